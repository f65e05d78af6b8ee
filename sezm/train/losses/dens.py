"""The ``dens`` loss: energy plus direct-force / denoising supervision (DPA4 ``dens`` head).

Two steps per batch. :meth:`DensLoss.corrupt` (before the model): in training, with probability
``dens_prob`` the batch is a denoising batch; then each real atom is corrupted with probability
``dens_corrupt_ratio`` (all of them if ``None``), ``r_i -> r_i + eps_i``,
``eps_i ~ N(0, sigma^2 I)``, ``sigma = dens_std``. The model gets the noisy coordinates, the
corrupted-atom mask and, in a denoising batch, the clean force labels (its force embedding).

:meth:`DensLoss.__call__` (after the model), energies and forces in normalised units
``E~ = (E - sum_i b_{t_i}) / s`` (``b`` the per-type energy bias over the model's kept atoms,
``s`` the energy std of type 0) and ``F~ = F / rmsd`` (global force RMSD statistic):

* energy, mse ``L_e = <(dE~_f)^2 / N_f>_f``, mae ``<|dE~_f| / N_f>_f``;
* force ``L_F = p_f(lr) (n_c/n) l(F~_pred - F~_label | clean) + c_dn (n_d/n) l(F~_pred - eps/sigma | corrupted)``
  with ``n_c``, ``n_d``, ``n`` the clean, corrupted and real atom counts of the batch,
  ``c_dn = dens_denoising_pos_coefficient`` (not scheduled), ``l`` the mean over the subset of
  squared components (mse) or of vector norms (mae); an empty subset gives 0.

``p_e``, ``p_f`` follow the ``ener`` schedule. Metrics (physical units): mse ``rmse_e =
sqrt(<(dE_f / N_f)^2>)``, ``l2_ener_loss = <(dE~)^2>``, ``l2_force_loss`` (pooled mean square of
both normalised subsets), ``rmse_f`` over clean atoms; mae ``mae_e = <|dE_f| / N_f>``, ``mae_f``
= mean error-vector norm over clean atoms. ``rmse_f``/``mae_f`` are left out when no atom is
clean. ``rmse = sqrt(L)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .common import F64, LabelRequirement, Pref, found, nan_like


@dataclass
class DensBatch:
    """Model inputs and targets of one ``dens`` batch (from :meth:`DensLoss.corrupt`).

    coord ``(nf, nloc, 3)``: coordinates for the model, ``r + eps``; noise_mask / clean_mask
    ``(nf, nloc)`` bool: corrupted / uncorrupted real atoms; noise_target ``(nf, nloc, 3)``:
    ``eps / sigma``; force_input ``(nf, nloc, 3)``: clean force labels for the model's force
    embedding, only in a denoising batch (``use_dens``).
    """

    coord: Tensor
    noise_mask: Tensor
    clean_mask: Tensor
    noise_target: Tensor
    force_input: Tensor | None
    use_dens: bool


class DensLoss:
    """``loss.type = "dens"``; ``section`` is the normalized ``loss`` input."""

    def __init__(self, section: dict[str, Any], starter_learning_rate: float) -> None:
        self.lr0 = float(starter_learning_rate)
        self.pref_e, self.pref_f = Pref.of(section, "e"), Pref.of(section, "f")
        self.loss_func = section["loss_func"]
        self.prob = float(section["dens_prob"])
        self.std = float(section["dens_std"])
        ratio = section["dens_corrupt_ratio"]
        self.ratio = None if ratio is None else float(ratio)
        self.coef_dn = float(section["dens_denoising_pos_coefficient"])
        self._check(section)

    def _check(self, section: dict) -> None:
        if self.loss_func not in ("mse", "mae"):
            raise ValueError(f"dens loss: loss_func must be 'mse' or 'mae', not {self.loss_func!r}")
        if not section["dens_fixed_noise_std"]:
            raise NotImplementedError("dens loss: only dens_fixed_noise_std = true exists")
        if not 0.0 <= self.prob <= 1.0 or not 0.0 <= (self.ratio or 0.0) <= 1.0:
            raise ValueError("dens loss: dens_prob and dens_corrupt_ratio must lie in [0, 1]")
        if self.std <= 0.0 or self.coef_dn < 0.0:
            raise ValueError("dens loss: dens_std must be > 0, dens_denoising_pos_coefficient >= 0")

    def corrupt(
        self,
        coord: Tensor,
        atype: Tensor,
        force: Tensor,
        *,
        training: bool,
        generator: torch.Generator | None = None,
    ) -> DensBatch:
        """Noisy inputs and denoising targets; ``coord``/``force`` ``(nf, nloc, 3)``, ``atype (nf, nloc)``.

        Draws, in this order: one uniform (denoising batch?), ``(nf, nloc)`` uniforms (which atoms),
        ``(nf, nloc, 3)`` normals, all from ``generator`` (float64 uniforms, normals in
        ``coord.dtype``). Outside training, or with ``dens_prob = 0``, nothing is drawn.
        """
        nf, nloc = atype.shape
        coord = coord.reshape(nf, nloc, 3)
        real = atype >= 0
        dev = coord.device
        use = training and self.prob > 0.0
        use = use and torch.rand((), dtype=F64, device=dev, generator=generator).item() < self.prob
        noise_mask = torch.zeros_like(real)
        eps = torch.zeros_like(coord)
        if use:
            noise_mask = real
            if self.ratio is not None:
                pick = torch.rand((nf, nloc), dtype=F64, device=dev, generator=generator)
                noise_mask = (pick < self.ratio) & real
            normal = torch.randn(coord.shape, dtype=coord.dtype, device=dev, generator=generator)
            eps = normal * self.std * noise_mask.unsqueeze(-1)
        force_input = force.reshape(nf, nloc, 3).to(coord.dtype) if use else None
        return DensBatch(
            coord + eps, noise_mask, real & ~noise_mask, eps / self.std, force_input, use
        )

    def __call__(
        self,
        pred: dict[str, Tensor],
        label: dict[str, Tensor],
        find: dict[str, bool],
        natoms: int,
        lr: float,
        *,
        batch: DensBatch,
        energy_bias: Tensor,
        energy_std: Tensor | float,
        force_rmsd: Tensor | float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and metrics of one batch.

        pred: ``energy (nf,)`` and ``force (nf, nloc, 3)`` (physical, or normalised when the
        ``*_norm`` keys are absent), optional ``energy_norm (nf,)``, ``force_norm``,
        ``clean_force_norm``, ``denoising_force_norm`` ``(nf, nloc, 3)`` (the last two fall back
        to ``force_norm``, then ``force``); label ``energy (nf,)``, ``force (nf, nloc, 3)``;
        ``energy_bias (nf,)`` = ``sum_i b_{t_i}`` over kept atoms; ``natoms`` is unused (the
        real atom counts come from ``batch``).
        """
        coef = lr / self.lr0
        real = batch.clean_mask | batch.noise_mask
        ref = next(iter(pred.values()))
        loss = torch.zeros((), dtype=F64, device=ref.device)
        metrics: dict[str, Tensor] = {}
        if self.pref_e.active and "energy" in pred:
            if found("energy", label, find):
                value, shown = self._energy(pred, label, real, energy_bias, energy_std, metrics)
                loss = loss + self.pref_e(coef) * value
                metrics["mae_e" if self.loss_func == "mae" else "rmse_e"] = shown.detach()
            else:
                names = ("mae_e",) if self.loss_func == "mae" else ("rmse_e", "l2_ener_loss")
                metrics.update(dict.fromkeys(names, nan_like(ref)))
        if self.pref_f.active and "force" in pred:
            if found("force", label, find):
                loss = loss + self._force(pred, label, batch, real, force_rmsd, coef, metrics)
            else:
                names = ["l2_force_loss"] if self.loss_func == "mse" else []
                if batch.clean_mask.any():
                    names.append("mae_f" if self.loss_func == "mae" else "rmse_f")
                metrics.update(dict.fromkeys(names, nan_like(ref)))
        metrics["rmse"] = loss.detach().sqrt()
        return loss, metrics

    def _energy(self, pred, label, real, bias, std, metrics) -> tuple[Tensor, Tensor]:
        """(loss term, shown metric) of the energy; see the module docstring."""
        e_norm = pred.get("energy_norm", pred["energy"])
        e_label = label["energy"].reshape(e_norm.shape).to(e_norm.dtype)
        e_phys = pred["energy"] if "energy_norm" in pred else e_norm * std + bias
        inv = 1.0 / real.sum(-1).to(e_norm.dtype)  # (nf,)
        d_norm = e_norm - (e_label - bias) / std
        d_phys = e_phys - e_label
        if self.loss_func == "mae":
            return (d_norm.abs() * inv).mean(), (d_phys.abs() * inv).mean()
        metrics["l2_ener_loss"] = d_norm.square().mean().detach()
        return (d_norm.square() * inv).mean(), (d_phys.square() * inv.square()).mean().sqrt()

    def _force(self, pred, label, batch: DensBatch, real, rmsd, coef, metrics) -> Tensor:
        """Loss term of clean and corrupted atoms; adds the force metrics."""
        fallback = pred.get("force_norm", pred["force"])
        clean_pred = pred.get("clean_force_norm", fallback)
        noisy_pred = pred.get("denoising_force_norm", fallback)
        f_label = label["force"].reshape(clean_pred.shape).to(clean_pred.dtype)
        f_phys = pred["force"] if "force_norm" in pred else clean_pred * rmsd
        clean, noisy = batch.clean_mask, batch.noise_mask
        n_real = real.sum().to(F64)
        d_clean = clean_pred[clean] - (f_label / rmsd)[clean]  # (n_c, 3)
        d_noisy = noisy_pred[noisy] - batch.noise_target[noisy]  # (n_d, 3)
        value = (self.pref_f(coef) * (clean.sum() / n_real)) * self._subset(d_clean)
        if batch.use_dens:
            value = value + (self.coef_dn * (noisy.sum() / n_real)) * self._subset(d_noisy)
        if self.loss_func == "mse":
            dof = max(d_clean.numel(), 1) + d_noisy.numel()
            metrics["l2_force_loss"] = (
                (d_clean.square().sum() + d_noisy.square().sum()) / dof
            ).detach()
        if clean.any():
            err = f_phys[clean] - f_label[clean]
            if self.loss_func == "mse":
                metrics["rmse_f"] = err.square().mean().sqrt().detach()
            else:
                metrics["mae_f"] = err.norm(dim=-1).mean().detach()
        return value

    def _subset(self, diff: Tensor) -> Tensor:
        """Mean squared component (mse) or mean vector norm (mae) of ``diff (n, 3)``; 0 if empty."""
        if diff.numel() == 0:
            return diff.new_zeros(())
        if self.loss_func == "mse":
            return diff.square().mean()
        return diff.norm(dim=-1).mean()

    @property
    def label_requirements(self) -> list[LabelRequirement]:
        reqs = []
        if self.pref_e.active:
            reqs.append(LabelRequirement("energy", 1, False, high_prec=True))
        if self.pref_f.active:
            reqs.append(LabelRequirement("force", 3, True))
        return reqs
