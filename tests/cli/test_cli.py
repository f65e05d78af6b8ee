"""The command line tells what runs: `--version`, a versions/device line first in every log, and
every option's help with its default."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

import sezm
from sezm.cli import build_parser, main

WATER = Path(__file__).parents[1] / "data" / "systems" / "water"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sezm {sezm.__version__} (torch {torch.__version__}")


@pytest.mark.parametrize(
    "name",
    [
        "", "train", "test", "embed", "freeze", "neighbor-stat", "plot",
        "model-devi", "change-bias", "show", "doc-train-input",
    ],
)  # fmt: skip
def test_every_option_has_help_and_shows_its_default(name) -> None:
    parser = build_parser()
    command = _subcommands(parser)[name] if name else parser
    text = command.format_help()
    for action in command._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.dest}: no help text"
        if action.option_strings and action.default is not argparse.SUPPRESS:
            help_line = command._get_formatter()._expand_help(action)
            assert "default" in help_line, f"{name} {action.option_strings}: default not shown"
    if name in ("test", "embed"):
        assert "(default: model.ckpt.pt)" in " ".join(text.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "missing.json"],
        ["test", "-m", "missing.pt", "-s", str(WATER)],
        ["embed", "-m", "missing.pt", "-s", str(WATER)],
        ["freeze", "-c", "missing.pt"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_log_starts_with_versions_and_device(argv, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="sezm"), pytest.raises((Exception, SystemExit)):
        main(argv)
    first = caplog.records[0].getMessage()
    assert first.startswith(f"sezm {sezm.__version__} (torch {torch.__version__}")
    assert "; device cpu (" in first or "; device cuda" in first


def test_test_says_which_model_it_tests(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="sezm"), pytest.raises(Exception):  # noqa: B017
        main(["test", "-s", str(WATER)])
    assert f"testing model model.ckpt.pt on the systems under {WATER}" in caplog.text


# ---------------------------------------------------------------------------------------------
# the error boundary of the `sezm` command


def test_user_error_is_one_message_and_status_2(tmp_path, capsys) -> None:
    from sezm.cli import run

    bad = tmp_path / "input.json"
    bad.write_text('{"model": {"type": "dpa4", "type_map": ["O"], "descriptor": {"chanels": 8}}}')
    assert run(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sezm: error:" in err and "chanels" in err and "channels" in err
    assert "Traceback" not in err


def test_missing_file_names_the_path(tmp_path, capsys) -> None:
    from sezm.cli import run

    missing = tmp_path / "nowhere.json"
    assert run(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_internal_error_shows_the_traceback_and_status_1(monkeypatch, capsys) -> None:
    import sezm.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_neighbor_stat", broken)
    assert cli.run(["neighbor-stat", "-s", str(WATER), "-r", "6"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: ZeroDivisionError" in err


def test_debug_shows_the_traceback_of_user_errors(tmp_path) -> None:
    from sezm.cli import run
    from sezm.config.errors import ConfigError

    bad = tmp_path / "input.json"
    bad.write_text('{"model": {"type": "dpa4", "type_map": ["O"], "descriptor": {"chanels": 8}}}')
    with pytest.raises(ConfigError):
        run(["--debug", "train", str(bad)])
