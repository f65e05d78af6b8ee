"""``sezm check MODEL [-s STRUCTURE]``: a physics self-test of a checkpoint or ``.pt2``.

On one structure (the user's, or the bundled water frame) it measures rotation, translation
and permutation invariance, forces and virial against finite differences, smoothness as a
neighbour crosses the cutoff, the ``.pt2`` against its checkpoint (when both are given), the
energy drift of a short NVE run, and whether the structure's closest pair lies within the
training data's. Modules: ``structure`` (input), ``subject`` (model, precision, tolerances),
``symmetry``, ``derivatives``, ``cutoff``, ``nve``, ``runner`` (order, table rows),
``result`` (rows and the table).
"""

from __future__ import annotations

from .result import Result, format_table
from .runner import CheckOptions, run_checks
from .structure import Structure, read_structure
from .subject import CheckError, Subject, load_subject

__all__ = [
    "CheckError",
    "CheckOptions",
    "Result",
    "Structure",
    "Subject",
    "check",
    "format_table",
    "load_subject",
    "read_structure",
    "run_checks",
]


def check(
    model: str,
    structure: str | None = None,
    frame: int = 0,
    *,
    pt2: str | None = None,
    checkpoint: str | None = None,
    head: str | None = None,
    options: CheckOptions | None = None,
) -> list[Result]:
    """Every check of ``model`` (with its ``.pt2`` or checkpoint counterpart, if given) on
    frame ``frame`` of ``structure`` (default: the bundled water frame)."""
    subject = load_subject(model, pt2=pt2, checkpoint=checkpoint, head=head)
    s = read_structure(structure, frame, subject.evaluator.type_map)
    return run_checks(subject, s, options or CheckOptions())
