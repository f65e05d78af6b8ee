"""Build a model from a normalised ``model`` section, or load one from a checkpoint."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..compat.deepmd import Checkpoint, load_checkpoint, load_into
from .energy import EnergyModel
from .property_model import PropertyModel
from .spin import build_spin_model


def build_model(params: dict) -> nn.Module:
    """Energy or property model of a normalised model section."""
    if params.get("spin"):
        return build_spin_model(params)
    fitting = params.get("fitting_net", {}).get("type", "dpa4_ener")
    if fitting == "property":
        return PropertyModel(params)
    if fitting in ("dpa4_ener", "sezm_ener"):
        return EnergyModel(params)
    raise ValueError(f"model.fitting_net.type {fitting!r} is not supported by DPA4")


def load_model(path: str | os.PathLike, head: str | None = None) -> tuple[nn.Module, Checkpoint]:
    """Model with the weights of a DeePMD-kit 3.2 or sezm ``.pt`` checkpoint, in eval mode."""
    ckpt = load_checkpoint(path, head)
    model = build_model(ckpt.model_params)
    state = dict(ckpt.state)
    # Checkpoints written before the descriptor carried a version use the 1.0 semantics.
    version = float(
        state.setdefault("descriptor.version_tensor", torch.tensor(1.0, dtype=torch.float64))
    )
    load_into(model, state, ckpt.path)
    model.descriptor.legacy_radial = version < 1.1
    return model.eval(), ckpt
