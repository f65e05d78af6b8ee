"""Grid nets: equivariant non-linearities that multiply fields point-wise on an S2 / SO(3) grid.

Two operands ``a, b`` (coefficients ``(N, J, F, K*C)``, ``K`` frames) are combined by a grid op

* ``glu``    (:class:`GridProduct`): ``c = from(to(a) * to(b))``;
* ``mlp``    (:class:`GridMLP`):     ``c = W_o from(to(W_l u) * to(W_r v))`` per frame;
* ``branch`` (:class:`GridBranch`): ``n`` products mixed by a softmax router on the scalars;

then every channel is gated by ``sigmoid(W_g [a_0 | b_0])`` and the scalar row (frame 0) gets
``silu(a_0) * b_0`` (``a_0, b_0``: the ``l = 0``, ``k = 0`` channels). Only invariant scalars
pass through non-polynomial functions, so equivariance rests on the quadrature alone.

Modes: ``"self"`` takes one input ``[a | b]`` of width ``2*K*C`` (FFNs, the SO(2) mixing
activation); ``"cross"`` takes a query ``a`` and a context ``b`` (the SO(2) convolution's
node-wise and message-node products), optionally lifted to ``K`` frames by :class:`DegreeLinear`,
brought back by another, and scaled by ``residual_scale (F, C_out)``.

Inputs and outputs are ``(N, J, F, W)``: ``N`` nodes or edges, ``J`` coefficient rows,
``F`` focus streams, ``W`` channels (times frames); callers in other layouts permute (views).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor
from .activation import GATE_INIT_STD
from .common import child_seed, uniform_
from .grid import GridProjector, S2GridProjector, SO3GridProjector, coefficient_rows
from .linear import ChannelLinear, FocusLinear


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``x = [a | b]`` on the last axis."""
    a, b = x.chunk(2, dim=-1)
    return a * torch.sigmoid(a) * b


def per_frame(linear: ChannelLinear, x: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Apply a channel map to each frame of ``(N, J, F, K*C_in)`` -> ``(N, J, F, K*C_out)``.

    Grid projections are frame-wise linear, so this equals mixing channels on the grid.
    """
    n, j, f, _ = x.shape
    return linear(x.reshape(n, j, f, n_frames, -1)).reshape(n, j, f, -1)


class GridProduct(nn.Module):
    """``from(to(a) * to(b))``: the band-limited point-wise product (a Gaunt product)."""

    def forward(self, left, right, scalars, projector: GridProjector) -> torch.Tensor:
        return projector.from_grid(projector.to_grid(left) * projector.to_grid(right))


class GridMLP(nn.Module):
    """Quadratic point-wise MLP ``W_o [(W_l u) * (W_r v)]`` with hidden width ``2C``.

    ``self`` mode: ``u = v = [a_k | b_k]`` per frame; ``cross`` mode: ``u = a``, ``v = b``.
    """

    def __init__(self, *, channels: int, mode: str, n_frames: int, dtype, seed=None) -> None:
        super().__init__()
        self.mode, self.n_frames = mode, n_frames
        width = 2 * channels if mode == "self" else channels
        linear = functools.partial(ChannelLinear, dtype=dtype, bias=False)
        self.left_proj = linear(width, 2 * channels, seed=child_seed(seed, 0))
        self.right_proj = linear(width, 2 * channels, seed=child_seed(seed, 1))
        self.out_proj = linear(2 * channels, channels, seed=child_seed(seed, 2))

    def forward(self, left, right, scalars, projector: GridProjector) -> torch.Tensor:
        k = self.n_frames
        if self.mode == "self":
            n, j, f, _ = left.shape
            pair = torch.cat([left.reshape(n, j, f, k, -1), right.reshape(n, j, f, k, -1)], dim=-1)
            left = right = pair.reshape(n, j, f, -1)  # (N, J, F, K*2C)
        left, right = per_frame(self.left_proj, left, k), per_frame(self.right_proj, right, k)
        product = projector.from_grid(projector.to_grid(left) * projector.to_grid(right))
        return per_frame(self.out_proj, product, k)


class GridBranch(nn.Module):
    """``W_o from( sum_h softmax(W_r s)_h  to(W_l^h a) * to(W_r^h b) )``, ``s = [a_0 | b_0]``."""

    def __init__(self, *, channels: int, n_branches: int, n_frames: int, dtype, seed=None) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError("n_branches must be positive")
        self.channels, self.n_branches, self.n_frames = channels, n_branches, n_frames
        wide = n_branches * channels
        linear = functools.partial(ChannelLinear, dtype=dtype, bias=False)
        self.left_proj = linear(channels, wide, seed=child_seed(seed, 0))
        self.right_proj = linear(channels, wide, seed=child_seed(seed, 1))
        self.router = linear(2 * channels, n_branches, seed=child_seed(seed, 2))
        self.out_proj = linear(channels, channels, seed=child_seed(seed, 3))

    def forward(self, left, right, scalars, projector: GridProjector) -> torch.Tensor:
        k = self.n_frames
        grid = projector.to_grid(per_frame(self.left_proj, left, k)) * projector.to_grid(
            per_frame(self.right_proj, right, k)
        )  # (N, G, F, H*C)
        n, g, f, _ = grid.shape
        weights = torch.softmax(self.router(scalars), dim=-1)  # (N, F, H)
        grid = torch.einsum("ngfhc,nfh->ngfc", grid.reshape(n, g, f, self.n_branches, -1), weights)
        return per_frame(self.out_proj, projector.from_grid(grid), k)


class DegreeLinear(nn.Module):
    """Per-degree channel map ``y_lm = x_lm W_l`` on ``(N, J, F, C_in)``, W ``(L+1, in, out)``:
    lifts ``C`` channels to ``K`` frames (``K*C``) in a cross-mode SO(3) grid net, and
    contracts them back."""

    def __init__(self, lmax, mmax, coefficient_layout, n_in, n_out, dtype, seed=None) -> None:
        super().__init__()
        layout = SphericalLayout.of(lmax, mmax)
        degrees = tuple(layout.degrees[p] for p in coefficient_rows(layout, coefficient_layout))
        self.register_buffer("degree_index", index_tensor(degrees), persistent=False)
        self.weight = nn.Parameter(torch.empty(lmax + 1, n_in, n_out, dtype=dtype))
        uniform_(self.weight, n_in**-0.5, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("njfi,jio->njfo", x, self.weight.index_select(0, self.degree_index))


class GridNet(nn.Module):
    """Grid non-linearity around a projector (see the module docstring).

    ``channels`` is the per-frame, per-focus width ``C``; ``op_type`` is ``glu``/``mlp``/``branch``.
    """

    def __init__(
        self,
        *,
        projector: GridProjector,
        channels: int,
        n_focus: int = 1,
        mode: str,
        op_type: str,
        dtype: torch.dtype,
        mlp_bias: bool = False,
        grid_branches: int = 1,
        frame_expand: nn.Module | None = None,
        frame_contract: nn.Module | None = None,
        residual_scale_init: float | None = None,
        seed=None,
    ) -> None:
        super().__init__()
        if mode not in ("self", "cross"):
            raise ValueError(f"grid net mode must be 'self' or 'cross', got {mode!r}")
        self.projector, self.mode = projector, mode
        self.channels, self.n_focus, self.n_frames = channels, n_focus, projector.n_frames
        self.frame_expand, self.frame_contract = frame_expand, frame_contract
        self.scalar_gate = FocusLinear(
            2 * channels,
            channels,
            n_focus,
            dtype=dtype,
            bias=mlp_bias,
            seed=child_seed(seed, 0),
            init_std=GATE_INIT_STD,
        )
        k, op_seed = self.n_frames, child_seed(seed, 1)
        if op_type == "glu":
            self.grid_op: nn.Module = GridProduct()
        elif op_type == "mlp":
            self.grid_op = GridMLP(
                channels=channels, mode=mode, n_frames=k, dtype=dtype, seed=op_seed
            )
        elif op_type == "branch":
            self.grid_op = GridBranch(
                channels=channels, n_branches=grid_branches, n_frames=k, dtype=dtype, seed=op_seed
            )
        else:
            raise ValueError(f"op_type must be 'glu', 'mlp' or 'branch', got {op_type!r}")
        out_width = channels if frame_contract is not None else k * channels
        self.residual_scale = None
        if residual_scale_init is not None:
            self.residual_scale = nn.Parameter(
                torch.full((n_focus, out_width), float(residual_scale_init), dtype=dtype)
            )

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``self``: ``query [a | b]`` ``(N, J, F, 2 K C)``; ``cross``: ``query a`` and
        ``context b``, ``(N, J, F, C)`` each. Returns ``(N, J, F, C_out)``."""
        dtype = self.scalar_gate.weight.dtype
        a = query.to(dtype)  # (N, J, F, *)
        if self.mode == "self":
            a, b = a.chunk(2, dim=-1)  # (N, J, F, K*C) each
        elif context is None:
            raise ValueError("cross grid nets need a context")
        else:
            b = context.to(dtype)
        c = self.channels
        scalars = torch.cat([a[:, 0, :, :c], b[:, 0, :, :c]], dim=-1)  # (N, F, 2C), frame 0
        if self.frame_expand is not None:
            a, b = self.frame_expand(a), self.frame_expand(b)
        out = self.grid_op(a, b, scalars, self.projector)  # (N, J, F, K*C)
        n, j, f, _ = out.shape
        gate = torch.sigmoid(self.scalar_gate(scalars))  # (N, F, C)
        out = (out.reshape(n, j, f, self.n_frames, c) * gate[:, None, :, None, :]).view(n, j, f, -1)
        out[:, 0, :, :c] += swiglu(scalars)
        if self.frame_contract is not None:
            out = self.frame_contract(out)
        if self.residual_scale is not None:
            out = out * self.residual_scale
        return out.to(query.dtype)


class S2GridNet(GridNet):
    """Grid net on an S2 grid (Lebedev or e3nn product grid); ``K = 1``.

    Takes the projector's settings; everything else (``channels``, ``mode``, ``op_type``, ...)
    is :class:`GridNet`'s.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        lmax: int,
        mmax: int | None = None,
        grid_resolution_list: list[int] | None = None,
        coefficient_layout: str = "packed",
        grid_method: str = "e3nn",
        **net,
    ) -> None:
        projector = S2GridProjector(
            dtype=dtype,
            lmax=lmax,
            mmax=mmax,
            grid_method=grid_method,
            coefficient_layout=coefficient_layout,
            grid_resolution_list=grid_resolution_list,
        )
        super().__init__(projector=projector, dtype=dtype, **net)


class SO3GridNet(GridNet):
    """Grid net on the SO(3) grid with ``K = 2 kmax + 1`` frames; cross mode lifts the operands
    with a :class:`DegreeLinear` and contracts the result with another.

    Takes the projector's settings; the rest goes to :class:`GridNet`.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        lmax: int,
        mmax: int | None = None,
        kmax: int = 1,
        lebedev_precision: int | None = None,
        coefficient_layout: str = "packed",
        **net,
    ) -> None:
        projector = SO3GridProjector(
            dtype=dtype,
            lmax=lmax,
            kmax=kmax,
            mmax=mmax,
            coefficient_layout=coefficient_layout,
            lebedev_precision=lebedev_precision,
        )
        if net["mode"] == "cross":  # lift to K frames and back, one map per degree
            seed, c, k = net.get("seed"), net["channels"], projector.n_frames
            rows = (lmax, projector.mmax, coefficient_layout)
            net["frame_expand"] = DegreeLinear(*rows, c, k * c, dtype, child_seed(seed, 4))
            net["frame_contract"] = DegreeLinear(*rows, k * c, c, dtype, child_seed(seed, 5))
        super().__init__(projector=projector, dtype=dtype, **net)
