"""The typed descriptor records (``sezm.nn.options``) of a normalised ``model`` section.

The schema (``schema_descriptor``) owns every default and single-key check, and
``rules.check_descriptor`` the rules across keys; both run when an input or a checkpoint's
stored ``model_params`` is normalised. This module only reads that normalised dict
(``cfg["key"]``): it groups the settings by the layers that use them, parses the compact forms
(per-path lists, flag lists, the ``node_cartesian`` string) into named fields and resolves the
settings one key overrides in another (branch activations, the GLU form).
"""

from __future__ import annotations

from typing import Any

from ..nn.options import (
    AttentionOptions,
    DegreeSchedule,
    DescriptorOptions,
    FFNOptions,
    GeometryOptions,
    GridOp,
    GridProduct,
    LayerBasics,
    MessageOptions,
    NodeCartesianSpec,
    ReadoutOptions,
    ResidualOptions,
)
from .errors import ConfigError
from .rules import block_schedules

#: Activation of the branches that an S2-grid SwiGLU replaces.
_S2_GRID_ACTIVATION = "silu"


def bridging_radii(model: dict[str, Any]) -> tuple[float, float] | None:
    """``(r_inner, r_outer)`` of a normalised model section with ZBL zone bridging, else
    ``None`` (the schema admits only ``ZBL`` and ``None``, in any case)."""
    if model["bridging_method"].lower() != "zbl":
        return None
    return float(model["bridging_r_inner"]), float(model["bridging_r_outer"])


def neighbour_cap(model: dict[str, Any]) -> int:
    """``sum(descriptor.sel)``: the cap on the (real) neighbours of each atom in the models
    that keep only the nearest, the deepspin and the dens models."""
    sel = model["descriptor"]["sel"]
    if isinstance(sel, str):
        raise ConfigError(
            "model/descriptor/sel",
            f"this model keeps the sum(sel) nearest neighbours: give numbers, not {sel!r}",
        )
    return int(sum(sel)) if isinstance(sel, (list, tuple)) else int(sel)


def descriptor_options(model: dict[str, Any]) -> DescriptorOptions:
    """Descriptor options of a normalised model section, with the model's pair exclusions
    (``pair_exclude_types``, else the descriptor's ``exclude_types``; the normalisation
    checked that they agree when both are given) and ZBL radii."""
    cfg = model["descriptor"]
    exclude_types = model["pair_exclude_types"] or cfg["exclude_types"]
    chg = cfg["default_chg_spin"]
    grid_ops = tuple(map(GridOp, _per_path(cfg["grid_mlp"], 3), _per_path(cfg["grid_branch"], 3)))
    return DescriptorOptions(
        basics=_basics(cfg),
        geometry=_geometry(cfg, len(model["type_map"]), exclude_types, bridging_radii(model)),
        degrees=_degrees(cfg),
        message=_message(cfg, grid_ops),
        ffn=_ffn(cfg, grid_ops),
        residual=_residual(cfg),
        readout=_readout(cfg),
        use_env_seed=cfg["use_env_seed"],
        use_amp=cfg["use_amp"],
        add_chg_spin_ebd=cfg["add_chg_spin_ebd"],
        default_chg_spin=None if chg is None else (float(chg[0]), float(chg[1])),
        trainable=cfg["trainable"],
        seed=cfg["seed"],
    )


def _per_path(value: Any, n: int) -> tuple:
    """A per-path setting given once or as a list of ``n`` (the schema checked the length)."""
    return tuple(value) if isinstance(value, list) else (value,) * n


def _basics(cfg: dict) -> LayerBasics:
    return LayerBasics(
        channels=cfg["channels"],
        precision=cfg["precision"],
        eps=cfg["eps"],
        mlp_bias=cfg["mlp_bias"],
        activation_function=cfg["activation_function"],
        glu_activation=cfg["glu_activation"],
        edge_norm=cfg["edge_norm"],
        layer_scale=cfg["layer_scale"],
    )


def _geometry(cfg: dict, ntypes: int, exclude_types, inner_clamp) -> GeometryOptions:
    rbf_env_exp, edge_env_exp = cfg["env_exp"]
    channels = cfg["channels"]
    return GeometryOptions(
        ntypes=ntypes,
        rcut=float(cfg["rcut"]),
        rbf_env_exp=rbf_env_exp,
        edge_env_exp=edge_env_exp,
        basis_type=cfg["basis_type"].lower(),
        n_radial=cfg["n_radial"],
        radial_hidden=tuple(channels if x == 0 else x for x in cfg["radial_mlp"]),
        random_gamma=cfg["random_gamma"],
        exclude_types=tuple((int(a), int(b)) for a, b in exclude_types),
        inner_clamp=inner_clamp,
    )


def _degrees(cfg: dict) -> DegreeSchedule:
    l_sched, m_sched = block_schedules(cfg)
    return DegreeSchedule(
        l_schedule=l_sched,
        m_schedule=m_sched,
        lmax=l_sched[0] if l_sched else cfg["lmax"],
        kmax=cfg["kmax"],
        extra_node_l=cfg["extra_node_l"],
    )


def _message(cfg: dict, grid_ops: tuple[GridOp, ...]) -> MessageOptions:
    """``grid_ops``: the grid operations of the node-wise, message-node and FFN paths."""
    s2_activation = cfg["s2_activation"][0]
    return MessageOptions(
        n_focus=cfg["n_focus"],
        focus_dim=cfg["focus_dim"] or cfg["channels"],
        mixing_layers=cfg["mixing_layers"],
        so2_norm=cfg["so2_norm"],
        layer_attn_res=cfg["so2_attn_res"],
        radial_mode=cfg["radial_so2_mode"],
        radial_rank=cfg["radial_so2_rank"],
        s2_activation=s2_activation,
        lebedev=_per_path(cfg["lebedev_quadrature"], 2)[0],
        edge_cartesian=cfg["edge_cartesian"],
        node_cartesian=parse_node_cartesian(cfg["node_cartesian"]),
        node_wise=GridProduct(cfg["node_wise_s2"], cfg["node_wise_so3"], grid_ops[0]),
        message_node=GridProduct(cfg["message_node_s2"], cfg["message_node_so3"], grid_ops[1]),
        attention=AttentionOptions(
            n_heads=cfg["n_atten_head"],
            f_mix=cfg["atten_f_mix"],
            v_proj=cfg["atten_v_proj"],
            o_proj=cfg["atten_o_proj"],
        ),
        activation_function=_S2_GRID_ACTIVATION if s2_activation else cfg["activation_function"],
    )


def _ffn(cfg: dict, grid_ops: tuple[GridOp, ...]) -> FFNOptions:
    so3_grid = cfg["ffn_so3_grid"]
    s2_activation = cfg["s2_activation"][1] and not so3_grid  # the SO(3) grid overrides it
    return FFNOptions(
        blocks=cfg["ffn_blocks"],
        neurons=cfg["ffn_neurons"],
        s2_activation=s2_activation,
        so3_grid=so3_grid,
        lebedev=_per_path(cfg["lebedev_quadrature"], 2)[1],
        grid=grid_ops[2],
        activation_function=_S2_GRID_ACTIVATION if s2_activation else cfg["activation_function"],
        glu=s2_activation or so3_grid or cfg["glu_activation"],
    )


def _readout(cfg: dict) -> ReadoutOptions:
    """The read-out FFNs: the base activation and GLU form, an SO(3) grid unless ``none``."""
    mode = cfg["so3_readout"]
    ffn = FFNOptions(
        blocks=cfg["readout_layers"],
        neurons=cfg["ffn_neurons"],
        s2_activation=False,
        so3_grid=mode != "none",
        lebedev=False,
        grid=GridOp(mlp=mode == "mlp", branches=0),
        activation_function=cfg["activation_function"],
        glu=cfg["glu_activation"],
    )
    return ReadoutOptions(mode, ffn)


def _residual(cfg: dict) -> ResidualOptions:
    so2_pre, so2_post, ffn_pre, ffn_post = cfg["sandwich_norm"]  # the schema's 4-list
    return ResidualOptions(
        so2_pre_norm=so2_pre,
        so2_post_norm=so2_post,
        ffn_pre_norm=ffn_pre,
        ffn_post_norm=ffn_post,
        full_attn_res=cfg["full_attn_res"],
        block_attn_res=cfg["block_attn_res"],
    )


def parse_node_cartesian(spec: str | int) -> NodeCartesianSpec:
    """``"none"``/``""`` | ``"default[:N]"`` | ``"parity[:N]"`` | ``N`` (default mode).

    A bare mode means one layer, an empty mode before ``:`` means "default"; zero layers disables.
    """
    text = str(spec).strip().lower()
    if text in ("", "none"):
        return NodeCartesianSpec(False, False, 0)
    mode, _, count = text.rpartition(":") if ":" in text else ("", "", text)
    if not count.strip().isdigit():  # a bare mode: one layer
        mode, count = text, "1"
    mode = mode.strip() or "default"
    if mode not in ("default", "parity"):
        raise ConfigError(
            "model/descriptor/node_cartesian",
            f"expected 'none', '<default|parity>[:<layers >= 0>]' or a layer count, got {spec!r}",
        )
    layers = int(count)
    return NodeCartesianSpec(layers > 0, mode == "parity", layers)
