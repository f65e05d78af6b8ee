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

Steps 2-6 are an edge-message part (:mod:`sezm.nn.edge_message`), step 7 an aggregation part
(:mod:`sezm.nn.aggregation`), each variant chosen once at construction; together they are the
edge work that the streamed engine runs chunk by chunk (:meth:`SO2Convolution.edge_messages`).
Steps 1 and 8 and the node products are node work. All layers are registered on the
convolution under DeePMD-kit's flat names, the checkpoint layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.stream import stream_edges, stream_nodes
from .aggregation import build_aggregation
from .cartesian import NodeCartesianTensorProduct
from .common import child_seed
from .edge_cache import EdgeCache
from .edge_message import (
    MESSAGE_NODE_SEED,
    FocusCompetition,
    build_edge_message,
    cross_product,
    grid_product,
)
from .linear import ChannelLinear, SO3Linear
from .options import BlockDegrees, LayerBasics, MessageOptions

#: Child-seed slots of a convolution's seed for its node layers (DeePMD-kit's numbering).
PRE_MIX_SEED, POST_MIX_SEED, RADIAL_PROJ_SEED, NODE_CARTESIAN_SEED = 2, 3, 6, 10


class SO2Convolution(nn.Module):
    """Message passing of one interaction block (see module docstring)."""

    def __init__(
        self, basics: LayerBasics, message: MessageOptions, degrees: BlockDegrees, seed
    ) -> None:
        super().__init__()
        lmax, c, cw = degrees.lmax, basics.channels, message.width
        dtype, bias = basics.dtype, basics.mlp_bias
        self.lmax, self.mmax = lmax, degrees.mmax
        self.pre_focus_mix = SO3Linear(
            lmax, c, cw, dtype=dtype, mlp_bias=bias, seed=child_seed(seed, PRE_MIX_SEED)
        )
        post_seed = child_seed(seed, POST_MIX_SEED)  # starts at zero: a fresh update is zero
        self.post_focus_mix = SO3Linear(
            lmax, cw, c, dtype=dtype, mlp_bias=bias, seed=post_seed, init_std=0.0
        )
        self.radial_hidden_proj = (
            ChannelLinear(c, cw, dtype=dtype, bias=False, seed=child_seed(seed, RADIAL_PROJ_SEED))
            if cw != c
            else None
        )
        self.message = build_edge_message(self, basics, message, degrees, seed)
        node_seed = child_seed(seed, MESSAGE_NODE_SEED)
        self.message_node_grid_product = grid_product(
            basics, message, "message_node", degrees, node_seed
        )
        self.node_cartesian_tp = _node_cartesian(basics, message, lmax, seed)
        self.aggregation = build_aggregation(self, basics, message, lmax, seed)
        if message.n_focus > 1:
            self.message.competition = FocusCompetition(self, basics, message, seed)
        # a per-edge scalar weight folds into the rotate-back when the blocks compute in the
        # parameter dtype (the rotation then runs in it too)
        self.folds_weight = self.message.folds_weight and basics.compute_dtype == dtype

    def forward(self, x: torch.Tensor, edges: EdgeCache, radial) -> torch.Tensor:
        """``x (N, D, C)``, ``radial (E, L+1, C)`` (fused with edge types) -> ``(N, D, C)``;
        when streamed, ``radial`` is a :class:`~sezm.engine.stream.ChunkRadial`.

        Node work (focus mixes, grid and Cartesian node products) runs on all atoms at once;
        the edge work (:meth:`edge_messages`) at once, or chunk by chunk when ``edges.chunks``.
        """
        x = self.pre_focus_mix(x.unsqueeze(2)).squeeze(2)  # (N, D, Cw)
        keys, queries = self.aggregation.keys_and_queries(x)  # (N, Fa, Ca) each, or None
        sources, centres = (self.message.source_features(x), keys), (x, queries)
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
            out = out + cross_product(self.message_node_grid_product, out, x)
        if self.node_cartesian_tp is not None:
            out = self.node_cartesian_tp(out, x)
        return self.post_focus_mix(out.unsqueeze(2)).squeeze(2)

    def edge_messages(
        self, sources: tuple, centres: tuple, edges: EdgeCache, radial: torch.Tensor
    ) -> torch.Tensor:
        """Messages of ``edges`` aggregated at their destinations: ``(n, D, Cw)``.

        ``sources = (x (N, D, Cw), keys (N, Fa, Ca) | None)`` of every atom, indexed by
        ``edges.src``; ``centres = (x, queries)`` of the ``n`` destinations, by ``edges.dst``.
        ``radial (E, L+1, C)``.
        """
        x, keys = sources
        centre, queries = centres
        state, weight = None, None
        if self.folds_weight:  # one scalar per edge rides on the small rotate-back matrices
            rad0 = self.message.widen(radial[:, 0])
            state, weight = self.aggregation.folded_weight(keys, queries, edges, rad0)
        message, rad0 = self.message(x, centre, edges, radial, weight)  # (E, D, Cw), (E, Cw)
        nodes = (keys, centre, queries)
        return self.aggregation(nodes, edges, message, rad0, state, weighted=weight is not None)


def _node_cartesian(basics: LayerBasics, message: MessageOptions, lmax: int, seed):
    """The node Cartesian product of a block of message degree ``lmax``, if enabled."""
    spec = message.block_node_cartesian(lmax)
    if not spec.enabled:
        return None
    return NodeCartesianTensorProduct(
        lmax=lmax,
        focus_dim=message.focus_dim,
        n_focus=message.n_focus,
        n_layers=spec.n_layers,
        symmetric=spec.symmetric,
        activation_function=message.activation_function,
        mlp_bias=basics.mlp_bias,
        dtype=basics.dtype,
        seed=child_seed(seed, NODE_CARTESIAN_SEED),
    )
