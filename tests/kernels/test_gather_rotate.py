"""The gather + rotate autograd node: same values and gradients (first and second order) as
``bmm(R, x[src])``, less saved for the backward pass, and a training step unchanged."""

from __future__ import annotations

import pytest
import torch
from model_zoo import make_model
from physics import graph_of, random_crystal
from saved_tensors import saved_elements

from sezm.geometry import rotate
from sezm.geometry.rotate import EdgeRotation
from sezm.kernels.gather_rotate import gather_rotate

F64 = torch.float64


def operands(n_nodes: int = 5, n_edges: int = 13, rows: int = 4, dim: int = 9, channels: int = 3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_nodes, dim, channels, generator=gen, dtype=F64, requires_grad=True)
    src = torch.randint(0, n_nodes, (n_edges,), generator=gen)
    matrices = torch.randn(n_edges, rows, dim, generator=gen, dtype=F64, requires_grad=True)
    return x, src, matrices


def test_values_match_gather_then_matmul() -> None:
    x, src, matrices = operands()
    assert torch.equal(gather_rotate(x, src, matrices), torch.bmm(matrices, x[src]))


def test_first_and_second_derivatives() -> None:
    x, src, matrices = operands()

    def fn(x, matrices):
        return gather_rotate(x, src, matrices)

    assert torch.autograd.gradcheck(fn, (x, matrices))
    assert torch.autograd.gradgradcheck(fn, (x, matrices))


def test_keeps_node_features_not_edge_rows() -> None:
    x, src, matrices = operands(n_nodes=4, n_edges=40)
    plain = saved_elements(lambda x, m: torch.bmm(m, x.index_select(0, src)), x, matrices)
    fused = saved_elements(lambda x, m: gather_rotate(x, src, m), x, matrices)
    assert plain == matrices.numel() + 40 * x.shape[1] * x.shape[2]
    assert fused == matrices.numel() + x.numel()


def test_rejects_mismatched_rows() -> None:
    x, src, matrices = operands()
    with pytest.raises(ValueError, match="9 rows, the matrices 8 columns"):
        gather_rotate(x, src, matrices[:, :, :8])


def training_gradients(model, graph) -> list[torch.Tensor]:
    """Gradients of an energy + force + virial loss (the force loss needs the double backward)."""
    out = model(graph, virial=True, create_graph=True)
    loss = out["energy"].square().sum() + out["force"].square().sum() + out["virial"].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, params, allow_unused=True)]


def test_training_step_equals_plain_ops(monkeypatch) -> None:
    model = make_model({"mmax": 1}).train()
    graph = graph_of(model, [random_crystal(6, 2, seed=3)])
    calls = []

    def counted(x, src, matrices):
        calls.append(src.shape[0])
        return gather_rotate(x, src, matrices)

    monkeypatch.setattr(rotate, "gather_rotate", counted)
    fused = training_gradients(model, graph)
    assert calls, "the model never took the gather + rotate path"

    def plain_ops(self, ops, x, index, mix=None):
        local = self.to_local(ops, x.index_select(0, index))
        return local if mix is None else torch.bmm(mix, local)

    monkeypatch.setattr(EdgeRotation, "gather_to_local", plain_ops)
    plain = training_gradients(model, graph)
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autocast_products_in_lower_precision_gradients_in_input_dtypes() -> None:
    """Under bfloat16 autocast (``use_amp``) the forward product is bfloat16 and the backward
    passes, run outside autocast as autograd runs them, must not mix it with the float32
    inputs: first and second derivatives come back in float32, close to the float32 ones."""
    x, src, matrices = operands(n_nodes=6, n_edges=30)
    x32 = x.detach().float().requires_grad_()
    m32 = matrices.detach().float().requires_grad_()
    a = torch.randn(6, 9, 3, dtype=torch.float32)

    def derivatives(autocast: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = gather_rotate(x32, src, m32)
        gx, gm = torch.autograd.grad(y.float().square().sum(), (x32, m32), create_graph=True)
        second = torch.autograd.grad((gx * a).sum() + gm.square().sum(), (x32, m32))
        return [y, gx, gm, *second]

    low, full = derivatives(True), derivatives(False)
    assert low[0].dtype == torch.bfloat16
    for got, want in zip(low[1:], full[1:]):
        assert got.dtype == torch.float32
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.05 * scale
