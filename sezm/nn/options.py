"""Descriptor options resolved once into named, validated settings.

The input schema (``sezm.config``) fills defaults and checks types; this module turns the
normalised ``descriptor`` dict into the derived quantities the layers use (schedules, branch
activations, hidden widths, grid settings), so no layer re-interprets raw options.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .common import compute_dtype_of, dtype_of

ATTN_RES_MODES = ("none", "independent", "dependent")


def ffn_width(neurons: int, channels: int, glu: bool) -> int:
    """Hidden width: ``neurons`` if > 0, else ``32 * ceil(w / 32)`` with ``w = 8C/3`` (GLU) or ``4C``."""
    if neurons < 0:
        raise ValueError("ffn_neurons must be >= 0")
    if neurons > 0:
        return neurons
    base = 8.0 * channels / 3.0 if glu else 4.0 * channels
    return int(32 * math.ceil(base / 32.0))


def _three(value, name: str, cast) -> tuple:
    """Broadcast a grid-path setting to ``(node_wise, message_node, ffn)``."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(items) != 3:
        raise ValueError(
            f"descriptor.{name} must be a single value or a list of 3 (node_wise, message_node, ffn)"
        )
    items = tuple(cast(v) for v in items)
    if cast is int and min(items) < 0:
        raise ValueError(f"descriptor.{name} entries must be >= 0")
    return items


def _pair(value, name: str) -> tuple[bool, bool]:
    items = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(items) != 2 or not all(isinstance(v, bool) for v in items):
        raise ValueError(f"descriptor.{name} must be a bool or a list of 2 bools (so2, ffn)")
    return items[0], items[1]


def _mode(value: str, name: str, allowed) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"descriptor.{name} must be one of {list(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class DescriptorOptions:
    ntypes: int
    rcut: float
    rbf_env_exp: int
    edge_env_exp: int
    channels: int
    basis_type: str
    n_radial: int
    radial_hidden: tuple[int, ...]
    edge_norm: bool
    use_env_seed: bool
    random_gamma: bool
    edge_cartesian: bool
    node_cartesian: str
    l_schedule: tuple[int, ...]
    m_schedule: tuple[int, ...]
    lmax: int  # backbone message-passing degree at the input
    kmax: int
    extra_node_l: int
    so2_norm: bool
    mixing_layers: int
    so2_attn_res: str
    radial_so2_mode: str
    radial_so2_rank: int
    n_focus: int
    focus_dim: int  # resolved (0 -> channels)
    n_atten_head: int
    atten_f_mix: bool
    atten_v_proj: bool
    atten_o_proj: bool
    grid_mlp: tuple[bool, bool, bool]
    grid_branch: tuple[int, int, int]
    ffn_blocks: int
    sandwich_norm: tuple[bool, bool, bool, bool]
    mlp_bias: bool
    layer_scale: bool
    full_attn_res: str
    block_attn_res: str
    so2_s2_activation: bool
    ffn_s2_activation: bool
    ffn_so3_grid: bool
    node_wise_s2: bool
    node_wise_so3: bool
    message_node_s2: bool
    message_node_so3: bool
    so3_readout: str
    readout_layers: int
    so2_lebedev: bool
    ffn_lebedev: bool
    activation_function: str
    glu_activation: bool
    use_amp: bool
    add_chg_spin_ebd: bool
    default_chg_spin: tuple[float, float] | None
    exclude_types: tuple[tuple[int, int], ...]
    precision: str
    eps: float
    seed: int | list[int] | None
    inner_clamp: tuple[float, float] | None
    ffn_neurons: int = 0

    # --- derived ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_of(self.dtype)

    @property
    def n_blocks(self) -> int:
        return len(self.l_schedule)

    @property
    def node_l_schedule(self) -> tuple[int, ...]:
        return tuple(l + self.extra_node_l for l in self.l_schedule)

    @property
    def node_init_lmax(self) -> int:
        return self.lmax + self.extra_node_l

    @property
    def node_readout_lmax(self) -> int:
        return self.node_l_schedule[-1] if self.n_blocks else self.node_init_lmax

    @property
    def so2_activation_function(self) -> str:
        return "silu" if self.so2_s2_activation else self.activation_function

    @property
    def ffn_activation_function(self) -> str:
        return "silu" if self.ffn_s2_activation else self.activation_function

    @property
    def ffn_glu(self) -> bool:
        return True if (self.ffn_s2_activation or self.ffn_so3_grid) else self.glu_activation

    @property
    def block_ffn_width(self) -> int:
        return ffn_width(self.ffn_neurons, self.channels, self.ffn_glu)

    @property
    def out_ffn_width(self) -> int:
        return ffn_width(self.ffn_neurons, self.channels, self.glu_activation)

    @property
    def env_seed_dims(self) -> dict[str, int]:
        """Internal widths of the environment seed, all derived from ``channels``."""
        embed = min(self.channels, 128)
        type_dim = min(32, max(8, self.channels // 4))
        axis = min(4 if embed < 64 else 8, max(1, embed - 1))
        g_in = max(32, embed - 2 * type_dim) + 2 * type_dim
        return {
            "embed_dim": embed,
            "axis_dim": axis,
            "type_dim": type_dim,
            "hidden_dim": min(256, max(2 * embed, g_in)),
        }

    def block_edge_cartesian(self, l_block: int) -> bool:
        return self.edge_cartesian and l_block in (1, 2)

    def block_node_cartesian(self, l_block: int) -> str:
        return self.node_cartesian if l_block in (1, 2) else "none"

    @property
    def needs_wigner(self) -> bool:
        return not all(self.block_edge_cartesian(l) for l in self.l_schedule)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg: dict,
        *,
        ntypes: int,
        inner_clamp: tuple[float, float] | None = None,
    ) -> DescriptorOptions:
        """Resolve a normalised ``model.descriptor`` dict."""
        env_exp = list(cfg.get("env_exp", [7, 5]))
        if len(env_exp) != 2:
            raise ValueError("descriptor.env_exp must be [rbf_env_exp, edge_env_exp]")
        channels = int(cfg.get("channels", 64))
        l_sched, m_sched, lmax = _schedules(cfg)
        kmax = int(cfg.get("kmax", 1))
        if not 0 <= kmax <= lmax:
            raise ValueError(f"descriptor.kmax must be in [0, lmax={lmax}], got {kmax}")
        so2_layers = cfg.get("so2_layers")
        mixing = int(cfg.get("mixing_layers", 4) if so2_layers is None else so2_layers)
        s2_act = _pair(cfg.get("s2_activation", [False, True]), "s2_activation")
        ffn_so3 = bool(cfg.get("ffn_so3_grid", False))
        sandwich = tuple(bool(v) for v in cfg.get("sandwich_norm", [False, True, True, False]))
        if len(sandwich) != 4:
            raise ValueError(
                "descriptor.sandwich_norm must be 4 bools [so2_pre, so2_post, ffn_pre, ffn_post]"
            )
        n_focus = int(cfg.get("n_focus", 1))
        focus_dim = int(cfg.get("focus_dim", 0)) or channels
        if n_focus < 1 or focus_dim < 1:
            raise ValueError("descriptor.n_focus must be >= 1 and focus_dim >= 0")
        heads = int(cfg.get("n_atten_head", 1))
        f_mix = bool(cfg.get("atten_f_mix", False))
        attn_width = n_focus * focus_dim if f_mix else focus_dim
        if heads < 0 or (heads > 0 and attn_width % heads):
            raise ValueError(
                f"descriptor.n_atten_head={heads} must divide the attention width {attn_width}"
            )
        full_res = _mode(cfg.get("full_attn_res", "none"), "full_attn_res", ATTN_RES_MODES)
        block_res = _mode(cfg.get("block_attn_res", "none"), "block_attn_res", ATTN_RES_MODES)
        if full_res != "none" and block_res != "none":
            raise ValueError("descriptor.full_attn_res and block_attn_res cannot both be enabled")
        chg = cfg.get("default_chg_spin")
        if chg is not None and len(chg) != 2:
            raise ValueError("descriptor.default_chg_spin must be [charge, spin]")
        readout_layers = int(cfg.get("readout_layers", 1))
        ffn_blocks = int(cfg.get("ffn_blocks", 1))
        if readout_layers < 1 or ffn_blocks < 1:
            raise ValueError("descriptor.readout_layers and ffn_blocks must be >= 1")
        radial_mlp = [int(x) for x in cfg.get("radial_mlp", [0])]
        opts = cls(
            ntypes=ntypes,
            rcut=float(cfg.get("rcut", 6.0)),
            rbf_env_exp=int(env_exp[0]),
            edge_env_exp=int(env_exp[1]),
            channels=channels,
            basis_type=str(cfg.get("basis_type", "bessel")).lower(),
            n_radial=int(cfg.get("n_radial", 16)),
            radial_hidden=tuple(channels if x == 0 else x for x in radial_mlp),
            edge_norm=bool(cfg.get("edge_norm", True)),
            use_env_seed=bool(cfg.get("use_env_seed", True)),
            random_gamma=bool(cfg.get("random_gamma", True)),
            edge_cartesian=bool(cfg.get("edge_cartesian", False)),
            node_cartesian=str(cfg.get("node_cartesian", "none")),
            l_schedule=l_sched,
            m_schedule=m_sched,
            lmax=lmax,
            kmax=kmax,
            extra_node_l=_nonneg(cfg.get("extra_node_l", 0), "extra_node_l"),
            so2_norm=bool(cfg.get("so2_norm", False)),
            mixing_layers=_nonneg(mixing, "mixing_layers"),
            so2_attn_res=_mode(cfg.get("so2_attn_res", "none"), "so2_attn_res", ATTN_RES_MODES),
            radial_so2_mode=_mode(
                cfg.get("radial_so2_mode", "degree_channel"),
                "radial_so2_mode",
                ("none", "degree", "degree_channel"),
            ),
            radial_so2_rank=_nonneg(cfg.get("radial_so2_rank", 1), "radial_so2_rank"),
            n_focus=n_focus,
            focus_dim=focus_dim,
            n_atten_head=heads,
            atten_f_mix=f_mix,
            atten_v_proj=bool(cfg.get("atten_v_proj", False)),
            atten_o_proj=bool(cfg.get("atten_o_proj", False)),
            grid_mlp=_three(cfg.get("grid_mlp", False), "grid_mlp", bool),
            grid_branch=_three(cfg.get("grid_branch", 0), "grid_branch", int),
            ffn_blocks=ffn_blocks,
            sandwich_norm=sandwich,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_scale=bool(cfg.get("layer_scale", False)),
            full_attn_res=full_res,
            block_attn_res=block_res,
            so2_s2_activation=s2_act[0],
            ffn_s2_activation=False if ffn_so3 else s2_act[1],
            ffn_so3_grid=ffn_so3,
            node_wise_s2=bool(cfg.get("node_wise_s2", False)),
            node_wise_so3=bool(cfg.get("node_wise_so3", False)),
            message_node_s2=bool(cfg.get("message_node_s2", False)),
            message_node_so3=bool(cfg.get("message_node_so3", False)),
            so3_readout=_mode(
                cfg.get("so3_readout", "none"), "so3_readout", ("none", "glu", "mlp")
            ),
            readout_layers=readout_layers,
            so2_lebedev=_pair(cfg.get("lebedev_quadrature", True), "lebedev_quadrature")[0],
            ffn_lebedev=_pair(cfg.get("lebedev_quadrature", True), "lebedev_quadrature")[1],
            activation_function=str(cfg.get("activation_function", "silu")),
            glu_activation=bool(cfg.get("glu_activation", True)),
            use_amp=bool(cfg.get("use_amp", True)),
            add_chg_spin_ebd=bool(cfg.get("add_chg_spin_ebd", False)),
            default_chg_spin=None if chg is None else (float(chg[0]), float(chg[1])),
            exclude_types=tuple(tuple(int(t) for t in p) for p in cfg.get("exclude_types", [])),
            precision=str(cfg.get("precision", "float32")),
            eps=float(cfg.get("eps", 1e-7)),
            seed=cfg.get("seed"),
            inner_clamp=inner_clamp,
            ffn_neurons=_nonneg(cfg.get("ffn_neurons", 0), "ffn_neurons"),
        )
        dtype_of(opts.precision)  # validates the name
        return opts


def _nonneg(value, name: str) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"descriptor.{name} must be >= 0, got {value}")
    return value


def _schedules(cfg: dict) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Per-block degrees ``l_schedule``, orders ``m_schedule`` and the input degree ``lmax``."""
    lmax_cfg = int(cfg.get("lmax", 3))
    if cfg.get("l_schedule") is None:
        l_sched = (lmax_cfg,) * _nonneg(cfg.get("n_blocks", 3), "n_blocks")
    else:
        l_sched = tuple(int(x) for x in cfg["l_schedule"])
    if any(l < 0 for l in l_sched):
        raise ValueError("descriptor.l_schedule entries must be >= 0")
    if any(a < b for a, b in itertools.pairwise(l_sched)):
        raise ValueError(f"descriptor.l_schedule must be non-increasing, got {list(l_sched)}")
    mmax = cfg.get("mmax", 1)
    if cfg.get("m_schedule") is not None:
        m_sched = tuple(int(x) for x in cfg["m_schedule"])
    elif mmax is None:
        m_sched = l_sched
    else:
        m_sched = tuple(min(_nonneg(mmax, "mmax"), l) for l in l_sched)
    if len(m_sched) != len(l_sched):
        raise ValueError("descriptor.m_schedule must have one entry per block")
    if any(not 0 <= m <= l for m, l in zip(m_sched, l_sched)):
        raise ValueError(
            "descriptor.m_schedule entries must satisfy 0 <= m_schedule[i] <= l_schedule[i]"
        )
    lmax = l_sched[0] if l_sched else lmax_cfg
    return l_sched, m_sched, lmax
