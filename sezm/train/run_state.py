"""Checkpoints of a run and the exact restart from one.

A checkpoint after step ``s`` holds the model in DeePMD-kit's layout (``checkpoint.py``), the
optimizer state, the EMA state, and sezm's run state ``{"next_step", "rng"[, "rng_ranks"]}``:
the random state of torch, of every sampler and of the branch draw, per rank. A restart puts
all of it back, so the run continues exactly as if it had not stopped. Besides the periodic
checkpoints (and their EMA twins) a run writes best checkpoints chosen by full validation and,
with LoRA, ``<save_ckpt>[_ema]_merged.pt``: the adapters folded into a plain DPA4 checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from ..compat.deepmd import to_deepmd_state
from .checkpoint import atomic_save, branches_state
from .distributed import optimizer_state
from .faults import TrainingError
from .lora import merged_state_dict, strip_lora
from .setup import TrainingSetup

log = logging.getLogger("sezm.train")


class RunCheckpoints:
    """The checkpoints a run writes; every method is called on every rank, rank 0 writes."""

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup

    def save(self, step: int, lr: float) -> Path | None:
        """Checkpoint after ``step`` (0-based) in DeePMD-kit's layout, plus sezm's run state;
        written by rank 0 (its path; ``None`` elsewhere)."""
        s = self.setup
        obj = self._checkpoint(step, lr)
        if obj is None:
            return None
        path = s.store.save(obj, step + 1)
        log.info("saved checkpoint %s", path)
        if s.ema is not None:
            s.ema_store.save(self._ema_checkpoint(step, lr), step + 1)
        return path

    def save_untrained(self) -> None:
        """``numb_steps: 0``: no step to train; the model with its data statistics is saved as
        checkpoint 0 (as DeePMD-kit does)."""
        path = self.save(-1, self.setup.lr.value(0))
        if path is not None:
            log.info(
                "training/numb_steps is 0: no training step; saved the untrained model (data "
                "statistics, initial weights) as %s",
                path,
            )

    def save_best(self, path: Path, step: int, lr: float, on_ema: bool) -> None:
        """A best checkpoint chosen by full validation: the EMA weights alone, or the full
        resumable state; a LoRA run writes it merged (a plain DPA4 checkpoint)."""
        if self.setup.lora:
            if self.setup.dist.is_main:
                self.save_merged(step, lr, use_ema=on_ema, path=path)
            return
        obj = self._ema_checkpoint(step, lr) if on_ema else self._checkpoint(step, lr)
        if self.setup.dist.is_main:
            atomic_save(obj, path)

    def save_merged(
        self, step: int, lr: float, use_ema: bool = False, path: Path | None = None
    ) -> Path:
        """``<save_ckpt>[_ema]_merged.pt`` (or ``path``): the LoRA adapters folded into the
        base weights, ``lora`` dropped from ``model_params``, no optimizer state (a plain DPA4
        checkpoint)."""
        s = self.setup
        store = s.ema_store if use_ema else s.store
        path = path or store.directory / f"{store.prefix.name}_merged.pt"
        with self._weights(use_ema):
            tensors = {k: v.cpu() for k, v in merged_state_dict(s.model).items()}
        state = {
            "_extra_state": {
                "model_params": strip_lora(s.model_params),
                "train_infos": {**s.train_infos, "lr": float(lr), "step": int(step)},
            },
            **to_deepmd_state(tensors),
        }
        atomic_save({"model": state}, path)
        log.info("saved merged LoRA checkpoint %s", path)
        return path

    def remove_stale_temps(self) -> None:
        """Temporary files of saves that were killed in an earlier run (rank 0)."""
        if not self.setup.dist.is_main:
            return
        for store in (self.setup.store, self.setup.ema_store):
            removed = store.remove_stale_temps()
            if removed:
                log.info(
                    "removed %d temporary file(s) of an interrupted earlier save: %s",
                    len(removed),
                    ", ".join(str(p) for p in removed),
                )

    def _weights(self, use_ema: bool):
        """The block runs with the EMA weights in the model when ``use_ema``."""
        s = self.setup
        return s.ema.swapped_in(s.ema_models) if use_ema else contextlib.nullcontext()

    def _model_state(self, lr: float, step: int) -> dict:
        s = self.setup
        step = max(step, 0)  # the untrained model of `numb_steps: 0` is saved as step 0
        models = {name: task.model for name, task in s.tasks.items()}
        return branches_state(models, s.model_params, lr, step, s.train_infos)

    def _rng_state(self) -> dict[str, Any]:
        """This rank's random state: torch, samplers and the branch draw."""
        s = self.setup
        per_branch = {}
        for name, task in s.tasks.items():
            per_branch[name] = {"train": task.train_data.get_rng_state()}
            if task.valid_data is not None:
                per_branch[name]["valid"] = task.valid_data.get_rng_state()
        rng = {"torch": torch.get_rng_state()}
        return s.layout.pack_rng(rng, per_branch, s.draw.rng.bit_generator.state)

    def _checkpoint(self, step: int, lr: float) -> dict | None:
        """The resumable checkpoint after ``step`` (0-based) on rank 0, ``None`` elsewhere.
        Collective: every rank's random state and the (sharded) optimizer state are gathered."""
        s = self.setup
        rngs = s.dist.gather(self._rng_state())
        optimizer = optimizer_state(s.optimizer, s.dist)
        if not s.dist.is_main:
            return None
        run: dict[str, Any] = {"next_step": step + 1, "rng": rngs[0]}
        if s.dist.enabled:
            run["rng_ranks"] = rngs
        obj = {"model": self._model_state(lr, step), "optimizer": optimizer, "sezm": run}
        if s.ema is not None:
            obj["ema"] = s.ema.state_dict()
        return obj

    def _ema_checkpoint(self, step: int, lr: float) -> dict:
        with self._weights(use_ema=True):
            return {"model": self._model_state(lr, step)}


def restore_run_state(setup: TrainingSetup) -> None:
    """``--restart``: optimizer, EMA, step, ``train_infos`` and random state of the
    checkpoint the weights came from; a restart at or past the end of the run is an error."""
    s = setup
    ckpt = next(iter(s.restart_from.values()))
    extra = ckpt.extra
    if "optimizer" in extra:  # DeePMD-kit checkpoints without one restart with a fresh state
        s.optimizer.load_state_dict(_reindexed(s, extra["optimizer"]))
    if s.ema is not None and "ema" in extra:
        s.ema.load_state_dict(extra["ema"])
    run = extra.get("sezm", {})  # sezm's run state; absent in DeePMD-kit's checkpoints
    s.start_step = int(run.get("next_step", int(ckpt.train_infos.get("step", -1)) + 1))
    s.train_infos = {k: v for k, v in ckpt.train_infos.items() if k not in ("lr", "step")}
    rng = _rank_rng(s, run)
    if rng:
        _set_rng_state(s, rng)
    log.info("restarting at step %d", s.start_step)
    _check_steps_left(s)


def _set_rng_state(setup: TrainingSetup, rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    per_branch, draw = setup.layout.unpack_rng(rng)
    for name, task in setup.tasks.items():
        task.train_data.set_rng_state(per_branch[name]["train"])
        if task.valid_data is not None and "valid" in per_branch[name]:
            task.valid_data.set_rng_state(per_branch[name]["valid"])
    if draw is not None:
        setup.draw.rng.bit_generator.state = draw


def _check_steps_left(setup: TrainingSetup) -> None:
    """A restart at or past the end of the run has nothing to train: say so (instead of
    reporting success with no checkpoint written)."""
    if setup.start_step < setup.numb_steps:
        return
    raise TrainingError(
        f"--restart {setup.resume.restart}: the checkpoint is at step {setup.start_step} and "
        f"`training/numb_steps` is {setup.numb_steps}: nothing left to train. Raise "
        f"`training/numb_steps` (or pass --numb-steps N with N > {setup.start_step}) to "
        "train further"
    )


def _rank_rng(setup: TrainingSetup, run: dict) -> dict | None:
    """This rank's saved sampler state; a run on another number of processes restores
    rank 0's only (the other ranks keep their fresh, rank-seeded streams)."""
    dist = setup.dist
    per_rank = run.get("rng_ranks")  # written by multi-process runs only
    if per_rank and len(per_rank) == dist.world_size:
        return per_rank[dist.rank]
    if dist.rank == 0:
        return run.get("rng")
    log.warning("rank %d: no sampler state of this rank in the checkpoint", dist.rank)
    return None


def _reindexed(setup: TrainingSetup, saved: dict) -> dict:
    """A saved optimizer state renumbered to this optimizer's parameter order.

    Optimizers number parameters in the module order of the program that wrote them, which
    the checkpoint's tensor order gives (DeePMD-kit registers some modules in another order
    than sezm); shared parameters count once, where they first appear.
    """
    named = dict(setup.model.named_parameters(remove_duplicate=False))
    seen, order = set(), []
    for name, ckpt in setup.restart_from.items():
        prefix = setup.layout.parameter_prefix(name)
        for key in ckpt.state:
            p = named.get(prefix + key)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                order.append(p)
    groups = setup.optimizer.param_groups
    ours = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    if len(order) != len(ours) or len(saved["param_groups"]) != len(groups):
        raise ValueError("the checkpoint's optimizer state does not match the model's parameters")
    new_index = [ours[id(p)] for p in order]
    start, new_groups = 0, []
    for mine, old in zip(groups, saved["param_groups"]):
        new_groups.append({**old, "params": list(range(start, start + len(mine["params"])))})
        start += len(mine["params"])
    state = {new_index[int(k)]: v for k, v in saved["state"].items()}
    return {"state": state, "param_groups": new_groups}
