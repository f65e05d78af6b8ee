"""Training checkpoints in DeePMD-kit's layout, written atomically.

``{"model": state, "optimizer": ..., ["ema": ...], ["sezm": run state]}`` where ``state`` holds
the tensors under ``model.<branch>.`` and ``_extra_state = {"model_params", "train_infos"}``,
so DeePMD-kit 3.2 reads sezm checkpoints and vice versa. Numbered files are
``<save_dir>/<save_ckpt>-<step>.pt``; ``<save_ckpt>.pt`` is a symlink to the newest one and the
text file ``checkpoint`` names it. Every file (checkpoints, link, pointer) is written to a
temporary name ``.<name>.<random>.tmp`` in the same folder and renamed, so an interrupted save
never corrupts the previous checkpoint; the temporary files a killed save leaves behind are
removed when the next run starts (:meth:`CheckpointStore.remove_stale_temps`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..compat.deepmd import to_deepmd_state

log = logging.getLogger("sezm.train")


def model_state(
    model: torch.nn.Module,
    model_params: dict,
    lr: float,
    step: int,
    branch: str = "Default",
    infos: dict | None = None,
):
    """DeePMD-kit style model state of one branch (tensors cloned to CPU); ``infos``: further
    ``train_infos`` entries (the full-validation records)."""
    return branches_state({branch: model}, model_params, lr, step, infos)


def branches_state(
    models: Mapping[str, torch.nn.Module],
    model_params: dict,
    lr: float,
    step: int,
    infos: dict | None = None,
) -> dict:
    """DeePMD-kit model state of every branch (tensors under ``model.<branch>.``, cloned to
    CPU) with ``_extra_state = {"model_params", "train_infos"}``."""
    state = {
        "_extra_state": {
            "model_params": model_params,
            "train_infos": {**(infos or {}), "lr": float(lr), "step": int(step)},
        }
    }
    for name, model in models.items():
        tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.update(to_deepmd_state(tensors, name))
    return state


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, then rename over ``path``."""
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_pattern(target: str) -> re.Pattern:
    """Names of the temporary files that a save of a file named like ``target`` (a regular
    expression) creates: ``.<target>.<8 random characters>.tmp`` or ``.<target>.tmp``."""
    return re.compile(rf"\.(?:{target})(?:\.[a-z0-9_]{{8}})?\.tmp")


def keep_counts(training: dict, num_steps: int) -> tuple[int, int]:
    """``(periodic, EMA)`` checkpoints kept: ``max_ckpt_keep`` and ``ema_ckpt_keep`` (default:
    the same), both replaced by ``ceil(ckpt_keep_ratio * ceil(numb_steps / save_freq))``
    (at least 1; one checkpoint in all without periodic saves) when the ratio is set."""
    keep = int(training["max_ckpt_keep"])
    ema = keep if training["ema_ckpt_keep"] is None else int(training["ema_ckpt_keep"])
    ratio = training["ckpt_keep_ratio"]
    if ratio is None:
        return keep, ema
    save_freq = int(training["save_freq"])
    total = max(1, math.ceil(num_steps / save_freq)) if save_freq > 0 else 1
    keep = max(1, math.ceil(float(ratio) * total))
    log.info(
        "checkpoint retention %d from ckpt_keep_ratio=%s (numb_steps=%d, save_freq=%d)",
        keep,
        ratio,
        num_steps,
        save_freq,
    )
    return keep, keep


class CheckpointStore:
    """Numbered checkpoints with a retention window and a ``<prefix>.pt`` pointer."""

    def __init__(
        self, prefix: str, save_dir: str | None, max_keep: int, pointer: str | None = "checkpoint"
    ):
        self.prefix = Path(prefix)
        self.directory = Path(save_dir) if save_dir else self.prefix.parent
        self.max_keep = int(max_keep)
        self.pointer = Path(pointer) if pointer else None

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix.name}-{step}.pt"

    def step_of(self, path: Path) -> int | None:
        head = f"{self.prefix.name}-"
        text = (
            path.name[len(head) : -3] if path.name.startswith(head) and path.suffix == ".pt" else ""
        )
        return int(text) if text.isdigit() else None

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temporary files that killed saves of this store left behind (its own
        names only: numbered and merged checkpoints, the link, the pointer); the removed paths."""
        name = re.escape(self.prefix.name)
        targets = [
            (self.directory, rf"{name}(?:-\d+|_merged)?\.pt"),
            (self.prefix.parent, rf"{name}\.pt"),
        ]
        if self.pointer is not None:
            targets.append((self.pointer.parent, re.escape(self.pointer.name)))
        removed = set()
        for folder, target in targets:
            pattern = temp_pattern(target)
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if pattern.fullmatch(path.name) and (path.is_symlink() or path.is_file()):
                    path.unlink(missing_ok=True)
                    removed.add(path)
        return sorted(removed)

    def save(self, obj, step: int) -> Path:
        """Write checkpoint ``step``, point the prefix at it, prune older ones."""
        path = self.path_for(step)
        atomic_save(obj, path)
        self._publish(path)
        self._prune(step)
        return path

    def _publish(self, path: Path) -> None:
        link = self.prefix.parent / (self.prefix.name + ".pt")
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(path, link.parent)
        tmp = link.parent / f".{link.name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
        if self.pointer is not None:
            atomic_write_text(self.pointer, str(path))

    def _prune(self, current: int) -> None:
        if self.max_keep < 1:
            return
        numbered = sorted(
            (step, p)
            for p in self.directory.glob(f"{self.prefix.name}-*.pt")
            if not p.is_symlink() and (step := self.step_of(p)) is not None
        )
        for step, path in numbered:
            if step > current:  # left over from a longer earlier run in this directory
                path.unlink(missing_ok=True)
        kept = [(s, p) for s, p in numbered if s <= current]
        for _, path in kept[: max(0, len(kept) - self.max_keep)]:
            path.unlink(missing_ok=True)


#: Model settings that do not shape the network: they never explain a weight mismatch.
_NOT_ARCHITECTURE = {"seed", "trainable", "info", "precision", "use_amp", "use_compile"}


def model_differences(saved: dict, wanted: dict, path: str = "model") -> list[str]:
    """The settings in which the model section ``saved`` (a checkpoint's ``model_params``)
    differs from ``wanted`` (this run's), as ``key: saved vs wanted`` lines."""
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        if key in _NOT_ARCHITECTURE or key.startswith("_"):
            continue
        a, b = saved.get(key, "(absent)"), wanted.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += model_differences(a, b, f"{path}/{key}")
        elif a != b:
            lines.append(f"{path}/{key}: {a!r} in the checkpoint, {b!r} here")
    return lines
