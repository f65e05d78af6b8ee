"""Edge messages of an SO(2) convolution (steps 2-6 of :mod:`sezm.nn.so2_conv`).

Three variants, chosen once when the convolution is built:

* :class:`EdgeFrameMessage`: rotate into the edge frame, radial modulation (elementwise or the
  degree mixer), node-wise grid product, mixing stack, focus competition, rotate back;
* :class:`RadialMessage`: only a per-degree radial scaling, which commutes with rotations, so
  no frame is needed: ``m_e = x'_src * rho_e[l]``;
* :class:`CartesianMessage`: the Cartesian edge tensor product (message degrees 1 and 2).

A part owns no tensors: its layers are registered on the convolution (``owner``) under
DeePMD-kit's flat names, the checkpoint layout, and read from there at every call, so module
surgery on the convolution (LoRA adapters) and device moves reach them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor
from ..kernels.gather_scatter import gather_rows
from .cartesian import EdgeCartesianTensorProduct
from .common import child_seed, normal_
from .edge_cache import EdgeCache
from .grid import resolve_s2_full_grid_resolution
from .grid_net import S2GridNet, SO3GridNet
from .norm import ScalarRMSNorm
from .options import BlockDegrees, GridProduct, LayerBasics, MessageOptions
from .so2 import RadialDegreeMixer
from .so2_mixing import SO2MixingStack

#: Child-seed slots of a convolution's seed (DeePMD-kit's numbering, which fixes the initial
#: weights). The mixing stack uses 0, 1 and 5 (``so2_mixing``), the attention 4.
CARTESIAN_SEED, RADIAL_MIXER_SEED, NODE_WISE_SEED, MESSAGE_NODE_SEED = 0, 7, 8, 9
FOCUS_SEEDS = (4, 4)  # the focus competition's weights: slot 4 of slot 4
#: Label smoothing of the focus softmax: every stream keeps ``FOCUS_FLOOR / F`` of the weight,
#: so no stream loses its gradient entirely.
FOCUS_FLOOR = 0.02
#: Initial std of the focus-competition logit weights: near-uniform competition at the start.
LOGIT_INIT_STD = 0.01
#: Initial residual scale of the grid products: they start as a small correction.
GRID_RESIDUAL_INIT = 1e-3


class FocusCompetition:
    """Label-smoothed softmax over the ``F`` focus streams from their ``l = 0`` scalars
    (``F > 1``); registers ``focus_compete_norm``, ``adamw_focus_compete_w`` and
    ``focus_compete_bias`` on ``owner``."""

    def __init__(self, owner: nn.Module, basics: LayerBasics, message: MessageOptions, seed):
        self.owner, self.compute_dtype = owner, basics.compute_dtype
        nf, cf, cd = message.n_focus, message.focus_dim, basics.compute_dtype
        self.n_focus, self.focus_dim = nf, cf
        owner.focus_compete_norm = (
            ScalarRMSNorm(cf, n_focus=nf, eps=basics.eps, dtype=cd)
            if basics.edge_norm
            else nn.Identity()
        )
        owner.adamw_focus_compete_w = nn.Parameter(torch.zeros(cf, nf, dtype=cd))
        slot, sub = FOCUS_SEEDS
        normal_(
            owner.adamw_focus_compete_w, LOGIT_INIT_STD, child_seed(child_seed(seed, slot), sub)
        )
        owner.focus_compete_bias = (
            nn.Parameter(torch.zeros(nf, dtype=cd)) if basics.mlp_bias else None
        )

    def weights(self, gate_src: torch.Tensor) -> torch.Tensor:
        """``(E, F)`` weights from the scalars ``gate_src (E, F, C_f)``."""
        owner = self.owner
        logits = torch.einsum(
            "efi,if->ef",
            owner.focus_compete_norm(gate_src.to(self.compute_dtype)),
            owner.adamw_focus_compete_w,
        )
        if owner.focus_compete_bias is not None:
            logits = logits + owner.focus_compete_bias
        return torch.softmax(logits, dim=1) * (1.0 - FOCUS_FLOOR) + FOCUS_FLOOR / self.n_focus

    def packed(self, message: torch.Tensor, gate_src: torch.Tensor) -> torch.Tensor:
        """Weighted packed messages ``(E, D, F*C_f)``; ``gate_src (E, F*C_f)``."""
        e, d, _ = message.shape
        alpha = self.weights(gate_src.reshape(e, self.n_focus, self.focus_dim))
        weighted = (
            message.view(e, d, self.n_focus, self.focus_dim)
            * alpha.to(message.dtype)[:, None, :, None]
        )
        return weighted.view(e, d, -1)

    def local(self, blocks: tuple, gate_src: torch.Tensor) -> tuple:
        """Weighted edge-frame streams, ``|m|`` blocks ``(F, E, rows_b, C_f)``; ``gate_src
        (E, F, C_f)``."""
        alpha = self.weights(gate_src).t().to(blocks[0].dtype)[:, :, None, None]  # (F, E, 1, 1)
        return tuple(b * alpha for b in blocks)


class NoCompetition:
    """One focus stream: nothing to weigh."""

    def packed(self, message: torch.Tensor, gate_src: torch.Tensor) -> torch.Tensor:
        return message

    def local(self, blocks: tuple, gate_src: torch.Tensor) -> tuple:
        return blocks


class EdgeMessage:
    """Common part: the radial features widened to the message width ``Cw``."""

    #: whether a per-edge scalar weight can ride on the rotate-back matrices (all that follows
    #: the rotation is linear without bias)
    folds_weight = False

    def __init__(self, owner: nn.Module, message: MessageOptions, degrees: BlockDegrees):
        self.owner, self.lmax, self.mmax = owner, degrees.lmax, degrees.mmax
        self.n_focus, self.focus_dim = message.n_focus, message.focus_dim
        self.competition: FocusCompetition | NoCompetition = NoCompetition()

    def source_features(self, x: torch.Tensor) -> torch.Tensor:
        """Node features ``x (N, D, Cw)`` as edges gather them (once per block): unchanged."""
        return x

    def widen(self, radial: torch.Tensor) -> torch.Tensor:
        """``radial (E, R, C) -> (E, R, Cw)`` through ``radial_hidden_proj`` (when ``Cw != C``)."""
        proj = self.owner.radial_hidden_proj
        return radial if proj is None else proj(radial)

    def packed(self, x_src: torch.Tensor, edges: EdgeCache, rad: torch.Tensor) -> torch.Tensor:
        """Messages ``(E, D, Cw)`` of the sources ``x_src (E, D, Cw)``, ``rad (E, L+1, Cw)``
        (the frame-free variants)."""
        raise NotImplementedError

    def __call__(self, x, centre, edges: EdgeCache, radial, weight=None) -> tuple:
        """``x (N, D, Cw)`` by ``edges.src``, ``centre (n, D, Cw)`` by ``edges.dst``, ``radial
        (E, L+1, C)`` -> messages ``(E, D, Cw)`` (times ``weight (E, 1)`` if given: only when
        :attr:`folds_weight`) and the widened ``l = 0`` radial features ``(E, Cw)``."""
        rad = self.widen(radial)  # (E, L+1, Cw)
        x_src = gather_rows(x, edges.src)
        message = self.packed(x_src, edges, rad)
        return self.competition.packed(message, x_src[:, 0] * rad[:, 0]), rad[:, 0]


class RadialMessage(EdgeMessage):
    """``m_e = x'_src * rho_e[l]``: a per-degree scaling commutes with rotations."""

    def packed(self, x_src: torch.Tensor, edges: EdgeCache, rad: torch.Tensor) -> torch.Tensor:
        return x_src * rad.index_select(1, self.owner.degree_index_full)


class CartesianMessage(EdgeMessage):
    """The Cartesian edge tensor product of ``x'_src`` with the edge direction."""

    def packed(self, x_src: torch.Tensor, edges: EdgeCache, rad: torch.Tensor) -> torch.Tensor:
        return self.owner.edge_cartesian_tp(x_src, edges.vec, rad)


class EdgeFrameMessage(EdgeMessage):
    """Messages computed in the edge frame, ``|m| <= M`` (module docstring)."""

    folds_weight = True

    def __init__(
        self,
        owner: nn.Module,
        message: MessageOptions,
        degrees: BlockDegrees,
        mixing: SO2MixingStack | None,
    ) -> None:
        super().__init__(owner, message, degrees)
        self.mixing = mixing

    def source_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, D, Cw)`` times the shared degree mixer's channel scale, if any (it commutes
        with the per-edge matrices, and nodes are fewer than edges)."""
        mixer = self.owner.radial_degree_mixer
        scale = None if mixer is None or not mixer.shared else mixer.channel_scale()
        return x if scale is None else x * scale

    def __call__(self, x, centre, edges: EdgeCache, radial, weight=None) -> tuple:
        owner, lmax, mmax = self.owner, self.lmax, self.mmax
        rows, mixer = SphericalLayout.of(lmax, mmax).m_block_rows, owner.radial_degree_mixer
        rad = self.widen(radial if mixer else radial.index_select(1, owner.degree_index_m))
        shared = mixer is not None and mixer.shared  # in the rotation; scale: source_features
        mix = mixer.matrices(rad) if shared else None  # rad: (E, L+1 | D_m without mixer, Cw)
        x_local = edges.gather_to_local(x, edges.src, lmax, mmax, mix)  # (E, D_m, Cw)
        if mixer is None:
            blocks = (x_local * rad).split(rows, dim=1)  # (E, rows_b, Cw) each
        else:  # shared: mixed in the rotation; else it reads the m = 0 rows (degrees 0..L)
            blocks = x_local.split(rows, dim=1) if shared else mixer(x_local, rad)
        e, dm, _ = x_local.shape
        if owner.node_wise_grid_product is not None:
            x_local = torch.cat(blocks, dim=1)
            x_dst_local = edges.gather_to_local(centre, edges.dst, lmax, mmax)
            x_local = x_local + cross_product(owner.node_wise_grid_product, x_local, x_dst_local)
            blocks = x_local.split(rows, dim=1)
        nf, cf = self.n_focus, self.focus_dim
        # |m| blocks kept apart through the mixing stack: (F, E, rows_b, C_f) each
        blocks = tuple(b.view(e, b.shape[1], nf, cf).permute(2, 0, 1, 3) for b in blocks)
        gate_src = blocks[0][:, :, 0].transpose(0, 1)  # (E, F, C_f)
        if self.mixing is not None:
            factor = rad[:, 0].view(e, nf, cf).transpose(0, 1) * edges.env.view(1, -1, 1)
            blocks = self.mixing(blocks, factor)
        blocks = self.competition.local(blocks, gate_src)
        x_local = torch.cat(blocks, dim=2).permute(1, 2, 0, 3).reshape(e, dm, nf * cf)
        return edges.to_global(x_local, lmax, mmax, weight), rad[:, 0]  # (E, D, Cw)


def build_edge_message(
    owner: nn.Module, basics: LayerBasics, message: MessageOptions, degrees: BlockDegrees, seed
) -> EdgeMessage:
    """The message variant of a block, its layers registered on ``owner`` (the focus
    competition is added by the caller, after the attention layers: checkpoint order)."""
    lmax, mmax = degrees.lmax, degrees.mmax
    cartesian, mixing = message.block_edge_cartesian(lmax), None
    if cartesian:
        owner.edge_cartesian_tp = _edge_cartesian(basics, message, lmax, seed)
    elif message.mixing_layers > 0:  # registered on the owner container by container
        mixing = SO2MixingStack(basics, message, lmax, mmax, seed)
        for name, layers in mixing.named_children():
            owner.add_module(name, layers)
    owner.radial_degree_mixer = None
    if not cartesian and message.radial_mode != "none":
        owner.radial_degree_mixer = RadialDegreeMixer(
            lmax=lmax,
            mmax=mmax,
            channels=message.width,
            mode=message.radial_mode,
            rank=message.radial_rank,
            dtype=basics.dtype,
            seed=child_seed(seed, RADIAL_MIXER_SEED),
        )
    node_wise_seed = child_seed(seed, NODE_WISE_SEED)
    owner.node_wise_grid_product = grid_product(
        basics, message, "node_wise", degrees, node_wise_seed
    )
    if cartesian:
        return CartesianMessage(owner, message, degrees)
    local = any(
        p is not None for p in (mixing, owner.radial_degree_mixer, owner.node_wise_grid_product)
    )
    layout = SphericalLayout.of(lmax, mmax)
    if not local:
        owner.register_buffer("degree_index_full", index_tensor(layout.degrees), persistent=False)
        return RadialMessage(owner, message, degrees)
    degrees_m = index_tensor(layout.reduced_degrees)
    owner.register_buffer("degree_index_m", degrees_m, persistent=False)
    return EdgeFrameMessage(owner, message, degrees, mixing)


def _edge_cartesian(basics: LayerBasics, message: MessageOptions, lmax: int, seed) -> nn.Module:
    return EdgeCartesianTensorProduct(
        lmax=lmax,
        focus_dim=message.focus_dim,
        n_focus=message.n_focus,
        n_layers=message.mixing_layers,
        activation_function=message.activation_function,
        mlp_bias=basics.mlp_bias,
        eps=basics.eps,
        dtype=basics.dtype,
        seed=child_seed(seed, CARTESIAN_SEED),
    )


def grid_product(
    basics: LayerBasics, message: MessageOptions, kind: str, degrees: BlockDegrees, seed
) -> nn.Module | None:
    """The ``"node_wise"`` (edge frame, m-major rows) or ``"message_node"`` (packed rows) S2 /
    SO(3) grid product, if enabled; cross mode on ``(N, J, F, C_f)`` (:func:`cross_product`)."""
    path: GridProduct = getattr(message, kind)
    node_wise = kind == "node_wise"
    if not path.enabled:
        return None
    lmax, mmax = degrees.lmax, degrees.mmax
    common = dict(
        lmax=lmax,
        channels=message.focus_dim,
        n_focus=message.n_focus,
        mode="cross",
        op_type=path.op.op_type,
        dtype=basics.compute_dtype,
        coefficient_layout="m_major" if node_wise else "packed",
        grid_branches=max(1, path.op.branches),
        mlp_bias=basics.mlp_bias,
        residual_scale_init=GRID_RESIDUAL_INIT,
        seed=seed,
    )
    if path.so3:
        return SO3GridNet(kmax=degrees.kmax, **(dict(common, mmax=mmax) if node_wise else common))
    method = message.grid_method
    if node_wise:
        return S2GridNet(mmax=mmax, grid_method=method, **common)
    resolution = resolve_s2_full_grid_resolution(lmax, method=method)
    return S2GridNet(mmax=lmax, grid_method=method, grid_resolution_list=resolution, **common)


def cross_product(net: nn.Module, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A cross grid product on flat ``(B, J, F*C_f)`` features, per focus stream."""
    b, j, width = query.shape
    f = net.n_focus
    out = net(query.reshape(b, j, f, width // f), context.reshape(b, j, f, width // f))
    return out.flatten(2)  # (B, J, F*C_f)
