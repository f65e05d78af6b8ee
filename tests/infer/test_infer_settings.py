"""Inference switches ``DP_*_INFER``: parsing, errors, read-once semantics, their effects.

The compiled path is checked against eager on the tiny checkpoint by an opt-in test (its first
evaluation compiles for about 2-3 minutes on one CPU core): ``SEZM_SLOW_TESTS=1 pytest ...``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import sezm
from sezm.infer.settings import InferenceSettings, parse_bool, parse_level

TINY = Path(__file__).parents[1] / "data" / "parity" / "tiny"
VARS = ("DP_COMPILE_INFER", "DP_TF32_INFER", "DP_TRITON_INFER", "DP_AMP_INFER")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def frame(name: str = "small_cell"):
    data = np.load(TINY / "expected.npz")
    return data[f"{name}/coord"][None], data[f"{name}/box"][None], data[f"{name}/atype"]


@pytest.mark.parametrize("raw", ["1", "true", "YES", " On ", "True"])
def test_bool_true(raw):
    assert parse_bool("DP_AMP_INFER", raw) is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "OFF", None, ""])
def test_bool_false(raw):
    assert parse_bool("DP_AMP_INFER", raw) is False


@pytest.mark.parametrize("raw", ["2", "y", "enable", "1.0", "truee"])
def test_bool_invalid_names_variable_and_value(raw):
    with pytest.raises(ValueError, match=f"DP_COMPILE_INFER={raw!r}"):
        parse_bool("DP_COMPILE_INFER", raw)


def test_levels():
    levels = (0, 1, 2)
    assert [parse_level("V", r, levels) for r in ("0", "1", "2", None, " 2 ")] == [0, 1, 2, 0, 2]
    assert [parse_level("V", r, levels) for r in ("off", "FALSE", "on", "yes")] == [0, 0, 1, 1]
    for raw in ("3", "-1", "high", "1.5"):
        with pytest.raises(ValueError, match=f"DP_TF32_INFER={raw!r}"):
            parse_level("DP_TF32_INFER", raw, levels)


def test_from_env():
    env = {"DP_COMPILE_INFER": "yes", "DP_TF32_INFER": "2", "DP_TRITON_INFER": "3"}
    s = InferenceSettings.from_env(env | {"DP_AMP_INFER": "on"})
    assert s == InferenceSettings(compile=True, tf32=2, triton=3, amp=True)
    assert s.matmul_precision == "medium"
    assert InferenceSettings.from_env({}) == InferenceSettings()
    with pytest.raises(ValueError, match="DP_TRITON_INFER='4'"):
        InferenceSettings.from_env({"DP_TRITON_INFER": "4"})


def test_messages_on_cpu():
    lines = InferenceSettings(tf32=1, triton=2, amp=True).describe(torch.device("cpu"))
    assert "matmul precision highest" in lines[0] and "AMP off" in lines[0]
    assert any("DP_TF32_INFER=1 has no effect on cpu" in line for line in lines)
    assert any("DP_AMP_INFER=1 has no effect on cpu" in line for line in lines)
    assert any("DP_TRITON_INFER=2" in line and "no effect on cpu" in line for line in lines)
    cuda = InferenceSettings(tf32=1, triton=1).describe(torch.device("cuda"))
    assert "matmul precision high," in cuda[0]
    assert "fused kernels Triton edge-frame rotations" in cuda[0] and len(cuda) == 1
    assert "fused kernels none" in InferenceSettings().describe(torch.device("cuda"))[0]


def test_tf32_context_only_on_cuda():
    before = torch.get_float32_matmul_precision()
    settings = InferenceSettings(tf32=2)
    with settings.evaluation(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with settings.evaluation(torch.device("cuda")):  # sets the global flag; no GPU needed
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == before


def test_triton_level_without_triton_is_a_clear_error(monkeypatch):
    import sezm.kernels

    monkeypatch.setattr(sezm.kernels, "triton_available", lambda: False)
    settings = InferenceSettings(triton=1)
    with (
        pytest.raises(RuntimeError, match=r"DP_TRITON_INFER.*pip install triton"),
        settings.evaluation(torch.device("cuda")),
    ):
        pass
    with InferenceSettings(triton=0).evaluation(torch.device("cuda")):  # off: nothing needed
        pass


def test_read_once_at_construction(monkeypatch, caplog):
    monkeypatch.setenv("DP_TF32_INFER", "1")
    monkeypatch.setenv("DP_TRITON_INFER", "on")
    with caplog.at_level(logging.INFO, logger="sezm"):
        dp = sezm.DeepPot(TINY / "model.pt", device="cpu")
    assert dp.settings == InferenceSettings(tf32=1, triton=1)
    assert "inference settings on cpu" in caplog.text
    assert "DP_TRITON_INFER=1" in caplog.text
    monkeypatch.setenv("DP_TF32_INFER", "bogus")  # read once: no effect any more
    dp.eval(*frame())
    assert dp.settings.tf32 == 1


def test_invalid_value_fails_at_construction(monkeypatch):
    monkeypatch.setenv("DP_AMP_INFER", "maybe")
    with pytest.raises(ValueError, match="DP_AMP_INFER='maybe'"):
        sezm.DeepPot(TINY / "model.pt")


def test_compile_wraps_energy_path(monkeypatch):
    """DP_COMPILE_INFER=1 puts the energy (+ force) path under torch.compile (lazily)."""
    monkeypatch.setenv("DP_COMPILE_INFER", "1")
    dp = sezm.DeepPot(TINY / "model.pt", device="cpu")
    assert dp.settings.compile
    assert "atomic_energy" in vars(dp.model)  # the compiled callable shadows the method
    monkeypatch.delenv("DP_COMPILE_INFER")
    eager = sezm.DeepPot(TINY / "model.pt", device="cpu")
    assert "atomic_energy" not in vars(eager.model)


def test_amp_on_cuda_is_an_error():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="DP_AMP_INFER=1"):
        InferenceSettings(amp=True).apply(model, torch.device("cuda"))
    InferenceSettings(amp=True).apply(model, torch.device("cpu"))  # no effect, logged


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="set SEZM_SLOW_TESTS=1")
def test_compiled_equals_eager(monkeypatch):
    eager = sezm.DeepPot(TINY / "model.pt", device="cpu")
    monkeypatch.setenv("DP_COMPILE_INFER", "1")
    compiled = sezm.DeepPot(TINY / "model.pt", device="cpu")
    for name in ("water_pbc_0", "small_cell", "water_pbc_1"):  # varying atom/edge counts
        e0, f0, v0 = eager.eval(*frame(name))
        e1, f1, v1 = compiled.eval(*frame(name))
        nat = f0.shape[1]
        assert abs(e1 - e0).item() / nat < 1e-6
        assert np.abs(f1 - f0).max() < 1e-5 * (1 + np.abs(f0).max())
        assert np.abs(v1 - v0).max() / nat < 1e-5 * (1 + np.abs(v0).max() / nat)
