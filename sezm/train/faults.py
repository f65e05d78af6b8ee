"""When a training run cannot go on: a stop signal, a non-finite loss, out of memory, nothing
left to train.

A stop signal (Ctrl-C / SIGINT, or SIGTERM from a batch scheduler) does not cut a step in
half: :class:`StopSignals` records it, the loop finishes the step in progress, saves a
checkpoint and raises :class:`TrainingStopped`, which the command line turns into the restart
command and exit status ``128 + signal number`` (130 for Ctrl-C). A second Ctrl-C stops at
once, without saving (the checkpoints on disk are whole: they are written atomically).

A non-finite loss and an out-of-memory error are :class:`TrainingError`: the message names the
step, the batch (system and frames) or the settings to lower, and no checkpoint is written.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("sezm.train")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingError(RuntimeError):
    """A run stopped for a reason its user can act on (non-finite loss, out of memory,
    nothing to train)."""


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by a signal after saving ``checkpoint`` (``None``: nothing saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + int(signum)
        name = signal.Signals(signum).name
        saved = f"saved checkpoint {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"{name} received: training stopped after step {step}; {saved}")


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a request to stop after the current
    step (:attr:`received`); a second SIGINT raises ``KeyboardInterrupt`` at once.

    Handlers can only be installed in the main thread; elsewhere the signals keep their
    default behaviour.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            log.warning("second interrupt: stopping at once, without saving")
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "%s received: the step in progress finishes, then a checkpoint is saved "
            "(Ctrl-C again stops at once, without saving)",
            signal.Signals(signum).name,
        )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (host ``MemoryError``, CUDA/CPU out of memory)."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text
    )


def out_of_memory_message(
    step: int, where: str, batch_sizes: Sequence[int], sel: object, size: str, device: str
) -> str:
    """What ran out of memory and which settings to lower, with their current values."""
    return (
        f"out of memory on {device} at step {step} ({where}). Lower, in this order: "
        f"`training/training_data/batch_size` (now {[int(b) for b in batch_sizes]}; or a smaller "
        f"`validation_data/batch_size`), `model/descriptor/sel` (now {sel}; it bounds the "
        f"neighbours per atom on the capped paths), the model size ({size}); or train on a "
        "device with more memory"
    )


def non_finite_message(
    step: int, what: str, value: float, system: str, frames: Sequence[int]
) -> str:
    """The step and batch at which ``what`` (the loss, the gradient norm) stopped being a
    finite number."""
    return (
        f"step {step}: {what} is {value} on the batch of system {system}, frames "
        f"{list(frames)}; training stopped, the checkpoints on disk are from before this step. "
        "Check those frames (coordinates, labels, units), lower `learning_rate/start_lr`, or "
        "set `training/gradient_max_norm`"
    )
