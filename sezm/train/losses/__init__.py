"""Training losses: ``ener``, ``ener_spin``, ``property`` and ``dens`` (formulas in each module)."""

from __future__ import annotations

from typing import Any

from .common import LabelRequirement, Pref
from .dens import DensBatch, DensLoss
from .energy import EnergyLoss
from .property import PropertyLoss
from .spin import EnergySpinLoss

Loss = EnergyLoss | EnergySpinLoss | PropertyLoss | DensLoss

__all__ = [
    "DensBatch",
    "DensLoss",
    "EnergyLoss",
    "EnergySpinLoss",
    "LabelRequirement",
    "Loss",
    "Pref",
    "PropertyLoss",
    "build_loss",
]


def build_loss(config: dict[str, Any], starter_learning_rate: float, **model_info: Any) -> Loss:
    """The loss of a normalized ``loss`` section.

    ``starter_learning_rate`` is ``learning_rate.start_lr`` (the prefactor schedule's ``lr0``).
    ``model_info`` for ``property``: ``task_dim``, ``var_name`` (the fitting's property name),
    ``intensive``, optionally ``out_bias``/``out_std``; ignored by the other types.
    """
    kind = config["type"]
    if kind == "ener":
        return EnergyLoss(config, starter_learning_rate)
    if kind == "dens":
        return DensLoss(config, starter_learning_rate)
    if kind == "property":
        missing = {"task_dim", "var_name", "intensive"} - set(model_info)
        if missing:
            raise ValueError(f"property loss needs the model's {sorted(missing)}")
        keys = ("task_dim", "var_name", "intensive", "out_bias", "out_std")
        return PropertyLoss(config, **{k: model_info[k] for k in keys if k in model_info})
    if kind == "ener_spin":
        return EnergySpinLoss(config, starter_learning_rate)
    raise ValueError(
        f"unsupported loss type {kind!r}; sezm has `ener`, `ener_spin`, `property` and `dens`"
    )
