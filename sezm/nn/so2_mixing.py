"""The residual stack of SO(2) linears and gated activations of an edge message (step 4 of
:mod:`sezm.nn.so2_conv`), per focus stream, in the edge frame."""

from __future__ import annotations

import torch
from torch import nn

from .activation import GatedActivation
from .attn_res import DepthAttnRes
from .common import child_seed
from .grid_net import S2GridNet
from .norm import ReducedEquivariantRMSNorm
from .options import LayerBasics, MessageOptions
from .so2 import SO2Linear

#: Child-seed slots of the stack inside its convolution's seed (DeePMD-kit's numbering, which
#: fixes the initial weights): linears, activations, depth attention.
LINEAR_SEEDS, ACTIVATION_SEEDS, DEPTH_ATTENTION_SEEDS = 0, 1, 5
#: Initial residual scale of every layer under ``layer_scale``: the stack starts near identity.
LAYER_SCALE_INIT = 1e-3
#: RMS-norm floor between mixing layers.
INTER_NORM_EPS = 1e-5


class SO2MixingStack(nn.Module):
    """``x <- x + [scale *] act_i(SO2Linear_i(norm_i(x)))`` for ``i < mixing_layers``.

    ``act`` is a gated activation (or the S2-grid SwiGLU) except after the last layer; ``norm``
    is the reduced equivariant RMS norm when ``so2_norm`` (never before the last layer);
    ``so2_layer_attn_res`` replaces the residual input by depth attention over the earlier
    updates. Works on ``(F, E, D_m, C_f)``.
    """

    def __init__(
        self, basics: LayerBasics, message: MessageOptions, lmax: int, mmax: int, seed
    ) -> None:
        super().__init__()
        n, cf, nf = message.mixing_layers, message.focus_dim, message.n_focus
        self.so2_linears = nn.ModuleList(
            SO2Linear(
                lmax=lmax,
                mmax=mmax,
                in_channels=cf,
                out_channels=2 * cf if message.s2_activation and i < n - 1 else cf,
                n_focus=nf,
                dtype=basics.dtype,
                mlp_bias=basics.mlp_bias,
                seed=child_seed(child_seed(seed, LINEAR_SEEDS), i),
            )
            for i in range(n)
        )
        self.so2_inter_norms = nn.ModuleList(
            ReducedEquivariantRMSNorm(
                lmax, mmax, cf, n_focus=nf, eps=INTER_NORM_EPS, dtype=basics.compute_dtype
            )
            if message.so2_norm and i < n - 1
            else nn.Identity()
            for i in range(n)
        )
        act_seed = child_seed(seed, ACTIVATION_SEEDS)
        self.non_linearities = nn.ModuleList(
            _activation(basics, message, lmax, mmax, child_seed(act_seed, i))
            if i < n - 1
            else nn.Identity()
            for i in range(n)
        )
        self.so2_layer_attn_res = None
        if message.layer_attn_res != "none":
            self.so2_layer_attn_res = nn.ModuleList(
                DepthAttnRes(
                    channels=nf * cf,
                    input_dependent=message.layer_attn_res == "dependent",
                    eps=basics.eps,
                    bias=basics.mlp_bias,
                    dtype=basics.compute_dtype,
                    seed=child_seed(child_seed(seed, DEPTH_ATTENTION_SEEDS), i),
                )
                for i in range(n)
            )
        self.adam_so2_layer_scales = None
        if basics.layer_scale:
            self.adam_so2_layer_scales = nn.ParameterList(
                nn.Parameter(torch.full((nf, cf), LAYER_SCALE_INIT, dtype=basics.dtype))
                for _ in range(n)
            )

    def forward(self, x: tuple[torch.Tensor, ...], bias_factor: torch.Tensor) -> tuple:
        """``x``: the ``|m|`` blocks ``(F, E, rows_b, C_f)`` of the edge-frame streams
        (:attr:`~sezm.geometry.layout.SphericalLayout.m_block_rows`), kept apart through the
        linears and gated activations; ``bias_factor (F, E, C_f)`` = radial l=0 times envelope."""
        history = [x] if self.so2_layer_attn_res is not None else None
        for i, (linear, norm, act) in enumerate(
            zip(self.so2_linears, self.so2_inter_norms, self.non_linearities)
        ):
            if history is not None:
                x = self._depth_mix(i, history, x)
            y = linear(_joined(norm, x))
            if i == 0 and linear.bias0 is not None:
                _bias_correction(y[0], linear, bias_factor)
            y = _activated(act, y)
            if self.adam_so2_layer_scales is not None:
                scale = self.adam_so2_layer_scales[i].view(y[0].shape[0], 1, 1, -1)
                y = tuple(b * scale for b in y)
            x = tuple(a + b for a, b in zip(x, y))
            if history is not None:
                history.append(y)
        return x

    def _depth_mix(self, i: int, history: list[tuple], x: tuple) -> tuple:
        """Depth attention over ``[input, update_0, ...]`` in the edge-major view."""
        rows = [b.shape[2] for b in x]
        n_edge = x[0].shape[1]

        def l0(v: torch.Tensor) -> torch.Tensor:  # (E, F, D_m, C_f) -> (E, F*C_f)
            return v[:, :, 0, :].reshape(n_edge, -1)

        sources = [torch.cat(h, dim=2).transpose(0, 1) for h in history]
        mixed = self.so2_layer_attn_res[i](
            sources=sources, scalar_extractor=l0, current_x=torch.cat(x, dim=2).transpose(0, 1)
        )
        return mixed.transpose(0, 1).split(rows, dim=2)


def _joined(module: nn.Module, blocks: tuple) -> tuple:
    """A module of the whole m-major layout applied to ``|m|`` blocks (identity: untouched)."""
    if isinstance(module, nn.Identity):
        return blocks
    return module(torch.cat(blocks, dim=2)).split([b.shape[2] for b in blocks], dim=2)


def _activated(act: nn.Module, blocks: tuple) -> tuple:
    """The activation between two layers on ``|m|`` blocks ``(F, E, rows_b, C)``; activations
    work on ``(E, rows, F, C)``."""
    if isinstance(act, nn.Identity):
        return blocks
    if isinstance(act, GatedActivation):
        out = act.blocks(tuple(b.permute(1, 2, 0, 3) for b in blocks))
        return tuple(b.permute(2, 0, 1, 3) for b in out)
    rows = [b.shape[2] for b in blocks]
    out = act(torch.cat(blocks, dim=2).permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
    return out.split(rows, dim=2)


def _activation(
    basics: LayerBasics, message: MessageOptions, lmax: int, mmax: int, seed
) -> nn.Module:
    """The activation between two mixing layers: S2-grid SwiGLU or gated."""
    common = dict(
        lmax=lmax,
        mmax=mmax,
        channels=message.focus_dim,
        n_focus=message.n_focus,
        dtype=basics.compute_dtype,
        mlp_bias=basics.mlp_bias,
        seed=seed,
    )
    if message.s2_activation:
        return S2GridNet(
            mode="self",
            op_type="glu",
            coefficient_layout="m_major",
            grid_method=message.grid_method,
            **common,
        )
    return GatedActivation(activation_function=message.activation_function, **common)


def _bias_correction(y0: torch.Tensor, linear: SO2Linear, factor: torch.Tensor) -> None:
    """Make the first layer's l=0 bias vanish with the edge: ``bias * (rho_0 env - 1)`` added
    in place to row 0 of the fresh ``m = 0`` block ``y0 (F, E, L+1, C)``."""
    if linear.out_channels != factor.shape[-1]:
        factor = torch.cat([factor, factor], dim=-1)
    bias = linear.bias0.view(y0.shape[0], 1, -1)
    y0[:, :, 0] += bias * (factor - 1.0)
