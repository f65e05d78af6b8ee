"""Index-only gathers and scatter-sums: the values of ``index_select`` / ``index_add``, exact
first and second derivatives, and nothing but the index kept for either backward pass; the
gather + rotate node's own backward keeps no gathered edge rows either; ``table_rows`` (table
lookups by type) differentiates to the same sums on every run on several threads."""

from __future__ import annotations

import hashlib

import pytest
import torch
from saved_tensors import saved_elements

from sezm.geometry.layout import SphericalLayout
from sezm.kernels.gather_rotate import gather_rotate
from sezm.kernels.gather_scatter import gather_rows, scatter_rows, table_rows
from sezm.nn.activation import GatedActivation

F64 = torch.float64


def operands(dim: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 3, generator=gen, dtype=F64, requires_grad=True)
    index = torch.randint(0, x.shape[dim], (11,), generator=gen)
    return x, index


@pytest.mark.parametrize("dim", [0, 1])
def test_values_are_index_select_and_index_add(dim: int) -> None:
    x, index = operands(dim)
    assert torch.equal(gather_rows(x, index, dim), x.index_select(dim, index))
    values = x.index_select(dim, index)
    want = torch.zeros_like(x).index_add_(dim, index, values)
    assert torch.equal(scatter_rows(values, index, x.shape[dim], dim), want)


@pytest.mark.parametrize("dim", [0, 1])
def test_first_and_second_derivatives(dim: int) -> None:
    x, index = operands(dim)
    values = x.index_select(dim, index).detach().requires_grad_()
    size = x.shape[dim]
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index, dim), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, index, dim) ** 2, (x,))
    assert torch.autograd.gradcheck(lambda t: scatter_rows(t, index, size, dim), (values,))
    square = lambda t: scatter_rows(t, index, size, dim) ** 2  # noqa: E731
    assert torch.autograd.gradgradcheck(square, (values,))


def test_backward_graphs_keep_only_the_index() -> None:
    x, index = operands(0)
    values = x.index_select(0, index).detach().requires_grad_()
    assert saved_elements(lambda: torch.zeros_like(x).index_add(0, index, values)) > 0
    assert saved_elements(lambda: scatter_rows(values, index, 5)) == 0
    # a force loss differentiates this backward again, the incoming gradient included
    grad = torch.randn_like(values).requires_grad_()

    def backward(gather):
        return lambda: torch.autograd.grad(gather(x, index), x, grad, create_graph=True)

    assert saved_elements(backward(lambda t, i: t.index_select(0, i))) == grad.numel()
    assert saved_elements(backward(gather_rows)) == 0


def test_gather_rotate_backward_keeps_no_edge_rows() -> None:
    """With ``create_graph`` the backward keeps ``dL/dy``, the node features and the matrices,
    not the re-gathered ``(E, D, C)`` rows nor the per-edge ``R^T dL/dy``."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, 3, generator=gen, dtype=F64, requires_grad=True)
    src = torch.randint(0, 4, (40,), generator=gen)
    matrices = torch.randn(40, 7, 9, generator=gen, dtype=F64, requires_grad=True)
    grad = torch.randn(40, 7, 3, generator=gen, dtype=F64, requires_grad=True)
    y = gather_rotate(x, src, matrices)
    kept = saved_elements(lambda: torch.autograd.grad(y, (x, matrices), grad, create_graph=True))
    assert kept == grad.numel() + x.numel() + matrices.numel()


def test_third_derivative_path_of_gather_rotate() -> None:
    """The backward of the backward is itself differentiable (gradgradcheck of the grad node)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 2, generator=gen, dtype=F64, requires_grad=True)
    src = torch.randint(0, 3, (7,), generator=gen)
    matrices = torch.randn(7, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    grad = torch.randn(7, 3, 2, generator=gen, dtype=F64, requires_grad=True)

    def backward(g, x, m):
        y = gather_rotate(x, src, m)
        return torch.autograd.grad(y, (x, m), g, create_graph=True)

    assert torch.autograd.gradcheck(backward, (grad, x, matrices))


@pytest.mark.parametrize("n_focus", [1, 2])
def test_gated_blocks_match_the_joined_layout(n_focus: int) -> None:
    """Gating the ``|m|`` blocks apart equals gating the joined m-major rows."""
    lmax, mmax, c = 3, 2, 4
    act = GatedActivation(dtype=F64, lmax=lmax, mmax=mmax, channels=c, n_focus=n_focus, seed=0)
    rows = SphericalLayout.of(lmax, mmax).m_block_rows
    x = torch.randn(n_focus, 6, sum(rows), c, dtype=F64)  # (F, E, D_m, C) as the stack has it
    parts = tuple(b.permute(1, 2, 0, 3) for b in x.split(rows, dim=2))  # (E, rows_b, F, C)
    joined = act(x.permute(1, 2, 0, 3))
    assert torch.equal(torch.cat(act.blocks(parts), dim=1), joined)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_table_rows_is_indexing() -> None:
    table = torch.randn(5, 3, 2, dtype=torch.float64)
    index = torch.tensor([[0, -1], [4, 2], [-5, 3]])
    got = table_rows(table, index)
    assert got.shape == (3, 2, 3, 2)
    assert torch.equal(got, table[index])


def test_table_rows_gradient_is_the_same_on_every_run(two_threads) -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, 32, generator=gen, requires_grad=True)
    index = torch.randint(-3, 3, (200_000,), generator=gen)  # every row shared by ~70k entries
    upstream = torch.randn(200_000, 32, generator=gen)
    digests = set()
    for _ in range(10):
        (grad,) = torch.autograd.grad(table_rows(table, index), table, upstream)
        digests.add(hashlib.sha1(grad.numpy().tobytes()).hexdigest())
    assert len(digests) == 1
    want = torch.zeros(3, 32, dtype=torch.float64).index_add(0, index % 3, upstream.double())
    assert torch.allclose(grad.double(), want, rtol=1e-4, atol=1e-2)  # float32 sums of 70k
