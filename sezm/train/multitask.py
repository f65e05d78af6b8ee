"""Multi-task training pieces: shared modules, case one-hots, branch sampling.

A multi-task input has ``model.model_dict`` (one model section per branch) whose
``type_map`` / ``descriptor`` / ``fitting_net`` may name entries of ``model.shared_dict``
(``"name"`` or ``"name:level"``). Branches that name the same entry share its modules:

* descriptor, level 0: every sub-module and top-level parameter; level 1: the type
  embedding (and the charge/spin embedding);
* fitting, level 0: every sub-module; ``bias_atom_e`` and ``case_embd`` stay per branch.

The first branch of a link list is the base whose modules the others take. With
``dim_case_embd = K > 0`` every branch's fitting gets the one-hot of its index among the
sorted branch names (DeePMD-kit's case embedding), set only when training starts fresh.
Each step trains one branch, drawn with ``training.model_prob`` (normalised; by default
proportional to the number of training systems).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import nn


def case_indices(model_dict: Mapping[str, Mapping]) -> dict[str, int]:
    """Branch -> case index (sorted branch order); empty when ``dim_case_embd`` is 0."""
    dims = {k: int(v.get("fitting_net", {}).get("dim_case_embd", 0)) for k, v in model_dict.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"every branch needs the same fitting_net.dim_case_embd, got {dims}")
    if not any(dims.values()):
        return {}
    return {name: i for i, name in enumerate(sorted(model_dict))}


def _share_descriptor(desc: nn.Module, base: nn.Module, level: int) -> None:
    if level == 0:
        for name in desc._modules:
            desc._modules[name] = base._modules[name]
        for name, param in base._parameters.items():
            if param is not None:
                desc._parameters[name] = param
    elif level == 1:
        for name in ("type_embedding", "charge_spin_embedding"):
            desc._modules[name] = base._modules[name]
    else:
        raise NotImplementedError(f"descriptor shared_level {level} (0 or 1 are available)")


def _share_fitting(fit: nn.Module, base: nn.Module, level: int) -> None:
    if level != 0:
        raise NotImplementedError(f"fitting_net shared_level {level} (only 0 is available)")
    if fit.numb_fparam or fit.numb_aparam:
        raise NotImplementedError("a shared fitting_net with fparam/aparam is not available yet")
    for name in fit._modules:
        fit._modules[name] = base._modules[name]


def share_params(models: Mapping[str, nn.Module], links: Mapping[str, list[dict]]) -> None:
    """Let the branches named in each link list use the first one's modules."""
    for uses in links.values():
        base = models[uses[0]["model_key"]]
        for use in uses[1:]:
            model, kind = models[use["model_key"]], use["shared_type"]
            level = int(use["shared_level"])
            if kind == "descriptor":
                _share_descriptor(model.descriptor, base.descriptor, level)
            elif kind == "fitting_net":
                _share_fitting(model.fitting_net, base.fitting_net, level)
            else:
                raise ValueError(f"cannot share {kind!r}")


def model_prob(training: Mapping, names: list[str], n_systems: Mapping[str, int]) -> np.ndarray:
    """Normalised branch probabilities of ``training.model_prob`` (default: systems per branch)."""
    if training.get("num_epoch_dict"):  # multi-task sections only
        raise NotImplementedError("training.num_epoch_dict is not available; use numb_steps")
    given = training.get("model_prob") or {}  # absent in a single-task section: one branch
    if given and (missing := [n for n in names if n not in given]):
        raise ValueError(f"training.model_prob must name every branch; missing: {missing}")
    prob = np.array([float(given[n]) if given else n_systems[n] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(prob)) or (prob < 0).any() or prob.sum() <= 0:
        raise ValueError(f"training.model_prob must be non-negative with a positive sum: {prob}")
    return prob / prob.sum()


class BranchDraw:
    """The branch each training step trains, drawn with the branch probabilities from its own
    generator (one branch: always that one)."""

    def __init__(self, names: list[str], prob: np.ndarray, seed: int | None) -> None:
        self.names, self.prob = names, prob
        self.rng = np.random.default_rng(seed)

    def next(self) -> str:
        return self.names[int(self.rng.choice(len(self.names), p=self.prob))]
