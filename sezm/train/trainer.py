"""``sezm train``: the DeePMD-kit training workflow for DPA4 models.

A run is put together from three parts:

* setup (``setup.py``, ``tasks.py``, ``resume.py``): data, models, weights or statistics,
  optimizer, from the normalised input. A run trains named branches; a single-task input is a
  run with one branch, ``Default`` (``branches.py`` holds the file layouts that differ);
* the step loop (``loop.py``, ``steps.py``): steps, progress lines, ``lcurve.out``,
  validation, stops on signals, NaN and out of memory;
* checkpoints (``run_state.py``, ``checkpoint.py``): periodic, EMA, best and LoRA-merged
  checkpoints in DeePMD-kit's layout, and the exact ``--restart``.

Around them: full validation (``validation.py``), TensorBoard and the profiler
(``monitor.py``), precision and compile switches (``precision.py``, ``compile.py``),
``torchrun`` processes (``distributed.py``), and after the last step
``change_bias_after_training`` (the fine-tuning bias change on the training data).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from .distributed import Distributed
from .finetune import change_out_bias
from .loop import TrainingLoop
from .progress import StepTimer
from .resume import Resume
from .run_state import RunCheckpoints, restore_run_state
from .setup import TrainingSetup, build_setup, log_settings, resolved_config
from .steps import StepRunner
from .tasks import Task

log = logging.getLogger("sezm.train")

__all__ = ["Resume", "Trainer", "write_out_json"]


class Trainer:
    """A training run of a normalised input: :meth:`run` trains it."""

    def __init__(
        self,
        config: dict,
        resume: Resume | None = None,
        device: str | None = None,
        shared_links: dict[str, list[dict]] | None = None,
    ) -> None:
        """``shared_links``: the modules multi-task branches share (``None``: none)."""
        self.setup: TrainingSetup = build_setup(config, resume or Resume(), device, shared_links)
        if self.setup.resume.restart:
            restore_run_state(self.setup)
        self.steps = StepRunner(self.setup)
        self.checkpoints = RunCheckpoints(self.setup)
        self.loop = TrainingLoop(self.setup, self.steps, self.checkpoints)
        log_settings(self.setup)

    @property
    def tasks(self) -> dict[str, Task]:
        """The branches by name (``Default`` alone in single-task training)."""
        return self.setup.tasks

    @property
    def model(self) -> nn.Module:
        """The trained module: the one branch's model, or a ``ModuleDict`` of the branches."""
        return self.setup.model

    @property
    def dist(self) -> Distributed:
        """This process's place in a multi-process run."""
        return self.setup.dist

    @property
    def model_params(self) -> dict:
        """The model section saved in checkpoints."""
        return self.setup.model_params

    @property
    def resolved_config(self) -> dict:
        """The input as this run resolved it: what ``out.json`` holds."""
        return resolved_config(self.setup)

    def run(self) -> None:
        """Train from the start step to ``numb_steps``; a stop signal ends the run after the
        step in progress with a checkpoint (:class:`~sezm.train.faults.TrainingStopped`)."""
        s = self.setup
        self.checkpoints.remove_stale_temps()
        if s.numb_steps == 0:
            self.checkpoints.save_untrained()
            return
        timer = StepTimer(s.start_step, s.numb_steps)
        log.info("training %d steps (from step %d)", s.numb_steps, s.start_step)
        self.loop.run(timer)
        steps, mean = timer.steps_run(s.numb_steps), timer.mean_step_time(s.numb_steps)
        self._finish()
        log.info(
            "finished: ran steps %d-%d, mean step time %.3f s over these %d steps; "
            "latest checkpoint %s",
            s.start_step + 1,
            s.numb_steps,
            mean,
            steps,
            s.store.path_for(s.numb_steps),
        )

    def _finish(self) -> None:
        """After the last step: the bias change and the merged LoRA checkpoints."""
        s, last = self.setup, self.setup.numb_steps - 1
        if s.config["training"]["change_bias_after_training"]:
            for task in s.tasks.values():  # every rank alike, from the same frames
                change_out_bias(task.model, task.train_data, task.params, s.seed)
            self.checkpoints.save(last, s.lr.value(last))
        if s.lora and s.dist.is_main:
            self.checkpoints.save_merged(last, s.lr.value(last))
            if s.ema is not None:
                self.checkpoints.save_merged(last, s.lr.value(last), use_ema=True)


def write_out_json(config: dict, path: str | os.PathLike = "out.json") -> None:
    """The resolved input, as ``dp --pt train`` writes it."""
    Path(path).write_text(json.dumps(config, indent=2))
