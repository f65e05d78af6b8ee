"""Linear maps in the edge frame that commute with rotations about the edge axis (SO(2)).

Features are ``(F, E, D_m, C)`` in the m-major reduced layout (``geometry.layout``): the
``m = 0`` rows (l = 0..L) first, then for each ``m >= 1`` the ``(l, -m)`` rows and the
``(l, +m)`` rows for ``l = m..L``. An SO(2)-equivariant map may mix degrees within one ``|m|``
and acts on the ``(-m, +m)`` pair as a complex number:

    y_-m = x_-m W_u - x_+m W_v,    y_+m = x_-m W_v + x_+m W_u.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor
from .common import child_seed, trunc_normal_fan_

#: Seed offsets of the per-focus weight initialisations: ``m = 0`` blocks, and ``|m| >= 1`` blocks
#: (one hundred focus streams per ``|m|``), as DeePMD-kit numbers them.
_M0_SEED, _M_SEED, _M_SEED_STRIDE = 1000, 2000, 100


def _focus_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (F, E, rows, C)`` flattened per edge, times ``weight (F, rows*C, out)``
    -> ``(F, E, out)``."""
    f, e = x.shape[0], x.shape[1]
    if f == 1:  # one plain GEMM
        return (x.reshape(e, -1) @ weight[0]).unsqueeze(0)
    return torch.bmm(x.reshape(f, e, -1), weight)


class SO2Linear(nn.Module):
    """Per-focus SO(2)-equivariant linear map ``(F, E, D_m, C_in) -> (F, E, D_m, C_out)``.

    Weights: ``weight_m0`` ``((L+1) C_in, F (L+1) C_out)`` for m = 0, and ``weight_m[m-1]``
    ``(n_l C_in, F 2 n_l C_out)`` holding ``[W_u | W_v]`` per focus for each ``m >= 1``
    (flattened index ``l_local * C + c``). Optional ``bias0`` on the ``l = 0`` row.
    """

    def __init__(
        self,
        *,
        lmax: int,
        mmax: int,
        in_channels: int,
        out_channels: int,
        n_focus: int = 1,
        dtype: torch.dtype,
        mlp_bias: bool = False,
        seed=None,
    ) -> None:
        super().__init__()
        self.lmax, self.mmax, self.n_focus = lmax, mmax, n_focus
        self.in_channels, self.out_channels = in_channels, out_channels
        self.layout = layout = SphericalLayout.of(lmax, mmax)
        blocks = layout.m_blocks
        self.register_buffer("m0_idx", torch.arange(lmax + 1))
        neg = tuple(b.neg_start + i for b in blocks for i in range(b.size))
        pos = tuple(b.pos_start + i for b in blocks for i in range(b.size))
        self.register_buffer("neg_indices", index_tensor(neg))
        self.register_buffer("pos_indices", index_tensor(pos))
        n0 = lmax + 1
        self.weight_m0 = nn.Parameter(
            torch.empty(n0 * in_channels, n_focus * n0 * out_channels, dtype=dtype)
        )
        w0 = self.weight_m0.data.view(n0 * in_channels, n_focus, -1)
        for f in range(n_focus):
            trunc_normal_fan_(w0[:, f], child_seed(seed, _M0_SEED + f))
        self.bias0 = (
            nn.Parameter(torch.zeros(n_focus * out_channels, dtype=dtype)) if mlp_bias else None
        )
        self.weight_m = nn.ParameterList()
        for block in blocks:
            n_l, m = block.size, block.order
            w = torch.empty(n_l * in_channels, n_focus * 2 * n_l * out_channels, dtype=dtype)
            wv = w.view(n_l * in_channels, n_focus, -1)
            for f in range(n_focus):
                trunc_normal_fan_(wv[:, f], child_seed(seed, _M_SEED + _M_SEED_STRIDE * m + f))
            # the pair weight [[W_u, W_v], [-W_v, W_u]] doubles the fan-in
            self.weight_m.append(nn.Parameter(w * (1.0 / math.sqrt(2.0))))

    def _per_focus(self, weight: torch.Tensor) -> torch.Tensor:
        """``(in, F * out) -> (F, in, out)``."""
        return weight.view(weight.shape[0], self.n_focus, -1).transpose(0, 1)

    def _pair_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``[W_u | W_v]`` per focus -> ``[[W_u, W_v], [-W_v, W_u]]`` ``(F, 2 in, 2 out)``: the
        complex product on the flattened ``[x_-m | x_+m]`` rows as one real matmul."""
        w = self._per_focus(weight)
        w_u, w_v = w.chunk(2, dim=-1)
        return torch.cat([w, torch.cat([-w_v, w_u], dim=-1)], dim=1)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]):
        """``x (F, E, D_m, C_in)`` -> ``(F, E, D_m, C_out)``, or its ``|m|`` blocks
        ``(F, E, rows_b, C)`` (:attr:`SphericalLayout.m_block_rows`) -> the output blocks:
        kept apart, the blocks need neither a split nor a concatenation (nor their backward
        copies)."""
        blocks = isinstance(x, tuple)
        rows = self.layout.m_block_rows
        parts = x if blocks else (x.split(rows, dim=2) if len(rows) > 1 else (x,))
        f, e, c_out = parts[0].shape[0], parts[0].shape[1], self.out_channels
        outs = [_focus_matmul(parts[0], self._per_focus(self.weight_m0)).view(f, e, rows[0], c_out)]
        for part, weight, n in zip(parts[1:], self.weight_m, rows[1:]):
            outs.append(_focus_matmul(part, self._pair_weight(weight)).view(f, e, n, c_out))
        if self.bias0 is not None:  # in place: the GEMM's backward does not need its output
            outs[0][:, :, 0] += self.bias0.view(f, 1, c_out)
        if blocks:
            return tuple(outs)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class RadialDegreeMixer(nn.Module):
    """Edge-conditioned mixing of degrees within each ``|m|`` block (the "EMFA" radial kernel).

    A per-edge kernel ``K_e = flatten(rho_e[l = 0..L]) @ weight`` is laid out as one
    ``n_l x n_l`` block per ``|m|`` (shared by ``-m`` and ``+m``; compact index
    ``l_in * n_l + l_out``) and applied as ``y[l_out] = sum_{l_in} K[l_in, l_out] x[l_in]``:

    - ``degree``: one kernel for all channels;
    - ``degree_channel``, rank ``r > 0``: ``K`` has ``r`` components mixed per channel by
      ``channel_basis (r, C)``; rank 0: a separate kernel per channel.

    One kernel for all channels (``degree``; rank 1 is then a channel scale) is a block-diagonal
    ``(D_m, D_m)`` matrix per edge (:meth:`matrices`), folded into the edge-frame rotation.
    """

    def __init__(
        self,
        *,
        lmax: int,
        mmax: int,
        channels: int,
        mode: str,
        rank: int,
        dtype: torch.dtype,
        seed=None,
    ) -> None:
        super().__init__()
        if mode not in ("degree", "degree_channel"):
            raise ValueError(
                f"radial_so2_mode must be 'none', 'degree' or 'degree_channel', got {mode!r}"
            )
        self.lmax, self.channels, self.mode, self.rank = lmax, channels, mode, rank
        self.layout = layout = SphericalLayout.of(lmax, mmax)
        kernel = sum(n * n for n in layout.block_sizes)
        width = 1 if mode == "degree" else (rank if rank > 0 else channels)
        self.kernel_width = width
        self.weight = nn.Parameter(torch.empty((lmax + 1) * channels, kernel * width, dtype=dtype))
        trunc_normal_fan_(self.weight, child_seed(seed, 0))
        self.channel_basis = None
        if mode == "degree_channel" and rank > 0:
            self.channel_basis = nn.Parameter(torch.empty(rank, channels, dtype=dtype))
            trunc_normal_fan_(self.channel_basis, child_seed(seed, 1))
        compact, dense = _kernel_scatter(layout)
        self.register_buffer("kernel_compact_index", index_tensor(compact))
        self.register_buffer("kernel_dense_index", index_tensor(dense))
        self.shared = width == 1  # one kernel for all channels
        one_hot = torch.zeros(kernel, layout.reduced_dim**2, dtype=dtype)  # compact -> dense
        one_hot[list(compact), list(dense)] = 1.0
        self.register_buffer("kernel_to_matrix", one_hot if self.shared else None, persistent=False)

    def matrices(self, radial: torch.Tensor) -> torch.Tensor:
        """Shared kernels ``(E, D_m, D_m)`` (``y = K_e x``, then :meth:`channel_scale`) from the
        first ``L + 1`` rows of ``radial (E, >= L+1, C)``."""
        e, n0, dim = radial.shape[0], self.lmax + 1, self.layout.reduced_dim
        weight = self.weight @ self.kernel_to_matrix  # ((L+1) C, D_m^2)
        return (radial[:, :n0].reshape(e, n0 * radial.shape[-1]) @ weight).view(e, dim, dim)

    def channel_scale(self) -> torch.Tensor | None:
        """Per-channel scale ``(C,)`` of the shared kernel's output (rank 1), or ``None``."""
        return None if self.channel_basis is None else self.channel_basis[0]

    def _mixed_rows(self, kernel: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> list:
        """``kernel (E, n_in, n_out, w)``, rows ``xs`` (``n_in`` of ``(E, C)``) -> ``n_out`` rows.

        A few ``(E, w) * (E, C)`` products accumulated with ``addcmul``: faster on CPU than
        batched tiny matmuls or broadcast products (whose backward reduces over broadcast axes).
        """
        n, w = kernel.shape[1], kernel.shape[-1]
        entries = kernel.reshape(kernel.shape[0], n * n, w).unbind(1)  # K[i, o]
        rows = []
        for o in range(n):
            row = entries[o] * xs[0]
            for i in range(1, n):
                row = torch.addcmul(row, entries[i * n + o], xs[i])
            rows.append(row)
        return rows

    def forward(self, x: torch.Tensor, radial: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x (E, D_m, C)`` -> its mixed ``|m|`` blocks ``(E, rows_b, C)``
        (:attr:`SphericalLayout.m_block_rows`); the kernel comes from the first ``L + 1`` rows
        of ``radial``: per-degree rows ``(E, L+1, C)``, or the m-major layout (whose m = 0
        rows are the degrees in order)."""
        e = x.shape[0]
        n0 = self.lmax + 1
        compact = radial[:, :n0].reshape(e, n0 * radial.shape[-1]) @ self.weight  # (E, K * w)
        block_sizes = self.layout.block_sizes
        kernels = compact.split([n * n * self.kernel_width for n in block_sizes], dim=1)
        xs, start, out = x.unbind(1), 0, []
        for b, n in enumerate(block_sizes):
            kernel = kernels[b].view(e, n, n, self.kernel_width)
            if self.channel_basis is not None:  # fold the rank into channels
                kernel = kernel @ self.channel_basis  # (E, n, n, C)
            rows = []
            for _ in range(1 if b == 0 else 2):  # -m and +m share the kernel
                rows += self._mixed_rows(kernel, xs[start : start + n])
                start += n
            out.append(torch.stack(rows, dim=1))  # (E, rows_b, C)
        return tuple(out)


def _kernel_scatter(layout: SphericalLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Compact -> dense ``(D_m, D_m)`` positions of the block-diagonal mixer kernel (checkpoint
    buffers): the ``m = 0`` block, then each ``|m|`` block used for ``-m`` and ``+m``."""
    dim, compact, dense = layout.reduced_dim, [], []

    def block(start: int, offset: int, n: int) -> None:
        for i in range(n):
            for o in range(n):
                compact.append(offset + i * n + o)
                dense.append((start + o) * dim + start + i)

    n0 = layout.lmax + 1
    block(0, 0, n0)
    offset = n0 * n0
    for m_block in layout.m_blocks:
        block(m_block.neg_start, offset, m_block.size)
        block(m_block.pos_start, offset, m_block.size)
        offset += m_block.size**2
    return tuple(compact), tuple(dense)
