"""The house rules of the package that a reader relies on, checked on its source.

* no function above 60 lines outside the declarative input schema (``config/schema_*.py``);
* layers do not read the input: ``sezm/nn`` and ``sezm/geometry`` import nothing from
  ``sezm/config`` (the typed records reach them ready-made, DESIGN.md);
* the model core (``geometry``, ``nn``, ``model``) stays within its 6,000-line budget.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "sezm"
MAX_FUNCTION_LINES = 60
CORE, CORE_BUDGET = ("geometry", "nn", "model"), 6000


def sources() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 50, f"no package sources under {PACKAGE}"
    return found


def test_no_long_functions() -> None:
    long = []
    for path in sources():
        if path.parent.name == "config" and path.name.startswith("schema"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}::{node.name} ({length} lines)")
    assert not long, "functions above 60 lines: " + ", ".join(long)


@pytest.mark.parametrize("layer", ["nn", "geometry"])
def test_layers_do_not_read_the_input(layer: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                target = "." * node.level + node.module
                if target.startswith(("..config", "sezm.config")):
                    offenders.append(f"{path.name}: from {target} import ...")
    assert not offenders, offenders


def test_model_core_line_budget() -> None:
    files = [path for part in CORE for path in (PACKAGE / part).glob("*.py")]
    assert len(files) > 20, f"no model core under {PACKAGE}"
    lines = sum(len(path.read_text().splitlines()) for path in files)
    assert lines <= CORE_BUDGET, f"model core is {lines} lines, over its budget of {CORE_BUDGET}"
