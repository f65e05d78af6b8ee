"""The DPA4 / SeZM descriptor: per-atom scalar features from an equivariant message-passing stack.

type embedding t_i  ──(env-seed FiLM)──> x_i[l=0]
neighbour directions ──(GIE)──────────> x_i[l>=1]
x <- InteractionBlock_b(x)   for each block (degrees follow l_schedule)
descriptor_i = (x_ro + ReadoutFFN(x_ro))[l=0]
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from ..compat.descriptor_versions import (
    LATEST_VERSION,
    RADIAL_ENVELOPE_VERSION,
    upgrade_state,
)
from ..engine.chunks import merge_chunks, plan_chunks, sorted_by_destination
from ..engine.stream import (
    ATOM_CHUNK_RATIO,
    ChunkRadial,
    StreamPolicy,
    stream_edges,
    stream_nodes,
    up_to,
)
from ..geometry.layout import so3_dim
from ..geometry.wigner import WignerD
from ..kernels import tracing
from ..nn.attn_res import attn_res_blocks, depth_attn_res
from ..nn.block import InteractionBlock
from ..nn.common import child_seed
from ..nn.edge_cache import EdgeCache, build_edge_cache
from ..nn.embedding import (
    ChargeSpinEmbedding,
    EnvironmentSeed,
    GeometricInitialEmbedding,
    SpinEmbedding,
    TypeEmbedding,
)
from ..nn.ffn import EquivariantFFN
from ..nn.norm import ScalarRMSNorm
from ..nn.options import DescriptorOptions, GeometryOptions
from ..nn.radial import BridgingSwitch, InnerClamp, RadialBasis, RadialMLP

#: The environment-seed FiLM starts as a 1 % modulation of the type embedding.
FILM_STRENGTH_INIT = 0.01
#: Floor of the envelope-weighted degree ``sum env^2`` (version >= 1.1): an atom with few, far
#: neighbours gets messages scaled by at most ``1 / sqrt(0.25) = 2``.
DEGREE_FLOOR = 0.25
#: Seed slot of the descriptor-level depth attention (DeePMD-kit's numbering).
FINAL_ATTN_SEED = 2000


class CheckpointWigner(WignerD):
    """``WignerD`` plus the two constant buffers DeePMD-kit checkpoints carry for it."""

    def __init__(self, lmax: int, dtype: torch.dtype) -> None:
        super().__init__(lmax, dtype=dtype)
        self.register_buffer("l1_perm", torch.tensor([1, 2, 0]))
        sign = torch.tensor([-1.0, -1.0, 1.0], dtype=dtype)
        self.register_buffer("l1_sign_outer", torch.outer(sign, sign))


class Descriptor(nn.Module):
    """``use_spin`` (one flag per type) adds the native-spin inputs (:class:`SpinEmbedding`
    and the spin rows of the environment seed); it needs a node degree >= 1."""

    def __init__(self, opts: DescriptorOptions, use_spin: list[bool] | None = None) -> None:
        super().__init__()
        self.opts = opts
        self.amp_eval = False  # bfloat16 blocks in evaluation (DP_AMP_INFER); set by the user
        # streamed evaluation (sezm.engine.stream): set by the evaluators, never used in training
        self.streaming: StreamPolicy | None = None
        self.use_spin = None if use_spin is None else [bool(f) for f in use_spin]
        self.register_buffer("version_tensor", torch.tensor(LATEST_VERSION, dtype=torch.float64))
        self._build_embeddings(opts)
        self._build_edge_features(opts)
        self.blocks = nn.ModuleList(
            InteractionBlock(opts, i, child_seed(child_seed(opts.seed, 1), i))
            for i in range(opts.degrees.n_blocks)
        )
        self._build_final_attn_res(opts)
        self._build_readout(opts)
        self.register_buffer("mean", torch.zeros(0, dtype=opts.basics.dtype))
        self.register_buffer("stddev", torch.ones(0, dtype=opts.basics.dtype))
        self.register_buffer("pair_keep", _pair_keep(opts.geometry), persistent=False)
        self.legacy_radial = False  # set when a version-1.0 state is loaded
        # Multi-rank freezing only (sezm.infer.comm.GhostExchange): completes per-node edge
        # sums (the bridging gate) over edges that other ranks hold. None everywhere else.
        self.ghost_exchange = None
        if not opts.trainable:  # DeePMD-kit's `trainable: false`: no parameter is trained
            self.requires_grad_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        version = upgrade_state(state_dict, prefix, self.use_spin)
        if version is not None:  # version 1.0 keeps its own radial maths
            self.legacy_radial = version < RADIAL_ENVELOPE_VERSION
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- construction -------------------------------------------------------------------
    def _build_embeddings(self, opts: DescriptorOptions) -> None:
        """Type, frame-charge/spin, native-spin and environment-seed embeddings."""
        c, cd, seed = opts.basics.channels, opts.basics.compute_dtype, opts.seed
        act, ntypes = opts.basics.activation_function, opts.geometry.ntypes
        self.type_embedding = TypeEmbedding(ntypes, c, dtype=cd, seed=child_seed(seed, 0))
        self.charge_spin_embedding = None
        if opts.add_chg_spin_ebd:
            self.charge_spin_embedding = ChargeSpinEmbedding(
                c, activation_function=act, dtype=cd, seed=child_seed(seed, 7)
            )
        self.spin_embedding = None
        if self.use_spin is not None:
            if opts.degrees.node_init_lmax < 1:
                raise ValueError("native spin needs a node degree lmax + extra_node_l >= 1")
            self.spin_embedding = SpinEmbedding(
                ntypes,
                c,
                self.use_spin,
                activation_function=act,
                dtype=cd,
                seed=child_seed(seed, 8),
            )
        self.env_seed_embedding = None
        if opts.use_env_seed:
            self._build_env_seed(opts)

    def _build_edge_features(self, opts: DescriptorOptions) -> None:
        """Radial basis and network, Wigner-D, geometric initial embedding, ZBL bridging."""
        geometry, degrees, cd = opts.geometry, opts.degrees, opts.basics.compute_dtype
        self.radial_basis = RadialBasis(
            geometry.rcut, geometry.basis_type, geometry.n_radial, geometry.rbf_env_exp, cd
        )
        rows = degrees.node_init_lmax + 1
        self.radial_embedding = RadialMLP(
            [geometry.n_radial, *geometry.radial_hidden, rows * opts.basics.channels],
            activation_function=opts.basics.activation_function,
            radial_norm=opts.basics.edge_norm,
            dtype=cd,
            seed=child_seed(opts.seed, 3),
        )
        self.wigner_calc = CheckpointWigner(degrees.lmax, cd)
        self.gie = None
        self.gie_zonal_wigner_calc = None
        if opts.use_env_seed and degrees.node_init_lmax > 0:
            self.gie = GeometricInitialEmbedding(degrees.node_init_lmax)
            if degrees.extra_node_l > 0:
                self.gie_zonal_wigner_calc = CheckpointWigner(degrees.node_init_lmax, cd)
        self.inner_clamp = self.bridging_switch = None
        if geometry.inner_clamp is not None:
            self.inner_clamp = InnerClamp(*geometry.inner_clamp)
            self.bridging_switch = BridgingSwitch(*geometry.inner_clamp)

    def _build_final_attn_res(self, opts: DescriptorOptions) -> None:
        """The descriptor-level depth attention that ends the blocks, if any."""
        self.final_full_attn_res = self.final_block_attn_res = None
        mode, basics = opts.residual.depth_mode, opts.basics
        if mode is None:
            return
        final = depth_attn_res(
            opts.residual.depth_attn_res,
            basics.channels,
            eps=basics.eps,
            bias=basics.mlp_bias,
            dtype=basics.compute_dtype,
            seed=child_seed(child_seed(opts.seed, 5 if mode == "full" else 6), FINAL_ATTN_SEED),
        )
        setattr(self, f"final_{mode}_attn_res", final)

    def _build_env_seed(self, opts: DescriptorOptions) -> None:
        basics = opts.basics
        cd, c, eps = basics.compute_dtype, basics.channels, basics.eps
        self.env_seed_embedding = EnvironmentSeed(
            basics, opts.geometry, child_seed(opts.seed, 4), self.use_spin
        )
        if basics.edge_norm:
            self.film_scale_norm = ScalarRMSNorm(c, eps=eps, dtype=cd)
            self.film_shift_norm = ScalarRMSNorm(c, eps=eps, dtype=cd)
        else:
            self.film_scale_norm = self.film_shift_norm = nn.Identity()
        strength = math.log(FILM_STRENGTH_INIT)
        self.film_scale_strength_log = nn.Parameter(torch.full((1,), strength, dtype=cd))
        self.film_shift_strength_log = nn.Parameter(torch.full((1,), strength, dtype=cd))

    def _build_readout(self, opts: DescriptorOptions) -> None:
        readout, latent_lmax = opts.readout, opts.degrees.node_readout_lmax
        lmax = 0 if readout.so3_readout == "none" else latent_lmax
        kmax, seed_out = min(opts.degrees.kmax, latent_lmax), child_seed(opts.seed, 2)
        basics = opts.basics.in_compute_precision  # the read-out stays in compute_dtype
        ffn = functools.partial(EquivariantFFN, basics, readout.ffn, lmax, kmax)
        self.readout_pre_layers = nn.ModuleList(
            ffn(child_seed(seed_out, i)) for i in range(readout.ffn.blocks - 1)
        )
        self.output_ffn = ffn(seed_out)

    # --- forward --------------------------------------------------------------------------
    @property
    def dim_out(self) -> int:
        return self.opts.basics.channels

    def forward(
        self,
        atype: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        edge_vec: torch.Tensor,
        edge_mask: torch.Tensor | None = None,
        charge_spin: torch.Tensor | None = None,
        spin: torch.Tensor | None = None,
        force_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptor ``(nf, nloc, C)`` and final equivariant node state ``(nf*nloc, D, 1, C)``.

        ``atype (nf, nloc)``; edges over the flattened atoms ``frame * nloc + i``:
        ``src``/``dst (E,)``, ``edge_vec (E, 3) = r_src - r_dst``, ``edge_mask (E,)``;
        ``spin (nf, nloc, 3)``: atomic spins of a native-spin descriptor (ignored otherwise);
        ``force_embedding (nf*nloc, D0, 1, C)``: added to the initial state before the blocks
        (the ``dens`` head's :class:`~sezm.model.dens.ForceEmbedding`).
        """
        opts = self.opts
        node_init_lmax, dtype = opts.degrees.node_init_lmax, opts.basics.dtype
        nf, nloc = atype.shape
        types = atype.reshape(-1)
        n_nodes = types.shape[0]
        t = self.type_embedding(types)  # (N, C)
        if self.charge_spin_embedding is not None:
            t = t + self._frame_condition(charge_spin, nf, t.dtype).repeat_interleave(nloc, dim=0)
        spin_l1 = None
        if self.spin_embedding is None or spin is None:
            spin = None
        else:
            spin = spin.reshape(n_nodes, 3)
            spin_l0, spin_l1 = self.spin_embedding(spin, types)  # (N, C), (N, 3, C)
            t = t + spin_l0.to(t.dtype)
        edges = self._edge_cache(types, src, dst, edge_vec, edge_mask)
        streamed = edges.chunks is not None
        radial = None if streamed else self._edge_radial(edges)  # (E, L0+1, C)
        x0 = t if self.env_seed_embedding is None else self._film(t, edges, types, spin)
        x = self._initial_state(x0, edges, radial, types, spin)  # (N, D0, 1, C)
        if spin_l1 is not None:  # on-site spin direction, after the degree normalisation
            x = torch.cat([x[:, :1], x[:, 1:4] + spin_l1.unsqueeze(2), x[:, 4:]], dim=1)
        if streamed:
            radial = ChunkRadial(self._chunk_block_radial, t, node_init_lmax + 1)
        else:
            radial = self._block_radial(radial, edges, t, t)  # (E, L0+1, C)
        x = x.to(dtype)
        if force_embedding is not None:
            x = x + force_embedding.to(x.dtype)
        if len(self.blocks):
            block_edges = edges.cast(dtype)
            with self._block_autocast(x.device):
                x = self._run_blocks(x, block_edges, radial)
        readout = stream_nodes(self._readout, x, chunks=edges.atom_chunks)
        return readout.view(nf, nloc, self.dim_out), x

    def _edge_cache(self, types, src, dst, edge_vec, edge_mask) -> EdgeCache:
        """Edge geometry of a pass, with the chunk plan when it streams (edges then sorted by
        destination); excluded type pairs and masked edges are kept with weight 0."""
        n_nodes = types.shape[0]
        if src.numel() == 0:  # no pair within rcut: one masked self-edge keeps every shape valid
            src = dst = torch.zeros(1, dtype=torch.long, device=types.device)
            edge_vec = torch.cat([edge_vec, edge_vec.new_zeros(1, 3)])
            edge_mask = torch.zeros(1, dtype=torch.bool, device=types.device)
        chunk = self._edge_chunk(src.shape[0])
        if chunk is not None:
            src, dst, edge_vec, edge_mask = sorted_by_destination(src, dst, edge_vec, edge_mask)
        keep = self.pair_keep[types[dst], types[src]]
        if edge_mask is not None:
            keep = keep & edge_mask
        edges = self._edges(src, dst, edge_vec, keep, n_nodes)
        if chunk is not None:
            edges.chunks = plan_chunks(dst, n_nodes, chunk)
            edges.atom_chunks = merge_chunks(edges.chunks, max(1, chunk // ATOM_CHUNK_RATIO))
        return edges

    def _edge_radial(self, edges: EdgeCache) -> torch.Tensor:
        """Radial features ``(E, L0+1, C)`` of the edges, times the envelope (version >= 1.1)."""
        rows = self.opts.degrees.node_init_lmax + 1
        radial = self.radial_embedding(edges.rbf).view(-1, rows, self.dim_out)
        return radial if self.legacy_radial else radial * edges.env.unsqueeze(-1)

    def _block_radial(
        self, radial: torch.Tensor, edges: EdgeCache, types: torch.Tensor, centre_types
    ) -> torch.Tensor:
        """Radial features of the blocks: plus the type embeddings of both ends ``(E, L0+1, C)``
        (``types (N, C)`` by ``edges.src``, ``centre_types`` by ``edges.dst``)."""
        dtype = self.opts.basics.dtype
        ends = types.index_select(0, edges.src) + centre_types.index_select(0, edges.dst)
        return radial.to(dtype) + (ends * edges.keep).to(dtype).unsqueeze(1)

    def _chunk_block_radial(self, edges: EdgeCache, types, centre_types) -> torch.Tensor:
        return self._block_radial(self._edge_radial(edges), edges, types, centre_types)

    def _edge_chunk(self, n_edges: int) -> int | None:
        """Edges per chunk if this pass streams the block edge work (evaluation with a policy,
        single rank, not being traced for export), else ``None``."""
        if (
            self.streaming is None
            or self.training
            or self.ghost_exchange is not None
            or tracing()
            or not len(self.blocks)
            or self.opts.basics.dtype != self.opts.basics.compute_dtype
        ):
            return None
        return self.streaming.chunk_for(n_edges)

    def edge_bytes(self) -> int:
        """Estimated working set of one edge in a block's edge work (bytes), for chunk sizes:
        the widest block's ``(D, F C_f)`` message, times the intermediates kept per mixing layer."""
        message = self.opts.message
        rows = (max(self.opts.degrees.l_schedule, default=0) + 1) ** 2
        itemsize = torch.empty((), dtype=self.opts.basics.compute_dtype).element_size()
        return rows * message.width * itemsize * (8 + 6 * message.mixing_layers)

    def _block_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the interaction blocks on CUDA: in training with ``use_amp``,
        in evaluation with :attr:`amp_eval`; geometry, embeddings and read-out stay in
        ``compute_dtype``. Elsewhere a no-op."""
        enabled = self.opts.use_amp if self.training else self.amp_eval
        if enabled and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _frame_condition(self, charge_spin, nf: int, dtype) -> torch.Tensor:
        if charge_spin is None:
            if self.opts.default_chg_spin is None:
                raise ValueError(
                    "this model embeds a frame [charge, spin]; pass charge_spin or set "
                    "descriptor.default_chg_spin"
                )
            charge_spin = torch.tensor(self.opts.default_chg_spin)
        charge_spin = torch.as_tensor(charge_spin, dtype=dtype, device=self.version_tensor.device)
        charge_spin = charge_spin.reshape(-1, 2).expand(nf, 2)
        return self.charge_spin_embedding(charge_spin)

    def _edges(self, src, dst, edge_vec, keep, n_nodes) -> EdgeCache:
        opts, geometry = self.opts, self.opts.geometry
        floor = opts.basics.eps if self.legacy_radial else DEGREE_FLOOR
        exchange = self.ghost_exchange
        return build_edge_cache(
            src=src,
            dst=dst,
            edge_vec=edge_vec,
            keep=keep,
            n_nodes=n_nodes,
            rcut=geometry.rcut,
            edge_env_exp=geometry.edge_env_exp,
            radial_basis=self.radial_basis,
            wigner=self.wigner_calc if opts.needs_wigner and len(self.blocks) else None,
            eps=opts.basics.eps,
            deg_floor=floor,
            dtype=opts.basics.compute_dtype,
            inner_clamp=self.inner_clamp,
            bridging_switch=self.bridging_switch,
            random_roll=geometry.random_gamma and self.training,
            complete_node_sums=None if exchange is None else exchange.complete_node_sums,
        )

    def _film(self, t: torch.Tensor, edges: EdgeCache, types: torch.Tensor, spin=None):
        """``x0 = t (1 + e^a tanh(s)) + e^b tanh(h)`` with ``[s | h]`` from the environment seed."""
        c = self.dim_out
        film = self.env_seed_embedding(edges, types, spin)  # (N, 2C)
        scale = torch.tanh(self.film_scale_norm(film[:, :c])) * torch.exp(
            self.film_scale_strength_log
        )
        shift = torch.tanh(self.film_shift_norm(film[:, c:])) * torch.exp(
            self.film_shift_strength_log
        )
        return t * (1.0 + scale) + shift

    def _initial_state(
        self, x0: torch.Tensor, edges: EdgeCache, radial: torch.Tensor, types, spin=None
    ) -> torch.Tensor:
        n, c = x0.shape
        dim = so3_dim(self.opts.degrees.node_init_lmax)
        if self.gie is None:
            return torch.cat([x0.view(n, 1, 1, c), x0.new_zeros(n, dim - 1, 1, c)], dim=1)
        wigner = self.gie_zonal_wigner_calc or self.wigner_calc
        zonal = wigner.zonal(edges.quat, lmin=1)  # (E, D0-1)
        message = None if spin is None else self.spin_embedding.edge_l1(spin, types, edges)
        if edges.chunks is None:
            rest = self.gie(edges, zonal, radial[:, 1:], message)  # (N, D0-1, C)
        else:  # the radial features are made inside each chunk

            def chunk_gie(_sources, _centres, chunk: EdgeCache, zonal_rows, message_rows):
                return self.gie(chunk, zonal_rows, self._edge_radial(chunk)[:, 1:], message_rows)

            rest = stream_edges(chunk_gie, (), (), edges, zonal, message)
        return torch.cat([x0.unsqueeze(1), rest], dim=1).unsqueeze(2)

    def _run_blocks(self, x: torch.Tensor, edges: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        degrees = self.opts.degrees
        dims = [so3_dim(l + degrees.extra_node_l) for l in degrees.l_schedule]
        final = self.final_full_attn_res or self.final_block_attn_res
        if final is None:
            for l_block, dim, block in zip(degrees.l_schedule, dims, self.blocks):
                x = block(x[:, :dim], edges, up_to(radial, l_block))
            return x
        steps = [
            lambda v, hist, b=block, l=l_block: b.forward_with_history(
                v, hist, edges, up_to(radial, l)
            )
            for l_block, block in zip(degrees.l_schedule, self.blocks)
        ]
        out = attn_res_blocks(x, steps, dims, final, so3_dim(degrees.node_readout_lmax))
        return out.to(self.opts.basics.dtype)

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D, 1, C) -> (N, C)``: residual read-out FFNs, then the ``l = 0`` slice."""
        if self.opts.readout.so3_readout == "none":
            x = x[:, :1]
        else:
            x = x[:, : so3_dim(self.opts.degrees.node_readout_lmax)]
        x = x.to(self.opts.basics.compute_dtype)
        for layer in self.readout_pre_layers:
            x = x + layer(x)
        return (x + self.output_ffn(x))[:, 0, 0, :]


def _pair_keep(geometry: GeometryOptions) -> torch.Tensor:
    """``(ntypes, ntypes)`` bool: False for the excluded type pairs (both orders)."""
    keep = torch.ones(geometry.ntypes, geometry.ntypes, dtype=torch.bool)
    for a, b in geometry.exclude_types:
        keep[a, b] = keep[b, a] = False
    return keep
