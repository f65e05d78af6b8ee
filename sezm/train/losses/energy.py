"""The ``ener`` loss: energy, force, virial, atomic-energy, weighted-force and generalized-force terms.

``L = sum_x p_x(lr) L_x`` over the active terms ``x`` (both prefactors non-zero), with
``p_x(lr) = limit_x + (start_x - limit_x) lr / lr0``. ``N_f`` is the real atom count of frame
``f`` and ``<.>`` a plain mean. For ``loss_func = "mse"``:

* energy ``L_e = <(dE_f)^2 / N_f^k>_f`` (``k = 2`` if ``intensive_ener_virial`` else 1);
  virial ``L_v = <<(dW_fab)^2>_ab / N_f^k>_f``;
* force ``L_f = mean over real atoms and components of dF^2``; atomic energy
  ``L_ae = mean over real atoms of de^2``; weighted force ``L_pf = mean of w_i dF^2``;
* generalized force ``L_gf = <(sum_{i,a} dF_ia q_iab)^2>_{f,b}`` with ``q = drdq`` (always MSE),
  forces of phantom atoms zeroed.

With ``mae`` the squares become absolute values and every ``1/N_f^k`` becomes ``1/N_f``;
``f_use_norm`` replaces the three force components by ``|dF_i|``. With ``use_huber`` the
energy/virial/force/atomic-energy terms use ``huber(r, delta)`` on ``r = dE_f / N_f``,
``dW_fab / N_f``, ``dF_ia`` (or ``|dF_i|``), ``de_i``. ``relative_f`` divides ``dF_i`` by
``|F_i^label| + relative_f`` (for the force and weighted-force terms). With
``enable_atom_ener_coeff`` the predicted energy is ``sum_i c_i e_i``.

Metrics: ``rmse_e = sqrt(<(dE_f / N_f)^2>)``, ``rmse_v`` likewise, ``rmse_f``, ``rmse_ae``,
``rmse_pf`` = square roots of the per-atom means, ``rmse_gf = sqrt(L_gf)``, and the raw means
``l2_ener_loss``, ``l2_force_loss``, ``l2_virial_loss``, ``l2_atom_ener_loss``,
``l2_pref_force_loss``, ``l2_gen_force_loss`` (over all entries, phantom atoms included). With
``mae`` (not Huber) ``mae_e``, ``mae_f``, ``mae_v``, ``mae_ae``, ``mae_pf`` equal their loss
terms. ``rmse = sqrt(L)``. The learning curve shows every metric except the ``l2_*`` ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .common import F64, Frames, LabelRequirement, Pref, atom_mean, found, huber, nan_like

_ORDER = ("e", "f", "pf", "gf", "v", "ae")
_PRED = {
    "e": "energy",
    "f": "force",
    "pf": "force",
    "gf": "force",
    "v": "virial",
    "ae": "atom_energy",
}
_LABELS = {
    "e": ("energy",),
    "f": ("force",),
    "pf": ("force", "atom_pref"),
    "gf": ("force", "drdq"),
    "v": ("virial",),
    "ae": ("atom_ener",),
}
_L2 = {
    "e": "l2_ener_loss",
    "f": "l2_force_loss",
    "pf": "l2_pref_force_loss",
    "gf": "l2_gen_force_loss",
    "v": "l2_virial_loss",
    "ae": "l2_atom_ener_loss",
}

Term = tuple[Tensor, Tensor, "Tensor | None"]  # (loss term, shown metric, l2 metric)


def _nloc(pred: dict, mask: Tensor | None, natoms: int) -> int:
    for x in (mask, pred.get("force"), pred.get("atom_energy")):
        if x is not None:
            return x.shape[1]
    return natoms


def huber_deltas(delta: float | list[float]) -> tuple[float, float, float]:
    """``huber_delta`` as (energy, force, virial) thresholds."""
    if isinstance(delta, (list, tuple)):
        if len(delta) != 3:
            raise ValueError("huber_delta must be one number or [energy, force, virial]")
        return float(delta[0]), float(delta[1]), float(delta[2])
    return (float(delta),) * 3


class EnergyLoss:
    """``loss.type = "ener"``; ``section`` is the normalized ``loss`` input."""

    # terms in order, the prediction each reads, their labels and their l2 metric names
    TERMS, PRED, LABELS, L2 = _ORDER, _PRED, _LABELS, _L2

    def __init__(self, section: dict[str, Any], starter_learning_rate: float) -> None:
        self.lr0 = float(starter_learning_rate)
        self.prefs = {item: Pref.of(section, item) for item in self.TERMS}
        self.loss_func = section["loss_func"]
        self.relative_f = section.get("relative_f")  # no default: absent means plain forces
        self.f_use_norm = bool(section["f_use_norm"])
        self.use_huber = bool(section["use_huber"])
        self.norm_exp = 2 if section["intensive_ener_virial"] else 1
        self.atom_ener_coeff = bool(section["enable_atom_ener_coeff"])
        self.use_default_pf = bool(section["use_default_pf"])
        self.ngc = int(section["numb_generalized_coord"])
        self.delta_e, self.delta_f, self.delta_v = huber_deltas(section["huber_delta"])
        self._check(Pref.of(section, "h"))
        self.active = [item for item in self.TERMS if self.prefs[item].active]

    def _check(self, hessian: Pref) -> None:
        if self.loss_func not in ("mse", "mae"):
            raise ValueError(f"ener loss: loss_func must be 'mse' or 'mae', not {self.loss_func!r}")
        if self.f_use_norm and not (self.use_huber or self.loss_func == "mae"):
            raise ValueError("ener loss: f_use_norm needs use_huber or loss_func='mae'")
        if self.prefs["gf"].active and self.ngc < 1:
            raise ValueError(
                "ener loss: the generalized-force term needs numb_generalized_coord > 0"
            )
        if self.use_huber and (
            self.prefs["pf"].active or self.prefs["gf"].active or self.relative_f is not None
        ):
            raise ValueError(
                "ener loss: use_huber excludes atom_pref, generalized and relative forces"
            )
        if hessian.start != 0.0 or hessian.limit != 0.0:
            raise NotImplementedError(
                "ener loss: sezm models have no Hessian output (start/limit_pref_h)"
            )

    def __call__(
        self,
        pred: dict[str, Tensor],
        label: dict[str, Tensor],
        find: dict[str, bool],
        natoms: int,
        lr: float,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and metrics of one batch.

        pred: ``energy (nf,)``, ``force (nf, nloc, 3)``, ``virial (nf, 9)``, ``atom_energy
        (nf, nloc)``; label: ``energy``, ``force``, ``virial``, ``atom_ener (nf, nloc)``,
        ``atom_pref (nf, nloc)``, ``drdq (nf, nloc*3*ngc)``, ``atom_ener_coeff (nf, nloc)``;
        ``natoms``: atoms per frame; ``mask (nf, nloc)``: real atoms (``atype >= 0``), if any are
        phantoms; ``lr``: the current learning rate.
        """
        ref = pred.get("energy", next(iter(pred.values())))
        frames = Frames.build(natoms, mask, ref.shape[0], _nloc(pred, mask, natoms), ref)
        coef = lr / self.lr0
        loss = torch.zeros((), dtype=F64, device=ref.device)
        metrics: dict[str, Tensor] = {}
        for item in self.active:
            if self.PRED[item] not in pred:
                continue
            names = self._metric_names(item)
            if not all(self._has(name, label, find) for name in self.LABELS[item]):
                metrics.update(dict.fromkeys(names, nan_like(ref)))
                continue
            value, shown, l2 = getattr(self, f"_term_{item}")(pred, label, frames)
            loss = loss + self.prefs[item](coef) * value
            metrics[names[0]] = shown.detach()
            if l2 is not None:
                metrics[names[1]] = l2.detach()
        metrics["rmse"] = loss.detach().sqrt()
        return loss, metrics

    def _has(self, name: str, label: dict, find: dict) -> bool:
        return (name == "atom_pref" and self.use_default_pf) or found(name, label, find)

    def _metric_names(self, item: str) -> tuple[str, ...]:
        if self.loss_func == "mae" and item != "gf":
            return (f"mae_{item}",)
        return (f"rmse_{item}", self.L2[item])

    # --- terms: each returns (loss term, shown metric, l2 metric or None) ---------------------

    def _term_e(self, pred: dict, label: dict, frames: Frames) -> Term:
        energy = pred["energy"]
        if self.atom_ener_coeff and "atom_energy" in pred:
            atom = pred["atom_energy"]
            coeff = label.get("atom_ener_coeff")
            energy = (atom if coeff is None else coeff.reshape(atom.shape) * atom).sum(-1)
        diff = (energy - label["energy"].reshape(energy.shape)).reshape(-1, 1)  # (nf, 1)
        return self._frame_term(diff, frames.inv, self.delta_e)

    def _term_v(self, pred: dict, label: dict, frames: Frames) -> Term:
        diff = label["virial"].reshape(-1, 9) - pred["virial"].reshape(-1, 9)  # (nf, 9)
        return self._frame_term(diff, frames.inv, self.delta_v)

    def _term_f(self, pred: dict, label: dict, frames: Frames) -> Term:
        return self._atom_term(
            self._force_diff(pred, label), frames.keep, self.delta_f, self.f_use_norm
        )

    def _term_pf(self, pred: dict, label: dict, frames: Frames) -> Term:
        diff = self._force_diff(pred, label)
        weight = label.get("atom_pref")
        weight = 1.0 if weight is None else weight.reshape(*diff.shape[:2], -1)  # (nf, nloc, 1|3)
        return self._atom_term(diff, frames.keep, self.delta_f, False, weight)

    def _term_ae(self, pred: dict, label: dict, frames: Frames) -> Term:
        atom = pred["atom_energy"]
        diff = (label["atom_ener"].reshape(atom.shape) - atom).reshape(*frames.keep.shape, 1)
        return self._atom_term(diff, frames.keep, self.delta_e, False)

    def _term_gf(self, pred: dict, label: dict, frames: Frames) -> Term:
        keep = frames.keep.unsqueeze(-1)
        nf = keep.shape[0]
        drdq = label["drdq"].reshape(nf, -1, self.ngc)  # (nf, nloc*3, ngc)
        f_label = (label["force"].reshape(pred["force"].shape) * keep).reshape(nf, -1)
        f_pred = (pred["force"] * keep).reshape(nf, -1)
        diff = torch.einsum("fia,fi->fa", drdq, f_label) - torch.einsum("fia,fi->fa", drdq, f_pred)
        l2 = diff.square().mean()
        return l2, l2.sqrt(), l2

    # --- shared reductions -----------------------------------------------------------------

    def _force_diff(self, pred: dict, label: dict) -> Tensor:
        """``dF = F_label - F_pred (nf, nloc, 3)``, divided by ``|F_label| + relative_f`` if set."""
        f_label = label["force"].reshape(pred["force"].shape)
        diff = f_label - pred["force"]
        if self.relative_f is not None:
            diff = diff / (f_label.norm(dim=-1, keepdim=True) + self.relative_f)
        return diff

    def _frame_term(self, diff: Tensor, inv: Tensor, delta: float) -> Term:
        """Extensive residual ``diff (nf, k)`` weighted by ``1/N_f`` (see module docstring)."""
        if self.loss_func == "mae":
            value = (diff.abs().mean(-1) * inv).mean()
            return value, value, None
        per_frame = diff.square().mean(-1)  # (nf,)
        shown = (per_frame * inv.square()).mean().sqrt()
        if self.use_huber:
            value = huber(diff * inv.unsqueeze(-1), delta).mean()
        else:
            value = (per_frame * inv**self.norm_exp).mean()
        return value, shown, diff.square().mean()

    def _atom_term(
        self, diff: Tensor, keep: Tensor, delta: float, use_norm: bool, weight: Tensor | float = 1.0
    ) -> Term:
        """Per-atom residual ``diff (nf, nloc, C)`` averaged over real atoms and components."""
        if self.loss_func == "mae":
            r = diff.norm(dim=-1, keepdim=True) if use_norm else diff.abs()
            value = atom_mean(r * weight, keep)
            return value, value, None
        sq = diff.square() * weight
        msd = atom_mean(sq, keep)
        if self.use_huber:
            r = diff.norm(dim=-1, keepdim=True) if use_norm else diff
            value = atom_mean(huber(r, delta), keep)
        else:
            value = msd
        return value, msd.sqrt(), sq.mean()

    @property
    def label_requirements(self) -> list[LabelRequirement]:
        """Labels read by the active terms (a force label also for ``relative_f`` alone)."""
        on = {item: self.prefs[item].active for item in _ORDER}
        reqs = []
        if on["e"]:
            reqs.append(LabelRequirement("energy", 1, False, high_prec=True))
        if on["f"] or on["pf"] or on["gf"] or self.relative_f is not None:
            reqs.append(LabelRequirement("force", 3, True))
        if on["v"]:
            reqs.append(LabelRequirement("virial", 9, False))
        if on["ae"]:
            reqs.append(LabelRequirement("atom_ener", 1, True))
        if on["pf"]:
            default = 1.0 if self.use_default_pf else None
            reqs.append(LabelRequirement("atom_pref", 1, True, repeat=3, default=default))
        if on["gf"]:
            reqs.append(LabelRequirement("drdq", self.ngc * 3, True))
        if self.atom_ener_coeff:
            reqs.append(LabelRequirement("atom_ener_coeff", 1, True, default=1.0))
        return reqs
