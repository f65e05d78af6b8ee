"""Triton kernels for the edge-frame rotations of :mod:`sezm.geometry.rotate`.

The dense path builds ``(E, D_m, D)`` matrices from the flat Wigner block values and runs a
batched matmul; most of those entries are zeros off the degree blocks. These kernels read the
flat block values ``blocks (E, sum_l (2l+1)^2)`` directly and touch only non-zero entries:

* :func:`to_local`: ``y[e, r] = sum_k D_e[rows[r], k] x[s_e, k]`` over the ``2l+1`` columns of
  row ``r``'s degree (gather ``s_e = index[e]`` optional, m-truncation by the row list);
* :func:`to_global`: ``out[t_e, p] (+)= w_e g_l sum_r D_e[rows[r], p] y[e, r]`` over the kept
  rows of ``p``'s degree, with the truncation gain ``g_l``, an optional per-edge weight and an
  optional scatter-add onto destinations ``t_e = index[e]``.

Products accumulate in float32 (float64 for float64 inputs), whatever the storage dtype. Both
are differentiable once (forces), with Triton backward kernels: the two products are each
other's transposes, and :func:`_block_grad_kernel` gives the gradient of the block values.

Edge blocks of ``BLOCK_E`` edges times ``BLOCK_C`` channels form one program; the loops over
rows and their few columns run inside it, with index plans (:class:`RotationPlan`) read from
small integer tensors so that one compiled kernel serves every ``(lmax, mmax)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..geometry.layout import m_major_row_list, so3_dim

BLOCK_E = 32
BLOCK_C = 32


@dataclass(frozen=True)
class RotationPlan:
    """Index plans of one ``(lmax, mmax)`` on one device.

    ``local_rows (D_m, 3)``: per local row, the flat index of its first block entry, its first
    packed column and its degree width ``2l+1``. ``row_gain (D_m,)``: the truncation gain of
    its degree. ``global_ptr (D+1,)`` / ``global_terms (T, 2)``: per packed row ``p``, the
    ``(local row, flat entry)`` pairs that sum into it (CSR). ``grad_terms (T, 3)``: every
    non-zero ``(flat entry, local row, packed column)`` of the truncated matrix.
    """

    lmax: int
    mmax: int
    local_rows: torch.Tensor
    row_gain: torch.Tensor
    global_ptr: torch.Tensor
    global_terms: torch.Tensor
    grad_terms: torch.Tensor

    @property
    def dim(self) -> int:
        return so3_dim(self.lmax)

    @property
    def local_dim(self) -> int:
        return self.local_rows.shape[0]

    @property
    def n_entries(self) -> int:
        return sum((2 * l + 1) ** 2 for l in range(self.lmax + 1))


@functools.cache
def rotation_plan(lmax: int, mmax: int, device: torch.device) -> RotationPlan:
    """The :class:`RotationPlan` of ``(lmax, mmax)`` on ``device`` (built once)."""
    offsets = [sum((2 * k + 1) ** 2 for k in range(l)) for l in range(lmax + 1)]
    rows = m_major_row_list(lmax, mmax)
    degree = [math.isqrt(p) for p in range(so3_dim(lmax))]

    def entry(p_row: int, p_col: int) -> int:
        l = degree[p_row]
        return offsets[l] + (p_row - l * l) * (2 * l + 1) + (p_col - l * l)

    local = [(entry(p, degree[p] ** 2), degree[p] ** 2, 2 * degree[p] + 1) for p in rows]
    gain = [math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0 for l in degree]
    ptr, terms, grad = [0], [], []
    for p in range(so3_dim(lmax)):
        for r, q in enumerate(rows):
            if degree[q] == degree[p]:
                terms.append((r, entry(q, p)))
                grad.append((entry(q, p), r, p))
        ptr.append(len(terms))

    def ints(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return RotationPlan(
        lmax=lmax,
        mmax=mmax,
        local_rows=ints(local),
        row_gain=torch.tensor([gain[p] for p in rows], dtype=torch.float64, device=device),
        global_ptr=ints(ptr),
        global_terms=ints(terms),
        grad_terms=ints(grad),
    )


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _to_local_kernel(
    blocks, x, index, row_scale, edge_scale, local_rows, out,
    n_edges, n_rows, n_chan, s_b, s_x0, s_x1, s_x2,
    HAS_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_EDGE_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    me = e < n_edges
    m2 = me[:, None] & (c < n_chan)[None, :]
    src = tl.load(index + e, mask=me, other=0).to(tl.int64) if HAS_INDEX else e
    x_row0 = x + src[:, None] * s_x0 + c[None, :] * s_x2  # [BE, BC] pointers to row 0
    b_row = blocks + e * s_b
    w = tl.load(edge_scale + e, mask=me, other=0).to(ACC) if HAS_EDGE_SCALE else 1.0
    for r in range(n_rows):
        first = tl.load(local_rows + 3 * r)
        col = tl.load(local_rows + 3 * r + 1)
        width = tl.load(local_rows + 3 * r + 2)
        acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=ACC)
        for j in range(width):
            d = tl.load(b_row + first + j, mask=me, other=0).to(ACC)  # [BE]
            xv = tl.load(x_row0 + (col + j) * s_x1, mask=m2, other=0).to(ACC)  # [BE, BC]
            acc += d[:, None] * xv
        if HAS_ROW_SCALE:
            acc = acc * tl.load(row_scale + r).to(ACC)
        if HAS_EDGE_SCALE:
            acc = acc * w[:, None]
        dst = out + (e[:, None] * n_rows + r) * n_chan + c[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _to_global_kernel(
    blocks, y, index, row_gain, edge_scale, ptr, terms, out,
    n_edges, n_local, n_packed, n_chan, s_b,
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
            acc = acc * tl.load(row_gain + tl.load(terms + 2 * start)).to(ACC)
        if HAS_EDGE_SCALE:
            acc = acc * w[:, None]
        dst = out + (dst_row[:, None] * n_packed + p) * n_chan + c[None, :]
        if HAS_INDEX:
            tl.atomic_add(dst, acc.to(out.dtype.element_ty), mask=m2)
        else:
            tl.store(dst, acc.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _block_grad_kernel(
    a, x, index, row_scale, edge_scale, terms, out,
    n_edges, n_terms, n_local, n_chan, s_x0, s_x1, s_x2, s_o,
    HAS_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_EDGE_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``out[e, entry] = s sum_c a[e, r, c] x[i_e, p, c]`` for each ``(entry, r, p)`` term."""
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    me = e < n_edges
    row = tl.load(index + e, mask=me, other=0).to(tl.int64) if HAS_INDEX else e
    w = tl.load(edge_scale + e, mask=me, other=0).to(ACC) if HAS_EDGE_SCALE else 1.0
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
        if HAS_ROW_SCALE:
            total = total * tl.load(row_scale + r).to(ACC)
        if HAS_EDGE_SCALE:
            total = total * w
        tl.store(out + e * s_o + entry, total.to(out.dtype.element_ty), mask=me)


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_zeros(1)


def _launch_local(plan, blocks, x, index=None, row_scale=None, edge_scale=None) -> torch.Tensor:
    """``(E, D_m, C)`` local rows of ``x`` (``(E or N, >= D, C)``, any strides)."""
    n_edges, n_chan = blocks.shape[0], x.shape[2]
    out = x.new_empty(n_edges, plan.local_dim, n_chan)
    grid = (triton.cdiv(n_edges, BLOCK_E), triton.cdiv(n_chan, BLOCK_C))
    _to_local_kernel[grid](
        blocks, x,
        _dummy(plan.local_rows) if index is None else index,
        _dummy(x) if row_scale is None else row_scale.to(x.dtype),
        _dummy(x) if edge_scale is None else edge_scale,
        plan.local_rows, out,
        n_edges, plan.local_dim, n_chan, blocks.stride(0), *x.stride(),
        HAS_INDEX=index is not None, HAS_ROW_SCALE=row_scale is not None,
        HAS_EDGE_SCALE=edge_scale is not None,
        ACC=_acc_type(x.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


def _launch_global(
    plan, blocks, y, index=None, n_out=None, edge_scale=None, gain=True
) -> torch.Tensor:
    """``(E, D, C)`` packed rows from local ``y (E, D_m, C)``, or ``(n_out, D, C)`` summed
    over edges into ``index``; ``gain``: times the truncation gain (else the plain transpose)."""
    y = y.contiguous()
    n_edges, n_chan = blocks.shape[0], y.shape[2]
    if index is None:
        out = y.new_empty(n_edges, plan.dim, n_chan)
    else:
        out = y.new_zeros(n_out, plan.dim, n_chan)
    grid = (triton.cdiv(n_edges, BLOCK_E), triton.cdiv(n_chan, BLOCK_C))
    _to_global_kernel[grid](
        blocks, y,
        _dummy(plan.local_rows) if index is None else index,
        plan.row_gain.to(y.dtype),
        _dummy(y) if edge_scale is None else edge_scale,
        plan.global_ptr, plan.global_terms, out,
        n_edges, plan.local_dim, plan.dim, n_chan, blocks.stride(0),
        HAS_INDEX=index is not None, HAS_GAIN=gain, HAS_EDGE_SCALE=edge_scale is not None,
        ACC=_acc_type(y.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


def _launch_block_grad(
    plan, blocks, a, x, index=None, row_scale=None, edge_scale=None
) -> torch.Tensor:
    """Gradient of the flat block values ``(E, nnz)`` from local ``a (E, D_m, C)`` and packed
    ``x (E or N, >= D, C)``; entries outside the kept rows (and degrees > lmax) stay zero."""
    a = a.contiguous()
    out = blocks.new_zeros(blocks.shape)
    _block_grad_kernel[(triton.cdiv(blocks.shape[0], BLOCK_E),)](
        a, x,
        _dummy(plan.local_rows) if index is None else index,
        _dummy(a) if row_scale is None else row_scale.to(a.dtype),
        _dummy(a) if edge_scale is None else edge_scale,
        plan.grad_terms, out,
        blocks.shape[0], plan.grad_terms.shape[0], plan.local_dim, a.shape[2], *x.stride(),
        out.stride(0),
        HAS_INDEX=index is not None, HAS_ROW_SCALE=row_scale is not None,
        HAS_EDGE_SCALE=edge_scale is not None,
        ACC=_acc_type(a.dtype), BLOCK_E=BLOCK_E, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return out


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, x, plan, index):
        ctx.save_for_backward(blocks, x, index)
        ctx.plan = plan
        return _launch_local(plan, blocks, x, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        blocks, x, index = ctx.saved_tensors
        plan = ctx.plan
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[1]:
            grad_x = _launch_global(plan, blocks, grad, index, x.shape[0], gain=False)
            if x.shape[1] > plan.dim:  # x had rows beyond lmax: they get no gradient
                grad_x = torch.nn.functional.pad(grad_x, (0, 0, 0, x.shape[1] - plan.dim))
        if ctx.needs_input_grad[0]:
            grad_blocks = _launch_block_grad(plan, blocks, grad, x, index)
        return grad_blocks, grad_x, None, None


class _ToGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, y, weight, plan, index, n_out):
        ctx.save_for_backward(blocks, y, weight, index)
        ctx.plan = plan
        return _launch_global(plan, blocks, y, index, n_out, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        blocks, y, weight, index = ctx.saved_tensors
        plan = ctx.plan
        grad_blocks = grad_y = grad_w = None
        unweighted = _launch_local(plan, blocks, grad, index, row_scale=plan.row_gain)
        if ctx.needs_input_grad[1]:
            grad_y = unweighted if weight is None else unweighted * weight.view(-1, 1, 1)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_w = (unweighted * y).sum(dim=(1, 2))
        if ctx.needs_input_grad[0]:
            grad_blocks = _launch_block_grad(
                plan, blocks, y, grad, index, row_scale=plan.row_gain, edge_scale=weight
            )
        return grad_blocks, grad_y, grad_w, None, None, None


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
    plan = rotation_plan(lmax, mmax, blocks.device)
    return _ToLocal.apply(blocks, x, plan, _index(index))


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
    plan = rotation_plan(lmax, mmax, blocks.device)
    w = None if weight is None else weight.reshape(-1).to(y.dtype)
    return _ToGlobal.apply(blocks, y, w, plan, _index(index), n_out)


def _index(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else index.to(torch.int64).contiguous()
