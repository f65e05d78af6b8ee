"""``sezm model-devi`` against ``dp --pt model-devi`` (DeePMD-kit 3.2).

Reference files: ``tests/data/model_devi/<case>.out``, made by
``tests/module_fixtures/make_model_devi.py`` (committees of the ``tiny`` parity checkpoint and
perturbed copies of it; see that script). Commands run from ``tests/data`` with the same
relative paths as the reference, so the ``# <system>`` header lines must match as well.

Numbers: float32 models, so each value must agree within 1e-5 of the largest value of its kind
(virial, force, energy) in its frame; the header lines and the column layout must be identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sezm.cli import build_parser, main, run
from sezm.data import DataError
from sezm.infer.deep_pot import DeepPot
from sezm.infer.model_devi import CheckpointError, deviation_table, model_devi

DATA = Path(__file__).parents[1] / "data"
REF = DATA / "model_devi"
MODELS = ["parity/tiny/model.pt", "model_devi/model_1.pt", "model_devi/model_2.pt"]
FPARAM_MODELS = ["parity/fparam1/model.pt", "model_devi/fparam_1.pt"]
RTOL = 1e-5

# case: (system, models (indices into MODELS, or FPARAM_MODELS), keyword arguments)
CASES = {
    "plain": ("systems/water/data_1", (0, 1, 2), {"frequency": 10}),
    "relative": ("systems/water/data_1", (0, 1, 2), {"relative": 0.05}),
    "relative_v": ("model_devi/sets", (0, 1, 2), {"relative": 0.1, "relative_v": 0.2}),
    "atomic": ("systems/water/data_0", (0, 1, 2), {"atomic": True, "frequency": 3}),
    "nopbc": ("model_devi/nopbc", (0, 1, 2), {"relative": 0.05}),
    "two_models": ("systems/water/data_0", (0, 1), {}),
    "directory": ("systems/water", (0, 1, 2), {"frequency": 2}),
    "fparam": ("model_devi/fparam", FPARAM_MODELS, {}),
}


@pytest.fixture(scope="module")
def committee() -> list[DeepPot]:
    return [DeepPot(DATA / m, device="cpu") for m in MODELS]


def read_blocks(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{system: (column header line, data lines)}`` of a model_devi.out file."""
    blocks: dict[str, tuple[str, list[str]]] = {}
    lines = path.read_text().splitlines()
    k = 0
    while k < len(lines):
        assert lines[k].startswith("# ") and lines[k + 1].startswith("# step"), lines[k : k + 2]
        system, columns, k = lines[k][2:], lines[k + 1], k + 2
        rows = []
        while k < len(lines) and not lines[k].startswith("#"):
            rows.append(lines[k])
            k += 1
        blocks[system] = (columns, rows)
    return blocks


def assert_same_output(got: Path, want: Path) -> None:
    """Identical headers, systems, steps and layout; values within float32 tolerance."""
    mine, ref = read_blocks(got), read_blocks(want)
    assert sorted(mine) == sorted(ref)
    for system, (columns, rows) in ref.items():
        assert mine[system][0] == columns, system
        assert len(mine[system][1]) == len(rows), system
        for line_got, line_want in zip(mine[system][1], rows):
            assert len(line_got) == len(line_want)
            assert line_got[:12] == line_want[:12]  # the step, %12d
            a = np.array(line_got.split(), dtype=float)
            b = np.array(line_want.split(), dtype=float)
            scale = np.zeros_like(b)  # largest value of each kind in the frame (step: 0)
            scale[1:4] = np.abs(b[1:4]).max()
            scale[4:7] = scale[8:] = np.abs(b[4:7]).max()
            scale[7] = abs(b[7])
            np.testing.assert_array_less(np.abs(a - b), RTOL * scale + 1e-300, err_msg=system)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_deepmd(case, committee, tmp_path, monkeypatch):
    system, members, kwargs = CASES[case]
    monkeypatch.chdir(DATA)
    models = [committee[m] if isinstance(m, int) else m for m in members]
    out = tmp_path / f"{case}.out"
    tables = model_devi(models, system, out, **kwargs)
    assert_same_output(out, REF / f"{case}.out")
    assert len(tables) == len(read_blocks(out))
    assert tables[0].shape[1] == 8 + (192 if kwargs.get("atomic") else 0)


def test_cli_matches_deepmd(tmp_path, monkeypatch):
    """The command as DP-GEN runs it, DeePMD-kit's ``--relative_v`` spelling included."""
    monkeypatch.chdir(DATA)
    out = tmp_path / "md.out"
    out.write_text("stale content of an earlier run\n")  # replaced, not appended to
    base = ["model-devi", "-m", *MODELS, "-s", "model_devi/sets", "-o", str(out)]
    main([*base, "--relative", "0.1", "--relative_v", "0.2"])
    assert_same_output(out, REF / "relative_v.out")
    main([*base[:-4], "-s", "systems/water/data_1", "-o", str(out), "-f", "10"])
    assert_same_output(out, REF / "plain.out")


def test_every_option_has_help_and_shows_its_default():
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    command = action.choices["model-devi"]
    for option in command._actions:
        if not isinstance(option, argparse._HelpAction):
            text = command._get_formatter()._expand_help(option)
            assert "default" in text, option.option_strings


def test_directory_blocks_in_sorted_order(committee, tmp_path, monkeypatch):
    monkeypatch.chdir(DATA)
    model_devi(committee, "systems/water", tmp_path / "md.out")
    assert list(read_blocks(tmp_path / "md.out")) == [
        "systems/water/data_0",
        "systems/water/data_1",
    ]


def test_batches_do_not_change_the_result(committee, tmp_path):
    """Frames evaluated one at a time number and deviate as in one batch."""
    system = DATA / "systems" / "water" / "data_1"  # two sets: 3 + 2 frames
    one = model_devi(committee, system, tmp_path / "a.out", frequency=5, batch_atoms=1)
    all_ = model_devi(committee, system, tmp_path / "b.out", frequency=5, batch_atoms=10**6)
    np.testing.assert_array_equal(one[0][:, 0], np.arange(5) * 5)
    # float32 forces of O(1) eV/Å round at ~1e-7 and the deviations subtract them; a batch of
    # many frames may also take the streamed path, which sums in another order
    np.testing.assert_allclose(one[0], all_[0], rtol=1e-6, atol=1e-7)


def test_formulas_on_random_values():
    """Deviations of a 4-model committee, computed here element by element (nine frames: the
    count at which DeePMD-kit 3.2's relative virial deviation divides by wrong magnitudes)."""
    rng = np.random.default_rng(0)
    nm, nf, nat = 4, 9, 5
    e, f, v = (
        rng.normal(size=(nm, nf)),
        rng.normal(size=(nm, nf, nat, 3)),
        rng.normal(size=(nm, nf, 9)),
    )
    got = deviation_table(e, f, v, relative=0.3, relative_v=0.7, atomic=True)
    assert got.shape == (nf, 7 + nat)
    for t in range(nf):
        w = v[:, t] / nat  # (nm, 9)
        u = np.sqrt(((w - w.mean(0)) ** 2).mean(0)) / (np.sqrt((w.mean(0) ** 2).sum()) + 0.7)
        s = np.array(
            [
                np.sqrt(((f[:, t, i] - f[:, t, i].mean(0)) ** 2).sum(1).mean())
                / (np.sqrt((f[:, t, i].mean(0) ** 2).sum()) + 0.3)
                for i in range(nat)
            ]
        )
        ea = e[:, t] / nat
        want = [u.max(), u.min(), np.sqrt((u**2).sum()) / 3, s.max(), s.min(), s.mean()]
        want += [np.sqrt(((ea - ea.mean()) ** 2).mean()), *s]
        np.testing.assert_allclose(got[t], want, rtol=1e-12)


def test_one_model_has_zero_deviation(committee, tmp_path):
    table = model_devi(committee[:1], DATA / "model_devi" / "nopbc", tmp_path / "md.out")[0]
    np.testing.assert_array_equal(table[:, 1:], 0.0)


def test_different_type_maps_name_the_file(committee, tmp_path):
    other = DATA / "parity" / "mixed_type" / "model.pt"
    with pytest.raises(CheckpointError, match=r"mixed_type/model\.pt: type_map .* differs"):
        model_devi([DATA / MODELS[0], other], DATA / "model_devi" / "nopbc", tmp_path / "o")


def test_user_errors_end_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(DATA)
    out = str(tmp_path / "md.out")
    cases = [
        (
            ["-m", MODELS[0], "missing.pt", "-s", "model_devi/nopbc"],
            "model file not found: missing.pt",
        ),
        (["-m", *MODELS[:2], "-s", "no/such/system"], "no/such/system"),
        (["-m", MODELS[0], "parity/property/model.pt", "-s", "model_devi/nopbc"], "property model"),
        (["-m", *MODELS[:2], "-s", "model_devi/nopbc", "--relative", "-1"], "must be >= 0"),
    ]
    for args, message in cases:
        assert run(["model-devi", *args, "-o", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sezm: error: ") and message in err, err


def test_missing_fparam_names_the_system(tmp_path):
    system = tmp_path / "fparam"
    shutil.copytree(REF / "fparam", system)
    (system / "set.000" / "fparam.npy").unlink()
    with pytest.raises(DataError, match="fparam"):
        model_devi([DATA / m for m in FPARAM_MODELS], system, tmp_path / "md.out")


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="freezes a .pt2 (~1.5 min)")
def test_frozen_model_in_the_committee(tmp_path, monkeypatch):
    """A ``.pt2`` frozen from the first checkpoint takes its place."""
    main(["freeze", "-c", str(DATA / MODELS[0]), "-o", str(tmp_path / "m0"), "--no-with-comm"])
    monkeypatch.chdir(DATA)
    out = tmp_path / "md.out"
    models = [str(tmp_path / "m0.pt2"), *MODELS[1:]]
    main(["model-devi", "-m", *models, "-s", "systems/water/data_1", "-o", str(out), "-f", "10"])
    assert_same_output(out, REF / "plain.out")
