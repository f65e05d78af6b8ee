"""The EMFA SO(2) convolution: edge messages in the bond frame, aggregated at each centre.

For every edge ``j -> i``:

1. ``x' = pre_focus_mix(x)`` widens the node features to ``F`` focus streams (``F * C_f``).
2. Rotate ``x'_j`` into the edge frame and keep orders ``|m| <= M`` (``D_m @ x'_j``).
3. Modulate by the edge's radial features: elementwise, or the edge-conditioned degree mixer.
4. Per focus stream, a residual stack of SO(2) linears and gated activations.
5. Focus competition (``F > 1``): a softmax over streams from ``l = 0`` scalars.
6. Rotate back (``D_m^T``), rescaling truncated degrees.
7. Aggregate at ``i``: envelope-weighted sum, or envelope-gated attention with head gates.
8. ``post_focus_mix`` (zero-initialised) maps back to ``C`` channels.

Optional branches: a node-wise grid product in step 3, a message-node grid product and a
node Cartesian product after step 7, the Cartesian edge path replacing steps 2-6.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry.layout import degree_of_rows, m_major_degrees
from .attention import envelope_gated_softmax
from .common import child_seed, normal_
from .edge_cache import EdgeCache
from .linear import ChannelLinear, SO3Linear
from .norm import ReducedEquivariantRMSNorm, ScalarRMSNorm
from .options import BlockDegrees, GridProduct, LayerBasics, MessageOptions
from .so2 import RadialDegreeMixer, SO2Linear
from .stream import stream_edges, stream_nodes


class SO2MixingStack:
    """``x <- x + [scale *] act_i(SO2Linear_i(norm_i(x)))`` for ``i < mixing_layers``.

    ``act`` is a gated activation (or the S2-grid SwiGLU) except after the last layer; ``norm``
    is the reduced equivariant RMS norm when ``so2_norm`` (never before the last layer).
    Works on ``(F, E, D_m, C_f)``. The layers are registered on the owning convolution
    (``attach``), which is where checkpoints keep them.
    """

    def __init__(
        self, basics: LayerBasics, message: MessageOptions, lmax: int, mmax: int, seed
    ) -> None:
        from .activation import GatedActivation
        from .grid_net import S2GridNet

        n, cf, nf = message.mixing_layers, message.focus_dim, message.n_focus
        s2 = message.s2_activation
        dtype, cd, bias = basics.dtype, basics.compute_dtype, basics.mlp_bias
        degrees = m_major_degrees(lmax, mmax)
        self.so2_linears = nn.ModuleList(
            SO2Linear(
                lmax=lmax,
                mmax=mmax,
                in_channels=cf,
                out_channels=2 * cf if s2 and i < n - 1 else cf,
                n_focus=nf,
                dtype=dtype,
                mlp_bias=bias,
                seed=child_seed(child_seed(seed, 0), i),
            )
            for i in range(n)
        )
        self.so2_inter_norms = nn.ModuleList(
            ReducedEquivariantRMSNorm(lmax, mmax, cf, degrees, n_focus=nf, eps=1e-5, dtype=cd)
            if message.so2_norm and i < n - 1
            else nn.Identity()
            for i in range(n)
        )
        acts: list[nn.Module] = []
        for i in range(n):
            s = child_seed(child_seed(seed, 1), i)
            if i == n - 1:
                acts.append(nn.Identity())
            elif s2:
                acts.append(
                    S2GridNet(
                        lmax=lmax,
                        mmax=mmax,
                        channels=cf,
                        n_focus=nf,
                        mode="self",
                        op_type="glu",
                        dtype=cd,
                        layout="fndc",
                        coefficient_layout="m_major",
                        grid_method=message.grid_method,
                        mlp_bias=bias,
                        seed=s,
                    )
                )
            else:
                acts.append(
                    GatedActivation(
                        lmax=lmax,
                        mmax=mmax,
                        channels=cf,
                        n_focus=nf,
                        dtype=cd,
                        activation_function=message.activation_function,
                        mlp_bias=bias,
                        layout="fndc",
                        seed=s,
                    )
                )
        self.non_linearities = nn.ModuleList(acts)
        self.so2_layer_attn_res = None
        if message.layer_attn_res != "none":
            from .attn_res import DepthAttnRes

            self.so2_layer_attn_res = nn.ModuleList(
                DepthAttnRes(
                    channels=nf * cf,
                    input_dependent=message.layer_attn_res == "dependent",
                    eps=basics.eps,
                    bias=bias,
                    dtype=cd,
                    seed=child_seed(child_seed(seed, 5), i),
                )
                for i in range(n)
            )
        self.adam_so2_layer_scales = None
        if basics.layer_scale:
            self.adam_so2_layer_scales = nn.ParameterList(
                nn.Parameter(torch.full((nf, cf), 1e-3, dtype=dtype)) for _ in range(n)
            )

    def attach(self, owner: nn.Module) -> None:
        for name in (
            "so2_linears",
            "so2_inter_norms",
            "non_linearities",
            "so2_layer_attn_res",
            "adam_so2_layer_scales",
        ):
            setattr(owner, name, getattr(self, name))

    def __call__(self, x: torch.Tensor, bias_factor: torch.Tensor | None) -> torch.Tensor:
        """``x (F, E, D_m, C_f)``; ``bias_factor (F, E, C_f)`` = radial l=0 times envelope."""
        history = [x] if self.so2_layer_attn_res is not None else None
        for i, (linear, norm, act) in enumerate(
            zip(self.so2_linears, self.so2_inter_norms, self.non_linearities)
        ):
            if history is not None:
                x = self._depth_mix(i, history, x)
            y = linear(norm(x))
            if i == 0 and linear.bias0 is not None and bias_factor is not None:
                y = self._bias_correction(y, linear, bias_factor)
            y = act(y)
            if self.adam_so2_layer_scales is not None:
                y = y * self.adam_so2_layer_scales[i].view(y.shape[0], 1, 1, -1)
            x = x + y
            if history is not None:
                history.append(y)
        return x

    def _depth_mix(self, i: int, history: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Depth attention over ``[input, update_0, ...]`` in the edge-major view."""
        n_edge = x.shape[1]

        def l0(v: torch.Tensor) -> torch.Tensor:  # (E, F, D_m, C_f) -> (E, F*C_f)
            return v[:, :, 0, :].reshape(n_edge, -1)

        sources = [h.transpose(0, 1) for h in history]
        mixed = self.so2_layer_attn_res[i](
            sources=sources, scalar_extractor=l0, current_x=x.transpose(0, 1)
        )
        return mixed.transpose(0, 1)

    @staticmethod
    def _bias_correction(y: torch.Tensor, linear: SO2Linear, factor: torch.Tensor) -> torch.Tensor:
        """Make the first layer's l=0 bias vanish with the edge: ``bias * (rho_0 env - 1)`` added."""
        if linear.out_channels != factor.shape[-1]:
            factor = torch.cat([factor, factor], dim=-1)
        bias = linear.bias0.view(y.shape[0], 1, 1, -1)
        y0, y_rest = y.split([1, y.shape[2] - 1], dim=2)
        return torch.cat([y0 + bias * (factor.unsqueeze(2) - 1.0), y_rest], dim=2)


class SO2Convolution(nn.Module):
    """Message passing of one interaction block (see module docstring)."""

    def __init__(
        self, basics: LayerBasics, message: MessageOptions, degrees: BlockDegrees, seed
    ) -> None:
        super().__init__()
        lmax, mmax = degrees.lmax, degrees.mmax
        c, nf, cf, cw = basics.channels, message.n_focus, message.focus_dim, message.width
        dtype, cd, bias = basics.dtype, basics.compute_dtype, basics.mlp_bias
        self.lmax, self.mmax, self.n_focus, self.focus_dim = lmax, mmax, nf, cf
        self.eps, self.compute_dtype, self.dtype = basics.eps, cd, dtype
        self.edge_cartesian = message.block_edge_cartesian(lmax)
        self.pre_focus_mix = SO3Linear(
            lmax, c, cw, dtype=dtype, mlp_bias=bias, seed=child_seed(seed, 2)
        )
        self.post_focus_mix = SO3Linear(
            lmax, cw, c, dtype=dtype, mlp_bias=bias, seed=child_seed(seed, 3), init_std=0.0
        )
        self.radial_hidden_proj = (
            ChannelLinear(c, cw, dtype=dtype, bias=False, seed=child_seed(seed, 6))
            if cw != c
            else None
        )
        self.register_buffer("degree_index_full", degree_of_rows(lmax), persistent=False)
        self.register_buffer("degree_index_m", m_major_degrees(lmax, mmax), persistent=False)
        self._build_message_path(basics, message, degrees, seed)
        self._build_aggregation(basics, message, seed)
        self._build_focus_competition(basics, message, seed)

    # --- construction -------------------------------------------------------------------
    def _build_message_path(
        self, basics: LayerBasics, message: MessageOptions, degrees: BlockDegrees, seed
    ) -> None:
        lmax, mmax, bias = degrees.lmax, degrees.mmax, basics.mlp_bias
        self.mixing = None
        self.edge_cartesian_tp = None
        if self.edge_cartesian:
            from .cartesian import EdgeCartesianTensorProduct

            self.edge_cartesian_tp = EdgeCartesianTensorProduct(
                lmax=lmax,
                focus_dim=message.focus_dim,
                n_focus=message.n_focus,
                n_layers=message.mixing_layers,
                activation_function=message.activation_function,
                mlp_bias=bias,
                eps=basics.eps,
                dtype=basics.dtype,
                seed=child_seed(seed, 0),
            )
        elif message.mixing_layers > 0:
            self.mixing = SO2MixingStack(basics, message, lmax, mmax, seed)
            self.mixing.attach(self)
        self.radial_degree_mixer = None
        if not self.edge_cartesian and message.radial_mode != "none":
            self.radial_degree_mixer = RadialDegreeMixer(
                lmax=lmax,
                mmax=mmax,
                channels=message.width,
                mode=message.radial_mode,
                rank=message.radial_rank,
                dtype=basics.dtype,
                seed=child_seed(seed, 7),
            )
        self.node_wise_grid_product = _grid_product(
            basics, message, message.node_wise, degrees, child_seed(seed, 8), node_wise=True
        )
        self.message_node_grid_product = _grid_product(
            basics, message, message.message_node, degrees, child_seed(seed, 9), node_wise=False
        )
        self.node_cartesian_tp = None
        spec = message.block_node_cartesian(lmax)
        if spec.enabled:
            from .cartesian import NodeCartesianTensorProduct

            self.node_cartesian_tp = NodeCartesianTensorProduct(
                lmax=lmax,
                focus_dim=message.focus_dim,
                n_focus=message.n_focus,
                n_layers=spec.n_layers,
                symmetric=spec.symmetric,
                activation_function=message.activation_function,
                mlp_bias=bias,
                dtype=basics.dtype,
                seed=child_seed(seed, 10),
            )
        self.needs_local_frame = not self.edge_cartesian and (
            self.mixing is not None
            or self.radial_degree_mixer is not None
            or self.node_wise_grid_product is not None
        )

    def _build_aggregation(self, basics: LayerBasics, message: MessageOptions, seed) -> None:
        attention, lmax = message.attention, self.lmax
        self.n_heads = attention.n_heads
        if self.n_heads == 0:
            return
        cd, cw = basics.compute_dtype, message.width
        self.attn_focus = 1 if attention.f_mix else message.n_focus
        self.attn_width = cw if attention.f_mix else message.focus_dim
        fa, ca, h = self.attn_focus, self.attn_width, self.n_heads
        s = child_seed(seed, 4)
        self.attn_qk_norm = ScalarRMSNorm(ca, n_focus=fa, eps=basics.eps, dtype=cd)
        from .linear import FocusLinear

        self.attn_q_proj = FocusLinear(ca, ca, fa, dtype=cd, bias=False, seed=child_seed(s, 0))
        self.attn_k_proj = FocusLinear(ca, ca, fa, dtype=cd, bias=False, seed=child_seed(s, 1))
        self.attn_focus_mix = (
            SO3Linear(lmax, cw, cw, dtype=cd, seed=child_seed(s, 19)) if attention.f_mix else None
        )
        self.attn_v_proj = (
            SO3Linear(lmax, ca, ca, n_focus=fa, dtype=cd, seed=child_seed(s, 20))
            if attention.v_proj
            else None
        )
        self.attn_o_proj = (
            SO3Linear(lmax, ca, ca, n_focus=fa, dtype=cd, seed=child_seed(s, 21))
            if attention.o_proj
            else None
        )
        self.adamw_attn_logit_w = nn.Parameter(torch.zeros(ca, fa, h, dtype=cd))
        normal_(self.adamw_attn_logit_w, 0.01, child_seed(s, 2))
        self.adamw_attn_z_bias_raw = nn.Parameter(torch.full((fa, h), 0.5413, dtype=cd))
        self.attn_output_gate_norm = ScalarRMSNorm(ca, n_focus=fa, eps=basics.eps, dtype=cd)
        self.adamw_attn_gate_w = nn.Parameter(torch.zeros(ca, fa, h, dtype=cd))
        normal_(self.adamw_attn_gate_w, 0.01, child_seed(s, 3))

    def _build_focus_competition(self, basics: LayerBasics, message: MessageOptions, seed) -> None:
        self.focus_compete_norm = None
        nf, cf, cd = message.n_focus, message.focus_dim, basics.compute_dtype
        if nf == 1:
            return
        self.focus_compete_norm = (
            ScalarRMSNorm(cf, n_focus=nf, eps=basics.eps, dtype=cd)
            if basics.edge_norm
            else nn.Identity()
        )
        self.adamw_focus_compete_w = nn.Parameter(torch.zeros(cf, nf, dtype=cd))
        normal_(self.adamw_focus_compete_w, 0.01, child_seed(child_seed(seed, 4), 4))
        self.focus_compete_bias = (
            nn.Parameter(torch.zeros(nf, dtype=cd)) if basics.mlp_bias else None
        )

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, edges: EdgeCache, radial) -> torch.Tensor:
        """``x (N, D, C)``, ``radial (E, L+1, C)`` (fused with edge types) -> ``(N, D, C)``;
        when streamed, ``radial`` is a :class:`~sezm.nn.stream.ChunkRadial`.

        Node work (focus mixes, grid and Cartesian node products) runs on all atoms at once;
        the edge work (:meth:`edge_messages`) at once, or chunk by chunk when ``edges.chunks``.
        """
        x = self.pre_focus_mix(x.unsqueeze(2)).squeeze(2)  # (N, D, Cw)
        keys, queries = self._keys_and_queries(x)
        sources, centres = (x, keys), (x, queries)
        if edges.chunks is None:
            out = self.edge_messages(sources, centres, edges, radial)
        else:  # radial: a ChunkRadial, made inside each chunk from the chunk's edges

            def chunk_messages(src_tables, centre_tables, chunk: EdgeCache) -> torch.Tensor:
                rows = radial.rows(chunk, src_tables[-1], centre_tables[-1])
                return self.edge_messages(src_tables[:-1], centre_tables[:-1], chunk, rows)

            sources, centres = (*sources, radial.types), (*centres, radial.types)
            out = stream_edges(chunk_messages, sources, centres, edges)
        return stream_nodes(self._node_update, out, x, chunks=edges.atom_chunks)

    def _node_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Aggregated ``out (n, D, Cw)`` and the centres' ``x (n, D, Cw)`` -> update ``(n, D, C)``."""
        if self.message_node_grid_product is not None:
            out = out + self.message_node_grid_product(out, x)
        if self.node_cartesian_tp is not None:
            out = self.node_cartesian_tp(out, x)
        return self.post_focus_mix(out.unsqueeze(2)).squeeze(2)

    def _keys_and_queries(self, x: torch.Tensor) -> tuple:
        """Attention keys and queries of every node ``(N, Fa, Ca)`` (``None`` without attention)."""
        if self.n_heads == 0:
            return None, None
        scalars = self.attn_qk_norm(
            x[:, 0].reshape(x.shape[0], self.attn_focus, self.attn_width).to(self.compute_dtype)
        )
        return self.attn_k_proj(scalars), self.attn_q_proj(scalars)

    def edge_messages(
        self, sources: tuple, centres: tuple, edges: EdgeCache, radial: torch.Tensor
    ) -> torch.Tensor:
        """Messages of ``edges`` aggregated at their destinations: ``(n, D, Cw)``.

        ``sources = (x (N, D, Cw), keys (N, Fa, Ca) | None)`` of every atom, indexed by
        ``edges.src``; ``centres = (x, queries)`` of the ``n`` destinations, by ``edges.dst``.
        """
        x, keys = sources
        centre, queries = centres
        alpha, edge_weight = self._folded_edge_weight(keys, queries, edges, radial)
        if self.edge_cartesian:
            message, rad = self._cartesian_message(x, edges, radial)
        elif self.needs_local_frame:
            message, rad = self._so2_message(x, centre, edges, radial, edge_weight)
        else:
            message, rad = self._radial_message(x, edges, radial)
        if self.n_heads and self.attn_focus_mix is not None:
            message = self.attn_focus_mix(message.unsqueeze(2)).squeeze(2)
        if self.n_heads == 0:
            return self._scatter(edges, message, weighted=edge_weight is not None)
        return self._attend(
            (keys, centre, queries), edges, message, rad, alpha, weighted=edge_weight is not None
        )

    def _folded_edge_weight(self, keys, queries, edges: EdgeCache, radial):
        """Aggregation weight of each edge when it is one scalar per edge ``(E, 1)``.

        The scalar then rides on the small rotate-back matrices instead of scaling the
        ``(E, D, Cw)`` messages; everything between rotation and sum (focus mix, value
        projection) is linear without bias, so the result is unchanged. Returns
        ``(alpha, weight)``: the attention weights if computed here, and the weight or None.
        """
        if not self.needs_local_frame or self.edge_cartesian or self.compute_dtype != self.dtype:
            return None, None
        if self.n_heads == 0:
            return None, edges.message_weight
        if self.attn_focus * self.n_heads != 1:
            return None, None
        alpha = self._attention_weights(keys, queries, edges, self._widen(radial[:, 0]))
        return alpha, alpha.view(-1, 1)

    def _focus_weights(self, gate_src: torch.Tensor) -> torch.Tensor:
        """Label-smoothed softmax over focus streams ``(E, F)`` from l=0 scalars ``(E, F, C_f)``."""
        logits = torch.einsum(
            "efi,if->ef",
            self.focus_compete_norm(gate_src.to(self.compute_dtype)),
            self.adamw_focus_compete_w,
        )
        if self.focus_compete_bias is not None:
            logits = logits + self.focus_compete_bias
        return torch.softmax(logits, dim=1) * 0.98 + 0.02 / self.n_focus

    def _compete_global(self, message: torch.Tensor, gate_src: torch.Tensor) -> torch.Tensor:
        """Apply focus weights to a packed message ``(E, D, F*C_f)``."""
        if self.focus_compete_norm is None:
            return message
        e, d, _ = message.shape
        alpha = self._focus_weights(gate_src.reshape(e, self.n_focus, self.focus_dim))
        weighted = (
            message.view(e, d, self.n_focus, self.focus_dim)
            * alpha.to(message.dtype)[:, None, :, None]
        )
        return weighted.view(e, d, -1)

    def _widen(self, radial: torch.Tensor) -> torch.Tensor:
        return radial if self.radial_hidden_proj is None else self.radial_hidden_proj(radial)

    def _radial_message(self, x, edges: EdgeCache, radial):
        """No local-frame op needed: ``m_e = x'_src * rho_e[l]`` (per-degree scaling commutes with rotation)."""
        rad = self._widen(radial)  # (E, L+1, Cw)
        x_src = x.index_select(0, edges.src)
        message = x_src * rad.index_select(1, self.degree_index_full)
        return self._compete_global(message, x_src[:, 0] * rad[:, 0]), rad

    def _cartesian_message(self, x, edges: EdgeCache, radial):
        rad = self._widen(radial)
        x_src = x.index_select(0, edges.src)
        message = self.edge_cartesian_tp(x_src, edges.vec, rad)
        return self._compete_global(message, x_src[:, 0] * rad[:, 0]), rad

    def _so2_message(self, x, centre, edges: EdgeCache, radial, edge_weight=None):
        x_local = edges.to_local(x.index_select(0, edges.src), self.lmax, self.mmax)  # (E, D_m, Cw)
        if self.radial_degree_mixer is None:
            rad = self._widen(radial.index_select(1, self.degree_index_m))  # (E, D_m, Cw)
            x_local = x_local * rad
        else:  # the mixer reads only the m = 0 rows, which are the degrees l = 0..L in order
            rad = self._widen(radial)  # (E, L+1, Cw)
            x_local = self.radial_degree_mixer(x_local, rad)
        if self.node_wise_grid_product is not None:
            x_dst_local = edges.to_local(centre.index_select(0, edges.dst), self.lmax, self.mmax)
            x_local = x_local + self.node_wise_grid_product(x_local, x_dst_local)
        e, dm, _ = x_local.shape
        nf, cf = self.n_focus, self.focus_dim
        x_local = x_local.view(e, dm, nf, cf).permute(2, 0, 1, 3)  # (F, E, D_m, C_f)
        gate_src = x_local[:, :, 0].transpose(0, 1)  # (E, F, C_f)
        if self.mixing is not None:
            factor = rad[:, 0].view(e, nf, cf).transpose(0, 1) * edges.env.view(1, -1, 1)
            x_local = self.mixing(x_local, factor)
        if self.focus_compete_norm is not None:
            alpha = self._focus_weights(gate_src)  # (E, F)
            x_local = x_local * alpha.t().to(x_local.dtype)[:, :, None, None]
        x_local = x_local.permute(1, 2, 0, 3).reshape(e, dm, nf * cf)
        message = edges.to_global(x_local, self.lmax, self.mmax, edge_weight)  # (E, D, Cw)
        return message, rad

    def _scatter(self, edges: EdgeCache, message, weighted: bool = False) -> torch.Tensor:
        """``out_i = inv_sqrt_deg_i * sum_{e -> i} env_e gate_e m_e`` (``weighted``: already applied)."""
        if not weighted:
            message = message * edges.message_weight.unsqueeze(-1)
        summed = edges.sum_at_dst(message.to(self.compute_dtype))
        return (summed * edges.inv_sqrt_deg).to(self.dtype)

    def _attention_weights(self, keys, queries, edges: EdgeCache, rad0) -> torch.Tensor:
        """Envelope-gated attention ``(E, Fa, H)`` from node ``keys (N, Fa, Ca)``, centre
        ``queries (n, Fa, Ca)`` and ``rad0 (E, Cw)``."""
        n, e = queries.shape[0], edges.src.shape[0]
        fa, ca, h = self.attn_focus, self.attn_width, self.n_heads
        cd = self.compute_dtype
        q = queries.index_select(0, edges.dst).view(e, fa, h, -1)
        k = keys.index_select(0, edges.src).view(e, fa, h, -1)
        bias = torch.einsum("efi,ifo->efo", rad0.reshape(e, fa, ca).to(cd), self.adamw_attn_logit_w)
        logits = (q * k).sum(-1) / math.sqrt(ca // h) + bias  # (E, Fa, H)
        return envelope_gated_softmax(
            logits,
            edges.env.to(cd),
            edges.dst,
            n,
            self.adamw_attn_z_bias_raw,
            self.eps,
            None if edges.src_gate is None else edges.src_gate.to(cd),
        )

    def _attend(
        self, nodes: tuple, edges: EdgeCache, message, rad, alpha=None, weighted: bool = False
    ) -> torch.Tensor:
        """Attention-weighted sum with output gates; ``weighted``: ``alpha`` already applied.
        ``nodes = (keys (N, Fa, Ca), centre states (n, D, Cw), centre queries (n, Fa, Ca))``."""
        keys, centre, queries = nodes
        n, d = centre.shape[0], centre.shape[1]
        e = message.shape[0]
        fa, ca, h = self.attn_focus, self.attn_width, self.n_heads
        cd = self.compute_dtype
        if alpha is None:
            alpha = self._attention_weights(keys, queries, edges, rad[:, 0])
        value = message.reshape(e, d, fa, ca).to(cd)
        if self.attn_v_proj is not None:
            value = self.attn_v_proj(value)
        # (flattened to 4-D: broadcasting over 5-D views with unit axes is far slower on CPU)
        value = value.reshape(e, d, fa * h, -1)
        if not weighted:
            value = value * alpha.view(e, 1, fa * h, 1)
        summed = edges.sum_at_dst(value)  # (N, D, Fa*H, C_h)
        x0 = centre[:, 0].reshape(n, fa, ca).to(cd)
        gate = torch.sigmoid(
            torch.einsum("nfi,ifo->nfo", self.attn_output_gate_norm(x0), self.adamw_attn_gate_w)
        )
        out = (summed * gate.reshape(n, 1, fa * h, 1)).view(n, d, fa, ca)
        if self.attn_o_proj is not None:
            out = self.attn_o_proj(out)
        return out.reshape(n, d, fa * ca).to(self.dtype)


def _grid_product(
    basics: LayerBasics,
    message: MessageOptions,
    path: GridProduct,
    degrees: BlockDegrees,
    seed,
    *,
    node_wise: bool,
):
    """Node-wise (edge frame, m-major) or message-node (packed) S2 / SO(3) grid product, if
    ``path`` is enabled."""
    if not path.enabled:
        return None
    from .grid_net import S2GridNet, SO3GridNet

    lmax, mmax = degrees.lmax, degrees.mmax
    common = dict(
        lmax=lmax,
        channels=message.focus_dim,
        n_focus=message.n_focus,
        mode="cross",
        op_type=path.op.op_type,
        dtype=basics.compute_dtype,
        layout="flat",
        coefficient_layout="m_major" if node_wise else "packed",
        grid_branches=max(1, path.op.branches),
        mlp_bias=basics.mlp_bias,
        residual_scale_init=1e-3,
        seed=seed,
    )
    if path.so3:
        if node_wise:
            common["mmax"] = mmax
        return SO3GridNet(kmax=degrees.kmax, **common)
    method = message.grid_method
    if node_wise:
        return S2GridNet(mmax=mmax, grid_method=method, **common)
    from .grid import resolve_s2_full_grid_resolution

    resolution = resolve_s2_full_grid_resolution(lmax, method=method)
    return S2GridNet(mmax=lmax, grid_method=method, grid_resolution_list=resolution, **common)
