"""Aggregation of edge messages at their destinations (step 7 of :mod:`sezm.nn.so2_conv`).

Two variants, chosen once when the convolution is built:

* :class:`EnvelopeSum`: ``out_i = inv_sqrt_deg_i * sum_{e -> i} env_e gate_e m_e``;
* :class:`EnvelopeGatedAttention`: per focus group and head, attention weights from node keys
  and queries and the edge's radial scalars (:func:`~sezm.nn.attention.envelope_gated_softmax`),
  an optional value projection, the weighted sum, sigmoid output gates from the centre's
  scalars, and an optional output projection.

As in :mod:`sezm.nn.edge_message`, a part owns no tensors: its layers are registered on the
convolution (``owner``) under DeePMD-kit's flat names and read from there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.gather_scatter import gather_rows
from .attention import envelope_gated_softmax
from .common import child_seed, normal_
from .edge_cache import EdgeCache
from .linear import FocusLinear, SO3Linear
from .norm import ScalarRMSNorm
from .options import LayerBasics, MessageOptions

#: Child-seed slot of the attention in its convolution's seed, and the slots inside it
#: (DeePMD-kit's numbering, which fixes the initial weights).
ATTENTION_SEED = 4
QUERY, KEY, LOGIT, GATE, FOCUS_MIX, VALUE, OUTPUT = 0, 1, 2, 3, 19, 20, 21
#: ``softplus(0.5413) = 1.0``: the null mass of the softmax starts at one.
NULL_MASS_INIT = 0.5413
#: Initial std of the radial logit bias and output gate weights.
LOGIT_INIT_STD = 0.01


class EnvelopeSum:
    """Envelope-weighted sum, normalised by the square root of the envelope-weighted degree."""

    def __init__(self, owner: nn.Module, basics: LayerBasics) -> None:
        self.dtype, self.compute_dtype = basics.dtype, basics.compute_dtype

    def keys_and_queries(self, x: torch.Tensor) -> tuple[None, None]:
        """No attention: nothing per node."""
        return None, None

    def folded_weight(self, keys, queries, edges: EdgeCache, rad0: torch.Tensor) -> tuple:
        """``(state, weight (E, 1))``: the envelope (times the source gate), one scalar per edge."""
        return None, edges.message_weight

    def __call__(
        self, nodes: tuple, edges: EdgeCache, message, rad0, state=None, weighted=False
    ) -> torch.Tensor:
        """``message (E, D, Cw)`` -> ``(n, D, Cw)``; ``weighted``: the weight already applied."""
        if not weighted:
            message = message * edges.message_weight.unsqueeze(-1)
        summed = edges.sum_at_dst(message.to(self.compute_dtype))
        return (summed * edges.inv_sqrt_deg).to(self.dtype)


class EnvelopeGatedAttention:
    """Attention over the incoming edges of each node with head gates (module docstring)."""

    def __init__(
        self, owner: nn.Module, basics: LayerBasics, message: MessageOptions, lmax: int, seed
    ):
        attention, cd = message.attention, basics.compute_dtype
        self.owner, self.eps, self.dtype, self.compute_dtype = owner, basics.eps, basics.dtype, cd
        self.n_heads = h = attention.n_heads
        self.n_groups = fa = 1 if attention.f_mix else message.n_focus
        self.group_width = ca = message.width if attention.f_mix else message.focus_dim
        s = child_seed(seed, ATTENTION_SEED)
        owner.attn_qk_norm = ScalarRMSNorm(ca, n_focus=fa, eps=basics.eps, dtype=cd)
        owner.attn_q_proj = FocusLinear(ca, ca, fa, dtype=cd, bias=False, seed=child_seed(s, QUERY))
        owner.attn_k_proj = FocusLinear(ca, ca, fa, dtype=cd, bias=False, seed=child_seed(s, KEY))
        cw = message.width
        owner.attn_focus_mix = (
            SO3Linear(lmax, cw, cw, dtype=cd, seed=child_seed(s, FOCUS_MIX))
            if attention.f_mix
            else None
        )
        owner.attn_v_proj = _group_linear(attention.v_proj, lmax, ca, fa, cd, child_seed(s, VALUE))
        owner.attn_o_proj = _group_linear(attention.o_proj, lmax, ca, fa, cd, child_seed(s, OUTPUT))
        owner.adamw_attn_logit_w = nn.Parameter(torch.zeros(ca, fa, h, dtype=cd))
        normal_(owner.adamw_attn_logit_w, LOGIT_INIT_STD, child_seed(s, LOGIT))
        owner.adamw_attn_z_bias_raw = nn.Parameter(torch.full((fa, h), NULL_MASS_INIT, dtype=cd))
        owner.attn_output_gate_norm = ScalarRMSNorm(ca, n_focus=fa, eps=basics.eps, dtype=cd)
        owner.adamw_attn_gate_w = nn.Parameter(torch.zeros(ca, fa, h, dtype=cd))
        normal_(owner.adamw_attn_gate_w, LOGIT_INIT_STD, child_seed(s, GATE))

    def keys_and_queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and queries of every node ``(N, Fa, Ca)`` from its scalars ``x[:, 0]``."""
        owner, n = self.owner, x.shape[0]
        scalars = x[:, 0].reshape(n, self.n_groups, self.group_width).to(self.compute_dtype)
        scalars = owner.attn_qk_norm(scalars)
        return owner.attn_k_proj(scalars), owner.attn_q_proj(scalars)

    def folded_weight(self, keys, queries, edges: EdgeCache, rad0: torch.Tensor) -> tuple:
        """``(alpha, weight (E, 1))`` with one group and one head, else ``(None, None)``."""
        if self.n_groups * self.n_heads != 1:
            return None, None
        alpha = self.weights(keys, queries, edges, rad0)
        return alpha, alpha.view(-1, 1)

    def weights(self, keys, queries, edges: EdgeCache, rad0: torch.Tensor) -> torch.Tensor:
        """Envelope-gated attention ``(E, Fa, H)`` from node ``keys (N, Fa, Ca)``, centre
        ``queries (n, Fa, Ca)`` and ``rad0 (E, Cw)``."""
        n, e = queries.shape[0], edges.src.shape[0]
        fa, ca, h, cd = self.n_groups, self.group_width, self.n_heads, self.compute_dtype
        q = gather_rows(queries, edges.dst).view(e, fa, h, -1)
        k = gather_rows(keys, edges.src).view(e, fa, h, -1)
        weight = self.owner.adamw_attn_logit_w
        bias = torch.einsum("efi,ifo->efo", rad0.reshape(e, fa, ca).to(cd), weight)
        logits = (q * k).sum(-1) / math.sqrt(ca // h) + bias  # (E, Fa, H)
        gate = None if edges.src_gate is None else edges.src_gate.to(cd)
        z_bias = self.owner.adamw_attn_z_bias_raw
        return envelope_gated_softmax(
            logits, edges.env.to(cd), edges.dst, n, z_bias, self.eps, gate
        )

    def __call__(
        self, nodes: tuple, edges: EdgeCache, message, rad0, alpha=None, weighted=False
    ) -> torch.Tensor:
        """``message (E, D, Cw)`` -> ``(n, D, Cw)``; ``nodes = (keys (N, Fa, Ca), centre states
        (n, D, Cw), centre queries (n, Fa, Ca))``; ``weighted``: ``alpha`` already applied."""
        owner = self.owner
        if owner.attn_focus_mix is not None:
            message = owner.attn_focus_mix(message.unsqueeze(2)).squeeze(2)
        keys, centre, queries = nodes
        n, d, e = centre.shape[0], centre.shape[1], message.shape[0]
        fa, ca, h, cd = self.n_groups, self.group_width, self.n_heads, self.compute_dtype
        if alpha is None:
            alpha = self.weights(keys, queries, edges, rad0)
        value = message.reshape(e, d, fa, ca).to(cd)
        if owner.attn_v_proj is not None:
            value = owner.attn_v_proj(value)
        # (flattened to 4-D: broadcasting over 5-D views with unit axes is far slower on CPU)
        value = value.reshape(e, d, fa * h, -1)
        if not weighted:
            value = value * alpha.view(e, 1, fa * h, 1)
        summed = edges.sum_at_dst(value)  # (n, D, Fa*H, C_h)
        x0 = owner.attn_output_gate_norm(centre[:, 0].reshape(n, fa, ca).to(cd))
        gate = torch.sigmoid(torch.einsum("nfi,ifo->nfo", x0, owner.adamw_attn_gate_w))
        out = (summed * gate.reshape(n, 1, fa * h, 1)).view(n, d, fa, ca)
        if owner.attn_o_proj is not None:
            out = owner.attn_o_proj(out)
        return out.reshape(n, d, fa * ca).to(self.dtype)


def _group_linear(enabled: bool, lmax: int, width: int, groups: int, dtype, seed):
    """A per-group :class:`SO3Linear` (value or output projection), if enabled."""
    if not enabled:
        return None
    return SO3Linear(lmax, width, width, n_focus=groups, dtype=dtype, seed=seed)


def build_aggregation(
    owner: nn.Module, basics: LayerBasics, message: MessageOptions, lmax: int, seed
) -> EnvelopeSum | EnvelopeGatedAttention:
    """The aggregation of a block of message degree ``lmax``, its layers registered on ``owner``."""
    if message.attention.n_heads == 0:
        return EnvelopeSum(owner, basics)
    return EnvelopeGatedAttention(owner, basics, message, lmax, seed)
