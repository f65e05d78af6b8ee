"""TensorBoard scalars and the PyTorch profiler of a training run (rank 0), DeePMD-kit's way.

``training.tensorboard``: every ``tensorboard_freq`` steps (and at step 1) the events file in
``tensorboard_log_dir`` gets, under the trained branch's name (``Default`` in single-task runs):
``<branch>/lr``, ``<branch>/loss`` and ``<branch>/<metric>`` for every loss metric (``rmse``,
``rmse_e``, ``l2_e_loss``, ...); with ``gradient_max_norm > 0`` also the pre-clip
``<branch>/grad/total_norm``, the histogram ``<branch>/grad/param_norms`` of the per-parameter
gradient norms and the ten largest as ``<branch>/grad_top10/<parameter>``.

``training.enable_profiler`` / ``profiling``: ``torch.profiler`` with DeePMD-kit's schedule
(wait 1, warm-up 15, record 3 steps); ``enable_profiler`` writes the trace to
``tensorboard_log_dir``, ``profiling`` alone exports a Chrome trace to ``profiling_file``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

log = logging.getLogger("sezm.train")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "training.tensorboard needs the `tensorboard` package (pip install tensorboard)"
        ) from err
    return SummaryWriter


class Monitor:
    """TensorBoard writer and profiler of one run (settings from the normalized ``training``
    section); inactive on ranks other than 0."""

    def __init__(self, training: Mapping[str, Any], active: bool = True) -> None:
        self.log_dir = str(training["tensorboard_log_dir"])
        self.freq = int(training["tensorboard_freq"])
        wanted = bool(training["tensorboard"])
        self.tensorboard = wanted and active
        self.enable_profiler = bool(training["enable_profiler"]) and active
        self.profiling = bool(training["profiling"]) and active
        self.profiling_file = str(training["profiling_file"])
        self._writer_cls = _summary_writer() if wanted else None  # every rank fails alike, early
        self.writer = None
        self.profiler = None
        self._profiled_steps = 0

    def due(self, step: int) -> bool:
        """Whether completed step ``step`` (1-based) writes TensorBoard events."""
        return self.tensorboard and (step % self.freq == 0 or step == 1)

    def start(self) -> None:
        if self.tensorboard:
            self.writer = self._writer_cls(log_dir=self.log_dir)
        if self.enable_profiler or self.profiling:
            handler = torch.profiler.tensorboard_trace_handler if self.enable_profiler else None
            self.profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=1, warmup=15, active=3, repeat=1),
                on_trace_ready=handler(self.log_dir) if handler else None,
                record_shapes=True,
                with_stack=True,
            )
            self.profiler.start()

    def step_begins(self) -> None:
        if self.profiler is not None:
            self.profiler.step()
            self._profiled_steps += 1

    def scalars(
        self,
        step: int,
        branch: str,
        lr: float,
        loss: torch.Tensor,
        metrics: Mapping[str, float],
        grad_norm: torch.Tensor | None = None,
        param_norms: Iterable[tuple[str, float]] = (),
    ) -> None:
        """The events of completed step ``step`` (call when :meth:`due`)."""
        w = self.writer
        w.add_scalar(f"{branch}/lr", lr, step)
        w.add_scalar(f"{branch}/loss", float(loss), step)
        for name, value in metrics.items():
            w.add_scalar(f"{branch}/{name}", float(value), step)
        if grad_norm is None:
            return
        w.add_scalar(f"{branch}/grad/total_norm", float(grad_norm), step)
        norms = sorted(param_norms, key=lambda item: item[1], reverse=True)
        if norms:
            values = torch.tensor([n for _, n in norms], dtype=torch.float32)
            w.add_histogram(f"{branch}/grad/param_norms", values, step)
            for name, value in norms[:10]:
                w.add_scalar(f"{branch}/grad_top10/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.profiler is not None:
            self.profiler.stop()
            if self._profiled_steps < 17:
                log.warning(
                    "the profiler records steps 17-19 (1 skipped, 15 warm-up); this run had %d",
                    self._profiled_steps,
                )
            if self.enable_profiler:
                log.info("the profiling trace has been saved under %s", self.log_dir)
            else:
                self.profiler.export_chrome_trace(self.profiling_file)
                log.info("the profiling trace has been saved to %s", self.profiling_file)
