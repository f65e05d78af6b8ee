"""The ``property`` loss on a frame property ``P (nf, task_dim)``.

Extensive properties are compared per atom, ``P_f / N_f`` (``N_f`` real atoms of frame ``f``);
intensive ones as they are. With ``y`` the label, ``p`` the prediction, ``b``/``s`` the output
bias and std of type 0 (``out_bias[0, 0]``, ``out_std[0, 0]``), ``u = (y - b)/s``, ``v = (p - b)/s``:

* ``smooth_mae``: ``sum_fk sl1_beta(u - v)`` with ``sl1_beta(r) = r^2/(2 beta)`` for
  ``|r| < beta``, else ``|r| - beta/2`` (``beta = 0``: ``|r|``);
* ``mae``: ``sum |u - v|``; ``mse``: ``sum (u - v)^2``; ``rmse``: ``sqrt(<(u - v)^2>)``;
* ``mape``: ``<|(y - p) / (y + 0.001)|>`` (not normalised).

The ``metric`` list picks the displayed metrics, each a mean over ``y``/``p`` (not normalised):
``smooth_mae`` (same beta), ``mae``, ``mse``, ``rmse``, ``mape``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import F64, LabelRequirement

METRICS = ("smooth_mae", "mae", "mse", "rmse", "mape")


def _error(kind: str, y: Tensor, p: Tensor, beta: float, reduction: str) -> Tensor:
    if kind == "smooth_mae":
        return F.smooth_l1_loss(y, p, reduction=reduction, beta=beta)
    if kind == "mae":
        return F.l1_loss(y, p, reduction=reduction)
    if kind == "mse":
        return F.mse_loss(y, p, reduction=reduction)
    if kind == "rmse":
        return F.mse_loss(y, p, reduction="mean").sqrt()
    return ((y - p) / (y + 1e-3)).abs().mean()  # mape


class PropertyLoss:
    """``loss.type = "property"``.

    ``task_dim``, ``var_name`` (the label name, i.e. the fitting's ``property_name``) and
    ``intensive`` come from the model; ``out_bias``/``out_std`` ``(task_dim,)`` may be fixed
    here or passed per call (the model's current ``out_bias[0, 0]``, ``out_std[0, 0]``).
    """

    def __init__(
        self,
        section: dict[str, Any],
        *,
        task_dim: int,
        var_name: str,
        intensive: bool,
        out_bias: Tensor | None = None,
        out_std: Tensor | None = None,
    ) -> None:
        self.loss_func = section["loss_func"]
        self.metric = list(section["metric"])
        self.beta = float(section["beta"])
        self.task_dim, self.var_name, self.intensive = int(task_dim), var_name, bool(intensive)
        self.out_bias, self.out_std = out_bias, out_std
        unknown = [m for m in [self.loss_func, *self.metric] if m not in METRICS]
        if unknown:
            raise ValueError(
                f"property loss: unknown loss_func/metric {unknown}; use one of {METRICS}"
            )

    def __call__(
        self,
        pred: dict[str, Tensor],
        label: dict[str, Tensor],
        find: dict[str, bool],
        natoms: int,
        lr: float = 0.0,
        mask: Tensor | None = None,
        *,
        out_bias: Tensor | None = None,
        out_std: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and metrics; pred ``property (nf, task_dim)``, label ``<var_name> (nf, task_dim)``.

        ``mask (nf, nloc)``: real atoms, if the batch has phantoms; ``find`` and ``lr`` are unused.
        """
        p, y = pred["property"], label[self.var_name]
        shape = (p.shape[0], self.task_dim)
        if p.shape != shape or y.shape != shape:
            raise ValueError(
                f"property loss: expected {shape}, got {tuple(p.shape)} / {tuple(y.shape)}"
            )
        if not self.intensive:
            n = natoms if mask is None else mask.sum(-1, keepdim=True).to(p.dtype)
            p, y = p / n, y / n
        bias = self._stat(out_bias, self.out_bias, "out_bias", p)
        std = self._stat(out_std, self.out_std, "out_std", p)
        if self.loss_func == "mape":
            value = _error("mape", y, p, self.beta, "mean")
        else:
            value = _error(self.loss_func, (y - bias) / std, (p - bias) / std, self.beta, "sum")
        loss = torch.zeros((), dtype=F64, device=p.device) + value
        metrics = {m: _error(m, y, p, self.beta, "mean").detach() for m in self.metric}
        return loss, metrics

    def _stat(self, given: Tensor | None, fixed: Tensor | None, name: str, like: Tensor) -> Tensor:
        value = given if given is not None else fixed
        if value is None:
            raise ValueError(f"property loss: {name} is needed (the model's {name}[0, 0])")
        value = torch.as_tensor(value, dtype=F64, device=like.device)
        if value.shape != (self.task_dim,):
            raise ValueError(f"property loss: {name} must have shape ({self.task_dim},)")
        return value

    @property
    def label_requirements(self) -> list[LabelRequirement]:
        return [LabelRequirement(self.var_name, self.task_dim, False, must=True, high_prec=True)]
