"""Parity plots of ``sezm test``: predicted against reference energy per atom, force components
and virial per atom, from the detail files ``sezm test -d PREFIX`` writes.

The files are DeePMD-kit's: ``PREFIX.e_peratom.out`` (``data_e pred_e``), ``PREFIX.f.out``
(``data_f{x,y,z} pred_f{x,y,z}``; ``PREFIX.fr.out`` for spin models) and
``PREFIX.v_peratom.out`` (nine data then nine predicted components), each with ``#`` comment
lines between systems. A panel per file that exists, the diagonal, and the RMSE and MAE written in the
panel. matplotlib is optional: without it a :class:`~sezm.plot.PlotError` says how to install it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plot import PlotError, import_matplotlib

#: (file suffix, panel title, unit) in panel order.
PANELS = (
    (".e_peratom.out", "energy per atom", "eV/atom"),
    (".f.out", "force components", "eV/Å"),
    (".fr.out", "force components", "eV/Å"),
    (".v_peratom.out", "virial per atom", "eV/atom"),
)


def read_detail(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(reference, predicted)`` flat arrays of one detail file (first half of the columns
    the reference, second half the prediction)."""
    try:
        table = np.loadtxt(path, ndmin=2)
    except ValueError as err:
        raise PlotError(f"{path}: not a detail file of sezm/dp test ({err})") from None
    if table.size == 0 or table.shape[1] % 2:
        raise PlotError(f"{path}: expected an even number of columns (data, then predictions)")
    half = table.shape[1] // 2
    return table[:, :half].ravel(), table[:, half:].ravel()


def plot_parity(prefix: str | Path, output: str | Path, dpi: int = 150):
    """One parity panel per detail file of ``prefix`` that exists; written to ``output``
    (PNG) and returned."""
    prefix = Path(prefix)
    found = [
        (title, unit, *read_detail(prefix.with_suffix(suffix)))
        for suffix, title, unit in PANELS
        if prefix.with_suffix(suffix).is_file()
    ]
    if not found:
        raise PlotError(f"{prefix}: no detail files (.e_peratom.out, .f.out, .v_peratom.out)")
    Figure, FigureCanvasAgg, _, _ = import_matplotlib()
    fig = Figure(figsize=(4.2 * len(found), 4.4))
    FigureCanvasAgg(fig)
    for ax, (title, unit, ref, pred) in zip(fig.subplots(1, len(found), squeeze=False)[0], found):
        err = pred - ref
        rmse, mae = float(np.sqrt(np.mean(err**2))), float(np.mean(np.abs(err)))
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, zorder=1)
        ax.scatter(ref, pred, s=4, alpha=0.5, zorder=2)
        stats = f"RMSE {rmse:.3g} {unit}\nMAE {mae:.3g} {unit}\n{ref.size} values"
        ax.text(0.03, 0.97, stats, transform=ax.transAxes, va="top")
        ax.set_title(title, loc="left")
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_aspect("equal", adjustable="datalim")
        ax.ticklabel_format(useOffset=False)
        ax.locator_params(nbins=4)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    return fig
