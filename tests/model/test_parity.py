"""Parity with DeePMD-kit 3.2: upstream checkpoints evaluated by sezm vs upstream's own outputs.

Each case in ``tests/data/parity/<case>/`` holds an upstream checkpoint (``model.pt``), the
input it was trained from, and upstream ``DeepPot``/``DeepProperty`` outputs on fixed frames
(``expected.npz``). Tolerances (float32 models): |dE|/atom <= 1e-5 eV;
max|dF| <= 1e-5 + 1e-4 max|F|; |dV|/atom <= 1e-5 + 1e-4 max|V|/atom; descriptor
max|d| <= 1e-4 (1 + max|d|); property max|d| <= 1e-5 (1 + max|p|); atomic energies
1e-5 + 3e-7 max|E_i| (float32 rounding of O(100) eV values); atomic virials like forces.
"""

from __future__ import annotations

import numpy as np
import pytest
from parity_cases import CASES, PARITY, frames

import sezm


@pytest.mark.parametrize("case", CASES)
def test_parity(case: str) -> None:
    path = PARITY / case / "model.pt"
    probe = sezm.DeepPot(path)
    is_property = type(probe.model).__name__ == "PropertyModel"
    dp = sezm.DeepProperty(path) if is_property else probe
    failures = []
    for name, coord, box, atype, ref in frames(case):
        nat = len(atype)
        inputs = {k: ref[k] for k in ("fparam", "aparam", "charge_spin", "spin") if k in ref}
        if "descriptor" in ref:
            d = dp.eval_descriptor(coord, box, atype, **inputs)[0]
            err = np.abs(d - ref["descriptor"]).max()
            if err > 1e-4 * (1 + np.abs(ref["descriptor"]).max()):
                failures.append(f"{name}: descriptor max|d| {err:.2e}")
        if is_property:
            p, _ap = dp.eval(coord, box, atype, atomic=True, **inputs)
            err = np.abs(p.reshape(-1) - ref["property"].reshape(-1)).max()
            if err > 1e-5 * (1 + np.abs(ref["property"]).max()):
                failures.append(f"{name}: property max|d| {err:.2e}")
            continue
        e, f, v, ae, av = dp.eval(coord, box, atype, atomic=True, **inputs)[:5]  # spin: + fm, mm
        f_ref, v_ref = ref["force"].reshape(nat, 3), ref["virial"].reshape(9)
        checks = {
            "energy/atom": (abs(e.item() - ref["energy"].item()) / nat, 1e-5),
            "force": (np.abs(f[0] - f_ref).max(), 1e-5 + 1e-4 * np.abs(f_ref).max()),
            "virial/atom": (
                np.abs(v[0] - v_ref).max() / nat,
                1e-5 + 1e-4 * np.abs(v_ref).max() / nat,
            ),
            # atomic energies are O(100) eV in float32: allow a few ulps on top of 1e-5
            "atom_energy": (
                np.abs(ae[0, :, 0] - ref["atom_energy"]).max(),
                1e-5 + 3e-7 * np.abs(ref["atom_energy"]).max(),
            ),
            "atom_virial": (
                np.abs(av[0] - ref["atom_virial"].reshape(nat, 9)).max(),
                1e-5 + 1e-4 * np.abs(ref["atom_virial"]).max(),
            ),
        }
        failures += [
            f"{name}: {k} {err:.2e} > {tol:.2e}" for k, (err, tol) in checks.items() if err > tol
        ]
    assert not failures, "\n".join(failures)
