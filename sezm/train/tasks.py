"""The branches of a run with their data, model and loss, built from the normalised input.

Each branch (``Default`` alone in single-task training) opens its training and validation
data with its own seed (``seed + 2 i`` for the ``i``-th branch, ``+ 1`` for validation, offset
by rank), resolves ``descriptor.sel`` from the neighbour statistics of its data, and takes its
output bias (and ``dens_force_rmsd``) from statistics of its training frames when the run does
not start from weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DataError, DataSystem, StatFile, fields_for_model, model_stats, update_sel
from ..data.stats import force_rmsd
from ..model.dens import DensModel
from ..model.property_model import PropertyModel
from .branches import BranchSpec, Layout
from .distributed import rank_seed
from .losses import build_loss
from .precision import Precision

log = logging.getLogger("sezm.train")


@dataclass
class Task:
    """One model branch with its data, model and loss."""

    name: str
    label: str  # the branch as logs and learning-curve columns name it ("" for a single task)
    params: dict  # normalised model section of the branch (``sel`` and ``info`` filled in)
    data_params: dict  # ``training`` (single-task) or ``training.data_dict[name]``
    loss_params: dict  # ``loss`` (single-task) or ``loss_dict[name]``
    train_data: DataSystem
    valid_data: DataSystem | None
    model: nn.Module | None = None
    loss: Any = None
    min_nbor_dist: float | None = None  # from this run's neighbour statistics
    precision: Precision | None = None

    def tagged(self, text: str) -> str:
        """``text`` of this branch in a log line: ``trn`` or ``<branch>_trn``."""
        return f"{self.label}_{text}" if self.label else text


def open_tasks(layout: Layout, config: dict, seed: int | None, rank: int) -> dict[str, Task]:
    """Every branch of the input with its training and validation data opened."""
    return {
        spec.name: _open_task(spec, rank_seed(None if seed is None else seed + 2 * i, rank))
        for i, spec in enumerate(layout.specs(config))
    }


def _open_task(spec: BranchSpec, seed: int | None) -> Task:
    params, data = spec.params, spec.data
    fields = fields_for_model(params)
    train = _open_data(data, "training_data", spec.where, params["type_map"], fields, seed)
    valid = None
    if data["validation_data"]:
        valid_seed = None if seed is None else seed + 1
        valid = _open_data(
            data, "validation_data", spec.where, params["type_map"], fields, valid_seed
        )
    suffix = f" of {spec.label}" if spec.label else ""
    log.info(train.summary("training data" + suffix))
    if valid is not None:
        log.info(valid.summary("validation data" + suffix))
    return Task(spec.name, spec.label, params, data, spec.loss, train, valid)


def _open_data(
    section: dict, key: str, where: str, type_map: list[str], fields: dict, seed: int | None
) -> DataSystem:
    """``DataSystem`` of ``section[key]``; a data error names the input section."""
    try:
        return DataSystem.from_config(section[key], type_map, fields, seed)
    except DataError as err:
        raise DataError(f"{where}/{key}: {err}") from None


def run_length(training: dict, tasks: dict[str, Task]) -> int:
    """``numb_steps``, or (one branch) ``numb_epoch`` passes over the training data:
    ``ceil(numb_epoch * max_i(n_batches_i / p_i))`` over the systems drawn with ``p_i > 0``,
    DeePMD-kit's epoch length."""
    if training.get("numb_steps") is not None:  # absent when the input gives numb_epoch
        return int(training["numb_steps"])
    if len(tasks) > 1:  # single-task inputs have one of the two (config rules)
        raise ValueError(
            "training/num_epoch_dict is not supported by sezm; give training/numb_steps"
        )
    data = next(iter(tasks.values())).train_data
    probs, nbatches = np.asarray(data.probs), np.asarray(data.nbatches, dtype=np.float64)
    drawn = probs > 0
    epoch = int(np.ceil(np.max(nbatches[drawn] / probs[drawn])))
    steps = int(np.ceil(float(training["numb_epoch"]) * epoch))
    log.info(
        "training/numb_steps = %d: numb_epoch %s x %d batches per epoch",
        steps,
        training["numb_epoch"],
        epoch,
    )
    return steps


def resolve_sel(task: Task, statistics: bool, from_weights: bool) -> None:
    """``descriptor.sel`` (``"auto"`` sized) and ``min_nbor_dist`` from the neighbour
    statistics of the branch's training data; skipped without ``statistics`` (then
    ``"auto"`` is an error unless the weights come from a checkpoint) or with ``from_weights``."""
    desc = dict(task.params["descriptor"])
    sel = desc["sel"]
    if not statistics or from_weights:
        if isinstance(sel, str) and sel.startswith("auto") and not from_weights:
            raise ValueError(
                'descriptor.sel "auto" needs the neighbour statistics; drop --skip-neighbor-stat'
            )
        return
    new_sel, min_dist = update_sel(
        task.train_data.systems, float(desc["rcut"]), sel, len(task.params["type_map"])
    )
    desc["sel"] = new_sel
    task.params["descriptor"] = desc
    task.min_nbor_dist = min_dist
    log.info("neighbour statistics: sel = %s, min_nbor_dist = %.4f A", new_sel, min_dist)


def set_statistics(task: Task, observed: bool = True) -> None:
    """Output bias and standard deviation (and ``dens_force_rmsd``) from the branch's training
    frames (or its ``stat_file``); ``observed``: record the types seen in ``info``."""
    stats = model_stats(
        task.train_data,
        getattr(task.model, "stat_params", task.params),  # deepspin: with virtual types
        task.data_params.get("stat_file"),  # absent: statistics are not stored
        task.data_params["stat_file_mode"],
    )
    stats.apply_to(task.model)
    if isinstance(task.model, DensModel):
        with torch.no_grad():
            task.model.dens_force_rmsd.fill_(dens_force_rmsd(task))
    if observed:
        task.params["info"] = {**task.params["info"], "observed_type": list(stats.observed_type)}
    log.info(
        "output bias per type%s: %s",
        f" of {task.label}" if task.label else "",
        np.asarray(stats.out_bias).reshape(len(stats.out_bias[0]), -1).tolist(),
    )


def dens_force_rmsd(task: Task) -> float:
    """``dens_force_rmsd`` of the statistics frames; kept in the stat file as
    ``rmsd_dforce`` (DeePMD-kit's item)."""
    params, data = task.params, task.data_params
    cache = None
    if data.get("stat_file"):  # absent: statistics are not stored
        cache = StatFile(data["stat_file"], params["type_map"], data["stat_file_mode"])
    stored = None if cache is None else cache.get("rmsd_dforce")
    if stored is not None:
        return float(np.asarray(stored).reshape(-1)[0])
    samples = task.train_data.stat_frames(int(params["data_stat_nbatch"]), ["force"])
    value = force_rmsd(samples, params["atom_exclude_types"])
    if cache is not None:
        cache.put({"rmsd_dforce": np.array([value])})
    log.info("dens force RMSD: %.6g eV/A", value)
    return value


def task_loss(task: Task, start_lr: float):
    """The loss of the branch's ``loss`` section; a property loss learns the fitting's
    dimensions and names."""
    if isinstance(task.model, PropertyModel):
        fit = task.model.fitting_net
        return build_loss(
            task.loss_params,
            start_lr,
            task_dim=fit.task_dim,
            var_name=fit.property_name,
            intensive=fit.intensive,
        )
    return build_loss(task.loss_params, start_lr)
