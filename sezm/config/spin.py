"""The ``model/spin`` block of a normalised model section, read into per-type settings.

The schema admits the block's keys and types; what depends on the model's ``type_map`` (the
magnetic types, the virtual-atom scales, the plain-model section of the virtual-atom scheme) is
read here, with a :class:`ConfigError` naming the key when the block does not fit the types.
"""

from __future__ import annotations

import copy
from typing import Any

from .descriptor_options import neighbour_cap
from .errors import ConfigError


def use_spin_flags(spin: dict[str, Any], type_map: list[str]) -> list[bool]:
    """``spin.use_spin`` (one bool per type, type indices or element symbols) as one bool per
    type."""
    flags, ntypes = list(spin["use_spin"]), len(type_map)
    if not flags:
        return [False] * ntypes
    if all(isinstance(f, bool) for f in flags):
        if len(flags) != ntypes:
            raise ConfigError(
                "model/spin/use_spin", f"has {len(flags)} flags for {ntypes} types {type_map}"
            )
        return flags
    index = {name: i for i, name in enumerate(type_map)}
    unknown = [f for f in flags if isinstance(f, str) and f not in index]
    if unknown:
        raise ConfigError(
            "model/spin/use_spin", f"names {unknown}, which are not in type_map {type_map}"
        )
    chosen = {index[f] if isinstance(f, str) else int(f) for f in flags}
    if any(not 0 <= t < ntypes for t in chosen):
        raise ConfigError(
            "model/spin/use_spin", f"type index out of range [0, {ntypes}): {sorted(chosen)}"
        )
    return [t in chosen for t in range(ntypes)]


def virtual_scales(spin: dict[str, Any], use_spin: list[bool]) -> list[float]:
    """``virtual_scale`` per type (given per type, per magnetic type or once), 0 if
    non-magnetic."""
    scale = spin.get("virtual_scale")  # no schema default: required by deepspin only
    if scale is None:
        raise ConfigError("model/spin/virtual_scale", "the deepspin scheme needs it")
    magnetic = [t for t, f in enumerate(use_spin) if f]
    if isinstance(scale, (int, float)):
        per_type = [float(scale)] * len(use_spin)
    elif len(scale) == len(use_spin):
        per_type = [float(x) for x in scale]
    elif len(scale) == len(magnetic):
        per_type = [0.0] * len(use_spin)
        for t, x in zip(magnetic, scale):
            per_type[t] = float(x)
    else:
        raise ConfigError(
            "model/spin/virtual_scale",
            f"has {len(scale)} values; give {len(use_spin)} (one per type) "
            f"or {len(magnetic)} (one per magnetic type)",
        )
    return [x if f else 0.0 for x, f in zip(per_type, use_spin)]


def spin_scheme(model: dict[str, Any]) -> str:
    """``native`` or ``deepspin``: the spin scheme of a normalised model section, lower-cased
    (the schema admits only these two, in any case)."""
    return model["spin"]["scheme"].lower()


def virtual_model_params(params: dict) -> dict:
    """The plain-model section of a deepspin model: type map ``T + [t_spin]``, placeholder pair
    exclusions, virtual types excluded from the energy, ``sel = [2 sum(sel) + 1]``."""
    p = copy.deepcopy(params)
    real = list(p["type_map"])
    nt = len(real)
    use_spin = use_spin_flags(p["spin"], real)
    desc = p["descriptor"]
    desc["sel"] = [2 * neighbour_cap(params) + 1]
    placeholders = [nt + t for t in range(nt) if not use_spin[t]]
    pairs = [[a, b] for a in placeholders for b in range(2 * nt)]
    real_pairs = [list(x) for x in p["pair_exclude_types"] or desc["exclude_types"]]
    p["pair_exclude_types"] = desc["exclude_types"] = pairs + real_pairs
    atoms = set(range(nt, 2 * nt)) | {int(t) for t in p["atom_exclude_types"]}
    p["atom_exclude_types"] = sorted(atoms)
    p["type_map"] = real + [t + "_spin" for t in real]
    return p
