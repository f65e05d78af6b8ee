"""Same start: a model section and its seeds give DeePMD-kit 3.2's initial weights exactly.

``data/init/init_states.npz`` (``module_fixtures/make_init_states.py``, run with DeePMD-kit
3.2 on torch 2.11) holds, for every parity input and the shared example recipes, a digest of
each initial state tensor: 32 of its values, its sum and its sum of squares. Equal values mean
the same initialisers, the same order of random draws and the same per-layer child seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.compat.deepmd import to_deepmd_state
from sezm.config.normalize import normalize_model
from sezm.model.build import build_model
from sezm.nn.common import child_seed, fold_seed, make_generator

FIXTURE = Path(__file__).parents[1] / "data" / "init" / "init_states.npz"
STATES = np.load(FIXTURE)
CASES = sorted({k.split("/")[0] for k in STATES.files})


def digest(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
    flat = t.detach().reshape(-1).double()
    head = flat[:16].numpy()
    spread = flat[:: max(1, flat.numel() // 16)][:16].numpy()
    return head, spread, flat.sum().item(), flat.square().sum().item()


def test_fixture_covers_the_options() -> None:
    assert len(CASES) >= 29
    assert {"tiny", "mini", "property", "dens", "spin_native", "lmp_recipe"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_initial_weights_match_deepmd(case: str) -> None:
    config = json.loads(str(STATES[f"{case}/config"]))
    model = build_model(normalize_model(config), dens=bool(STATES[f"{case}/dens"]))
    state = {
        k.removeprefix("model.Default."): v for k, v in to_deepmd_state(model.state_dict()).items()
    }
    keys = json.loads(str(STATES[f"{case}/keys"]))
    wrong = []
    for (key, shape), row in zip(keys, STATES[f"{case}/digest"], strict=True):
        assert key in state, f"{case}: no tensor {key}"
        tensor = state[key]
        assert list(tensor.shape) == shape, f"{case}: {key} has shape {tuple(tensor.shape)}"
        head, spread, total, squares = digest(tensor)
        # the same draws; the CPU's vector kernels (AVX2 where the fixtures were made, AVX-512)
        # round erfinv differently: measured up to 2.4e-7 of the tensor's rms
        atol = 1e-6 * np.sqrt(row[33] / max(1, tensor.numel()))
        same = (
            np.allclose(head, row[: head.size], rtol=0, atol=atol)
            and np.allclose(spread, row[16 : 16 + spread.size], rtol=0, atol=atol)
            and abs(total - row[32]) <= 1e-9 * (1 + abs(row[32])) + 1e-6 * np.sqrt(row[33])
            and abs(squares - row[33]) <= 1e-7 * (1 + row[33])
        )
        if not same:
            wrong.append(key)
    assert not wrong, f"{case}: {len(wrong)} tensors differ from DeePMD-kit's start: {wrong[:5]}"


def test_seed_words_and_folding() -> None:
    # DeePMD-kit's child seeds put the index in front; the fold is NumPy's SeedSequence hash.
    assert child_seed(7, 3) == [3, 7]
    assert child_seed(child_seed(7, 1), 0) == [0, 1, 7]
    assert child_seed(None, 3) is None
    assert fold_seed([3, 7]) != fold_seed([7, 3])
    assert 0 <= fold_seed([2**40, 5]) < 2**64
    a = torch.randn(4, generator=make_generator([0, 1, 7]))
    b = torch.randn(4, generator=make_generator([0, 1, 7]))
    assert torch.equal(a, b)
