"""The ``ener_spin`` loss of spin models: energy, real force, magnetic force, virial, atomic energy.

The energy, real-force (``fr``), virial and atomic-energy terms are those of the ``ener`` loss
(:mod:`.energy`, same ``mse``/``mae`` reductions and ``intensive_ener_virial``). The magnetic
force term averages over the magnetic atoms of the batch (``mask_mag``) and components:

    L_fm = sum_{f,i,c} m_fi (dFm_fic)^2 / (3 sum_{f,i} m_fi)      (|dFm| with ``mae``)

and is 0 for a batch without magnetic atoms. Metrics: ``rmse_e``, ``rmse_fr``, ``rmse_fm``,
``rmse_v``, ``rmse_ae`` and ``l2_ener_loss``, ``l2_force_r_loss``, ``l2_force_m_loss``,
``l2_virial_loss``, ``l2_atom_ener_loss`` (``mae_*`` with ``mae``); ``rmse = sqrt(L)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .common import Frames, LabelRequirement, Pref, atom_mean
from .energy import EnergyLoss, Term


class EnergySpinLoss(EnergyLoss):
    """``loss.type = "ener_spin"``; ``section`` is the normalized ``loss`` input."""

    TERMS = ("e", "fr", "fm", "v", "ae")
    PRED: ClassVar[dict[str, str]] = {
        "e": "energy",
        "fr": "force",
        "fm": "force_mag",
        "v": "virial",
        "ae": "atom_energy",
    }
    LABELS: ClassVar[dict[str, tuple[str, ...]]] = {
        "e": ("energy",),
        "fr": ("force",),
        "fm": ("force_mag",),
        "v": ("virial",),
        "ae": ("atom_ener",),
    }
    L2: ClassVar[dict[str, str]] = {
        "e": "l2_ener_loss",
        "fr": "l2_force_r_loss",
        "fm": "l2_force_m_loss",
        "v": "l2_virial_loss",
        "ae": "l2_atom_ener_loss",
    }

    # options of the ``ener`` loss that the ``ener_spin`` section does not have, switched off
    # (``huber_delta`` is unused without ``use_huber``)
    ENER_ONLY: ClassVar[dict[str, Any]] = {
        "start_pref_h": 0.0,
        "limit_pref_h": 0.0,
        "numb_generalized_coord": 0,
        "use_default_pf": False,
        "use_huber": False,
        "f_use_norm": False,
        "huber_delta": 0.01,
    }

    def __init__(self, section: dict[str, Any], starter_learning_rate: float) -> None:
        super().__init__({**self.ENER_ONLY, **section}, starter_learning_rate)
        if Pref.of(section, "pf").active or section.get("relative_f") is not None:
            raise NotImplementedError(
                "ener_spin loss: atom-weighted (pf) and relative forces are not available"
            )

    def _check(self, hessian: Pref) -> None:
        if self.loss_func not in ("mse", "mae"):
            raise ValueError(
                f"ener_spin loss: loss_func must be 'mse' or 'mae', not {self.loss_func!r}"
            )

    def _term_fr(self, pred: dict, label: dict, frames: Frames) -> Term:
        return self._term_f(pred, label, frames)

    def _term_fm(self, pred: dict, label: dict, frames: Frames) -> Term:
        """Mean over magnetic atoms and components (``mask_mag (nf, nloc)``)."""
        fm = pred["force_mag"]
        diff = label["force_mag"].reshape(fm.shape) - fm  # (nf, nloc, 3)
        magnetic = pred["mask_mag"].reshape(fm.shape[:2]).to(diff.dtype)
        if self.loss_func == "mae":
            value = atom_mean(diff.abs(), magnetic)
            return value, value, None
        value = atom_mean(diff.square(), magnetic)
        return value, value.sqrt(), value

    @property
    def label_requirements(self) -> list[LabelRequirement]:
        on = {item: self.prefs[item].active for item in self.TERMS}
        reqs = []
        if on["e"]:
            reqs.append(LabelRequirement("energy", 1, False, high_prec=True))
        if on["fr"]:
            reqs.append(LabelRequirement("force", 3, True))
        if on["fm"]:
            reqs.append(LabelRequirement("force_mag", 3, True))
        if on["v"]:
            reqs.append(LabelRequirement("virial", 9, False))
        if on["ae"]:
            reqs.append(LabelRequirement("atom_ener", 1, True))
        if self.atom_ener_coeff:
            reqs.append(LabelRequirement("atom_ener_coeff", 1, True, default=1.0))
        return reqs
