"""Per-edge matrix products: ``torch.bmm`` eagerly, unrolled broadcast products when traced for a
package; the dense (``L >= 2``) rotations traced that way hold no batched matmul and give the
eager values and derivatives (float64)."""

from __future__ import annotations

import torch
from test_row_combination import rotation_operands
from torch.fx.experimental.proxy_tensor import make_fx

from sezm.geometry.rotate import EdgeRotation
from sezm.kernels.edge_matmul import edge_matmul, tracing

F64 = torch.float64


def test_unrolled_product_equals_bmm() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 7, 9, generator=gen, dtype=F64)
    b = torch.randn(5, 9, 4, generator=gen, dtype=F64)
    traced = make_fx(edge_matmul)(a, b)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "bmm" in t], targets
    assert not tracing()
    torch.testing.assert_close(traced(a, b), torch.bmm(a, b))
    torch.testing.assert_close(edge_matmul(a, b), torch.bmm(a, b), rtol=0, atol=0)


def test_second_derivative_reaches_b_contiguous_and_exact() -> None:
    """A force loss differentiates the product's own gradient: the gradient that then reaches
    ``b`` is contiguous (without care it is the transpose of an ``(E, C, J)`` product), and
    both derivatives are those of ``torch.bmm`` (float64)."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 7, 9, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(6, 9, 5, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(6, 7, 5, generator=gen, dtype=F64)

    def second_derivative(product):
        layouts = []
        b = x * 2.0
        b.register_hook(lambda g: layouts.append(g.is_contiguous()))
        (ga,) = torch.autograd.grad((product(a, b) * w).sum(), a, create_graph=True)
        return torch.autograd.grad(ga.square().sum(), x), layouts

    got, layouts = second_derivative(edge_matmul)
    want, plain_layouts = second_derivative(torch.bmm)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert layouts == [True]
    assert plain_layouts == [False]  # what the identity is there for


def test_traced_dense_rotations_are_plain_products() -> None:
    """Gather + rotate with a folded mixer, and the rotate-back, as ``sezm freeze`` traces them
    (forward and the gradient a force needs): the products with the features element-wise, the
    eager values."""
    blocks, x, y = rotation_operands(2, 1, n_edges=7)
    plan = EdgeRotation(2, 1)
    assert not plan.sparse
    gen = torch.Generator().manual_seed(4)
    n_nodes, n_local = 4, y.shape[1]
    nodes = torch.randn(n_nodes, x.shape[1], x.shape[2], generator=gen, dtype=F64)
    nodes.requires_grad_()
    src = torch.randint(0, n_nodes, (x.shape[0],), generator=gen)
    mix = torch.randn(x.shape[0], n_local, n_local, generator=gen, dtype=F64)
    weight = torch.rand(x.shape[0], 1, generator=gen, dtype=F64)

    def grads(blocks, nodes, y):
        ops = plan.matrices(blocks)
        local = plan.gather_to_local(ops, nodes, src, mix)
        back = plan.to_global(ops, y, weight)
        loss = local.square().sum() + (back * back.flip(0)).sum()
        return torch.autograd.grad(loss, (blocks, nodes, y))

    traced = make_fx(grads)(blocks, nodes, y)
    products = [n.meta["val"].shape for n in traced.graph.nodes if "bmm" in str(n.target)]
    # only the mixer's fold into the matrices (and its gradient) stays a batched matmul
    assert products and all(shape[1:] in ((n_local, 9), (n_local, n_local)) for shape in products)
    for got, want in zip(traced(blocks, nodes, y), grads(blocks, nodes, y)):
        torch.testing.assert_close(got, want)


def test_compiled_dense_rotations_equal_eager() -> None:
    """Under ``torch.compile`` (``DP_COMPILE_INFER``) the same unrolled products and the GEMM-picked
    matrices, compiled by Inductor, give the eager rotations and gradients."""
    blocks, x, y = rotation_operands(2, 1, n_edges=7)
    plan = EdgeRotation(2, 1)
    weight = torch.rand(x.shape[0], 1, dtype=F64)

    def loss(blocks, x, y):
        ops = plan.matrices(blocks)
        return plan.to_local(ops, x).square().sum() + plan.to_global(ops, y, weight).sum()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    got, want = compiled(blocks, x, y), loss(blocks, x, y)
    torch.testing.assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (blocks, x, y)), torch.autograd.grad(want, (blocks, x, y))
    ):
        torch.testing.assert_close(a, b)
