"""The names that ``README.md`` and ``docs/*.md`` cite exist, so the docs cannot drift silently.

Three kinds of reference are read from the Markdown:

* backticked Python names: ``sezm.x.y``, ``module.name`` where ``module`` is a sezm module
  (``comm.GhostExchange``, ``config.normalize.complete_model``) and ``Class.attribute`` where
  ``Class`` is a sezm class (``SO2Convolution.edge_messages``); each must resolve: the module
  imports, the attribute exists (on the class, or assigned as ``self.attribute`` in its source);
* backticked repository paths (``sezm/...``, ``tests/...``, ``docs/...``, ``benchmarks/...``,
  ``examples/...``, and package-relative ``nn/options.py``), optionally ``path.py::name`` or
  ``dir/module.name``: the file exists and defines the name;
* ``sezm <command>`` invocations, inline or in code blocks: the command exists and every
  ``--option`` / ``-o`` after it appears in that command's ``--help``.

Names that belong to other projects (``torch.compile``, ASE's ``SocketClient.run``) or are
input keys and user files (``training.numb_steps``, ``input.json``) resolve to nothing in sezm
and are not checked; :data:`FOREIGN_CLASSES` lists the CamelCase ones by hand.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
from functools import cache
from pathlib import Path

import pytest

import sezm
from sezm.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBPACKAGES = (
    "compat",
    "config",
    "data",
    "engine",
    "geometry",
    "infer",
    "kernels",
    "model",
    "nn",
    "train",
)
TOP_DIRS = ("sezm", "tests", "docs", "benchmarks", "examples")
# CamelCase names the docs cite from DeePMD-kit, ASE and LAMMPS
FOREIGN_CLASSES = {"SocketClient", "DeepPotPTExpt", "DeepSpinPTExpt"}
# first components of names that are input keys, data fields or other libraries' modules
# DeePMD-kit options the docs say sezm does not provide
FOREIGN_OPTIONS = {"--real_error"}
FOREIGN_PREFIXES = {
    "atoms",
    "metadata",
    "model",
    "nn",
    "np",
    "torch",
    "torch_sim",
    "training",
    "ts",
}
# files that the documented commands write, not part of the repository
GENERATED = {"benchmarks/gpu/summary.md", "examples/water/model.ckpt.pt"}
FENCE = re.compile(r"```.*?```", re.S)
SPAN = re.compile(r"`([^`\n]+)`")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def inline_spans(path: Path) -> list[str]:
    """Backticked spans outside fenced code blocks."""
    return SPAN.findall(FENCE.sub("", path.read_text()))


def code_lines(path: Path) -> list[str]:
    """Lines of fenced code blocks."""
    return [line for block in FENCE.findall(path.read_text()) for line in block.splitlines()]


@cache
def sezm_modules() -> dict[str, object]:
    """Every importable ``sezm`` module by dotted name (Triton kernels may need a GPU stack)."""
    mods = {"sezm": sezm}
    for info in pkgutil.walk_packages(sezm.__path__, "sezm."):
        if info.name == "sezm.__main__":  # runs the CLI on import
            continue
        try:
            mods[info.name] = importlib.import_module(info.name)
        except ImportError:
            continue
    return mods


@cache
def sezm_classes() -> dict[str, list[type]]:
    classes: dict[str, list[type]] = {}
    for mod in sezm_modules().values():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__.startswith("sezm"):
                classes.setdefault(name, []).append(obj)
    return classes


def has_attribute(cls: type, name: str) -> bool:
    """A class attribute, or one an instance sets (``self.name`` in the class source)."""
    if hasattr(cls, name):
        return True
    assigned = re.compile(rf"self\.{re.escape(name)}\b\s*(:[^=]*)?=")
    return any(
        klass.__module__.startswith("sezm") and assigned.search(inspect.getsource(klass))
        for klass in cls.__mro__
    )


def resolve_in(obj: object, parts: list[str]) -> bool:
    for i, part in enumerate(parts):
        if inspect.isclass(obj):
            return has_attribute(obj, part) and (
                i == len(parts) - 1 or resolve_in(getattr(obj, part, None), parts[i + 1 :])
            )
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def resolve_dotted(name: str) -> bool | None:
    """True/False for a sezm name that does / does not resolve; None for a foreign name."""
    parts = name.removesuffix("()").split(".")
    if parts[0] in FOREIGN_PREFIXES:
        return None
    mods = sezm_modules()
    for cut in range(len(parts), 0, -1):  # the longest module path the name starts with
        prefix = ".".join(parts[:cut])
        matches = [m for m in mods if m == prefix or m.endswith("." + prefix)]
        if parts[0] != "sezm" and parts[0] not in SUBPACKAGES and cut == 1:
            matches = [m for m in matches if m.rsplit(".", 1)[-1] == prefix]
        if matches:
            return any(resolve_in(mods[m], parts[cut:]) for m in matches)
    if parts[0] == "sezm":
        return False
    if parts[0][:1].isupper() and parts[0] not in FOREIGN_CLASSES:
        classes = sezm_classes().get(parts[0], [])
        return any(resolve_in(cls, parts[1:]) for cls in classes)
    return None


DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(\))?")
FILE_SUFFIXES = (
    *(".py", ".md", ".json", ".pt", ".pt2", ".out", ".npy", ".npz", ".raw", ".png", ".txt"),
    *(".sh", ".ckpt", ".xyz", ".extxyz", ".lmp", ".cc", ".so", ".h", ".xml", ".lammps"),
)


def python_names(path: Path) -> list[str]:
    return sorted(
        {s for s in inline_spans(path) if DOTTED.fullmatch(s) and not s.endswith(FILE_SUFFIXES)}
    )


def repository_paths(path: Path) -> list[str]:
    """Backticked paths into this repository (placeholders like ``<case>`` or ``*`` skipped)."""
    out = set()
    for span in inline_spans(path):
        if " " in span or "/" not in span or re.search(r"[<>*$]", span) or span in GENERATED:
            continue
        head = span.removeprefix("../").split("/", 1)[0]
        module = ROOT / "sezm" / (span.partition("::")[0].rsplit(".", 1)[0] + ".py")
        if head in TOP_DIRS or (head in SUBPACKAGES and (".py" in span or module.is_file())):
            out.add(span)
    return sorted(out)


def path_resolves(span: str) -> bool:
    span = span.removeprefix("../")
    file_part, _, name = span.partition("::")
    base = ROOT if file_part.split("/", 1)[0] in TOP_DIRS else ROOT / "sezm"
    target = base / file_part
    if target.exists():
        text = target.read_text() if target.is_file() and name else ""
        return not name or bool(re.search(rf"^\s*(def|class)\s+{name}\b|^{name}\s*=", text, re.M))
    # dir/module.name: a module path ending in a dotted attribute
    stem, dot, attr = file_part.rpartition(".")
    if dot and (base / f"{stem}.py").is_file():
        module = ".".join(("sezm", *stem.split("/")) if base != ROOT else stem.split("/"))
        return resolve_dotted(f"{module}.{attr}") is True
    return False


# --- CLI ---------------------------------------------------------------------------------------
COMMAND = re.compile(r"(?:^|[\s(])sezm\s+([a-z][\w-]*)(?=\s|$)([^`|;&\n]*)")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


@cache
def command_help() -> dict[str, str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser.format_help(), **{name: p.format_help() for name, p in sub.choices.items()}}


def script_options(path: Path) -> str:
    """Source of the benchmark scripts a doc cites: options named on their own may be theirs."""
    scripts = set(re.findall(r"benchmarks/[\w/]+\.(?:py|sh)", path.read_text()))
    return "\n".join((ROOT / s).read_text() for s in sorted(scripts) if (ROOT / s).is_file())


def cli_uses(path: Path) -> list[tuple[str, str]]:
    """``(command, option)`` of every ``sezm <command> ... --option`` in the file."""
    commands = [s for s in inline_spans(path) if s.startswith("sezm ")]
    commands += [line for line in code_lines(path) if "#" not in line.split("sezm", 1)[0]]
    uses = {("*", s) for s in inline_spans(path) if re.fullmatch(r"--[a-z][\w-]*", s)}
    for text in commands:
        for command, rest in COMMAND.findall(text):
            uses.add((command, ""))
            uses.update((command, flag) for flag in FLAG.findall(rest))
    return sorted(uses)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_python_names_resolve(doc):
    unresolved = [name for name in python_names(doc) if resolve_dotted(name) is False]
    assert not unresolved, f"{doc_id(doc)} names what sezm does not have: {unresolved}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_repository_paths_exist(doc):
    missing = [span for span in repository_paths(doc) if not path_resolves(span)]
    assert not missing, f"{doc_id(doc)} cites missing paths or names: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_cli_options_exist(doc):
    helps = command_help()
    bad = []
    known = "\n".join([*helps.values(), script_options(doc)])
    for command, flag in cli_uses(doc):
        if command == "*":  # an option named on its own: sezm or a cited script has it
            if flag not in FOREIGN_OPTIONS and not re.search(rf"{flag}(?![\w-])", known):
                bad.append(flag)
        elif command not in helps:
            bad.append(f"sezm {command}")
        elif flag and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[command]):
            bad.append(f"sezm {command} {flag}")
    assert not bad, f"{doc_id(doc)} uses commands or options sezm does not have: {bad}"


def test_the_extraction_finds_references():
    """The checks above have something to check: known references are extracted and resolve,
    and made-up ones are rejected."""
    readme = ROOT / "README.md"
    assert {("test", "--plot"), ("*", "--no-with-comm")} <= set(cli_uses(readme))
    assert "runtime.tune_allocator" in python_names(ROOT / "docs" / "DESIGN.md")
    assert resolve_dotted("sezm.calculator.SeZMCalculator") is True
    assert resolve_dotted("SO2Convolution.edge_messages") is True
    assert resolve_dotted("comm.GhostExchange.no_such_hook") is False
    assert resolve_dotted("sezm.no_such_module") is False
    assert resolve_dotted("torch.compile") is None
    assert path_resolves("engine/chunks.py::plan_chunks")
    assert not path_resolves("nn/edge_cache.py::no_such_function")
    assert not path_resolves("nn/edge_cache.no_such_gate")
