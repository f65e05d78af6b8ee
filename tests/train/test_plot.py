"""``sezm plot``: lcurve.out files (single-task, no validation, multi-task, nan, restarted) are
read column by column, drawn one panel per quantity plus the learning rate, written as a PNG;
a file that is not a learning curve, or a missing matplotlib, ends in one clear message."""

from __future__ import annotations

import builtins
import importlib.util
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from sezm.cli import build_parser, run
from sezm.plot import PlotError, file_labels, parse_column, plot_lcurves, read_lcurve

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)

NOTE = "# If there is no available reference data, rmse_*_{val,trn} will print nan\n"

# as sezm/DeePMD-kit write them: rmse (total), energy, force, virial; validation and training
WITH_VALID = (
    "# step       rmse_val    rmse_trn    rmse_e_val  rmse_e_trn    rmse_f_val  rmse_f_trn"
    "    rmse_v_val  rmse_v_trn   lr      \n" + NOTE + "      1      2.51e+01    2.60e+01"
    "      1.92e-01    2.17e-01      7.93e-01    8.23e-01      5.00e-02    6.00e-02    1.0e-03\n"
    "     50      1.99e+01    2.38e+01      2.55e-02         nan      7.48e-01    8.95e-01"
    "           nan    4.00e-02    7.0e-04\n"
    "    100      1.05e+01    1.01e+01      1.48e-02    8.29e-03      4.68e-01    4.52e-01"
    "      2.00e-02    3.00e-02    5.0e-04\n"
)
# a run without validation data, with mae metrics
NO_VALID = (
    "# step      mae_e_trn   mae_f_trn    rmse_trn   lr      \n" + NOTE + "      1      2.10e-01"
    "    1.43e+00    5.72e+00    1.0e-04\n"
    "    100      3.47e-02    1.21e+00    4.99e+00    5.0e-04\n"
    "    200      3.63e-03    1.20e+00    4.90e+00    5.0e-04\n"
)
# multi-task: branch "water" with validation, branch "metal_2" without
MULTI = (
    "# step    rmse_val_water rmse_trn_water rmse_e_val_water rmse_e_trn_water"
    " rmse_f_val_water rmse_f_trn_water rmse_trn_metal_2 rmse_e_trn_metal_2"
    " rmse_f_trn_metal_2   lr\n" + NOTE + "      1   3.0 3.1 0.2 0.3 0.9 1.0 2.0 0.5 1.5 1.0e-03\n"
    "    100   2.0 2.1 0.1 nan 0.7 0.8 1.0 0.2 1.1 5.0e-04\n"
    "    200   1.0 1.1 0.05 0.06 0.5 0.6 0.5 0.1 0.9 1.0e-04\n"
)


def _write(folder: Path, text: str, name: str = "lcurve.out") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _titles(fig) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_columns_are_named_by_kind_quantity_split_and_branch() -> None:
    col = parse_column("rmse_e_val")
    assert (col.kind, col.quantity, col.split, col.branch) == ("rmse", "e", "val", "")
    col = parse_column("mae_f_trn_metal_2")
    assert (col.kind, col.quantity, col.split, col.branch) == ("mae", "f", "trn", "metal_2")
    col = parse_column("rmse_trn")
    assert (col.kind, col.quantity, col.split) == ("rmse", "", "trn")
    col = parse_column("smooth_mae_val")
    assert (col.kind, col.quantity) == ("smooth_mae", "")
    assert parse_column("step") is None and parse_column("lr") is None


def test_read_with_validation_and_nan(tmp_path) -> None:
    curve = read_lcurve(_write(tmp_path, WITH_VALID))
    np.testing.assert_array_equal(curve.step, [1, 50, 100])
    np.testing.assert_allclose(curve.lr, [1e-3, 7e-4, 5e-4])
    by_name = {c.name: v for c, v in curve.errors.items()}
    assert list(by_name) == [
        *("rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn"),
        *("rmse_f_val", "rmse_f_trn", "rmse_v_val", "rmse_v_trn"),
    ]
    assert math.isnan(by_name["rmse_e_trn"][1]) and by_name["rmse_e_trn"][2] == 8.29e-03
    assert curve.has_validation and curve.branches == [""]
    # the total loss is not drawn when there are per-quantity columns
    assert {c.quantity for c in curve.plotted()} == {"e", "f", "v"}


def test_read_without_validation(tmp_path) -> None:
    curve = read_lcurve(_write(tmp_path, NO_VALID))
    assert not curve.has_validation
    assert {(c.kind, c.quantity, c.split) for c in curve.plotted()} == {
        ("mae", "e", "trn"),
        ("mae", "f", "trn"),
    }


def test_read_multi_task(tmp_path) -> None:
    curve = read_lcurve(_write(tmp_path, MULTI))
    assert curve.branches == ["water", "metal_2"]
    f_metal = next(v for c, v in curve.errors.items() if c.name == "rmse_f_trn_metal_2")
    np.testing.assert_allclose(f_metal, [1.5, 1.1, 0.9])
    assert {c.branch for c in curve.plotted() if c.split == "val"} == {"water"}


def test_restart_repeats_the_header_and_an_unfinished_last_row_is_skipped(tmp_path) -> None:
    body = WITH_VALID.split(NOTE)[1]
    text = WITH_VALID + WITH_VALID.split(NOTE)[0] + "\n" + NOTE + body + "    150   1.0 2.0"
    curve = read_lcurve(_write(tmp_path, text))
    np.testing.assert_array_equal(curve.step, [1, 50, 100, 1, 50, 100])


@needs_matplotlib
def test_png_has_energy_force_virial_and_learning_rate(tmp_path) -> None:
    path = _write(tmp_path / "run", WITH_VALID)
    out = tmp_path / "curves.png"
    fig = plot_lcurves([path], out)
    assert _titles(fig) == ["energy error", "force error", "virial error", ""]
    assert fig.axes[-1].get_ylabel() == "learning rate"
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert fig.axes[0].get_ylabel() == "RMSE (eV/atom)"
    energy = fig.axes[0].get_lines()
    assert [line.get_linestyle() for line in energy] == ["-", "--"]  # validation, training
    # nan rows are left out and the line joined across them: 0.05 (nan) 0.02 is one segment
    np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_ydata(), [5e-2, 2e-2])
    np.testing.assert_array_equal(energy[1].get_xdata(), [1, 100])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000  # a drawn figure, not an empty canvas
    width, height = struct.unpack(">II", out.read_bytes()[16:24])  # PNG IHDR
    assert (width, height) == (1350, round(150 * fig.get_figheight()))


@needs_matplotlib
def test_overlaid_files_are_named_by_their_folders(tmp_path) -> None:
    paths = [
        _write(tmp_path / "a" / "quick", WITH_VALID),
        _write(tmp_path / "b" / "long", NO_VALID),
        _write(tmp_path / "c" / "multi", MULTI),
    ]
    fig = plot_lcurves(paths, tmp_path / "all.png")
    assert _titles(fig) == ["energy error", "force error", "virial error", ""]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "quick (RMSE)",
        "long (MAE)",
        "multi [water] (RMSE)",
        "multi [metal_2] (RMSE)",
        "validation",
        "training",
    ]
    # energy: quick val+trn, long trn, water val+trn, metal_2 trn
    assert len(fig.axes[0].get_lines()) == 6
    assert len(fig.axes[-1].get_lines()) == 3  # one learning rate per file
    assert (tmp_path / "all.png").stat().st_size > 20_000


def test_file_labels() -> None:
    assert file_labels(["x/a.out", "x/b.out"]) == ["a.out", "b.out"]
    assert file_labels(["x/run1/lcurve.out", "y/run2/lcurve.out"]) == ["run1", "run2"]
    assert file_labels(["x/run/lcurve.out", "y/run/lcurve.out"]) == ["x/run", "y/run"]


@needs_matplotlib
def test_all_nan_quantity_gets_no_panel_and_no_lr_column_no_lr_panel(tmp_path) -> None:
    text = "# step  rmse_e_trn  rmse_f_trn  rmse_v_trn\n1  0.1  1.0  nan\n2  0.05  0.8  nan\n"
    fig = plot_lcurves([_write(tmp_path, text)])
    assert _titles(fig) == ["energy error", "force error"]


@needs_matplotlib
def test_a_property_curve_gets_its_bare_columns_drawn(tmp_path) -> None:
    text = "# step  mae_val  mae_trn  lr\n1  0.5  0.6  1e-3\n2  0.3  0.4  1e-4\n"
    fig = plot_lcurves([_write(tmp_path, text)])
    assert _titles(fig) == ["property error", ""]
    assert fig.axes[0].get_ylabel() == "MAE"


@needs_matplotlib
def test_cli_writes_the_png(tmp_path, capsys) -> None:
    a = _write(tmp_path / "r1", WITH_VALID)
    b = _write(tmp_path / "r2", NO_VALID)
    out = tmp_path / "curves.png"
    assert run(["--log-level", "warning", "plot", str(a), str(b), "-o", str(out)]) == 0
    assert out.stat().st_size > 20_000


def test_plot_options_have_help() -> None:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    plot = action.choices["plot"]
    for option in plot._actions:
        assert option.help, option.dest
    text = " ".join(plot.format_help().split())
    assert "(default: lcurve.png)" in text and "matplotlib" in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"model": {"type": "dpa4"}}\n', "no header line before line 1"),
        ("", "no header line"),
        ("#!/bin/sh\necho hi\n", "line 1 is not the header"),
        ("1 2 3\n4 5 6\n", "no header line before line 1"),
        ("# step  rmse_e_trn  lr\n", "no rows yet"),
        ("# step  energy  force\n1 2 3\n", "no <metric>_val/<metric>_trn column"),
        ("# step  rmse_e_trn  lr\n1  0.1  1e-3\n2  0.1\n3 0.1 1e-3\n", "line 3 has 2 values"),
        ("# step  rmse_e_trn  lr\n1  abc  1e-3\n", "line 2 is not all numbers"),
    ],
    ids=["json", "empty", "script", "no-header", "no-rows", "no-metric", "short-row", "text"],
)
def test_a_file_that_is_not_a_learning_curve_is_named(tmp_path, capsys, text, expected) -> None:
    path = _write(tmp_path, text, name="input.json")
    with pytest.raises(PlotError) as info:
        read_lcurve(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert run(["plot", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sezm: error: {path}: ") and expected in err
    assert "lcurve.out format" in err or "no rows" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_file(tmp_path, capsys) -> None:
    assert run(["plot", str(tmp_path / "nope.out")]) == 2
    assert "nope.out: cannot read it" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = _write(tmp_path, WITH_VALID)
    with pytest.raises(PlotError, match="pip install matplotlib"):
        plot_lcurves([path])
    assert run(["plot", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "sezm: error:" in err and "needs matplotlib" in err
    assert "pip install matplotlib" in err and "sezm[plot]" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# parity plots of `sezm test --plot`


def _detail_files(prefix: Path, virial: bool = True) -> None:
    gen = np.random.default_rng(0)
    e = gen.normal(-155.9, 0.01, (5, 1))
    f = gen.normal(0.0, 1.0, (40, 3))
    np.savetxt(
        prefix.with_suffix(".e_peratom.out"), np.hstack([e, e + 0.001]), header="s: data_e pred_e"
    )
    np.savetxt(prefix.with_suffix(".f.out"), np.hstack([f, f * 1.1]), header="s: data_f pred_f")
    if virial:
        v = gen.normal(0.0, 0.1, (5, 9))
        np.savetxt(prefix.with_suffix(".v_peratom.out"), np.hstack([v, v]), header="s: v")


def test_parity_panels_follow_the_detail_files(tmp_path) -> None:
    from sezm.parity_plot import plot_parity

    _detail_files(tmp_path / "d")
    fig = plot_parity(tmp_path / "d", tmp_path / "p.png")
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["energy per atom", "force components", "virial per atom"]
    force_text = fig.axes[1].texts[0].get_text()  # pred = 1.1 data: RMSE = 0.1 * rms(data)
    data = np.loadtxt(tmp_path / "d.f.out")[:, :3]
    expected = 0.1 * np.sqrt(np.mean(data**2))
    assert float(force_text.split()[1]) == pytest.approx(expected, rel=1e-2)
    assert "120 values" in force_text
    assert (tmp_path / "p.png").stat().st_size > 10_000
    _detail_files(tmp_path / "n", virial=False)
    assert len(plot_parity(tmp_path / "n", tmp_path / "n.png").axes) == 2


def test_parity_plot_errors(tmp_path) -> None:
    from sezm.parity_plot import plot_parity

    with pytest.raises(PlotError, match="no detail files"):
        plot_parity(tmp_path / "none", tmp_path / "x.png")
    (tmp_path / "odd.f.out").write_text("1 2 3\n")
    with pytest.raises(PlotError, match="even number of columns"):
        plot_parity(tmp_path / "odd", tmp_path / "x.png")


def test_sezm_test_plot_writes_parity_png(tmp_path) -> None:
    tests = Path(__file__).parents[1] / "data"
    png = tmp_path / "parity.png"
    code = run([
        "test", "-m", str(tests / "parity" / "tiny" / "model.pt"),
        "-s", str(tests / "systems" / "water" / "data_0"), "-n", "1", "--plot", str(png),
    ])  # fmt: skip
    assert code == 0 and png.stat().st_size > 10_000
