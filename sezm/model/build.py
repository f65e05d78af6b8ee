"""Build a model from a normalised ``model`` section, or load one from a checkpoint."""

from __future__ import annotations

import os

from torch import nn

from ..compat.deepmd import Checkpoint, load_checkpoint, load_into
from ..config.normalize import complete_model
from .dens import DensModel
from .energy import EnergyModel
from .property_model import PropertyModel
from .spin import build_spin_model


def build_model(params: dict, dens: bool = False) -> nn.Module:
    """Energy or property model of a single-task model section; ``dens``: the model of the
    ``dens`` loss (an energy model with the direct-force / denoising heads).

    The section is completed first (:func:`~sezm.config.normalize.complete_model`: defaults
    filled, aliases resolved, rules checked), so a checkpoint's stored ``model_params`` of any
    version build like a fresh input; an already normalised section is unchanged by it.
    """
    params = complete_model(params)
    if params.get("spin"):
        if dens:
            raise ValueError("spin models train with the ener_spin loss, not dens")
        return build_spin_model(params)
    fitting = params["fitting_net"]["type"]
    if fitting == "property":
        if dens:
            raise ValueError("the dens loss needs an energy fitting, not a property one")
        return PropertyModel(params)
    if fitting in ("dpa4_ener", "sezm_ener"):
        return DensModel(params) if dens else EnergyModel(params)
    raise ValueError(f"model.fitting_net.type {fitting!r} is not supported by DPA4")


def load_model(
    path: str | os.PathLike, head: str | None = None, precision: str | None = None
) -> tuple[nn.Module, Checkpoint]:
    """Model with the weights of a DeePMD-kit 3.2 or sezm ``.pt`` checkpoint, in eval mode.

    ``precision`` (e.g. ``"float64"``): build the descriptor and fitting in this precision
    instead of the checkpoint's and cast the stored weights to it (``sezm check`` evaluates
    float32 checkpoints in float64 so that rounding does not hide what it measures); the
    returned checkpoint keeps its own ``model_params``.
    """
    ckpt = load_checkpoint(path, head)
    # DeePMD-kit evaluates a checkpoint holding a dens head in the dens mode.
    dens = any(k.startswith("dens_fitting_net.") for k in ckpt.state)
    params = ckpt.model_params
    if precision is not None:
        params = with_precision(params, precision)
    model = build_model(params, dens=dens)
    load_into(model, dict(ckpt.state), ckpt.path)
    return model.eval(), ckpt


def with_precision(params: dict, precision: str) -> dict:
    """A copy of a model section whose descriptor and fitting run in ``precision``."""
    out = dict(params)
    for section in ("descriptor", "fitting_net"):
        out[section] = {**out.get(section, {}), "precision": precision}
    return out
