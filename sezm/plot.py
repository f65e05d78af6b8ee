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
            tokens = line.lstrip().lstrip("#").split()
            if tokens and tokens[0] == "step":  # the header (again after a restart)
                header = _check_header(path, number, tokens)
                names.update(dict.fromkeys(header))
            elif header is None and tokens:
                raise PlotError(f"{path}: line {number} is not the header; {EXPECTED}")
            continue
        if header is None:
            raise PlotError(f"{path}: no header line before line {number}; {EXPECTED}")
        tokens = line.split()
        if number == unfinished and (len(tokens) != len(header) or not _numbers(tokens)):
            break
        if len(tokens) != len(header):
            raise PlotError(
                f"{path}: line {number} has {len(tokens)} values, the header names "
                f"{len(header)} columns; {EXPECTED}"
            )
        try:
            rows.append({k: float(t) for k, t in zip(header, tokens)})
        except ValueError:
            raise PlotError(f"{path}: line {number} is not all numbers; {EXPECTED}") from None
    if header is None:
        raise PlotError(f"{path}: no header line; {EXPECTED}")
    if not rows:
        raise PlotError(f"{path}: has a header but no rows yet")
    columns = {k: np.array([r.get(k, math.nan) for r in rows]) for k in names}
    errors = {parse_column(k): v for k, v in columns.items() if parse_column(k) is not None}
    return Lcurve(path, columns["step"], columns.get("lr"), errors)


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
    with_lr = any(c.lr is not None and np.isfinite(c.lr).any() for c in curves)
    kinds = {c.kind for curve in curves for c in curve.plotted()}

    # one colour per (file, branch, kind): the legend names it; line style tells val from trn
    groups: list[tuple[int, str, str]] = []
    for i, curve in enumerate(curves):
        for c in curve.plotted():
            if (i, c.branch, c.kind) not in groups:
                groups.append((i, c.branch, c.kind))
    labels = file_labels([c.path for c in curves])

    def group_label(i: int, branch: str, kind: str) -> str:
        text = labels[i] + (f" [{branch}]" if branch else "")
        return text + (f" ({kind.upper()})" if len(kinds) > 1 else "")

    colours = [f"C{n % 10}" for n in range(len(groups))]
    n_rows = len(panels) + with_lr
    fig = Figure(figsize=(9, 2.9 * len(panels) + 1.9 * with_lr + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        n_rows,
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3] * len(panels) + [1.6] * with_lr},
    )[:, 0]
    for ax, quantity in zip(axes, panels):
        title, unit = _title(quantity)
        shown = set()
        for i, curve in enumerate(curves):
            for c, values in curve.plotted().items():
                if c.quantity != quantity:
                    continue
                colour = colours[groups.index((i, c.branch, c.kind))]
                val = c.split == "val"
                ax.plot(
                    *_finite(curve.step, values),
                    color=colour,
                    linestyle="-" if val else "--",
                    linewidth=1.7 if val else 1.1,
                    alpha=1.0 if val else 0.8,
                )
                shown.add(c.kind)
        _log_scale(ax, Formatter)
        what = ", ".join(k.upper() for k in sorted(shown))
        ax.set_ylabel(f"{what} ({unit})" if unit else what)
        ax.set_title(f"{title} error" if quantity else title, loc="left", fontsize="medium")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    if with_lr:
        ax = axes[-1]
        for i, curve in enumerate(curves):
            if curve.lr is None or not np.isfinite(curve.lr).any():
                continue
            first = next((g for g in groups if g[0] == i), None)
            colour = colours[groups.index(first)] if first else "k"
            # earlier files wider: a schedule shared by several runs stays visible
            ax.plot(
                *_finite(curve.step, curve.lr),
                color=colour,
                linewidth=1.3 + 0.9 * min(len(curves) - 1 - i, 5),
            )
        _log_scale(ax, Formatter)
        ax.set_ylabel("learning rate")
        ax.grid(True, which="major", alpha=0.35)
    axes[-1].set_xlabel("step")

    handles = [Line2D([], [], color=colours[n], linewidth=2) for n in range(len(groups))]
    names = [group_label(*g) for g in groups]
    if any(c.has_validation for c in curves):
        handles += [
            Line2D([], [], color="0.3", linestyle="-", linewidth=1.7),
            Line2D([], [], color="0.3", linestyle="--", linewidth=1.1),
        ]
        names += ["validation", "training"]
    else:
        handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1.1))
        names.append("training (no validation data)")
    fig.legend(
        handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize="small"
    )
    if output is not None:
        fig.savefig(output, dpi=dpi)
    return fig
