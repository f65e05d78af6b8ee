"""Exponential moving average (EMA) of model parameters.

After every optimizer step ``shadow <- decay * shadow + (1 - decay) * param`` (as
``shadow.lerp_(param, 1 - decay)``), for every floating-point parameter. The state dict,
``{"decay", "model": {name: tensor}, "validation_state": {...}}``, is the ``"ema"`` entry of a
DeePMD-kit 3.2 training checkpoint; ``validation_state`` is carried along for the validator of
the EMA weights.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Models = nn.Module | Mapping[str, nn.Module]


def _named_parameters(model: Models) -> list[tuple[str, torch.Tensor]]:
    """Floating-point parameters by name; for a dict of models (multi-task) ``"<key>.<name>"``
    in sorted key order."""
    if isinstance(model, nn.Module):
        return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    return [(f"{key}.{n}", p) for key in sorted(model) for n, p in _named_parameters(model[key])]


class EMA:
    """Shadow copies of a model's parameters, averaged over the training steps."""

    def __init__(self, model: Models, decay: float = 0.999) -> None:
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow = {n: p.detach().clone() for n, p in _named_parameters(model)}
        self.validation_state: dict[str, Any] = {}

    @torch.no_grad()
    def update(self, model: Models) -> None:
        """Fold the current parameters in: ``shadow <- shadow + (1 - decay)(param - shadow)``."""
        for name, p in _named_parameters(model):
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "model": {n: t.detach().cpu().clone() for n, t in self.shadow.items()},
            "validation_state": copy.deepcopy(self.validation_state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the shadow weights (names and shapes must match); the configured decay wins
        over a different one in ``state``."""
        if "decay" in state and float(state["decay"]) != self.decay:
            warnings.warn(
                f"EMA state has decay {state['decay']}; keeping the configured {self.decay}",
                stacklevel=2,
            )
        weights = state.get("model", {})
        missing, unexpected = self.shadow.keys() - weights.keys(), weights.keys() - self.shadow
        if missing or unexpected:
            raise KeyError(
                "EMA weights do not match the model: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        for name, shadow in self.shadow.items():
            if tuple(weights[name].shape) != tuple(shadow.shape):
                raise ValueError(
                    f"EMA weight {name!r} has shape {tuple(weights[name].shape)}, "
                    f"the model {tuple(shadow.shape)}"
                )
            with torch.no_grad():
                shadow.copy_(weights[name])
        self.validation_state = copy.deepcopy(dict(state.get("validation_state") or {}))

    @contextmanager
    def swapped_in(self, model: Models) -> Iterator[None]:
        """Run the block with the EMA weights in ``model``; its own weights come back after."""
        named = _named_parameters(model)
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in named]
            for name, p in named:
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), own in zip(named, saved, strict=True):
                    p.copy_(own)
