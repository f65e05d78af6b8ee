"""Pieces shared by the training losses: prefactor schedules, batch weights, masked means.

Conventions of every loss here: ``pred``/``label`` are dicts of tensors, ``find[name]`` says
whether label ``name`` exists in this batch (a label missing from ``label`` counts as absent; a
present label without a ``find`` entry counts as found). An absent label adds nothing to the loss
and its metrics read NaN, so every batch reports the same metric names. Metrics are detached
0-d tensors (no device sync per step); ``float(v)`` converts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

F64 = torch.float64


class LabelRequirement(NamedTuple):
    """One label a loss reads: ``ndof`` values per frame (per atom if ``atomic``).

    ``repeat``: the loader repeats each value that many times; ``default``: the fill value of a
    system without the file (``None``: the label is absent there); ``must``: required in every
    system; ``high_prec``: read in float64.
    """

    name: str
    ndof: int
    atomic: bool
    must: bool = False
    high_prec: bool = False
    repeat: int = 1
    default: float | None = None


@dataclass(frozen=True)
class Pref:
    """Prefactor schedule ``p(lr) = limit + (start - limit) * lr / lr0``.

    The term is active only when both ends are non-zero.
    """

    start: float
    limit: float

    @property
    def active(self) -> bool:
        return self.start != 0.0 and self.limit != 0.0

    def __call__(self, coef: float) -> float:
        return self.limit + (self.start - self.limit) * coef

    @classmethod
    def of(cls, section: dict, item: str) -> Pref:
        """The ``start_pref_<item>``/``limit_pref_<item>`` pair of a normalized loss section."""
        return cls(float(section[f"start_pref_{item}"]), float(section[f"limit_pref_{item}"]))


@dataclass(frozen=True)
class Frames:
    """Atom weights of a batch: ``keep (nf, nloc)`` is 1 for real atoms, ``inv (nf,)`` = ``1/N_f``.

    Without a mask every atom is real and ``N_f = natoms``; with one, ``N_f = sum_i keep_fi``
    (phantom atoms, ``atype < 0``, pad frames of a mixed-size batch).
    """

    keep: Tensor
    inv: Tensor

    @classmethod
    def build(cls, natoms: int, mask: Tensor | None, nf: int, nloc: int, like: Tensor) -> Frames:
        if mask is None:
            keep = torch.ones(nf, nloc, dtype=like.dtype, device=like.device)
            return cls(keep, torch.full((nf,), 1.0 / natoms, dtype=like.dtype, device=like.device))
        keep = mask.to(like.dtype)
        return cls(keep, 1.0 / keep.sum(-1))


def found(name: str, label: dict, find: dict) -> bool:
    """Whether the batch has label ``name``: present, and not flagged missing in ``find``."""
    return name in label and bool(find.get(name, True))


def atom_mean(x: Tensor, keep: Tensor) -> Tensor:
    """``sum_{f,i,c} x_fic keep_fi / (C sum_{f,i} keep_fi)`` for ``x (nf, nloc, C)``; 0 if no atom.

    Pools all real atoms of the batch, so a frame weighs in proportion to its atom count.
    """
    total = (x * keep.unsqueeze(-1)).sum()
    dof = keep.sum() * x.shape[-1]
    has = dof > 0
    return torch.where(
        has, total / torch.where(has, dof, torch.ones_like(dof)), torch.zeros_like(total)
    )


def huber(r: Tensor, delta: float) -> Tensor:
    """Elementwise ``r^2/2`` for ``|r| <= delta``, else ``delta (|r| - delta/2)``."""
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r.square(), delta * (a - 0.5 * delta))


def nan_like(x: Tensor) -> Tensor:
    """A float64 ``nan`` scalar on the device of ``x``: the value of a metric without data."""
    return torch.full((), float("nan"), dtype=F64, device=x.device)
