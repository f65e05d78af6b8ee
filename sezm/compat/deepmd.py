"""DeePMD-kit checkpoint layout <-> sezm modules.

A DeePMD-kit 3.2 ``.pt`` checkpoint is ``{"model": state, ["optimizer": ...], ["ema": ...]}``
with ``state["_extra_state"] = {"model_params": <normalised model section>, "train_infos": ...}``
and tensors under ``model.<branch>.`` (``Default`` for single-task models). sezm modules use
the same parameter names below the atomic model, so the mapping is a fixed set of prefixes:

    model.<branch>.atomic_model.descriptor.*   <->  descriptor.*
    model.<branch>.atomic_model.fitting_net.*  <->  fitting_net.*
    model.<branch>.atomic_model.dens_fitting_net.*  <->  dens_fitting_net.*  (``dens`` head)
    model.<branch>.atomic_model.{out_bias,out_std,dens_force_rmsd}  <->  same names
    model.<branch>.{min_nbor_dist, inter_potential.*}               <->  same names

Keys that cannot be represented raise an error naming them; nothing is dropped silently.
Checkpoint contents are read as stored (:func:`~sezm.config.check_stored_model` only warns), so
optional entries are looked up with the meaning of their absence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import check_stored_model
from ..train.lora import fold_lora, has_lora
from .descriptor_versions import with_version

_PREFIXES = (
    ("atomic_model.descriptor.", "descriptor."),
    ("atomic_model.fitting_net.", "fitting_net."),
    ("atomic_model.", ""),
    ("", ""),
)


class CheckpointError(ValueError):
    """A checkpoint that sezm cannot read faithfully."""


@dataclass
class Checkpoint:
    """One model branch of a checkpoint, in sezm names."""

    path: str
    model_params: dict
    state: dict[str, torch.Tensor]
    train_infos: dict = field(default_factory=dict)
    branch: str = "Default"
    extra: dict = field(default_factory=dict)  # optimizer / ema / sezm training state


def load_checkpoint(path: str | os.PathLike, head: str | None = None) -> Checkpoint:
    """Read a DeePMD-kit (or sezm) ``.pt`` checkpoint and select one branch."""
    path = os.fspath(path)
    raw = _read(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(raw).__name__}")
    state = raw.get("model", raw)  # a bare state dict has no "model" level
    extra_state = state.get("_extra_state")
    if not isinstance(extra_state, dict) or "model_params" not in extra_state:
        raise CheckpointError(
            f"{path}: no '_extra_state.model_params' entry; this is not a DeePMD-kit/sezm "
            "training checkpoint (a frozen .pt2 model is read with sezm.DeepPot directly)"
        )
    params = extra_state["model_params"]
    check_stored_model(params, path)
    branch, params = _select_branch(path, params, head)
    prefix = f"model.{branch}."
    others = [k for k in state if k != "_extra_state" and not k.startswith("model.")]
    if "model_dict" not in extra_state["model_params"]:
        others += [k for k in state if k.startswith("model.") and not k.startswith(prefix)]
    if others:
        raise CheckpointError(f"{path}: entries outside the model branch {branch!r}: {others[:10]}")
    tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors under '{prefix}'")
    try:
        renamed = with_version(_rename(tensors))
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return Checkpoint(
        path=path,
        model_params=params,
        state=renamed,
        train_infos=dict(extra_state.get("train_infos", {})),  # absent: nothing recorded
        branch=branch,
        extra={k: v for k, v in raw.items() if k != "model"},
    )


def read_model_params(path: str | os.PathLike) -> dict:
    """The whole ``model_params`` of a checkpoint (every branch of a multi-task one)."""
    raw = _read(os.fspath(path))
    # a bare state dict has no "model" level
    extra = raw.get("model", raw).get("_extra_state") if isinstance(raw, dict) else None
    if not isinstance(extra, dict) or "model_params" not in extra:
        raise CheckpointError(f"{path}: no '_extra_state.model_params'; not a training checkpoint")
    return extra["model_params"]


def _read(path: str):
    """``torch.load`` of a checkpoint file; a missing or unreadable file named in the error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err


def _select_branch(path: str, params: dict, head: str | None) -> tuple[str, dict]:
    if "model_dict" not in params:
        if head not in (None, "Default"):
            raise CheckpointError(f"{path}: single-task checkpoint has no head {head!r}")
        return "Default", params
    branches = params["model_dict"]
    if head is None:
        raise CheckpointError(
            f"{path}: multi-task checkpoint; choose a head from {sorted(branches)}"
        )
    if head in branches:
        return head, branches[head]
    for name, branch_params in branches.items():
        if head in branch_params.get("model_branch_alias", []):  # absent: no alias
            return name, branch_params
    raise CheckpointError(f"{path}: no head {head!r}; available: {sorted(branches)}")


_ATOMIC_BUFFERS = ("out_bias", "out_std", "dens_force_rmsd")
_ATOMIC_MODULES = ("descriptor.", "fitting_net.", "dens_fitting_net.")


def _to_sezm_name(key: str) -> str:
    for sub in _ATOMIC_MODULES:
        if key.startswith("atomic_model." + sub):
            return key[len("atomic_model.") :]
    if key.startswith("atomic_model.") and key[len("atomic_model.") :] in _ATOMIC_BUFFERS:
        return key[len("atomic_model.") :]
    if key == "min_nbor_dist" or key.startswith("inter_potential."):
        return key
    raise CheckpointError(f"checkpoint entry {key!r} has no counterpart in sezm")


def _rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_to_sezm_name(k): v for k, v in tensors.items()}


def to_deepmd_state(
    state: dict[str, torch.Tensor], branch: str = "Default"
) -> dict[str, torch.Tensor]:
    """sezm model state -> DeePMD-kit key names (without ``_extra_state``)."""
    out = {}
    for key, value in state.items():
        atomic = key.startswith(_ATOMIC_MODULES) or key in _ATOMIC_BUFFERS
        name = "atomic_model." + key if atomic else key
        out[f"model.{branch}.{name}"] = value
    return out


def from_deepmd_state(
    state: dict[str, torch.Tensor], branch: str = "Default"
) -> dict[str, torch.Tensor]:
    """DeePMD-kit model state (``model.<branch>.*`` keys) -> sezm key names; other branches and
    non-tensor entries (``_extra_state``) are left out."""
    prefix = f"model.{branch}."
    return _rename(
        {
            k[len(prefix) :]: v
            for k, v in state.items()
            if k.startswith(prefix) and torch.is_tensor(v) and not k.endswith("_extra_state")
        }
    )


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists missing and unexpected keys by name.

    LoRA adapter entries (``A_*``, ``B_*``, ``lora_scaling``) are folded into their base
    weights when ``module`` has no adapters (DeePMD-kit's load-time behaviour).
    """
    if not has_lora(module):
        state = fold_lora(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        lines = [f"{source}: checkpoint does not match the model built from its own model_params"]
        if unexpected:
            lines.append("  entries the model cannot represent: " + ", ".join(unexpected[:20]))
        if missing:
            lines.append(
                "  entries the model needs but the checkpoint lacks: " + ", ".join(missing[:20])
            )
        raise CheckpointError("\n".join(lines))
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        detail = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:10]
        )
        raise CheckpointError(f"{source}: shape mismatch: {detail}")
    _check_constants(own, state, source)
    module.load_state_dict(state, strict=True)


#: Buffers that are functions of the configuration (index maps, quadrature weights, element
#: numbers). The model uses its own values, so a checkpoint holding different ones is rejected.
DERIVED_BUFFERS = {
    "expand_index",
    "balance_weight",
    "l1_perm",
    "l1_sign_outer",
    "m0_idx",
    "pos_indices",
    "neg_indices",
    "kernel_compact_index",
    "kernel_dense_index",
    "degree_index_m",
    "non_scalar_row_index",
    "zonal_m0_col_index_for_row",
    "radial_slot_index_for_row",
    "atomic_numbers",
}


def _check_constants(own: dict, state: dict, source: str) -> None:
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] not in DERIVED_BUFFERS:
            continue
        mine = own[key]
        same = (
            torch.allclose(value.to(mine.dtype), mine, rtol=1e-6, atol=0)
            if mine.is_floating_point()
            else torch.equal(value.to(mine.dtype), mine)
        )
        if not same:
            raise CheckpointError(
                f"{source}: constant buffer {key!r} differs from the value its configuration implies"
            )
