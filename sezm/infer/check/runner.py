"""``sezm check``: every check on one structure, as a table of results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .cutoff import check_cutoff
from .derivatives import check_forces, check_virial
from .nve import check_nve
from .result import Result, skipped
from .structure import Structure, min_pair_distance
from .subject import Evaluator, Subject
from .symmetry import check_permutation, check_rotation, check_translation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckOptions:
    """``fd_atoms``: atoms whose forces are differenced; NVE: ``nve_steps`` (0: no run) of
    ``nve_dt`` fs from ``temperature`` K; ``seed`` draws rotations, shifts, atoms, velocities."""

    fd_atoms: int = 4
    nve_steps: int = 200
    nve_dt: float = 0.5
    temperature: float = 300.0
    seed: int = 0


def check_min_distance(s: Structure, rcut: float, data_min: float | None) -> Result:
    """The structure's closest pair must not be closer than the training data's."""
    name = "closest pair within training data"
    closest = min_pair_distance(s, rcut)
    if data_min is None:
        return skipped(
            name,
            f"closest pair {closest:.3g} Å; no training minimum recorded (trained with "
            "--skip-neighbor-stat, or a .pt2 frozen before sezm stored it: add --checkpoint)",
        )
    note = ""
    if closest < data_min:
        note = "the model extrapolates to shorter distances than it was trained on"
        if closest < 0.6 * data_min:
            note += "; coordinates in the wrong unit (Bohr, nm)?"
    return Result(name, closest, data_min, "Å", ">=", note)


def check_frozen(frozen: Evaluator, eager: Evaluator, s: Structure) -> Result:
    """``.pt2`` against eager evaluation of its checkpoint (in the checkpoint's precision),
    within the tolerances ``sezm freeze`` verifies with: ``atol + rtol max|eager|``."""
    from ..freeze import tolerances

    got, want = frozen(s), eager(s)
    tol = tolerances(getattr(torch, eager.precision))
    ratios, errors = {}, {}
    for key, unit in (("energy", "eV"), ("force", "eV/Å"), ("virial", "eV")):
        a, b = np.asarray(getattr(got, key)), np.asarray(getattr(want, key))
        atol, rtol = tol[key]
        errors[key] = (float(np.max(np.abs(a - b))), atol + rtol * float(np.max(np.abs(b))), unit)
        ratios[key] = errors[key][0] / errors[key][1]
    key = max(ratios, key=lambda k: np.inf if np.isnan(ratios[k]) else ratios[k])
    err, bound, unit = errors[key]
    return Result(".pt2 = eager checkpoint", err, bound, unit, note=f"worst: {key}")


def run_checks(subject: Subject, s: Structure, options: CheckOptions) -> list[Result]:
    """Every check of ``subject`` on ``s``, in table order."""
    ev = subject.evaluator
    rng = np.random.default_rng(options.seed)
    ref = ev(s)
    steps: list[tuple[str, Callable[[], Result | list[Result]]]] = [
        ("rotation", lambda: check_rotation(ev, s, ref, rng)),
        ("translation", lambda: check_translation(ev, s, ref, rng)),
        ("permutation", lambda: check_permutation(ev, s, ref, rng)),
        ("forces", lambda: check_forces(ev, s, ref, rng, options.fd_atoms)),
        ("virial", lambda: check_virial(ev, s, ref)),
        ("cutoff", lambda: check_cutoff(ev, s)),
    ]
    if subject.counterpart is not None:
        steps.append((".pt2 vs eager", lambda: check_frozen(*subject.counterpart, s)))
    steps += [
        (
            "NVE",
            lambda: check_nve(
                ev, s, options.nve_steps, options.nve_dt, options.temperature, options.seed
            ),
        ),
        ("closest pair", lambda: check_min_distance(s, ev.rcut, subject.min_nbor_dist)),
    ]
    results: list[Result] = []
    for label, step in steps:
        results += _timed(label, step, ev)
    return results


def _timed(label: str, step: Callable, ev: Evaluator) -> list[Result]:
    start, calls = time.perf_counter(), ev.calls
    try:
        out = step()
    except Exception as err:  # a model that crashes on a moved structure fails that check
        out = Result(label, float("nan"), 0.0, note=f"raised {type(err).__name__}: {err}")
    log.info("%s: %d evaluations, %.1f s", label, ev.calls - calls, time.perf_counter() - start)
    return out if isinstance(out, list) else [out]
