"""Descriptor options: the settings of the descriptor as a few small typed records.

Each layer receives the records it uses. ``sezm.config.descriptor_options`` builds them from a
normalised ``model`` section (compact list forms parsed into named fields, branch activations
resolved); what the layers derive from them (degrees of a block, hidden widths) are
properties of the record that owns the setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .common import compute_dtype_of, dtype_of

_CARTESIAN_DEGREES = (1, 2)  # message degrees whose blocks may use the Cartesian products


def ffn_width(neurons: int, channels: int, glu: bool) -> int:
    """Hidden width: ``neurons`` if > 0, else ``32 * ceil(w / 32)`` with ``w = 8C/3`` (GLU) or ``4C``."""
    if neurons > 0:
        return neurons
    base = 8.0 * channels / 3.0 if glu else 4.0 * channels
    return int(32 * math.ceil(base / 32.0))


@dataclass(frozen=True)
class LayerBasics:
    """What every layer of the descriptor shares."""

    channels: int  # C: channels per (l, m) coefficient, also the descriptor width
    precision: str  # parameter and block precision ("float32", ...)
    eps: float
    mlp_bias: bool
    activation_function: str  # base activation of helper MLPs, gates and FFNs
    glu_activation: bool  # GLU form of the FFNs
    edge_norm: bool  # RMS-normalise the branches that vanish at the cutoff
    layer_scale: bool  # learnable residual scales on every SO(2) and FFN branch

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Geometry, norms and embeddings: never below float32."""
        return compute_dtype_of(self.dtype)

    @property
    def in_compute_precision(self) -> LayerBasics:
        """These settings with the parameters in :attr:`compute_dtype` (the read-out's)."""
        return self if self.dtype == self.compute_dtype else replace(self, precision="float32")


@dataclass(frozen=True)
class GeometryOptions:
    """Edges, radial basis and radial network."""

    ntypes: int
    rcut: float
    rbf_env_exp: int  # envelope exponent on the radial basis
    edge_env_exp: int  # envelope exponent on the message weights
    basis_type: str  # "bessel" | "gaussian"
    n_radial: int
    radial_hidden: tuple[int, ...]  # hidden widths of the radial network (0 resolved to C)
    random_gamma: bool  # random roll of each edge frame in training
    exclude_types: tuple[tuple[int, int], ...]
    inner_clamp: tuple[float, float] | None  # (r_inner, r_outer) of ZBL zone bridging


@dataclass(frozen=True)
class BlockDegrees:
    """Degrees of one interaction block."""

    lmax: int  # message degree L
    mmax: int  # orders |m| <= M kept in the SO(2) convolution
    kmax: int  # frame order of the SO(3) grids, at most L
    node_lmax: int  # node degree L + extra_node_l


@dataclass(frozen=True)
class DegreeSchedule:
    """Per-block message degrees and orders."""

    l_schedule: tuple[int, ...]
    m_schedule: tuple[int, ...]
    lmax: int  # message degree at the input (first block's, or ``lmax`` without blocks)
    kmax: int
    extra_node_l: int

    @property
    def n_blocks(self) -> int:
        return len(self.l_schedule)

    @property
    def node_init_lmax(self) -> int:
        """Degree of the initial node state."""
        return self.lmax + self.extra_node_l

    @property
    def node_readout_lmax(self) -> int:
        """Degree of the node state that reaches the read-out."""
        if not self.n_blocks:
            return self.node_init_lmax
        return self.l_schedule[-1] + self.extra_node_l

    def block(self, index: int) -> BlockDegrees:
        lmax = self.l_schedule[index]
        return BlockDegrees(
            lmax=lmax,
            mmax=self.m_schedule[index],
            kmax=min(self.kmax, lmax),
            node_lmax=lmax + self.extra_node_l,
        )


@dataclass(frozen=True)
class GridOp:
    """Point-wise operation of one grid path."""

    mlp: bool
    branches: int  # scalar-routed quadratic branches; > 0 takes precedence over ``mlp``

    @property
    def op_type(self) -> str:
        if self.branches > 0:
            return "branch"
        return "mlp" if self.mlp else "glu"


@dataclass(frozen=True)
class GridProduct:
    """A node-wise (edge frame) or message-node grid product; SO(3) wins over S2."""

    s2: bool
    so3: bool
    op: GridOp

    @property
    def enabled(self) -> bool:
        return self.s2 or self.so3


@dataclass(frozen=True)
class AttentionOptions:
    """Attention aggregation of the messages (``n_heads == 0``: envelope-weighted sum)."""

    n_heads: int
    f_mix: bool  # attend over all focus streams merged into one
    v_proj: bool
    o_proj: bool


class NodeCartesianSpec(NamedTuple):
    """The ``node_cartesian`` option: on or off, ``Y N + N Y`` (parity) or ``Y N``, layers."""

    enabled: bool
    symmetric: bool
    n_layers: int


@dataclass(frozen=True)
class MessageOptions:
    """The SO(2) convolution of every block."""

    n_focus: int  # F
    focus_dim: int  # C_f (0 resolved to C)
    mixing_layers: int
    so2_norm: bool
    layer_attn_res: str  # depth attention over the mixing layers: none | independent | dependent
    radial_mode: str  # none | degree | degree_channel
    radial_rank: int
    s2_activation: bool  # S2-grid SwiGLU between mixing layers
    lebedev: bool  # Lebedev quadrature for the S2 grids of this path
    edge_cartesian: bool
    node_cartesian: NodeCartesianSpec
    node_wise: GridProduct
    message_node: GridProduct
    attention: AttentionOptions
    activation_function: str  # of the gates and Cartesian paths ("silu" with s2_activation)

    @property
    def width(self) -> int:
        """``F * C_f``, the width of a message."""
        return self.n_focus * self.focus_dim

    @property
    def grid_method(self) -> str:
        return "lebedev" if self.lebedev else "e3nn"

    def block_edge_cartesian(self, lmax: int) -> bool:
        """Whether a block of message degree ``lmax`` takes the Cartesian edge path."""
        return self.edge_cartesian and lmax in _CARTESIAN_DEGREES

    def block_node_cartesian(self, lmax: int) -> NodeCartesianSpec:
        if lmax in _CARTESIAN_DEGREES:
            return self.node_cartesian
        return NodeCartesianSpec(False, False, 0)


@dataclass(frozen=True)
class FFNOptions:
    """The equivariant FFNs of every block."""

    blocks: int  # FFN sub-layers per block (the read-out: its number of FFNs)
    neurons: int  # hidden width (0: derived from the channels)
    s2_activation: bool  # S2-grid SwiGLU (off when ``so3_grid``)
    so3_grid: bool
    lebedev: bool
    grid: GridOp
    activation_function: str  # "silu" with s2_activation
    glu: bool  # GLU form, forced on the grid paths

    def width(self, channels: int) -> int:
        return ffn_width(self.neurons, channels, self.glu)


@dataclass(frozen=True)
class ResidualOptions:
    """Norms and scales around the residual branches, and depth attention over them."""

    so2_pre_norm: bool
    so2_post_norm: bool
    ffn_pre_norm: bool
    ffn_post_norm: bool
    full_attn_res: str  # none | independent | dependent (exclusive with block_attn_res)
    block_attn_res: str

    @property
    def depth_mode(self) -> str | None:
        """``"full"`` or ``"block"`` depth attention, or ``None`` for plain residuals."""
        if self.full_attn_res != "none":
            return "full"
        return "block" if self.block_attn_res != "none" else None

    @property
    def depth_attn_res(self) -> str:
        """The attention mode of :attr:`depth_mode` (``"none"`` without one)."""
        return self.full_attn_res if self.depth_mode == "full" else self.block_attn_res


@dataclass(frozen=True)
class ReadoutOptions:
    """Read-out of the scalar descriptor: ``ffn.blocks`` residual FFNs of degree ``so3_readout``."""

    so3_readout: str  # none (l = 0 only) | glu | mlp (SO(3)-grid FFNs)
    ffn: FFNOptions


@dataclass(frozen=True)
class DescriptorOptions:
    """Every descriptor setting, grouped by the layers that use them."""

    basics: LayerBasics
    geometry: GeometryOptions
    degrees: DegreeSchedule
    message: MessageOptions
    ffn: FFNOptions
    residual: ResidualOptions
    readout: ReadoutOptions
    use_env_seed: bool
    use_amp: bool
    add_chg_spin_ebd: bool
    default_chg_spin: tuple[float, float] | None
    trainable: bool
    seed: int | list[int] | None

    @property
    def needs_wigner(self) -> bool:
        """Whether some block rotates its messages into edge frames."""
        return not all(self.message.block_edge_cartesian(l) for l in self.degrees.l_schedule)
