"""Triton edge-frame rotations (``DP_TRITON_INFER``) against the PyTorch path, without a GPU.

The kernels run in Triton's interpreter on small sizes, in float32 and float64, forward and
backward (the force pass), with and without the per-edge weight, the gather of node features
and the scatter onto destinations; they are custom operators (``sezm::edge_rotation_*``) that
``torch.export`` keeps as graph nodes. Needs the ``triton`` package (the ``test`` extra on
Linux x86_64); skipped, saying so, without it.

CPU tensors always run the interpreted kernels, which need Triton imported in interpreter mode
(``TRITON_INTERPRET=1`` before the first import: ``tests/conftest.py`` sees to it on machines
without CUDA); the fused path takes CPU tensors only while the variable is on, which the module
fixture makes sure of and restores afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.geometry.edge_frame import edge_quaternion
from sezm.geometry.layout import so3_dim
from sezm.geometry.rotate import EdgeRotation, FusedOperands
from sezm.geometry.wigner import WignerD
from sezm.kernels import fused_rotation

if importlib.util.find_spec("triton") is None:
    pytest.skip(
        'triton is not installed (pip install "sezm[test]" on Linux x86_64, or pip install triton)',
        allow_module_level=True,
    )

TINY = Path(__file__).parents[1] / "data" / "parity" / "tiny"
CASES = [(0, 0), (1, 1), (2, 1), (3, 2), (4, 0)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
KERNELS = "sezm.kernels.rotation_triton"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernel module; ``TRITON_INTERPRET=1`` (which lets the fused path take CPU tensors)
    for this module's tests only. CPU tensors run the interpreted kernels whatever the
    variable said when the module was first imported."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from sezm.kernels import rotation_triton

        yield rotation_triton
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


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


def test_custom_ops_give_the_direct_launch(kernels):
    """Eager calls through the ``sezm::edge_rotation_*`` operators run the same launches."""
    lmax, mmax, dtype = 3, 1, torch.float64
    blocks, gen = operands(lmax, dtype, n_edges=21)
    table, gain = kernels.plan_tensors(lmax, mmax, blocks.device)
    x = torch.randn(21, so3_dim(lmax), 6, dtype=dtype, generator=gen)
    y = torch.randn(21, kernels.plan_layout(lmax, mmax).local_dim, 6, dtype=dtype, generator=gen)
    w = torch.rand(21, dtype=dtype, generator=gen)
    plan = (table, gain, lmax, mmax)
    pairs = [
        (torch.ops.sezm.edge_rotation_to_local, kernels.launch_to_local, (blocks, x, *plan, None, True)),
        (torch.ops.sezm.edge_rotation_to_global, kernels.launch_to_global, (blocks, y, *plan, None, None, w, True)),
        (torch.ops.sezm.edge_rotation_block_grad, kernels.launch_block_grad, (blocks, y, x, *plan, None, w, True)),
    ]  # fmt: skip
    for op, launch, args in pairs:
        via_op, direct = op(*args), launch(*args)
        assert via_op.abs().max() > 0
        assert torch.equal(via_op, direct), op


class _RotateAndForce(torch.nn.Module):
    """A rotation round trip of node features and its gradient in the edge vectors, the shape
    of the force pass of a frozen model."""

    def forward(self, vec, nodes, src, dst, w):
        vec = vec.detach().requires_grad_(True)
        with torch.enable_grad():
            blocks = WignerD(3, vec.dtype).blocks(edge_quaternion(vec, 1e-8))
            local = rotation_kernels().to_local(blocks, nodes, 3, 2, index=src)
            out = rotation_kernels().to_global(
                blocks, local, 3, 2, w, index=dst, n_out=nodes.shape[0]
            )
            energy = out.square().sum()
            (grad,) = torch.autograd.grad(energy, vec)
        return energy.detach(), grad


def rotation_kernels():
    return sys.modules[KERNELS]


def force_inputs(n_nodes: int, n_edges: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(n_edges, 3, dtype=torch.float64, generator=gen)
    nodes = torch.randn(n_nodes, so3_dim(3), 5, dtype=torch.float64, generator=gen)
    src = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    dst = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    w = torch.rand(n_edges, 1, dtype=torch.float64, generator=gen)
    return vec, nodes, src, dst, w


def test_export_keeps_the_ops_as_nodes(kernels):
    """``torch.export`` traces the ops with fake tensors (their fake implementations) and keeps
    them, forward and backward, as single nodes that AOTInductor can compile on CUDA; the
    exported program computes what eager evaluation does."""
    from sezm.infer.freeze import _export

    Dim = torch.export.Dim
    nodes, edges = Dim("nodes", min=2), Dim("edges", min=2)
    shapes = ({0: edges}, {0: nodes}, {0: edges}, {0: edges}, {0: edges})
    program = _export(_RotateAndForce(), force_inputs(6, 17, seed=0), shapes)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {
        "sezm.edge_rotation_to_local.default",
        "sezm.edge_rotation_to_global.default",
        "sezm.edge_rotation_block_grad.default",
    } <= targets
    fakes = [n.meta["val"] for n in program.graph.nodes if "sezm" in str(n.target)]
    assert all(isinstance(v, torch._subclasses.FakeTensor) for v in fakes)
    inputs = force_inputs(9, 31, seed=1)  # other sizes: the atom and edge counts stay dynamic
    for got, ref in zip(program.module()(*inputs), _RotateAndForce()(*inputs)):
        assert_close(got, ref, torch.float64)


def test_fake_implementations_give_shapes_on_meta(kernels):
    """On the ``meta`` device (no values) the ops return the right shapes and dtypes."""
    blocks = torch.empty(11, 84, device="meta")  # lmax 3: 1 + 9 + 25 + 49 entries
    nodes = torch.empty(4, 16, 7, device="meta")
    index = torch.zeros(11, dtype=torch.long, device="meta")
    local = kernels.to_local(blocks, nodes, 3, 2, index=index)
    assert local.shape == (11, kernels.plan_layout(3, 2).local_dim, 7)
    out = kernels.to_global(blocks, local, 3, 2, index=index, n_out=4)
    assert out.shape == (4, 16, 7) and out.device.type == "meta"


def test_freeze_trace_embeds_the_ops(kernels):
    """``sezm freeze --device cuda`` with ``DP_TRITON_INFER``: the tiny model's graph contract
    traced with the fused rotations on holds the ops, forward and backward, and (run here in
    the interpreter) gives the eager energies, forces and virials."""
    from sezm.infer import freeze as fz

    model, _ = fz.load_energy_model(TINY / "model.pt")
    model = model.eval().requires_grad_(False)
    with fused_rotation():  # what freeze() enters on CUDA; the interpreter stands in here
        program = fz.export_lower(model)
    targets = {str(n.target) for n in program.graph.nodes}
    assert {
        "sezm.edge_rotation_to_local.default",
        "sezm.edge_rotation_to_global.default",
        "sezm.edge_rotation_block_grad.default",
    } <= targets
    frames = fz.sample_frames(2, (6,), seed=2)
    inputs = fz.lower_inputs(model, frames, seed=2)
    got = fz.outputs(program.module()(*inputs))
    fz.compare("traced", model, got, fz.eager_reference(model, frames, inputs))


def test_freeze_records_where_the_kernels_run(kernels):
    from sezm.infer import freeze as fz
    from sezm.infer.settings import InferenceSettings

    on_cuda = fz.captured_settings(InferenceSettings(triton=1), torch.device("cuda"))
    assert on_cuda["fused_kernels"].startswith("Triton") and on_cuda["exported_on"] == "cuda"
    on_cpu = fz.captured_settings(InferenceSettings(triton=1), torch.device("cpu"))
    assert on_cpu["fused_kernels"] == "none" and on_cpu["exported_on"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(fz.FreezeError, match="sees no CUDA device"):
            fz.freeze_device("cuda")
    with pytest.raises(fz.FreezeError, match="cpu or cuda"):
        fz.freeze_device("meta")
