"""The sparse row-combination node of the ``L <= 1`` rotations: the rotation's values, and first
and second derivatives (finite differences, float64) through its hand-written backward."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sezm.geometry.layout import SphericalLayout
from sezm.geometry.rotate import EdgeRotation
from sezm.geometry.wigner import WignerD

F64 = torch.float64


def rotation_operands(lmax: int, mmax: int, n_edges: int = 6, channels: int = 3):
    gen = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(n_edges, 4, generator=gen, dtype=F64), dim=1)
    blocks = WignerD(lmax, dtype=F64).blocks(q).requires_grad_()
    dim, local = SphericalLayout.of(lmax).dim, SphericalLayout.of(lmax, mmax).reduced_dim
    x = torch.randn(n_edges, dim, channels, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(n_edges, local, channels, generator=gen, dtype=F64, requires_grad=True)
    return blocks, x, y


@pytest.mark.parametrize("lmax, mmax", [(1, 1), (1, 0), (0, 0)])
def test_sparse_rotations_equal_the_dense_matrices(lmax: int, mmax: int) -> None:
    blocks, x, y = rotation_operands(lmax, mmax)
    sparse, dense = EdgeRotation(lmax, mmax), EdgeRotation(lmax, mmax)
    dense.sparse = False
    assert sparse.sparse
    weight = torch.rand(blocks.shape[0], 1, dtype=F64)
    torch.testing.assert_close(
        sparse.to_local(sparse.matrices(blocks), x), dense.to_local(dense.matrices(blocks), x)
    )
    torch.testing.assert_close(
        sparse.to_global(sparse.matrices(blocks), y, weight),
        dense.to_global(dense.matrices(blocks), y, weight),
    )


@pytest.mark.parametrize("direction", ["to_local", "to_global"])
def test_first_and_second_derivatives(direction: str) -> None:
    blocks, x, y = rotation_operands(1, 1)
    plan = EdgeRotation(1, 1)
    features = x if direction == "to_local" else y

    def fn(blocks, features):
        return getattr(plan, direction)(plan.matrices(blocks), features)

    assert torch.autograd.gradcheck(fn, (blocks, features))
    assert torch.autograd.gradgradcheck(fn, (blocks, features))


def test_traced_rotation_is_plain_operations() -> None:
    """Traced for a package (``make_fx``, as ``sezm freeze`` does), the rotation and its
    derivatives are element-wise products that Inductor fuses, not the eager node's small
    matmuls; same values as eager."""
    blocks, x, _ = rotation_operands(1, 1)
    plan = EdgeRotation(1, 1)

    def grads(blocks, x):
        y = plan.to_local(plan.matrices(blocks), x)
        return torch.autograd.grad(y.square().sum(), (blocks, x))

    traced = make_fx(grads)(blocks, x)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "bmm" in t or "mm." in t], targets
    for a, b in zip(traced(blocks, x), grads(blocks, x)):
        torch.testing.assert_close(a, b)
