"""Learning curves from DeePMD-kit ``lcurve.out`` files as a PNG (``sezm plot``).

An ``lcurve.out`` (written by ``sezm train`` and ``dp train``) is a header line
``# step  <metric>_val <metric>_trn ...  lr``, optional comment lines, then one row of numbers
per display step. A metric is ``<kind>_<quantity>`` (``rmse_e``, ``mae_f``, ``rmse_v``, ...) or
a bare ``<kind>`` (``rmse``: the square root of the total loss of an energy model; ``mae``: the
error of a property model). A run without validation data has only ``_trn`` columns, a
multi-task run ``<metric>_val_<branch> <metric>_trn_<branch>`` per branch; values may be
``nan`` (no reference data). A restarted DeePMD-kit run repeats the header part-way through.

The figure has one panel per quantity (energy, force, virial, ...; the bare total-loss column
only where a file has no other), validation solid and training dashed, on a log scale, and the
learning rate in a shorter panel below. matplotlib is optional (``pip install sezm[plot]``); it
is imported only here, with the Agg canvas, so nothing needs a display.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install matplotlib (or pip install 'sezm[plot]')"
EXPECTED = (
    "expected DeePMD-kit's lcurve.out format: a header line "
    "'# step <metric>_val <metric>_trn ... lr', then rows of numbers"
)

# kinds of error a metric name starts with (longest first: smooth_mae before mae)
_KINDS = ("smooth_mae", "rmse", "mape", "mae", "mse")
# quantity (the part after the kind) -> panel title, unit; panels follow this order
_QUANTITIES = {
    "e": ("energy", "eV/atom"),
    "f": ("force", "eV/Å"),
    "fr": ("atomic force", "eV/Å"),
    "fm": ("magnetic force", "eV/μB"),
    "v": ("virial", "eV/atom"),
    "ae": ("atomic energy", "eV"),
    "pf": ("prefactor-weighted force", "eV/Å"),
    "gf": ("generalized force", ""),
}
_COLUMN = re.compile(r"^(?P<metric>.+?)_(?P<split>val|trn)(?:_(?P<branch>.+))?$")


class PlotError(ValueError):
    """A file that cannot be plotted, or matplotlib missing; the message says which and why."""


@dataclass(frozen=True)
class Column:
    """One error column of a learning curve, e.g. ``rmse_e_val_water``."""

    name: str  # as in the header
    kind: str  # rmse, mae, ...
    quantity: str  # e, f, v, ...; "" for a bare metric (total loss, property error)
    split: str  # val or trn
    branch: str  # multi-task branch; "" for a single-task file


@dataclass
class Lcurve:
    """The contents of one ``lcurve.out``: columns by header name, ``nan`` where a row lacked
    one (a restart that changed the header)."""

    path: Path
    step: np.ndarray
    lr: np.ndarray | None
    errors: dict[Column, np.ndarray] = field(default_factory=dict)

    @property
    def branches(self) -> list[str]:
        return list(dict.fromkeys(c.branch for c in self.errors))

    @property
    def has_validation(self) -> bool:
        return any(c.split == "val" for c in self.errors)

    def plotted(self) -> dict[Column, np.ndarray]:
        """The columns drawn: with any ``<kind>_<quantity>`` column the bare ``<kind>`` (the
        total loss) is left out; columns that are all ``nan`` are left out."""
        has_quantity = any(c.quantity for c in self.errors)
        return {
            c: v
            for c, v in self.errors.items()
            if (c.quantity or not has_quantity) and np.isfinite(v).any()
        }


def parse_column(name: str) -> Column | None:
    """``rmse_e_val`` -> Column(kind rmse, quantity e, split val); ``None`` if not an error
    column."""
    match = _COLUMN.match(name)
    if match is None:
        return None
    metric = match["metric"]
    kind = next((k for k in _KINDS if metric == k or metric.startswith(k + "_")), metric)
    quantity = metric[len(kind) + 1 :] if metric != kind else ""
    return Column(name, kind, quantity, match["split"], match["branch"] or "")


def read_lcurve(path: str | Path) -> Lcurve:
    """Read one ``lcurve.out``; :class:`PlotError` naming the file if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise PlotError(f"{path}: cannot read it ({err.strerror or err})") from None
    names, rows = _read_table(path, text)
    columns = {k: np.array([r.get(k, math.nan) for r in rows]) for k in names}
    errors = {parse_column(k): v for k, v in columns.items() if parse_column(k) is not None}
    return Lcurve(path, columns["step"], columns.get("lr"), errors)


def _read_table(path: Path, text: str) -> tuple[list[str], list[dict[str, float]]]:
    """Every column name seen (in order, over the repeated headers of a restarted run) and one
    ``{name: value}`` per row of numbers."""
    lines = text.splitlines()
    # a last row without its newline may still be being written by a running training
    unfinished = len(lines) if not text.endswith("\n") else 0
    header: list[str] | None = None
    rows: list[dict[str, float]] = []
    names: dict[str, None] = {}  # every column seen, in order
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            header = _comment_line(path, number, line, header)
            names.update(dict.fromkeys(header or ()))
            continue
        if header is None:
            raise PlotError(f"{path}: no header line before line {number}; {EXPECTED}")
        tokens = line.split()
        if number == unfinished and (len(tokens) != len(header) or not _numbers(tokens)):
            break
        rows.append(_row(path, number, header, tokens))
    if header is None:
        raise PlotError(f"{path}: no header line; {EXPECTED}")
    if not rows:
        raise PlotError(f"{path}: has a header but no rows yet")
    return list(names), rows


def _comment_line(path: Path, number: int, line: str, header: list[str] | None) -> list[str] | None:
    """The header in force after a ``#`` line: a new one where the line is a header (again after
    a restart), else ``header``; a comment before the first header is an error."""
    tokens = line.lstrip().lstrip("#").split()
    if tokens and tokens[0] == "step":
        return _check_header(path, number, tokens)
    if header is None and tokens:
        raise PlotError(f"{path}: line {number} is not the header; {EXPECTED}")
    return header


def _row(path: Path, number: int, header: list[str], tokens: list[str]) -> dict[str, float]:
    """One row of numbers by column name; an error naming the line if it does not fit the header."""
    if len(tokens) != len(header):
        raise PlotError(
            f"{path}: line {number} has {len(tokens)} values, the header names "
            f"{len(header)} columns; {EXPECTED}"
        )
    try:
        return {k: float(t) for k, t in zip(header, tokens)}
    except ValueError:
        raise PlotError(f"{path}: line {number} is not all numbers; {EXPECTED}") from None


def _numbers(tokens: list[str]) -> bool:
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return True


def _check_header(path: Path, number: int, tokens: list[str]) -> list[str]:
    if len(set(tokens)) != len(tokens):
        raise PlotError(f"{path}: line {number}: a column name repeats; {EXPECTED}")
    if not any(parse_column(t) for t in tokens):
        raise PlotError(f"{path}: line {number}: no <metric>_val/<metric>_trn column; {EXPECTED}")
    return tokens


def file_labels(paths: Sequence[str | Path]) -> list[str]:
    """Legend names: the file names, or where all are called alike (``lcurve.out``) their
    folders, with as many parent folders as it takes to tell them apart."""
    parts = [Path(p).absolute().parts for p in paths]
    if len({p[-1] for p in parts}) == len(parts):
        return [p[-1] for p in parts]
    drop = 1 if len({p[-1] for p in parts}) == 1 else 0
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[: len(p) - drop][-k:]) or p[-1] for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same file given twice


def _panels(curves: Sequence[Lcurve]) -> list[str]:
    """Quantities with data in any file, in :data:`_QUANTITIES` order, then the rest."""
    found = {c.quantity for curve in curves for c in curve.plotted()}
    known = [q for q in _QUANTITIES if q in found]
    return known + sorted(found - set(_QUANTITIES) - {""}) + ([""] if "" in found else [])


def _title(quantity: str) -> tuple[str, str]:
    if quantity == "":
        return "property error", ""
    return _QUANTITIES.get(quantity, (quantity, ""))


def import_matplotlib():
    """matplotlib's ``Figure``, Agg canvas, ``Line2D`` and a log-tick formatter that writes
    plain numbers between 0.01 and 1000; :class:`PlotError` with the pip extra if it is missing."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notes
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import LogFormatterSciNotation
    except ImportError as err:
        raise PlotError(f"sezm plot needs matplotlib ({err}): {INSTALL_HINT}") from None

    class Formatter(LogFormatterSciNotation):
        """matplotlib's choice of which log ticks to label; 0.6 and 1.4 rather than
        6×10⁻¹ and 1.4×10⁰ between 0.01 and 1000."""

        def __call__(self, x, pos=None):
            text = super().__call__(x, pos)
            return f"{x:g}" if text and 0.01 <= x < 1000 else text

    return Figure, FigureCanvasAgg, Line2D, Formatter


def _finite(step: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points with a value (> 0: the axes are logarithmic), joined across the ``nan`` rows
    (a lone value between two ``nan`` would otherwise not be drawn at all)."""
    keep = np.isfinite(values) & (values > 0)
    return step[keep], values[keep]


def _log_scale(ax, formatter) -> None:
    if not ax.get_lines() or not any(len(line.get_ydata()) for line in ax.get_lines()):
        return  # nothing positive to draw: leave the axis linear
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(formatter())
    ax.yaxis.set_minor_formatter(formatter(labelOnlyBase=False))


def plot_lcurves(
    paths: Sequence[str | Path], output: str | Path | None = None, dpi: int = 150
) -> Figure:
    """Draw the learning curves of ``paths`` into one figure, write it to ``output`` (PNG)
    when given, and return it (axes: one per error quantity, then the learning rate)."""
    if not paths:
        raise PlotError("no lcurve.out file given")
    curves = [read_lcurve(p) for p in paths]
    Figure, FigureCanvasAgg, Line2D, Formatter = import_matplotlib()
    panels = _panels(curves)
    if not panels:
        names = ", ".join(str(c.path) for c in curves)
        raise PlotError(f"{names}: every error column is nan; nothing to plot")
    with_lr = any(_has_lr(c) for c in curves)
    groups = _Groups.of(curves)

    fig = Figure(figsize=(9, 2.9 * len(panels) + 1.9 * with_lr + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        len(panels) + with_lr,
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3] * len(panels) + [1.6] * with_lr},
    )[:, 0]
    for ax, quantity in zip(axes, panels):
        _draw_errors(ax, quantity, curves, groups, Formatter)
    if with_lr:
        _draw_learning_rate(axes[-1], curves, groups, Formatter)
    axes[-1].set_xlabel("step")
    _legend(fig, Line2D, curves, groups)
    if output is not None:
        fig.savefig(output, dpi=dpi)
    return fig


def _has_lr(curve: Lcurve) -> bool:
    """Whether ``curve`` has a learning rate to draw (a column with a finite value)."""
    return curve.lr is not None and np.isfinite(curve.lr).any()


@dataclass(frozen=True)
class _Groups:
    """The line groups of a figure: one colour per (file index, branch, kind), in the order
    first drawn; the legend names each, the line style tells validation from training."""

    keys: list[tuple[int, str, str]]
    labels: list[str]  # per file, see file_labels
    kinds: set[str]  # every kind drawn; named in the legend only where there are several

    @classmethod
    def of(cls, curves: Sequence[Lcurve]) -> _Groups:
        """The groups of the columns that ``curves`` draw."""
        keys = [(i, c.branch, c.kind) for i, curve in enumerate(curves) for c in curve.plotted()]
        kinds = {kind for _, _, kind in keys}
        return cls(list(dict.fromkeys(keys)), file_labels([c.path for c in curves]), kinds)

    def colour(self, key: tuple[int, str, str]) -> str:
        """The matplotlib colour of group ``key`` (cycling through the ten default colours)."""
        return f"C{self.keys.index(key) % 10}"

    def label(self, key: tuple[int, str, str]) -> str:
        """The legend entry of group ``key``: file, then ``[branch]`` and ``(KIND)`` if needed."""
        i, branch, kind = key
        text = self.labels[i] + (f" [{branch}]" if branch else "")
        return text + (f" ({kind.upper()})" if len(self.kinds) > 1 else "")


def _draw_errors(ax, quantity: str, curves: Sequence[Lcurve], groups: _Groups, formatter) -> None:
    """One panel: every file's columns of ``quantity``, validation solid, training dashed."""
    title, unit = _title(quantity)
    shown = set()
    for i, curve in enumerate(curves):
        for c, values in curve.plotted().items():
            if c.quantity != quantity:
                continue
            val = c.split == "val"
            ax.plot(
                *_finite(curve.step, values),
                color=groups.colour((i, c.branch, c.kind)),
                linestyle="-" if val else "--",
                linewidth=1.7 if val else 1.1,
                alpha=1.0 if val else 0.8,
            )
            shown.add(c.kind)
    _log_scale(ax, formatter)
    what = ", ".join(k.upper() for k in sorted(shown))
    ax.set_ylabel(f"{what} ({unit})" if unit else what)
    ax.set_title(f"{title} error" if quantity else title, loc="left", fontsize="medium")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def _draw_learning_rate(ax, curves: Sequence[Lcurve], groups: _Groups, formatter) -> None:
    """The learning-rate panel: one line per file, in the colour of its first group."""
    for i, curve in enumerate(curves):
        if not _has_lr(curve):
            continue
        first = next((g for g in groups.keys if g[0] == i), None)
        # earlier files wider: a schedule shared by several runs stays visible
        ax.plot(
            *_finite(curve.step, curve.lr),
            color=groups.colour(first) if first else "k",
            linewidth=1.3 + 0.9 * min(len(curves) - 1 - i, 5),
        )
    _log_scale(ax, formatter)
    ax.set_ylabel("learning rate")
    ax.grid(True, which="major", alpha=0.35)


def _legend(fig, line2d, curves: Sequence[Lcurve], groups: _Groups) -> None:
    """The legend below the panels: the groups by colour, then the line styles."""
    handles = [line2d([], [], color=groups.colour(g), linewidth=2) for g in groups.keys]
    names = [groups.label(g) for g in groups.keys]
    if any(c.has_validation for c in curves):
        handles += [
            line2d([], [], color="0.3", linestyle="-", linewidth=1.7),
            line2d([], [], color="0.3", linestyle="--", linewidth=1.1),
        ]
        names += ["validation", "training"]
    else:
        handles.append(line2d([], [], color="0.3", linestyle="--", linewidth=1.1))
        names.append("training (no validation data)")
    fig.legend(
        handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize="small"
    )
