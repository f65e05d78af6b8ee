"""``sezm change-bias``: a new per-type output bias for a checkpoint (``dp --pt change-bias``).

Three ways to get it, as in DeePMD-kit 3.2:

* ``change`` (default): evaluate the model on the frames and add the least-squares fit of
  ``label - prediction`` to ``out_bias``; ``out_std`` becomes the std of what remains. This is
  the change-by-statistic of fine-tuning (:func:`sezm.train.finetune.change_out_bias`).
* ``set``: the least-squares fit of the labels alone, as when training starts, and (for models
  with ``fparam``/``aparam``) their statistics again (:func:`sezm.data.stats.model_stats`).
* ``bias_value``: one value per element of the type map (energy models only).

Frames: ``numb_batch`` per system, drawn at random without replacement (DeePMD-kit's loader
shuffles, unseeded, with batches of one frame); 0 takes every frame, so the result does not
depend on the draw. ``preset_out_bias`` and ``atom_exclude_types`` of the model apply.

The new checkpoint is the old one with only the tensors of :data:`CHANGED` rewritten (in the
selected branch); optimizer, EMA, ``train_infos`` and every other tensor stay as they were.
It is written atomically, by default next to the input as ``<name>_updated.pt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..compat.deepmd import CheckpointError, to_deepmd_state
from ..data import DataSystem, FileOptions, expand_systems, fields_for_model, model_stats
from ..model.build import load_model
from ..model.dens import DensModel
from ..model.property_model import PropertyModel
from ..train.checkpoint import atomic_save
from ..train.finetune import change_out_bias

log = logging.getLogger("sezm")

MODES = ("change", "set")

#: The tensors change-bias may rewrite (sezm names); the fitting statistics only in mode set.
CHANGED = (
    "out_bias",
    "out_std",
    "fitting_net.fparam_avg",
    "fitting_net.fparam_inv_std",
    "fitting_net.aparam_avg",
    "fitting_net.aparam_inv_std",
)


class ChangeBiasError(ValueError):
    """A change-bias request that cannot be carried out (the message names the file)."""


@dataclass
class ChangeBiasResult:
    """What :func:`change_bias` did: ``before``/``after`` are ``out_bias`` ``(ntypes, dim)``."""

    output: Path
    type_map: list[str]
    before: np.ndarray
    after: np.ndarray
    mode: str  # "change", "set" or "user"


def default_output(path: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model_updated.pt``, in the same directory."""
    path = Path(path)
    return path.with_name(path.stem + "_updated.pt")


def read_systems(system: str | Sequence[str] = ".", datafile: str | None = None) -> list[str]:
    """Systems under ``system`` (searched recursively), or those listed in ``datafile``."""
    if datafile is None:
        return expand_systems(system)
    try:
        lines = Path(datafile).read_text().splitlines()
    except OSError as err:
        raise ChangeBiasError(f"{datafile}: cannot read the list of systems ({err})") from None
    systems = [line.strip() for line in lines if line.strip()]
    if not systems:
        raise ChangeBiasError(f"{datafile}: lists no system")
    return systems


def change_bias(
    checkpoint: str | os.PathLike,
    system: str | Sequence[str] = ".",
    *,
    datafile: str | None = None,
    bias_value: Sequence[float] | None = None,
    numb_batch: int = 0,
    mode: str = "change",
    output: str | os.PathLike | None = None,
    head: str | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    file_options: FileOptions | None = None,
) -> ChangeBiasResult:
    """Write ``checkpoint`` with a new output bias to ``output`` (see the module doc).

    ``bias_value`` replaces the data (``system``/``datafile``, ``numb_batch``, ``mode`` are then
    unused); ``head``: the branch of a multi-task checkpoint; ``seed``: of the frame draw when
    ``numb_batch > 0`` (``None``: random, as DeePMD-kit); ``file_options``: how files among
    the systems are read with ASE.
    """
    path = Path(checkpoint)
    _check_request(path, mode, numb_batch)
    model, ckpt = load_model(path, head)
    if device is not None:
        model.to(device)
    params = ckpt.model_params
    type_map = list(params["type_map"])
    before = model.out_bias[0].detach().cpu().numpy().copy()  # [ntypes, dim]
    if bias_value is not None:
        _set_user_bias(model, path, type_map, bias_value)
        done = "user"
    else:
        if mode == "change" and isinstance(model, DensModel):
            raise ChangeBiasError(
                f"{path}: a dens model; mode change needs its energy predictions, which sezm's "
                "change-by-statistic does not compute for dens models (fine-tuning neither); "
                "use -m set or -b"
            )
        data = _open_data(read_systems(system, datafile), params, numb_batch, seed, file_options)
        _fit_bias(model, data, params, mode, numb_batch, seed)
        done = mode
    after = model.out_bias[0].detach().cpu().numpy().copy()
    if done != "change":  # change_out_bias reports its own change
        log.info(
            "change output bias of %s from %s to %s",
            type_map,
            np.round(before[:, 0], 6).tolist(),
            np.round(after[:, 0], 6).tolist(),
        )
    target = Path(output) if output is not None else default_output(path)
    _write(path, target, model, ckpt.branch)
    log.info("saved model to %s", target)
    return ChangeBiasResult(target, type_map, before, after, done)


def _check_request(path: Path, mode: str, numb_batch: int) -> None:
    """Refuse, before loading anything, a mode, file kind or frame count change-bias cannot use."""
    if mode not in MODES:
        raise ChangeBiasError(f"mode must be one of {MODES}, not {mode!r}")
    if path.suffix != ".pt":
        kind = "a frozen model" if path.suffix in (".pt2", ".pth") else "not a checkpoint"
        raise ChangeBiasError(
            f"{path}: {kind}; change-bias reads a training checkpoint (.pt) and writes another "
            "(change the bias of the checkpoint, then freeze it again)"
        )
    if numb_batch < 0:
        raise ChangeBiasError(f"numb_batch must be >= 0 (0: every frame), not {numb_batch}")


def _fit_bias(model, data, params: dict, mode: str, numb_batch: int, seed: int | None) -> None:
    """A new ``out_bias`` from ``numb_batch`` frames per system (0: all): mode ``change`` adds
    the fit of what the model misses, mode ``set`` fits the labels alone."""
    nbatch = numb_batch or max(len(kept) for kept in data.kept)
    stat_params = {**params, "data_stat_nbatch": nbatch}
    if mode == "change":
        change_out_bias(model, data, stat_params, seed)
    else:
        _set_by_statistic(model, data, stat_params)


def _set_user_bias(model, path: Path, type_map: list[str], values: Sequence[float]) -> None:
    """``out_bias`` set to ``values``, one per element of ``type_map`` (energy models only)."""
    if isinstance(model, PropertyModel):
        raise ChangeBiasError(
            f"{path}: a property model; bias values (-b) are for energy models only "
            "(use mode change or set with data)"
        )
    if len(values) != len(type_map):
        raise ChangeBiasError(
            f"{path}: {len(values)} bias value(s) given for the {len(type_map)} types of the "
            f"type map {type_map}; give one per type, in that order"
        )
    if tuple(model.out_bias.shape) != (1, len(type_map), 1):
        raise ChangeBiasError(
            f"{path}: out_bias has shape {tuple(model.out_bias.shape)}, not one value per "
            f"element of {type_map}; bias values (-b) cannot be mapped onto it"
        )
    with torch.no_grad():
        model.out_bias.copy_(torch.as_tensor(values, dtype=torch.float64).view(1, -1, 1))


def _open_data(
    systems: list[str],
    params: dict,
    numb_batch: int,
    seed: int | None,
    file_options: FileOptions | None = None,
):
    """The systems with batches of one frame; every label optional (model inputs keep
    their own rule)."""
    fields = {
        k: replace(f, must=f.must and k in ("fparam", "aparam", "charge_spin", "spin"))
        for k, f in fields_for_model(params).items()
    }
    data = DataSystem(
        systems,
        params["type_map"],
        batch_size=1,
        fields=fields,
        file_options=file_options,
        seed=seed,
    )
    frames = [len(kept) for kept in data.kept]
    log.info(
        "change-bias on %d system(s), %s frame(s) of each (%d in all)",
        len(data.systems),
        numb_batch or "all",
        sum(min(n, numb_batch) if numb_batch else n for n in frames),
    )
    return data


def _set_by_statistic(model, data, params: dict) -> None:
    """``out_bias``/``out_std`` (and the fparam/aparam statistics) from the data alone."""
    stat_params = getattr(model, "stat_params", params)  # deepspin: with its virtual types
    if stat_params is not params:
        stat_params = {**stat_params, "data_stat_nbatch": params["data_stat_nbatch"]}
    model_stats(data, stat_params).apply_to(model)


def _write(source: Path, target: Path, model, branch: str) -> None:
    """``source`` with the :data:`CHANGED` tensors of ``branch`` taken from ``model``."""
    raw = torch.load(source, map_location="cpu", weights_only=True)
    state = raw.get("model", raw)
    own = model.state_dict()
    changed = {k: own[k].detach().cpu() for k in CHANGED if own.get(k) is not None}
    for key, value in to_deepmd_state(changed, branch).items():
        stored = state.get(key)
        if stored is None:
            raise CheckpointError(f"{source}: no entry {key!r} to write the new value into")
        if stored.shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(stored.shape)}, the model {tuple(value.shape)}"
            )
        stored.copy_(value.to(stored.dtype))  # in place: tensors sharing it stay shared
    atomic_save(raw, target)
