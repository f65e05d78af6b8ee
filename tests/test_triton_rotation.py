"""Triton edge-frame rotations (``DP_TRITON_INFER``) against the PyTorch path, without a GPU.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here for this module only)
on small sizes, in float32 and float64, forward and backward (the force pass), with and without
the per-edge weight, the gather of node features and the scatter onto destinations. Needs the
``triton`` package (about 1 GB installed, so not in the ``test`` extra): ``pip install triton``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)
# Triton decides at import whether its functions run interpreted; so this is set first.
_TRITON_IMPORTED_BEFORE = "triton" in sys.modules
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sezm.geometry.edge_frame import edge_quaternion  # noqa: E402
from sezm.geometry.layout import so3_dim  # noqa: E402
from sezm.geometry.rotate import EdgeRotation, FusedOperands  # noqa: E402
from sezm.geometry.wigner import WignerD  # noqa: E402
from sezm.kernels import fused_rotation  # noqa: E402

TINY = Path(__file__).parent / "data" / "parity" / "tiny"
CASES = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 0)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.fixture(scope="module")
def kernels():
    """The kernel module (interpreted on a machine without CUDA)."""
    if _TRITON_IMPORTED_BEFORE and _INTERPRET_BEFORE != "1" and not torch.cuda.is_available():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run this file alone")
    from sezm.kernels import rotation_triton

    yield rotation_triton
    if _INTERPRET_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


def operands(lmax: int, dtype: torch.dtype, n_edges: int = 37, seed: int = 0):
    """Flat Wigner blocks of random edges (leaf, with gradient) and a generator."""
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(n_edges, 3, dtype=dtype, generator=gen)
    blocks = WignerD(lmax, dtype).blocks(edge_quaternion(vec, 1e-8)).detach()
    return blocks.requires_grad_(), gen


def grads(out: torch.Tensor, inputs: tuple, probe: torch.Tensor) -> tuple:
    return torch.autograd.grad((out * probe).sum(), inputs)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    scale = 1.0 + float(b.detach().abs().max())
    assert float((a - b).detach().abs().max()) <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lmax", "mmax"), CASES)
def test_to_local_matches_dense(kernels, lmax, mmax, dtype):
    blocks, gen = operands(lmax, dtype)
    rotation = EdgeRotation(lmax, mmax)
    x = torch.randn(blocks.shape[0], so3_dim(lmax) + 3, 40, dtype=dtype, generator=gen)
    x.requires_grad_()  # extra rows beyond lmax: ignored, zero gradient
    dense = rotation.to_local(rotation.matrices(blocks), x)
    fused = kernels.to_local(blocks, x[:, : so3_dim(lmax)], lmax, mmax)
    assert fused.shape == dense.shape
    assert_close(fused, dense, dtype)
    probe = torch.randn(dense.shape, dtype=dtype, generator=gen)
    for a, b in zip(grads(fused, (blocks, x), probe), grads(dense, (blocks, x), probe)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lmax", "mmax"), CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_to_global_matches_dense(kernels, lmax, mmax, dtype, weighted):
    blocks, gen = operands(lmax, dtype)
    rotation = EdgeRotation(lmax, mmax)
    n_local = len(rotation.rows)
    y = torch.randn(blocks.shape[0], n_local, 33, dtype=dtype, generator=gen).requires_grad_()
    w = torch.rand(blocks.shape[0], 1, dtype=dtype, generator=gen).requires_grad_()
    weight = w if weighted else None
    dense = rotation.to_global(rotation.matrices(blocks), y, weight)
    fused = kernels.to_global(blocks, y, lmax, mmax, weight)
    assert_close(fused, dense, dtype)
    probe = torch.randn(dense.shape, dtype=dtype, generator=gen)
    inputs = (blocks, y, w) if weighted else (blocks, y)
    for a, b in zip(grads(fused, inputs, probe), grads(dense, inputs, probe)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_and_scatter_match_index_ops(kernels, dtype):
    """Fused gather of node features and scatter-add onto destinations, both differentiated."""
    lmax, mmax, n_nodes = 3, 2, 9
    blocks, gen = operands(lmax, dtype, n_edges=50)
    src = torch.randint(0, n_nodes, (50,), generator=gen)
    dst = torch.randint(0, n_nodes, (50,), generator=gen)
    rotation = EdgeRotation(lmax, mmax)
    ops = rotation.matrices(blocks)
    nodes = torch.randn(n_nodes, so3_dim(lmax), 24, dtype=dtype, generator=gen).requires_grad_()
    w = torch.rand(50, 1, dtype=dtype, generator=gen).requires_grad_()

    local = rotation.to_local(ops, nodes.index_select(0, src))
    dense = torch.zeros_like(nodes).index_add(0, dst, rotation.to_global(ops, local, w))
    local_f = kernels.to_local(blocks, nodes, lmax, mmax, index=src)
    fused = kernels.to_global(blocks, local_f, lmax, mmax, w, index=dst, n_out=n_nodes)
    assert_close(local_f, local, dtype)
    assert_close(fused, dense, dtype)
    probe = torch.randn(dense.shape, dtype=dtype, generator=gen)
    inputs = (blocks, nodes, w)
    for a, b in zip(grads(fused, inputs, probe), grads(dense, inputs, probe)):
        assert_close(a, b, dtype)


def test_scatter_needs_destination_count(kernels):
    blocks, _ = operands(1, torch.float64, n_edges=4)
    y = torch.zeros(4, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs n_out"):
        kernels.to_global(blocks, y, 1, 1, index=torch.zeros(4, dtype=torch.long))


def test_dispatch_only_inside_the_switch(kernels):
    """EdgeRotation hands the fused path the raw blocks only inside ``fused_rotation``."""
    blocks, _ = operands(2, torch.float32, n_edges=5)
    rotation = EdgeRotation(2, 1)
    assert not isinstance(rotation.matrices(blocks), FusedOperands)
    with fused_rotation():
        assert isinstance(rotation.matrices(blocks), FusedOperands)
    with fused_rotation(False):
        assert not isinstance(rotation.matrices(blocks), FusedOperands)


def test_settings_switch_the_kernels_on_for_cuda_only(kernels):
    """``DP_TRITON_INFER`` acts through the evaluation context, on CUDA devices only."""
    from sezm.infer.settings import InferenceSettings

    blocks, _ = operands(2, torch.float32, n_edges=5)
    rotation = EdgeRotation(2, 1)
    with InferenceSettings(triton=1).evaluation(torch.device("cuda")):
        assert isinstance(rotation.matrices(blocks), FusedOperands)  # interpreter: CPU tensors
    with InferenceSettings(triton=1).evaluation(torch.device("cpu")):
        assert not isinstance(rotation.matrices(blocks), FusedOperands)
    with InferenceSettings(triton=0).evaluation(torch.device("cuda")):
        assert not isinstance(rotation.matrices(blocks), FusedOperands)


def test_model_energy_and_forces_match_dense(kernels, monkeypatch):
    """The tiny parity model on its 6-atom frame: fused rotations give the dense numbers."""
    import sezm

    calls = []
    for name in ("to_local", "to_global"):
        original = getattr(kernels, name)
        counted = lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(kernels, name, counted)
    data = np.load(TINY / "expected.npz")
    coord, box, atype = (data[f"small_cell/{k}"] for k in ("coord", "box", "atype"))
    dp = sezm.DeepPot(TINY / "model.pt", device="cpu")
    e_ref, f_ref, v_ref = dp.eval(coord[None], box[None], atype)
    assert not calls
    with fused_rotation():
        e, f, v = dp.eval(coord[None], box[None], atype)
    assert "to_local" in calls and "to_global" in calls
    assert abs(float(e[0, 0] - e_ref[0, 0])) <= 1e-5 * len(atype)
    assert np.abs(f - f_ref).max() <= 1e-5 + 1e-4 * np.abs(f_ref).max()
    assert np.abs(v - v_ref).max() <= 1e-5 * len(atype) + 1e-4 * np.abs(v_ref).max()
