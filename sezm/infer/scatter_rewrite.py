"""Rewrite of ``index_add`` in a traced force graph, so the compiled CPU package scatters fast.

A frozen package is compiled with deterministic algorithms on (``freeze.compile_package``: it
keeps Inductor from miscompiling the scatters of the force pass). Inductor then lowers every
``index_add`` to ATen's accumulating ``index_put_``, whose CPU kernel indexes element by
element: on the 192-atom water frame it took about a quarter of the tiny model's package time.
Before export, ``rewrite_index_add`` replaces each ``index_add`` / ``index_add_`` of the traced
graph by an equal computation that Inductor compiles well:

* along dim 0 (the atom and edge axes: the scatter of edge terms onto atoms), a
  ``scatter_add`` with the index expanded over the trailing dims (stride 0), which Inductor
  still hands to ATen (deterministic mode), where it takes the sorted, vectorised
  expanded-index path;
* along an inner dim with a short index into a short axis (the backward of a gather of
  degree or channel rows, e.g. ``x.index_select(1, rows)``), a one-hot contraction that
  Inductor fuses with its neighbours into one loop.

The sums are the same up to float rounding (each output element adds the same terms).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

ONE_HOT_MAX = 4096  # index length x target size up to which an inner-dim add is a contraction


def _spread(index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The row index ``(k,)`` broadcast to the shape of ``source (k, ...)`` (stride 0)."""
    return index.view(-1, *([1] * (source.dim() - 1))).expand(source.shape)


def add_rows(x: torch.Tensor, index: torch.Tensor, source: torch.Tensor, alpha=1) -> torch.Tensor:
    """``x.index_add(0, index, source, alpha=alpha)`` as a ``scatter_add``."""
    source = source * alpha if alpha != 1 else source
    return x.scatter_add(0, _spread(index, source), source.to(x.dtype))


def add_rows_(x: torch.Tensor, index: torch.Tensor, source: torch.Tensor, alpha=1) -> torch.Tensor:
    """In-place ``add_rows`` (``x.index_add_(0, ...)``)."""
    source = source * alpha if alpha != 1 else source
    return x.scatter_add_(0, _spread(index, source), source.to(x.dtype))


def add_inner(
    x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, alpha=1
) -> torch.Tensor:
    """``x.index_add(dim, index, source)`` for a short ``index (k,)`` into a short axis ``m``:
    ``x + sum_k source[.., k, ..] * onehot[k, j]``, one fused loop."""
    source = source * alpha if alpha != 1 else source
    m = x.shape[dim]
    onehot = (index.view(-1, 1) == torch.arange(m, device=index.device)).to(source.dtype)  # (k, m)
    trailing = [1] * (source.dim() - dim - 1)
    spread = source.unsqueeze(dim + 1) * onehot.view(-1, m, *trailing)  # (.., k, m, ..)
    return x + spread.sum(dim).to(x.dtype)


def add_inner_(
    x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, alpha=1
) -> torch.Tensor:
    """In-place ``add_inner`` (``x.index_add_(dim, ...)``)."""
    return x.copy_(add_inner(x, dim, index, source, alpha))


def _static_int(value) -> int | None:
    return value if isinstance(value, int) else None


def _replacement(node: fx.Node):
    """The function that replaces an ``index_add`` node, and its arguments; None to keep it."""
    inplace = node.target is aten.index_add_.default
    x, dim, index, source = node.args[:4]
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    x_val, index_val = x.meta.get("val"), index.meta.get("val")
    if x_val is None or index_val is None:
        return None
    dim = dim % x_val.dim() if x_val.dim() else 0
    if dim == 0:
        return (add_rows_ if inplace else add_rows), (x, index, source, alpha)
    k, m = _static_int(index_val.numel()), _static_int(x_val.shape[dim])
    if k is None or m is None or k * m > ONE_HOT_MAX:
        return None
    return (add_inner_ if inplace else add_inner), (x, dim, index, source, alpha)


def rewrite_index_add(graph_module: fx.GraphModule) -> int:
    """Replace the ``index_add`` nodes of ``graph_module`` (a ``make_fx`` trace) in place;
    returns how many were replaced. The new nodes call the functions above, which a later
    ``torch.export`` of the module traces into ATen ops."""
    count = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in (
            aten.index_add.default,
            aten.index_add_.default,
        ):
            continue
        found = _replacement(node)
        if found is None:
            continue
        fn, args = found
        with graph_module.graph.inserting_before(node):
            new = graph_module.graph.call_function(fn, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph_module.graph.erase_node(node)
        count += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return count
