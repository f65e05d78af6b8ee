"""The step loop: steps, progress lines, ``lcurve.out``, validation, checkpoints, stops.

Every ``disp_freq`` steps (and after the first): per branch the training metrics (with
``disp_avg`` the mean since the last row; a branch not trained this step is probed on one
batch) and the validation metrics, logged and written to ``lcurve.out``; the wall time and the
ETA. Every ``validation_freq`` steps: full validation and best checkpoints
(``validation.py``). Every ``save_freq`` steps and at the end: a checkpoint. A stop signal ends
the run after the step in progress with a checkpoint (:class:`TrainingStopped`); out of memory
ends it with the settings to lower.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

from ..model.dens import DensModel
from ..model.property_model import PropertyModel
from .distributed import any_rank
from .faults import (
    StopSignals,
    TrainingError,
    TrainingStopped,
    is_out_of_memory,
    out_of_memory_message,
)
from .monitor import Monitor
from .optim import set_lr
from .progress import LearningCurve, StepTimer, format_metrics, repair_curve
from .run_state import RunCheckpoints
from .setup import TrainingSetup
from .steps import StepRunner
from .tasks import Task
from .validation import FullValidator, evaluate_energy, full_validators

log = logging.getLogger("sezm.train")


class MetricSums:
    """Per branch: the sums of the shown training metrics and the steps since the last row."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, dict[str, float]] = {n: {} for n in self.names}
        self.counts = dict.fromkeys(self.names, 0)

    def add(self, name: str, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[name][k] = self.sums[name].get(k, 0.0) + v  # first step: no sum yet
        self.counts[name] += 1

    def mean(self, name: str) -> dict[str, float]:
        return {k: v / self.counts[name] for k, v in self.sums[name].items()}


class TrainingLoop:
    """Runs the steps of a set-up run from its ``start_step`` to ``numb_steps``."""

    def __init__(
        self, setup: TrainingSetup, steps: StepRunner, checkpoints: RunCheckpoints
    ) -> None:
        self.setup, self.steps, self.checkpoints = setup, steps, checkpoints
        self.validators = full_validation_flows(setup)
        self.monitor = Monitor(setup.config["training"], active=setup.dist.is_main)
        self.step_in_progress = setup.start_step + 1

    def run(self, timer: StepTimer) -> None:
        """The steps, with the stop signals caught, the learning curve open and the monitor
        on; out of memory is a :class:`TrainingError` naming the settings to lower."""
        with StopSignals() as stops, learning_curve(self.setup) as curve:
            self.monitor.start()
            try:
                self._steps(stops, curve, timer)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                raise TrainingError(self._out_of_memory(err)) from err
            finally:
                self.monitor.close()

    def _steps(self, stops: StopSignals, curve: LearningCurve | None, timer: StepTimer) -> None:
        """The steps; a stop signal after a step saves and raises :class:`TrainingStopped`."""
        s, tr = self.setup, self.setup.config["training"]
        disp_freq, save_freq = int(tr["disp_freq"]), int(tr["save_freq"])
        s.model.train()
        sums = MetricSums(list(s.tasks))
        saved = None
        for step in range(s.start_step, s.numb_steps):
            shown = self.step_in_progress = step + 1
            self.monitor.step_begins()
            lr = s.lr.value(step)
            set_lr(s.optimizer, lr)
            task, loss, metrics, norms = self.steps.train_step(step, lr, self.monitor.due(shown))
            sums.add(task.name, self.steps.shown(task, metrics))
            if tr["disp_training"] and (shown % disp_freq == 0 or shown == 1):
                if s.dist.is_main:
                    self._display(shown, lr, task, self.steps.shown(task, metrics), sums, curve)
                elapsed, eta = timer.lap(shown)
                if tr["time_training"]:
                    log.info("batch %7d: wall time %.2f s, eta %s", shown, elapsed, eta)
                sums.reset()
            self._full_validation(step, lr)
            if shown == s.numb_steps or (save_freq > 0 and shown % save_freq == 0):
                self.checkpoints.save(step, lr)
                saved = shown
            if self.monitor.due(shown):
                self.monitor.scalars(shown, task.name, lr, loss, metrics, *(norms or (None,)))
            if shown < s.numb_steps and any_rank(s.dist, stops.received is not None, s.device):
                path = (
                    self.checkpoints.save(step, lr) if saved != shown else s.store.path_for(shown)
                )
                raise TrainingStopped(stops.received or signal.SIGTERM, shown, path)

    def _display(
        self, shown: int, lr: float, trained: Task, metrics, sums: MetricSums, curve
    ) -> None:
        """Log lines and ``lcurve.out`` row of every branch; with ``disp_avg`` the training
        metrics are the means over the steps since the last display."""
        disp_avg = bool(self.setup.config["training"]["disp_avg"])
        trains, valids = {}, {}
        for name, task in self.setup.tasks.items():
            if disp_avg and sums.counts[name]:
                trains[name] = sums.mean(name)
            elif task is trained and not disp_avg:
                trains[name] = metrics
            else:
                trains[name] = self.steps.probe(task, lr)
            valids[name] = self.steps.validate(task, lr)
            log.info(format_metrics(shown, task.tagged("trn"), trains[name], lr))
            if valids[name]:
                log.info(format_metrics(shown, task.tagged("val"), valids[name], None))
        curve.write(shown, lr, trains, valids)

    def _full_validation(self, step: int, lr: float) -> None:
        """The full-validation flows due after ``step``: rank 0 evaluates and ranks, every rank
        joins the best-checkpoint save (collective under ZeRO), rank 0 logs."""
        dist, shown = self.setup.dist, step + 1
        for validator, on_ema in self.validators:
            if not validator.due(shown):
                continue
            dist.barrier()
            errors, path, failure = {}, None, None
            if dist.is_main:
                try:
                    errors = self._full_errors(on_ema)
                    path = validator.validate(shown, errors)
                except Exception as err:
                    failure = err
            path, failed = dist.broadcast((path, failure is not None))
            if failure is not None:
                raise failure
            if failed:
                raise RuntimeError("full validation failed on rank 0")
            if path is not None:
                self.checkpoints.save_best(Path(path), step, lr, on_ema)
            if dist.is_main:
                validator.finish(shown, errors, path)
            dist.barrier()

    def _full_errors(self, on_ema: bool) -> dict[str, float]:
        s = self.setup
        (task,) = s.tasks.values()  # full validation is single-task (full_validation_flows)
        swap = s.ema.swapped_in(s.ema_models) if on_ema else contextlib.nullcontext()
        with swap, self.steps.evaluating(), task.precision.evaluation_forward():
            return evaluate_energy(
                lambda graph: s.forward(task.name, graph, False),
                task.valid_data,
                task.model.rcut,
                s.device,
            )

    def _out_of_memory(self, err: BaseException) -> str:
        """The out-of-memory error of the step in progress, with the settings to lower."""
        s = self.setup
        first = next(iter(s.tasks.values()))
        desc = first.params["descriptor"]
        size = ", ".join(f"{k} {desc[k]}" for k in ("channels", "lmax", "n_blocks"))
        return out_of_memory_message(
            self.step_in_progress,
            str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__,
            first.train_data.batch_size,
            desc["sel"],
            size,
            str(s.device),
        )


def full_validation_flows(setup: TrainingSetup) -> list[tuple[FullValidator, bool]]:
    """The full-validation flows in force: ``(validator, on EMA weights)``; they need one
    energy branch with validation data."""
    flows = full_validators(
        setup.config["validating"],
        num_steps=setup.numb_steps,
        save_ckpt=setup.config["training"]["save_ckpt"],
        resumed_at=setup.start_step if setup.resume.restart else None,
        is_main=setup.dist.is_main,
        train_infos=setup.train_infos,
        ema_state=None if setup.ema is None else setup.ema.validation_state,
    )
    tasks = list(setup.tasks.values())
    plain = len(tasks) == 1 and not isinstance(tasks[0].model, (PropertyModel, DensModel))
    if flows and not (plain and tasks[0].valid_data):
        raise ValueError(
            "validating.full_validation needs single-task energy training with "
            "training.validation_data"
        )
    return flows


@contextlib.contextmanager
def learning_curve(setup: TrainingSetup):
    """The ``lcurve.out`` writer (rank 0; ``None`` elsewhere); a restart continues it."""
    if not setup.dist.is_main:
        yield None
        return
    disp_file = setup.config["training"]["disp_file"]
    restart = setup.resume.restart
    fresh = not (restart and repair_curve(disp_file, setup.start_step))
    file = Path(disp_file)
    file.parent.mkdir(parents=True, exist_ok=True)
    labels = {name: task.label for name, task in setup.tasks.items()}
    with open(file, "a" if restart else "w", buffering=1) as handle:
        yield LearningCurve(handle, labels, write_header=fresh)
