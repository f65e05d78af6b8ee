"""``sezm check``: passes on a good model, fails the right check (exit status 1) on a model
broken on purpose, reports a structure closer than the training data, rejects bad options.

The model is a tiny DPA4 (8 channels, rcut 3 Å) with every parameter perturbed so that all
branches take part; the structure is a cluster of five water molecules cut from the bundled
frame (open boundaries), so one full check takes a few seconds.
"""

from __future__ import annotations

import os

import ase.io
import numpy as np
import pytest
import torch

import sezm.model.forces
import sezm.nn.edge_cache
import sezm.nn.radial
from sezm.cli import run
from sezm.config import normalize_model
from sezm.data.frames import InputError
from sezm.infer.check import CheckError, CheckOptions, check, load_subject, read_structure
from sezm.infer.check.result import Result, format_table
from sezm.infer.check.runner import check_frozen
from sezm.infer.check.structure import BUNDLED, min_pair_distance
from sezm.infer.check.subject import Evaluator
from sezm.model.build import build_model
from sezm.train.checkpoint import model_state

ROWS = {
    "rotation": "rotation: E invariant, F, virial covariant",
    "translation": "translation invariance",
    "permutation": "permutation of same-type atoms",
    "forces": "forces = -dE/dr (finite differences)",
    "virial": "virial = -dE/d strain (finite differences)",
    "cutoff_energy": "cutoff crossing: energy continuous",
    "cutoff_force": "cutoff crossing: forces continuous",
    "nve": "NVE energy drift",
    "closest": "closest pair within training data",
}


def tiny_checkpoint(
    path, min_nbor_dist: float = 0.9, precision: str = "float32", noise: float = 0.1
) -> str:
    """A tiny DPA4 checkpoint, every parameter perturbed by ``noise N(0, 1)``."""
    raw = {
        "type": "dpa4",
        "type_map": ["O", "H"],
        "descriptor": {
            "rcut": 3.0,
            "channels": 8,
            "n_radial": 4,
            "lmax": 1,
            "n_blocks": 1,
            "precision": precision,
            "seed": 1,
        },
        "fitting_net": {"neuron": [8], "precision": precision, "seed": 1},
    }
    params = normalize_model(raw)
    model = build_model(params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        model.min_nbor_dist.fill_(min_nbor_dist)
    torch.save({"model": model_state(model, params, 1e-3, 9)}, path)
    return str(path)


def water_cluster(path, molecules: int = 5, scale: float = 1.0) -> str:
    """The ``molecules`` water molecules of the bundled frame nearest to its box centre, whole
    (hydrogens unwrapped next to their oxygen), with open boundaries; coordinates times
    ``scale``."""
    atoms = ase.io.read(BUNDLED)
    centre = atoms.cell.array.sum(axis=0) / 2
    oxygens = np.flatnonzero(atoms.numbers == 8)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    near = oxygens[np.argsort(np.linalg.norm(atoms.positions[oxygens] - centre, axis=1))]
    symbols, positions = [], []
    for o in near[:molecules]:
        vec = atoms.get_distances(o, hydrogens, mic=True, vector=True)  # (nH, 3)
        two = np.argsort(np.linalg.norm(vec, axis=1))[:2]
        symbols += ["O", "H", "H"]
        positions += [atoms.positions[o], *(atoms.positions[o] + vec[two])]
    cluster = ase.Atoms(symbols=symbols, positions=np.array(positions) * scale)
    ase.io.write(path, cluster, format="extxyz")
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("check") / "model.pt")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    return water_cluster(tmp_path_factory.mktemp("check") / "cluster.xyz")


def sezm_check(capsys, *args: str) -> tuple[int, dict[str, str]]:
    """Exit status of ``sezm check ARGS`` and each table row's status by check name."""
    try:
        status = run(["check", *args])
    except SystemExit as stop:  # a failed check: SystemExit(1) through the error boundary
        status = stop.code
    table = capsys.readouterr().out
    rows = {}
    for name in ROWS.values():
        line = next((ln for ln in table.splitlines() if ln.startswith(name)), None)
        assert line is not None, f"row {name!r} missing from\n{table}"
        rows[name] = next(w for w in ("PASS", "FAIL", "SKIP") if f"  {w}" in line)
    return status, rows


def test_cluster_is_five_whole_molecules(cluster) -> None:
    atoms = ase.io.read(cluster)
    assert atoms.get_chemical_formula() == "H10O5"
    oh = atoms.get_all_distances()[::3][:, [k for k in range(15) if k % 3]]
    assert (np.sort(oh, axis=1)[:, :2] < 1.2).all()  # each O with two H of its own


def test_good_model_passes(capsys, ckpt, cluster) -> None:
    status, rows = sezm_check(capsys, ckpt, "-s", cluster, "--nve-steps", "60")
    assert status == 0
    assert set(rows.values()) == {"PASS"}, rows


def test_measured_values_are_rounding_small(ckpt, cluster) -> None:
    results = {r.name: r for r in check(ckpt, cluster, options=CheckOptions(nve_steps=0))}
    assert results[ROWS["rotation"]].measured < 1e-12
    assert results[ROWS["forces"]].measured < 1e-7
    assert results[ROWS["virial"]].measured < 1e-7
    assert results[ROWS["cutoff_energy"]].measured < 1e-7
    assert results[ROWS["nve"]].status == "SKIP"
    assert results[ROWS["closest"]].measured == pytest.approx(
        min_pair_distance(read_structure(cluster, 0, ["O", "H"]), 3.0)
    )


def test_force_sign_error_fails_the_derivative_checks(capsys, monkeypatch, ckpt, cluster) -> None:
    """Negated forces are still covariant (rotation passes) but not -dE/dr, and MD heats up."""
    forces = sezm.model.forces.forces
    monkeypatch.setattr(sezm.model.forces, "forces", lambda *a: -forces(*a))
    status, rows = sezm_check(capsys, ckpt, "-s", cluster, "--nve-steps", "60")
    assert status == 1
    assert rows[ROWS["forces"]] == "FAIL"
    assert rows[ROWS["nve"]] == "FAIL"
    assert rows[ROWS["rotation"]] == rows[ROWS["virial"]] == "PASS"


def _patch_envelope(monkeypatch, envelope) -> None:
    monkeypatch.setattr(sezm.nn.edge_cache, "c3_envelope", envelope)
    monkeypatch.setattr(sezm.nn.radial, "c3_envelope", envelope)


def test_hard_cutoff_fails_energy_continuity(capsys, monkeypatch, ckpt, cluster) -> None:
    """An envelope that stays 1 up to rcut: the energy jumps when a pair crosses it."""
    _patch_envelope(monkeypatch, lambda r, rcut, p: (r < rcut).to(r.dtype))
    status, rows = sezm_check(capsys, ckpt, "-s", cluster, "--nve-steps", "0")
    assert status == 1
    assert rows[ROWS["cutoff_energy"]] == "FAIL"
    assert rows[ROWS["rotation"]] == rows[ROWS["forces"]] == "PASS"


def test_c0_envelope_fails_force_continuity(capsys, monkeypatch, ckpt, cluster) -> None:
    """An envelope reaching 0 at rcut with a finite slope: the energy is continuous, the
    forces jump."""
    _patch_envelope(monkeypatch, lambda r, rcut, p: ((rcut - r) / rcut).clamp(0.0, 1.0))
    status, rows = sezm_check(capsys, ckpt, "-s", cluster, "--nve-steps", "0")
    assert status == 1
    assert rows[ROWS["cutoff_force"]] == "FAIL"
    assert rows[ROWS["cutoff_energy"]] == "PASS"


def test_structure_closer_than_training_data(capsys, tmp_path) -> None:
    model = tiny_checkpoint(tmp_path / "far.pt", min_nbor_dist=1.3)
    squeezed = water_cluster(tmp_path / "bohr.xyz", scale=0.5)
    status, rows = sezm_check(capsys, model, "-s", squeezed, "--nve-steps", "0")
    assert status == 1
    assert rows[ROWS["closest"]] == "FAIL"
    [result] = [
        r
        for r in check(model, squeezed, options=CheckOptions(nve_steps=0))
        if r.name == ROWS["closest"]
    ]
    assert result.limit == pytest.approx(1.3) and result.measured < 0.5
    assert "wrong unit" in result.note


def test_unrecorded_training_distance_is_skipped(capsys, tmp_path, cluster) -> None:
    model = tiny_checkpoint(tmp_path / "old.pt", min_nbor_dist=-1.0)
    status, rows = sezm_check(capsys, model, "-s", cluster, "--nve-steps", "0")
    assert status == 0
    assert rows[ROWS["closest"]] == "SKIP"


def test_float32_checkpoint_is_checked_in_float64(ckpt) -> None:
    ev = load_subject(ckpt).evaluator
    assert ev.precision == "float64" and ev.tol.symmetry == 1e-9
    assert {p.dtype for p in ev.model.parameters()} == {torch.float64}


def test_bundled_structure_is_the_water_frame() -> None:
    from sezm.data.system import System

    s = read_structure(None, 0, ["O", "H"])
    frame = System(BUNDLED.parents[3] / "examples/water/data/data_0", ["O", "H"]).frames([0])
    assert s.nat == 192 and s.cell is not None
    np.testing.assert_allclose(s.coord, frame["coord"][0], atol=1e-6)
    np.testing.assert_array_equal(s.atype, frame["atype"][0])
    np.testing.assert_allclose(s.cell, frame["box"][0], atol=1e-6)


def test_npy_system_frame(tmp_path) -> None:
    path = BUNDLED.parents[3] / "examples/water/data/data_1"
    s = read_structure(str(path), 90, ["H", "O"])  # second set; types mapped onto the model
    assert s.nat == 192 and s.source.endswith("frame 90")
    assert (s.atype == 1).sum() == 64
    with pytest.raises(InputError, match="frame 500 does not exist"):
        read_structure(str(path), 500, ["O", "H"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pt2", "model.pt"], "expected a frozen model file ending in .pt2"),
        (["--checkpoint", "x.pt"], "is a checkpoint; use --pt2"),
    ],
)
def test_option_errors(capsys, ckpt, args, message) -> None:
    assert run(["check", ckpt, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_structure_and_unknown_element(capsys, ckpt, tmp_path) -> None:
    assert run(["check", ckpt, "-s", str(tmp_path / "none.xyz")]) == 2
    assert "structure not found" in capsys.readouterr().err
    ase.io.write(tmp_path / "nacl.xyz", ase.Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]]))
    assert run(["check", ckpt, "-s", str(tmp_path / "nacl.xyz")]) == 2
    assert "elements ['Cl', 'Na'] are not in the model's type_map" in capsys.readouterr().err


def test_frozen_comparison_fails_on_a_different_model(ckpt, cluster) -> None:
    """``.pt2 = eager`` within the freeze tolerances: itself passes, an energy offset fails."""
    from sezm.infer.check.subject import _checkpoint

    eager, _ = _checkpoint(ckpt, None, None)
    s = read_structure(cluster, 0, eager.type_map)
    assert check_frozen(eager, eager, s).status == "PASS"

    class Shifted:
        rcut, type_map = eager.model.rcut, eager.model.type_map

        def __call__(self, graph, **kw):
            out = eager.model(graph, **kw)
            return {**out, "force": out["force"] * 1.001}

    result = check_frozen(Evaluator(Shifted(), "float32", "shifted"), eager, s)
    assert result.status == "FAIL" and result.note == "worst: force"


def test_table_layout() -> None:
    table = format_table(
        [
            Result("a", 1e-10, 1e-9, "(rel)"),
            Result("closest pair", 0.5, 0.9, "Å", ">=", "wrong unit?"),
            Result("nve", None, None, note="--nve-steps 0"),
        ]
    ).splitlines()
    assert table[0].split() == ["check", "measured", "tolerance", "result"]
    assert table[2].split()[-1] == "PASS"
    assert table[3].endswith("FAIL  wrong unit?") and ">= 0.9 Å" in table[3]
    assert table[4].endswith("SKIP  --nve-steps 0")


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="freezes a .pt2 (~1 min)")
def test_pt2_against_its_checkpoint(capsys, ckpt, cluster, tmp_path) -> None:
    from sezm.infer.freeze import freeze

    pt2 = freeze(ckpt, tmp_path / "tiny", with_comm=False).path
    status = run(["check", str(pt2), "--checkpoint", ckpt, "-s", cluster, "--nve-steps", "40"])
    table = capsys.readouterr().out
    assert status == 0, table
    lines = table.splitlines()
    assert any(ln.startswith(".pt2 = eager checkpoint") and "PASS" in ln for ln in lines)
    # the package runs in float32: its symmetries are held to the float32 tolerance
    assert any(ln.startswith(ROWS["rotation"]) and "<= 0.0001 (rel)" in ln for ln in lines)
    with pytest.raises(CheckError, match=r"already a \.pt2"):
        load_subject(str(pt2), pt2=str(pt2))
