"""Format versions of the descriptor state (DeePMD-kit 3.2 numbering, ``version_tensor``).

1.0 used a tiny degree floor and no envelope on the radial features (the descriptor keeps
those maths behind ``legacy_radial``); 1.1 and later share today's maths, except for the
native-spin gate of the environment seed, which :func:`upgrade_state` rewrites while a state
dict is loaded.
"""

from __future__ import annotations

import torch

#: The version that brought today's radial maths (degree floor, envelope on the radial features).
RADIAL_ENVELOPE_VERSION = 1.1
#: The version that moved the native-spin gate of the environment seed.
SPIN_GATE_VERSION = 1.2
#: The version a descriptor writes.
LATEST_VERSION = 1.2

#: Native-spin weights that decide whether spin reaches the output at all.
_SPIN_ROUTES = (
    "spin_embedding.mag_layer2.matrix",
    "spin_embedding.adam_spin_vec_weight",
    "spin_embedding.adam_spin_nbr_weight",
    "env_seed_embedding.spin_scale",
)


def with_version(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's model state, with ``descriptor.version_tensor = 1.0`` if it has a
    descriptor but no version (written before the descriptor carried one)."""
    key = "descriptor.version_tensor"
    if key not in state and any(name.startswith("descriptor.") for name in state):
        state = {**state, key: torch.tensor(1.0, dtype=torch.float64)}
    return state


def upgrade_state(state: dict, prefix: str, use_spin: list[bool] | None) -> float | None:
    """Rewrite a version-1.1 descriptor state (keys under ``prefix``) to 1.2, in place, and
    return the version it was written in (``None`` if ``state`` holds no version).

    1.2 moved the environment-seed spin gate ``c`` from the spin coordinates (``c s``, so the
    spin block of ``D`` scaled as ``c^2``) to the spin block itself: ``c -> c^2`` keeps the
    function. A native-spin descriptor without magnetic types (``use_spin`` all False) instead
    has its dormant spin routes zeroed. Other versions are left alone.
    """
    key = prefix + "version_tensor"
    if key not in state:
        return None
    version = float(state[key])
    if not RADIAL_ENVELOPE_VERSION <= version < SPIN_GATE_VERSION:
        return version
    gate = prefix + "env_seed_embedding.spin_scale"
    if use_spin is not None and not any(use_spin):
        for name in _SPIN_ROUTES:
            if prefix + name in state:
                state[prefix + name] = torch.zeros_like(state[prefix + name])
    elif gate in state:
        state[gate] = state[gate] ** 2
    state[key] = torch.tensor(SPIN_GATE_VERSION, dtype=torch.float64)
    return version
