"""Triton kernels for the edge-frame rotations of :mod:`sezm.geometry.rotate`, as custom ops.

The dense path builds ``(E, D_m, D)`` matrices from the flat Wigner block values and runs a
batched matmul; most of those entries are zeros off the degree blocks. These kernels read the
flat block values ``blocks (E, sum_l (2l+1)^2)`` directly and touch only non-zero entries:

* :func:`to_local`: ``y[e, r] = sum_k D_e[rows[r], k] x[s_e, k]`` over the ``2l+1`` columns of
  row ``r``'s degree (gather ``s_e = index[e]`` optional, m-truncation by the row list);
* :func:`to_global`: ``out[t_e, p] (+)= w_e g_l sum_r D_e[rows[r], p] y[e, r]`` over the kept
  rows of ``p``'s degree, with the truncation gain ``g_l``, an optional per-edge weight and an
  optional scatter-add onto destinations ``t_e = index[e]``.

Products accumulate in float32 (float64 for float64 inputs), whatever the storage dtype.

The three launchers are registered as custom operators with ``torch.library.triton_op``
(``sezm::edge_rotation_to_local``, ``sezm::edge_rotation_to_global``,
``sezm::edge_rotation_block_grad``), so that ``torch.export`` keeps them as single nodes and
AOTInductor embeds their Triton kernels in a CUDA ``.pt2``. Each op has a fake implementation
(shapes only, for tracing) and the first two an autograd formula: the two products are each
other's transposes, and the block-gradient op gives the gradient of the block values (it has
no derivative itself, so the rotations are differentiable once in the block values, which the
force pass needs).

Edge blocks of ``BLOCK_E`` edges times ``BLOCK_C`` channels form one program; the loops over
rows and their few columns run inside it, with index plans (:class:`PlanLayout`) read from one
small integer tensor, so that one compiled kernel serves every ``(lmax, mmax)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import _disable_current_modes

from ..geometry.layout import SphericalLayout, so3_dim

BLOCK_E = 32
BLOCK_C = 32


@dataclass(frozen=True)
class PlanLayout:
    """Index plans of one ``(lmax, mmax)``, as Python numbers.

    ``table`` concatenates, as int32: ``local rows (D_m, 3)`` (per local row: the flat index of
    its first block entry, its first packed column, its degree width ``2l+1``), at ``rows_at``;
    ``global pointers (D+1,)`` and ``global terms (T, 2)``, a CSR list per packed row ``p`` of
    the ``(local row, flat entry)`` pairs that sum into it, at ``ptr_at`` and ``terms_at``;
    ``gradient terms (T, 3)``, every non-zero ``(flat entry, local row, packed column)`` of the
    truncated matrix, at ``grad_at``. ``gain (D_m,)``: each local row's truncation gain.
    """

    lmax: int
    mmax: int
    local_dim: int
    n_terms: int
    rows_at: int
    ptr_at: int
    terms_at: int
    grad_at: int
    table: tuple[int, ...]
    gain: tuple[float, ...]

    @property
    def dim(self) -> int:
        return so3_dim(self.lmax)


@functools.cache
def plan_layout(lmax: int, mmax: int) -> PlanLayout:
    """The :class:`PlanLayout` of ``(lmax, mmax)`` (built once)."""
    layout = SphericalLayout.of(lmax, mmax)
    rows, degree, gain, entry = (
        layout.reduced_rows,
        layout.degrees,
        layout.gains,
        layout.wigner_entry,
    )
    local = [(entry(p, degree[p] ** 2), degree[p] ** 2, 2 * degree[p] + 1) for p in rows]
    ptr, terms, grad = [0], [], []
    for p in range(so3_dim(lmax)):
        for r, q in enumerate(rows):
            if degree[q] == degree[p]:
                terms.append((r, entry(q, p)))
                grad.append((entry(q, p), r, p))
        ptr.append(len(terms))
    parts = [[v for row in local for v in row], ptr, [v for t in terms for v in t]]
    parts.append([v for t in grad for v in t])
    starts = [sum(len(q) for q in parts[:i]) for i in range(4)]
    return PlanLayout(
        lmax=lmax,
        mmax=mmax,
        local_dim=len(rows),
        n_terms=len(terms),
        rows_at=starts[0],
        ptr_at=starts[1],
        terms_at=starts[2],
        grad_at=starts[3],
        table=tuple(v for part in parts for v in part),
        gain=tuple(gain[p] for p in rows),
    )


@functools.cache
def plan_tensors(lmax: int, mmax: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table int32, gain float64)`` of :func:`plan_layout` on ``device`` (built once).

    Always real tensors, also when first asked for while a model is traced (``torch.export``):
    the trace takes them as constants.
    """
    layout = plan_layout(lmax, mmax)
    with _disable_current_modes():
        table = torch.tensor(layout.table, dtype=torch.int32, device=device)
        gain = torch.tensor(layout.gain, dtype=torch.float64, device=device)
    return table, gain


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _to_local_kernel(
    blocks, x, index, gain, plan, out,
    n_edges, n_rows, n_chan, s_b, s_x0, s_x1, s_x2, rows_at,
    HAS_INDEX: tl.constexpr, HAS_GAIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    me = e < n_edges
    m2 = me[:, None] & (c < n_chan)[None, :]
    src = tl.load(index + e, mask=me, other=0).to(tl.int64) if HAS_INDEX else e
    x_row0 = x + src[:, None] * s_x0 + c[None, :] * s_x2  # [BE, BC] pointers to row 0
    b_row = blocks + e * s_b
    local_rows = plan + rows_at
    for r in range(n_rows):
        first = tl.load(local_rows + 3 * r)
        col = tl.load(local_rows + 3 * r + 1)
        width = tl.load(local_rows + 3 * r + 2)
        acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=ACC)
        for j in range(width):
            d = tl.load(b_row + first + j, mask=me, other=0).to(ACC)  # [BE]
            xv = tl.load(x_row0 + (col + j) * s_x1, mask=m2, other=0).to(ACC)  # [BE, BC]
            acc += d[:, None] * xv
        if HAS_GAIN:
            acc = acc * tl.load(gain + r).to(ACC)
        dst = out + (e[:, None] * n_rows + r) * n_chan + c[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _to_global_kernel(
    blocks, y, index, gain, edge_scale, plan, out,
    n_edges, n_local, n_packed, n_chan, s_b, ptr_at, terms_at,
    HAS_INDEX: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_EDGE_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    me = e < n_edges
    m2 = me[:, None] & (c < n_chan)[None, :]
    dst_row = tl.load(index + e, mask=me, other=0).to(tl.int64) if HAS_INDEX else e
    y_row0 = y + e[:, None] * n_local * n_chan + c[None, :]
    b_row = blocks + e * s_b
    w = tl.load(edge_scale + e, mask=me, other=0).to(ACC) if HAS_EDGE_SCALE else 1.0
    ptr = plan + ptr_at
    terms = plan + terms_at
    for p in range(n_packed):
        start = tl.load(ptr + p)
        stop = tl.load(ptr + p + 1)
        acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=ACC)
        for t in range(start, stop):
            r = tl.load(terms + 2 * t)
            d = tl.load(b_row + tl.load(terms + 2 * t + 1), mask=me, other=0).to(ACC)
            yv = tl.load(y_row0 + r * n_chan, mask=m2, other=0).to(ACC)
            acc += d[:, None] * yv
        if HAS_GAIN:  # every term of a packed row has its degree: the gain of the first
            acc = acc * tl.load(gain + tl.load(terms + 2 * start)).to(ACC)
        if HAS_EDGE_SCALE:
            acc = acc * w[:, None]
        dst = out + (dst_row[:, None] * n_packed + p) * n_chan + c[None, :]
        if HAS_INDEX:
            tl.atomic_add(dst, acc.to(out.dtype.element_ty), mask=m2)
        else:
            tl.store(dst, acc.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _block_grad_kernel(
    a, x, index, gain, edge_scale, plan, out,
    n_edges, n_terms, n_local, n_chan, s_x0, s_x1, s_x2, s_o, grad_at,
    HAS_INDEX: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_EDGE_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``out[e, entry] = s_r w_e sum_c a[e, r, c] x[i_e, p, c]`` for each ``(entry, r, p)``."""
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    me = e < n_edges
    row = tl.load(index + e, mask=me, other=0).to(tl.int64) if HAS_INDEX else e
    w = tl.load(edge_scale + e, mask=me, other=0).to(ACC) if HAS_EDGE_SCALE else 1.0
    terms = plan + grad_at
    for t in range(n_terms):
        entry = tl.load(terms + 3 * t)
        r = tl.load(terms + 3 * t + 1)
        p = tl.load(terms + 3 * t + 2)
        total = tl.zeros((BLOCK_E,), dtype=ACC)
        for c0 in range(0, n_chan, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m2 = me[:, None] & (c < n_chan)[None, :]
            av = tl.load(a + (e[:, None] * n_local + r) * n_chan + c[None, :], mask=m2, other=0)
            xv = tl.load(x + row[:, None] * s_x0 + p * s_x1 + c[None, :] * s_x2, mask=m2, other=0)
            total += tl.sum(av.to(ACC) * xv.to(ACC), axis=1)
        if HAS_GAIN:
            total = total * tl.load(gain + r).to(ACC)
        if HAS_EDGE_SCALE:
            total = total * w
        tl.store(out + e * s_o + entry, total.to(out.dtype.element_ty), mask=me)


# --- launchers (the bodies of the custom ops) ---------------------------------------------
@functools.cache
def _interpreted(kernel):
    """``kernel`` for Triton's interpreter (numpy on the host), whatever ``TRITON_INTERPRET``
    said when the module was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


def _kernel_for(kernel, tensor: torch.Tensor):
    """The launchable ``kernel`` for ``tensor``'s device: interpreted for CPU tensors (how the
    kernels are tested without a GPU; called directly, as ``wrap_triton`` before torch 2.13
    refuses interpreted kernels), compiled and wrapped for ``torch.export`` on CUDA."""
    if tensor.device.type == "cpu":
        return _interpreted(kernel)
    return wrap_triton(kernel)


def _grid(n_edges, n_chan: int | None = None) -> tuple:
    if n_chan is None:
        return (triton.cdiv(n_edges, BLOCK_E),)
    return (triton.cdiv(n_edges, BLOCK_E), triton.cdiv(n_chan, BLOCK_C))


def launch_to_local(
    blocks: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    gain: torch.Tensor,
    lmax: int,
    mmax: int,
    index: torch.Tensor | None,
    use_gain: bool,
) -> torch.Tensor:
    """``(E, D_m, C)`` local rows of ``x`` (``(E or N, >= D, C)``, any strides), gathered by
    ``index`` when given; ``use_gain``: each row times its truncation gain."""
    layout = plan_layout(lmax, mmax)
    n_edges, n_chan = blocks.shape[0], x.shape[2]
    out = x.new_empty(n_edges, layout.local_dim, n_chan)
    kernel = _kernel_for(_to_local_kernel, x)
    kernel[_grid(n_edges, n_chan)](
        blocks, x, table if index is None else index, gain, table, out,
        n_edges, layout.local_dim, n_chan, blocks.stride(0), x.stride(0), x.stride(1),
        x.stride(2), layout.rows_at,
        HAS_INDEX=index is not None, HAS_GAIN=use_gain,
        ACC=_acc_type(x.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


def launch_to_global(
    blocks: torch.Tensor,
    y: torch.Tensor,
    table: torch.Tensor,
    gain: torch.Tensor,
    lmax: int,
    mmax: int,
    index: torch.Tensor | None,
    n_out: int | None,
    weight: torch.Tensor | None,
    use_gain: bool,
) -> torch.Tensor:
    """``(E, D, C)`` packed rows from local ``y (E, D_m, C)``, or ``(n_out, D, C)`` summed
    over edges into ``index``; times ``weight (E,)`` if given; ``use_gain``: times the
    truncation gain (else the plain transpose of :func:`launch_to_local`)."""
    layout = plan_layout(lmax, mmax)
    y = y.contiguous()
    n_edges, n_chan = blocks.shape[0], y.shape[2]
    if index is None:
        out = y.new_empty(n_edges, layout.dim, n_chan)
    else:
        out = y.new_zeros(n_out, layout.dim, n_chan)
    kernel = _kernel_for(_to_global_kernel, y)
    kernel[_grid(n_edges, n_chan)](
        blocks, y, table if index is None else index, gain, y if weight is None else weight,
        table, out,
        n_edges, layout.local_dim, layout.dim, n_chan, blocks.stride(0), layout.ptr_at,
        layout.terms_at,
        HAS_INDEX=index is not None, HAS_GAIN=use_gain, HAS_EDGE_SCALE=weight is not None,
        ACC=_acc_type(y.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


def launch_block_grad(
    blocks: torch.Tensor,
    a: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    gain: torch.Tensor,
    lmax: int,
    mmax: int,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    use_gain: bool,
) -> torch.Tensor:
    """Gradient of the flat block values ``(E, nnz)`` from local ``a (E, D_m, C)`` and packed
    ``x (E or N, >= D, C)``; entries outside the kept rows (and degrees > lmax) stay zero."""
    layout = plan_layout(lmax, mmax)
    a = a.contiguous()
    out = blocks.new_zeros(blocks.shape)
    kernel = _kernel_for(_block_grad_kernel, a)
    kernel[_grid(blocks.shape[0])](
        a, x, table if index is None else index, gain, a if weight is None else weight, table,
        out,
        blocks.shape[0], layout.n_terms, layout.local_dim, a.shape[2], x.stride(0),
        x.stride(1), x.stride(2), out.stride(0), layout.grad_at,
        HAS_INDEX=index is not None, HAS_GAIN=use_gain, HAS_EDGE_SCALE=weight is not None,
        ACC=_acc_type(a.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


# --- custom ops: fake implementations and autograd -----------------------------------------
local_op = triton_op("sezm::edge_rotation_to_local", mutates_args=())(launch_to_local)
global_op = triton_op("sezm::edge_rotation_to_global", mutates_args=())(launch_to_global)
block_grad_op = triton_op("sezm::edge_rotation_block_grad", mutates_args=())(launch_block_grad)


@local_op.register_fake
def _(blocks, x, table, gain, lmax, mmax, index, use_gain):
    return x.new_empty(blocks.shape[0], plan_layout(lmax, mmax).local_dim, x.shape[2])


@global_op.register_fake
def _(blocks, y, table, gain, lmax, mmax, index, n_out, weight, use_gain):
    rows = blocks.shape[0] if index is None else n_out
    return y.new_empty(rows, plan_layout(lmax, mmax).dim, y.shape[2])


@block_grad_op.register_fake
def _(blocks, a, x, table, gain, lmax, mmax, index, weight, use_gain):
    return blocks.new_empty(blocks.shape)


def _save_local(ctx, inputs, output) -> None:
    blocks, x, table, gain, lmax, mmax, index, use_gain = inputs
    ctx.save_for_backward(blocks, x, table, gain, index)
    ctx.plan = (lmax, mmax)
    ctx.use_gain = use_gain


def _local_backward(ctx, grad):
    blocks, x, table, gain, index = ctx.saved_tensors
    lmax, mmax = ctx.plan
    grad_blocks = grad_x = None
    if ctx.needs_input_grad[1]:
        grad_x = global_op(
            blocks, grad, table, gain, lmax, mmax, index, x.shape[0], None, ctx.use_gain
        )
        if x.shape[1] > so3_dim(lmax):  # x had rows beyond lmax: they get no gradient
            grad_x = torch.nn.functional.pad(grad_x, (0, 0, 0, x.shape[1] - so3_dim(lmax)))
    if ctx.needs_input_grad[0]:
        grad_blocks = block_grad_op(
            blocks, grad, x, table, gain, lmax, mmax, index, None, ctx.use_gain
        )
    return grad_blocks, grad_x, None, None, None, None, None, None


def _save_global(ctx, inputs, output) -> None:
    blocks, y, table, gain, lmax, mmax, index, _, weight, use_gain = inputs
    ctx.save_for_backward(blocks, y, table, gain, index, weight)
    ctx.plan = (lmax, mmax)
    ctx.use_gain = use_gain


def _global_backward(ctx, grad):
    blocks, y, table, gain, index, weight = ctx.saved_tensors
    lmax, mmax = ctx.plan
    grad_blocks = grad_y = grad_w = None
    unweighted = local_op(blocks, grad, table, gain, lmax, mmax, index, ctx.use_gain)
    if ctx.needs_input_grad[1]:
        grad_y = unweighted if weight is None else unweighted * weight.view(-1, 1, 1)
    if weight is not None and ctx.needs_input_grad[8]:
        grad_w = (unweighted * y).sum(dim=(1, 2))
    if ctx.needs_input_grad[0]:
        grad_blocks = block_grad_op(
            blocks, y, grad, table, gain, lmax, mmax, index, weight, ctx.use_gain
        )
    return grad_blocks, grad_y, None, None, None, None, None, None, grad_w, None


local_op.register_autograd(_local_backward, setup_context=_save_local)
global_op.register_autograd(_global_backward, setup_context=_save_global)


# --- the rotations ---------------------------------------------------------------------------
def to_local(
    blocks: torch.Tensor,
    x: torch.Tensor,
    lmax: int,
    mmax: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed ``x`` in the edge frames, ``|m| <= mmax``: ``(E, D_m, C)``.

    ``blocks (E, >= nnz)`` flat Wigner block values; ``x (E, >= D, C)`` per edge, or node
    features ``(N, >= D, C)`` gathered by ``index (E,)`` inside the kernel.
    """
    table, gain = plan_tensors(lmax, mmax, blocks.device)
    return local_op(blocks, x, table, gain, lmax, mmax, _index(index), False)


def to_global(
    blocks: torch.Tensor,
    y: torch.Tensor,
    lmax: int,
    mmax: int,
    weight: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    n_out: int | None = None,
) -> torch.Tensor:
    """Edge-frame ``y (E, D_m, C)`` back to packed ``(E, D, C)``, truncated degrees rescaled,
    times ``weight (E, 1)`` if given; with ``index (E,)``, summed onto ``(n_out, D, C)``
    (atomic adds: the summation order, and so the last bits, may vary between runs)."""
    if index is not None and n_out is None:
        raise ValueError("to_global: a scatter index needs n_out, the number of destinations")
    table, gain = plan_tensors(lmax, mmax, blocks.device)
    w = None if weight is None else weight.reshape(-1).to(y.dtype)
    return global_op(blocks, y, table, gain, lmax, mmax, _index(index), n_out, w, True)


def _index(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else index.to(torch.int64).contiguous()
