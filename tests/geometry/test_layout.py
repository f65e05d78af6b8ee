"""The (l, m) layout owner: index maps against their definitions, and the buffers built from it
against DeePMD-kit's checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sezm.geometry import layout as layout_module
from sezm.geometry.layout import SphericalLayout, packed_index, so3_dim
from sezm.model.build import load_model
from sezm.nn.so2 import RadialDegreeMixer, SO2Linear

PARITY = Path(__file__).parents[1] / "data" / "parity"
SHAPES = [(0, 0), (1, 0), (1, 1), (2, 1), (3, 2), (4, 4), (6, 2)]


def test_one_object_per_shape() -> None:
    assert SphericalLayout.of(3, 1) is SphericalLayout.of(3, 1)
    assert SphericalLayout.of(3) is SphericalLayout.of(3, None)
    assert SphericalLayout.of(3) == SphericalLayout.of(3, 3)
    with pytest.raises(ValueError, match="0 <= mmax <= lmax"):
        SphericalLayout.of(2, 3)


def test_small_example() -> None:
    layout = SphericalLayout.of(2, 1)
    assert layout.reduced_rows == (0, 2, 6, 1, 5, 3, 7)
    assert layout.reduced_degrees == (0, 1, 2, 1, 2, 1, 2)
    assert layout.block_sizes == (3, 2)
    assert [(b.order, b.neg_start, b.pos_start, b.size) for b in layout.m_blocks] == [(1, 3, 5, 2)]
    assert layout.truncated_rows == (0, 1, 2, 3, 5, 6, 7)
    assert layout.wigner_offsets == (0, 1, 10, 35)


@pytest.mark.parametrize(("lmax", "mmax"), SHAPES)
def test_maps_follow_their_definitions(lmax: int, mmax: int) -> None:
    layout = SphericalLayout.of(lmax, mmax)
    lm = [(l, m) for l in range(lmax + 1) for m in range(-l, l + 1)]
    assert layout.dim == so3_dim(lmax) == len(lm)
    assert [packed_index(l, m) for l, m in lm] == list(range(layout.dim))
    assert layout.degrees == tuple(l for l, _ in lm)
    kept = [(l, m) for l, m in lm if abs(m) <= mmax]
    # m-major: a permutation of the kept rows, ordered by |m|, then sign (- first), then l
    rows = layout.reduced_rows
    assert sorted(rows) == list(layout.truncated_rows) == [packed_index(*k) for k in kept]
    order = [(abs(lm[p][1]), lm[p][1] > 0, lm[p][0]) for p in rows]
    assert order == sorted(order)
    sizes = layout.block_sizes
    assert layout.reduced_dim == sizes[0] + 2 * sum(sizes[1:]) == len(kept)
    for block in layout.m_blocks:
        neg = rows[block.neg_start : block.neg_start + block.size]
        pos = rows[block.pos_start : block.pos_start + block.size]
        assert [lm[p] for p in neg] == [(l, -block.order) for l in range(block.order, lmax + 1)]
        assert [lm[p] for p in pos] == [(l, block.order) for l in range(block.order, lmax + 1)]
    for gain, l in zip(layout.gains, layout.degrees):
        assert gain == (math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0)
    sizes = [(2 * l + 1) ** 2 for l in range(lmax + 1)]
    assert layout.wigner_offsets == tuple(sum(sizes[:l]) for l in range(lmax + 2))


def test_modules_get_their_own_index_buffers() -> None:
    """Loading a state dict writes into buffers in place: no two modules may share one."""
    a = SO2Linear(lmax=2, mmax=1, in_channels=2, out_channels=2, dtype=torch.float64)
    b = SO2Linear(lmax=2, mmax=1, in_channels=2, out_channels=2, dtype=torch.float64)
    assert a.neg_indices.data_ptr() != b.neg_indices.data_ptr()
    assert a.neg_indices.tolist() == [3, 4] and a.pos_indices.tolist() == [5, 6]


@pytest.mark.parametrize("case", ["mini", "schedule", "no_env_seed"])
def test_index_buffers_equal_deepmd_checkpoints(case: str) -> None:
    """SO(2) linears and degree mixers built from the layout hold DeePMD-kit's stored index maps
    (``load_model`` rejects a checkpoint whose constant buffers differ; this says which)."""
    model, ckpt = load_model(PARITY / case / "model.pt")
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, SO2Linear | RadialDegreeMixer):
            continue
        for key, buffer in module.named_buffers():
            stored = ckpt.state.get(f"{name}.{key}")
            if stored is not None:
                assert torch.equal(buffer, stored.to(buffer.dtype)), f"{name}.{key}"
                checked += 1
    assert checked > 0


def test_index_maps_read_inside_a_compiled_region_keep_one_graph() -> None:
    """A model built outside ``torch.compile`` and run inside it reads its layouts' index maps
    there for the first time: that must not break the graph (Python 3.11's ``cached_property``
    takes a lock on a first read, which Dynamo cannot enter)."""
    layout_module._LAYOUTS.pop((6, 5), None)
    fresh = SphericalLayout.of(6, 5)  # made outside the compiled region, never read

    def rows(x: torch.Tensor) -> torch.Tensor:
        maps = (fresh.m_block_rows, fresh.reduced_rows, fresh.gains, fresh.wigner_offsets)
        return x * sum(len(m) for m in maps)

    explained = torch._dynamo.explain(rows)(torch.ones(3))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
