"""Full validation (``validating``) and the best checkpoints it selects, as in DeePMD-kit 3.2.

Every ``validation_freq`` steps from the start step on (``full_val_start``: 0 at once, a value in
(0, 1) a fraction of ``numb_steps``, 1 never, a larger value a step number), rank 0 evaluates every
frame of every validation system and appends a row to ``full_val_file`` (``val.log``):

    # step E_MAE(meV/atom) E_RMSE(meV/atom) F_MAE(meV/Å) F_RMSE(meV/Å) S_MAE(meV/Å³) S_RMSE(meV/Å³)

``E`` is the energy per atom, ``F`` the force components, ``S`` the stress ``-W / V`` (or ``V``,
the virial per atom, when ``validation_metric`` names it); each a mean over the systems weighted
by the number of values, RMSE in squares (as ``dp test``). Periodic systems with virial labels
give ``S``/``V``; a metric without data prints ``nan``.

The ``max_best_ckpt`` lowest values of ``validation_metric`` (ties: the earlier step) are kept;
when a validation enters them and ``save_best`` is set, the run saves
``<save_best_dir>/best.ckpt-<step>.t-<rank>.pt`` (rank 1 = best) and renames the others to their
new ranks or deletes those that dropped out. The records are stored in the checkpoint's
``train_infos`` (``full_validation_metric``, ``full_validation_topk_records``) so a restart
continues them and the log (DeePMD-kit 3.2 itself loses the live records on restart); a new
run deletes stale best checkpoints. The EMA flow
(``ema_full_validation``) validates the EMA weights the same way into ``val_ema.log`` and
``best_ema.ckpt-*``, keeping its records in the EMA state.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..infer.test import error_stats, merge

log = logging.getLogger("sezm.train")

METRIC_KEY = "full_validation_metric"
RECORDS_KEY = "full_validation_topk_records"
STALE_KEYS = (
    "full_validation_best_metric",
    "full_validation_best_step",
    "full_validation_best_path",
    "full_validation_best_records",
)


@dataclass(frozen=True)
class Family:
    """One validated quantity: its ``validation_metric`` token, error key stem and unit."""

    token: str
    stem: str  # error keys mae_<stem> / rmse_<stem>
    unit: str  # shown in the unit; values are scaled by 1000 (eV -> meV)


FAMILIES = {
    "e": Family("e", "e_per_atom", "meV/atom"),
    "f": Family("f", "f", "meV/Å"),
    "s": Family("s", "s", "meV/Å³"),
    "v": Family("v", "v_per_atom", "meV/atom"),
}
HEADER_NOTE = (
    "# E uses per-atom energy, F uses component-wise force errors, and the second-rank column "
    "is S, stress as the negated virial divided by the cell volume, or V, virial normalized by "
    "natoms, following `validation_metric`.\n"
)


def parse_metric(metric: str) -> tuple[Family, str]:
    """``"F:RMSE"`` -> (force family, ``"rmse"``); case-insensitive."""
    token, _, kind = metric.strip().lower().partition(":")
    if token not in FAMILIES or kind not in ("mae", "rmse"):
        names = ", ".join(f"{t.upper()}:{k.upper()}" for t in FAMILIES for k in ("MAE", "RMSE"))
        raise ValueError(f"validating.validation_metric must be one of {names}, got {metric!r}")
    return FAMILIES[token], kind


def start_step(full_val_start: float, num_steps: int) -> int | None:
    """First step of the schedule; ``None`` when ``full_val_start`` is 1 (never)."""
    value = float(full_val_start)
    if value == 1.0:
        return None
    return int(num_steps * value) if 0.0 <= value < 1.0 else int(value)


def with_suffix_tag(path: str | Path, tag: str) -> Path:
    """``val.log`` -> ``val_ema.log`` (``tag = "_ema"``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}{tag}{path.suffix}" if path.suffix else path.name + tag)


def format_number(value: float) -> str:
    """Five significant digits, fixed-point where it fits (DeePMD-kit's ``val.log`` style)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0 or abs(value) < np.finfo(float).tiny:
        return "0"
    decimals = 4 - math.floor(math.log10(abs(value)))
    if decimals > 16:
        return f"{value:.4e}"
    rounded = round(value, decimals) or 0.0
    return f"{rounded:.{decimals}f}" if decimals > 0 else f"{rounded:.0f}"


# -- errors ------------------------------------------------------------------------------------


def system_errors(pred: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], natoms: int):
    """``{mae_<stem>: (value, n), rmse_<stem>: (value, n)}`` of one system.

    ``pred``/``ref``: ``energy (nf,)``, ``force (nf, nloc, 3)``, ``virial (nf, 9)`` where
    labelled (virials only for periodic systems); ``ref["box"] (nf, 3, 3)`` gives the stress
    over the frames with a non-singular cell.
    """
    errors = {}
    if "energy" in ref:
        errors |= error_stats("e_per_atom", pred["energy"], ref["energy"], 1.0 / natoms)
    if "force" in ref:
        errors |= error_stats("f", pred["force"], ref["force"])
    if "virial" in ref:
        pv, rv = pred["virial"].reshape(-1, 9), ref["virial"].reshape(-1, 9)
        errors |= error_stats("v_per_atom", pv, rv, 1.0 / natoms)
        volume = np.abs(np.linalg.det(ref["box"].reshape(-1, 3, 3)))
        ok = volume > 0
        if ok.any():
            scale = -1.0 / volume[ok, None]
            errors |= error_stats("s", pv[ok] * scale, rv[ok] * scale)
    return errors


def evaluate_energy(forward: Callable, data, rcut: float, device: torch.device) -> dict:
    """Weighted errors of an energy model over every frame of ``data`` (a ``DataSystem``);
    ``forward(graph)`` returns the predictions."""
    per_system = []
    for index, system in enumerate(data.systems):
        preds, refs = {}, {}
        for batch in data.iter_batches(index, rcut, device):
            out = forward(batch.graph)
            keys = ["energy", "force"] + (["virial"] if system.pbc else [])
            for key in keys:
                if batch.find.get(key):
                    preds.setdefault(key, []).append(out[key].detach().cpu().numpy())
                    refs.setdefault(key, []).append(batch.labels[key].cpu().numpy())
            if system.pbc and batch.box is not None:
                refs.setdefault("box", []).append(np.asarray(batch.box))
        pred = {k: np.concatenate(v) for k, v in preds.items()}
        ref = {k: np.concatenate(v) for k, v in refs.items()}
        if pred:
            per_system.append(system_errors(pred, ref, int(batch.graph.atype.shape[1])))
    return merge(per_system)


# -- best checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Record:
    """A validated step and its metric; records order by metric (lower is better), then step."""

    metric: float
    step: int


class BestCheckpoints:
    """The top-K records of one flow and their files ``<prefix>-<step>.t-<rank>.pt``."""

    def __init__(self, directory: Path, prefix: str, keep: int) -> None:
        self.directory, self.prefix, self.keep = Path(directory), prefix, int(keep)
        self.pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.t-(\d+)\.pt$")
        self.records: list[Record] = []

    def path(self, step: int, rank: int) -> Path:
        return self.directory / f"{self.prefix}-{step}.t-{rank}.pt"

    def offer(self, metric: float, step: int) -> int | None:
        """Enter ``(metric, step)``; its rank (1 = best) if kept, else ``None``."""
        candidate = Record(metric, step)
        records = sorted([r for r in self.records if r.step != step] + [candidate])[: self.keep]
        if candidate not in records:
            return None
        self.records = records
        return records.index(candidate) + 1

    def files(self) -> list[Path]:
        found = self.directory.glob(f"{self.prefix}-*.t-*.pt")
        return sorted((p for p in found if not p.is_symlink()), key=lambda p: p.stat().st_mtime)

    def reconcile(self) -> None:
        """Rename the kept files to their ranks, delete the others."""
        expected = {r.step: self.path(r.step, i).name for i, r in enumerate(self.records, 1)}
        by_step: dict[int | None, list[Path]] = {}
        for path in self.files():
            match = self.pattern.match(path.name)
            by_step.setdefault(int(match.group(1)) if match else None, []).append(path)
        moves, stale = [], []
        for step, paths in by_step.items():
            if step not in expected:
                stale += paths
                continue
            keep = next((p for p in paths if p.name == expected[step]), paths[0])
            stale += [p for p in paths if p != keep]
            if keep.name != expected[step]:
                tmp = keep.with_name(keep.name + ".tmp")
                keep.rename(tmp)
                moves.append((tmp, keep.with_name(expected[step])))
        for path in stale:
            path.unlink(missing_ok=True)
        for tmp, final in moves:
            final.unlink(missing_ok=True)
            tmp.rename(final)

    def clear(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop the rows (and their best-checkpoint notes) after ``last_step``: a restart
    continues the log exactly."""
    kept, dropping = [], False
    for line in path.read_text().splitlines(keepends=True):
        if not line.startswith("#"):
            dropping = int(line.split()[0]) > last_step
        elif not line.startswith("# saved best"):
            dropping = False
        if not dropping:
            kept.append(line)
    path.write_text("".join(kept))


# -- the validator -----------------------------------------------------------------------------


class FullValidator:
    """One full-validation flow (live or EMA weights) of a training run.

    ``evaluate()`` returns the weighted errors (run on rank 0); ``state`` is the dict the
    records live in (``train_infos`` or the EMA state), read at start and updated in place.
    """

    def __init__(
        self,
        validating: Mapping[str, Any],
        *,
        num_steps: int,
        directory: Path,
        log_file: str | Path,
        prefix: str,
        state: dict[str, Any],
        resumed_at: int | None,
        is_main: bool,
        announce: bool = True,
    ) -> None:
        self.freq = int(validating["validation_freq"])
        self.save_best = bool(validating["save_best"])
        self.metric = str(validating["validation_metric"]).strip().lower()
        self.family, self.kind = parse_metric(self.metric)
        self.start = start_step(validating["full_val_start"], num_steps)
        self.log_file, self.state, self.announce = Path(log_file), state, announce
        self.best = BestCheckpoints(directory, prefix, int(validating["max_best_ckpt"]))
        self.columns = self._columns()
        self.step_width = max(len("step"), len(str(num_steps)))
        restart = resumed_at is not None
        self._mode = "a" if restart else "w"
        self._header = not (restart and self.log_file.exists())
        self.best.records = self._stored_records()
        self._store()
        if is_main:
            self.best.directory.mkdir(parents=True, exist_ok=True)
            if restart and self.log_file.exists():
                _truncate_log(self.log_file, resumed_at)
            if restart and self.save_best and self.best.records:
                self.best.reconcile()
            else:
                self.best.clear()

    def _columns(self) -> list[tuple[str, str, int]]:
        """``(error key, header label, width)``: E, F, then S unless V is the metric."""
        second = "v" if self.family.token == "v" else "s"
        out = []
        for token in ("e", "f", second):
            fam = FAMILIES[token]
            for kind in ("mae", "rmse"):
                label = f"{token.upper()}_{kind.upper()}({fam.unit})"
                out.append((f"{kind}_{fam.stem}", label, max(len(label), 10)))
        return out

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.family.stem}"

    def due(self, step: int) -> bool:
        """Whether completed step ``step`` (1-based) is a full-validation step."""
        if self.start is None or step < self.start:
            return False
        return (step - self.start) % self.freq == 0

    def _stored_records(self) -> list[Record]:
        if self.state.get(METRIC_KEY) != self.metric:
            return []
        raw = self.state.get(RECORDS_KEY) or []
        records = [
            Record(float(r["metric"]), int(r["step"]))
            for r in raw
            if isinstance(r, dict) and {"metric", "step"} <= r.keys()
        ]
        return sorted(records)[: self.best.keep]

    def _store(self) -> None:
        for key in STALE_KEYS:
            self.state.pop(key, None)
        self.state[METRIC_KEY] = self.metric
        self.state[RECORDS_KEY] = [{"metric": r.metric, "step": r.step} for r in self.best.records]

    def validate(self, step: int, errors: Mapping[str, float]) -> Path | None:
        """Rank the errors of completed step ``step``; the best-checkpoint path to write now
        (``None``: not among the best, or ``save_best`` off). Rank 0 only."""
        value = errors.get(self.key, math.nan)
        if math.isnan(value):
            raise RuntimeError(
                "the selected full validation metric is unavailable on the validation data: "
                + self.metric.upper()
            )
        rank = self.best.offer(float(value), step)
        if rank is None:
            return None
        self._store()
        return self.best.path(step, rank) if self.save_best else None

    def finish(self, step: int, errors: Mapping[str, float], saved: Path | None) -> None:
        """After the best checkpoint (if any) is written: ranks on disk, ``val.log`` row."""
        if saved is not None:
            self.best.reconcile()
        self._write_row(step, errors, saved)
        if saved is not None and self.announce:
            log.info("Saved best model to %s with %s", saved, self._selected(errors))

    def _selected(self, errors: Mapping[str, float]) -> str:
        label = f"{self.family.token.upper()}:{self.kind.upper()}"
        return f"{label} = {format_number(1000.0 * errors[self.key])} {self.family.unit}"

    def _write_row(self, step: int, errors: Mapping[str, float], saved: Path | None) -> None:
        with self.log_file.open(self._mode, buffering=1) as out:
            if self._header:
                head = "# " + f"{'step':^{self.step_width}s}"
                head += "".join(f" {label:^{width}s}" for _, label, width in self.columns)
                out.write(head + "\n" + HEADER_NOTE)
                self._header = False
            self._mode = "a"
            row = "  " + f"{step:^{self.step_width}d}"
            for key, _, width in self.columns:
                value = errors.get(key, math.nan)
                row += f" {format_number(1000.0 * value if not math.isnan(value) else value):^{width}s}"
            out.write(row + "\n")
            if saved is not None:
                out.write(f"# saved best checkpoint: {saved} ({self._selected(errors)})\n")


def full_validators(
    validating: Mapping[str, Any],
    *,
    num_steps: int,
    save_ckpt: str,
    resumed_at: int | None,
    is_main: bool,
    train_infos: dict[str, Any],
    ema_state: dict[str, Any] | None,
) -> list[tuple[FullValidator, bool]]:
    """The flows of a run, ``(validator, on EMA weights)``: the live weights with
    ``full_validation``, the EMA weights with ``ema_full_validation`` (ignored without EMA);
    none when the schedule starts after the last step. ``resumed_at``: the last step done
    before a restart (``None`` for a new run)."""
    live = bool(validating["full_validation"])
    ema = bool(validating["ema_full_validation"]) and ema_state is not None
    first = start_step(validating["full_val_start"], num_steps)
    if not (live or ema) or first is None or first > num_steps:
        return []
    common = dict(
        num_steps=num_steps,
        directory=Path(validating["save_best_dir"] or Path(save_ckpt).parent),
        resumed_at=resumed_at,
        is_main=is_main,
    )
    log_file = validating["full_val_file"]
    flows = []
    if live:
        validator = FullValidator(
            validating, **common, log_file=log_file, prefix="best.ckpt", state=train_infos
        )
        flows.append((validator, False))
    if ema:
        validator = FullValidator(
            validating,
            **common,
            log_file=with_suffix_tag(log_file, "_ema"),
            prefix="best_ema.ckpt",
            state=ema_state,
            announce=False,
        )
        flows.append((validator, True))
    return flows
