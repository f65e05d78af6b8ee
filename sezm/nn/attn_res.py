"""Depth attention residuals: replace ``x + f(x)`` shortcuts by a learned average over depth.

``out = sum_s alpha_s v_s`` with ``alpha = softmax_s(q . RMSNorm(l0(v_s)))`` over earlier
representations ``v_s``. The weights come from the ``l = 0`` channels only and scale whole
sources, so the mix is equivariant. The query is learned (``"independent"``:
``adamw_pseudo_query``) or read from the current state (``"dependent"``:
``q = query_proj(l0(current))``); both start at zero, i.e. at the uniform average.

Three places use it: across the layers of an SO(2) mixing stack (``so2_attn_res``, m-major edge
layout), and at descriptor level over unit outputs (``full_attn_res``) or block summaries
(``block_attn_res``), packed node layout. The block- and descriptor-level recurrences are the
plain functions at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .linear import ChannelLinear
from .norm import ScalarRMSNorm

ATTN_RES_MODES = ("none", "independent", "dependent")
Unit = Callable[[torch.Tensor], torch.Tensor]


def packed_l0(v: torch.Tensor) -> torch.Tensor:
    """Scalars of packed node features: ``(N, D, F, C) -> (N, F*C)``."""
    return v[:, 0].reshape(v.shape[0], -1)


def so2_l0(v: torch.Tensor) -> torch.Tensor:
    """Scalars of SO(2)-stack features: ``(F, E, D_m, C) -> (E, F*C)`` (focus-major)."""
    return v[:, :, 0].transpose(0, 1).reshape(v.shape[1], -1)


_LAYOUTS = {"packed": (packed_l0, 0), "so2": (so2_l0, 1)}  # scalar extractor, batch axis


class DepthAttnRes(nn.Module):
    """Softmax-weighted average of same-shape sources, weights from their scalars.

    ``layout="packed"``: sources ``(N, D, F, C)`` (batch = nodes); ``layout="so2"``: sources
    ``(F, E, D_m, C)`` (batch = edges). ``channels`` is the scalar width ``F*C``.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        channels: int,
        input_dependent: bool = True,
        eps: float = 1e-7,
        bias: bool = True,
        seed=None,
        layout: str = "packed",
    ) -> None:
        super().__init__()
        self.input_dependent = input_dependent
        self.scalars, self.batch_axis = _LAYOUTS[layout]
        self.key_norm = ScalarRMSNorm(channels, eps=eps, dtype=dtype)
        if input_dependent:
            self.query_proj = ChannelLinear(
                channels, channels, dtype=dtype, bias=bias, seed=seed, init_std=0.0
            )
        else:
            self.adamw_pseudo_query = nn.Parameter(torch.zeros(channels, dtype=dtype))

    def forward(
        self,
        sources: Sequence[torch.Tensor],
        current_x: torch.Tensor | None = None,
        scalar_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``sources``: S tensors of one shape; ``current_x``: the state for a dependent query.

        ``scalar_extractor`` (optional) overrides the layout's: any ``source -> (B, C)`` with the
        batch on axis 0 of the sources.
        """
        if len(sources) == 1:
            return sources[0]
        scalars, axis = (
            (self.scalars, self.batch_axis) if scalar_extractor is None else (scalar_extractor, 0)
        )
        dtype = self.key_norm.adam_scale.dtype
        keys = self.key_norm(torch.stack([scalars(v).to(dtype) for v in sources], dim=1))
        if self.input_dependent:
            query = self.query_proj(scalars(current_x).to(dtype))  # (B, C)
            logits = torch.einsum("bc,bsc->bs", query, keys)  # keys (B, S, C)
        else:
            logits = torch.einsum("c,bsc->bs", self.adamw_pseudo_query, keys)
        alpha = torch.softmax(logits, dim=1).T  # (S, B)
        values = torch.stack([v.to(dtype) for v in sources])  # (S, *source shape)
        alpha = alpha.reshape(len(sources), *(1,) * axis, -1, *(1,) * (values.ndim - 2 - axis))
        return (alpha * values).sum(0).to(sources[0].dtype)


def depth_attn_res(mode: str, channels: int, **kwargs) -> DepthAttnRes | None:
    """The module for an ``*_attn_res`` mode (``None`` for ``"none"``)."""
    mode = str(mode).lower()
    if mode not in ATTN_RES_MODES:
        raise ValueError(f"attention-residual mode must be one of {ATTN_RES_MODES}, got {mode!r}")
    if mode == "none":
        return None
    return DepthAttnRes(channels=channels, input_dependent=mode == "dependent", **kwargs)


def full_attn_res_units(
    x: torch.Tensor,
    history: Sequence[torch.Tensor],
    units: Sequence[Unit],
    attns: Sequence[DepthAttnRes],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Block with ``full_attn_res``: every unit reads an average over all completed units.

    ``history``: the descriptor's completed unit outputs (initial state first), truncated to the
    block's rows; ``units``/``attns``: SO(2) unit then FFN units, and their ``DepthAttnRes``.
    Unit k's input is ``attn_k(history + outputs of units < k, current)`` with ``current`` the
    block input for k=0, else the previous unit's output.
    Returns ``(last unit output, [unit outputs])``; the last unit output is the block output.
    """
    sources, outputs, current = list(history), [], x
    for unit, attn in zip(units, attns, strict=True):
        current = unit(attn(sources, current))
        sources.append(current)
        outputs.append(current)
    return current, outputs


def block_attn_res_units(
    x: torch.Tensor,
    history: Sequence[torch.Tensor],
    units: Sequence[Unit],
    attns: Sequence[DepthAttnRes],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block with ``block_attn_res``: units read an average over earlier block summaries.

    ``history``: the descriptor's block summaries (initial state first), truncated to the block's
    rows. Unit 0 reads ``attn_0(history, current=x)``; unit k>0 reads
    ``attn_k(history + [partial], current=previous unit output)``, ``partial`` being the sum of
    this block's unit outputs so far.
    Returns ``(last unit output, summary = sum of unit outputs)``.
    """
    current = units[0](attns[0](history, x))
    partial = current
    for unit, attn in zip(units[1:], attns[1:], strict=True):
        current = unit(attn([*history, partial], current))
        partial = partial + current
    return current, partial


def attn_res_blocks(
    x: torch.Tensor,
    blocks: Sequence[Callable[[torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, list]]],
    node_dims: Sequence[int],
    final: DepthAttnRes,
    readout_dim: int,
) -> torch.Tensor:
    """Descriptor-level driver for ``full_attn_res`` / ``block_attn_res``.

    ``x (N, D0, 1, C)``; ``blocks[i](x[:, :dim_i], history truncated to dim_i)`` returns
    ``(block output, new sources)``: its unit outputs (full) or ``[summary]`` (block). The result
    is ``final(all sources truncated to readout_dim, current=last block output)``.
    """
    history = [x]
    for block, dim in zip(blocks, node_dims, strict=True):
        x, new_sources = block(x[:, :dim], [v[:, :dim] for v in history])
        history.extend(new_sources)
    return final([v[:, :readout_dim] for v in history], x)
