"""``scatter_rewrite.rewrite_index_add``: the rewritten trace computes what the original did
(float64), forward and through the ``index_add`` that autograd makes of a gather's backward,
and only the ``index_add`` nodes it can express change."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sezm.infer.scatter_rewrite import ONE_HOT_MAX, rewrite_index_add

aten = torch.ops.aten


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


ROWS = torch.tensor([0, 0, 1, 2, 2, 2, 1])  # repeated rows: the backward must add them
R, C = 3, 4  # model widths: static in a trace, as the atom and edge counts are not


def scatter_and_gather(x, dst, src, weight):
    """Node features ``x (N, R, C)``: gather rows of degrees, gather edges, scatter back."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        rows = torch.tensor(ROWS.tolist())
        weight = weight.view(1, len(ROWS), C)
        wide = x.view(-1, R, C).index_select(1, rows) * weight  # (N, K, C): backward along dim 1
        edge = wide.index_select(0, src)  # (E, K, C): backward = index_add along dim 0
        node = torch.zeros_like(wide).index_add(0, dst, edge.sin(), alpha=0.5)  # (N, K, C)
        out = x.new_zeros(x.shape[0], 4).index_add_(0, torch.arange(x.shape[0]) % 4, x[:, 0])
        folded = node.new_zeros(node.shape[0], R, C).index_add_(1, rows, node)  # in place, dim 1
        energy = node.square().sum() + out.sum() + folded.cos().sum()
        (grad,) = torch.autograd.grad(energy, x)
    return node, out, folded, grad


@pytest.mark.parametrize("seed", [0, 1])
def test_rewritten_trace_equals_original(seed):
    gen = torch.Generator().manual_seed(seed)
    n, e = 11, 40
    args = (
        torch.randn(n, R, C, generator=gen, dtype=torch.float64),
        torch.randint(0, n, (e,), generator=gen),
        torch.randint(0, n, (e,), generator=gen),
        torch.randn(len(ROWS) * C, generator=gen, dtype=torch.float64),
    )
    gm = make_fx(scatter_and_gather, tracing_mode="symbolic")(*args)
    before = targets(gm)
    assert aten.index_add.default in before and aten.index_add_.default in before
    expected = scatter_and_gather(*args)
    replaced = rewrite_index_add(gm)
    after = targets(gm)
    assert replaced == before.count(aten.index_add.default) + before.count(aten.index_add_.default)
    assert aten.index_add.default not in after and aten.index_add_.default not in after
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the graph still runs with other sizes (symbolic atom and edge counts)
    args2 = (torch.randn(5, R, C, dtype=torch.float64), args[1][:9] % 5, args[2][:9] % 5, args[3])
    for got, want in zip(gm(*args2), scatter_and_gather(*args2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_long_inner_index_is_kept():
    """An inner-dim ``index_add`` whose one-hot would be large stays as it is."""
    m = ONE_HOT_MAX  # index of length 2 into m rows: 2 m > ONE_HOT_MAX

    def fn(x, idx, v):
        return x.index_add(1, idx, v)

    args = (torch.zeros(3, m), torch.tensor([0, m - 1]), torch.ones(3, 2))
    gm = make_fx(fn)(*args)
    assert rewrite_index_add(gm) == 0
    assert aten.index_add.default in targets(gm)
    torch.testing.assert_close(gm(*args), fn(*args))
