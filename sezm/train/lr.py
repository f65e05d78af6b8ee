"""Learning-rate schedules: ``exp``, ``cosine`` and ``wsd``, each after an optional linear warm-up.

Notation: ``N = numb_steps``, ``W`` warm-up steps, ``T = N - W`` steps after the warm-up,
``lr0 = start_lr``, ``lr1 = stop_lr`` and ``t = step - W`` the step counted from the end of the
warm-up. The arithmetic is float64 in DeePMD-kit 3.2's order, with numpy's ``exp``, ``log``,
``power`` and ``cos`` (they may differ from ``math``'s in the last bit), so the rates are
bit-for-bit DeePMD-kit's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SCHEDULES = ("exp", "cosine", "wsd")
"""Schedule types. ``scale_by_worker`` is accepted and, as in DeePMD-kit's PyTorch backend,
ignored."""


class LearningRate:
    """The learning rate of every training step, from a normalized ``learning_rate`` section.

    Warm-up (``step < W``): ``lr = f*lr0 + (lr0 - f*lr0) * step / W`` with
    ``f = warmup_start_factor``; ``W = warmup_steps`` or ``int(warmup_ratio * N)``.
    After it, the schedule of ``type`` at ``t = step - W``:

    * ``exp``: ``lr = max(lr0 * r**e, lr1)`` with ``e = t // s`` (``e = t / s`` if ``smooth``),
      ``s = decay_steps`` and ``r = decay_rate`` or, when null, ``r = exp(ln(lr1/lr0) / (T/s))``
      (``lr1`` clamped to >= 1e-10 there; ``r = 1`` when ``T = 0``). Without ``decay_rate`` and
      with ``s >= T``, ``s`` becomes ``100`` if ``T // 10 > 100`` else ``T // 100 + 1``.
    * ``cosine``: ``lr = lr0 * (a + (1 - a)/2 * (1 + cos(pi t/T)))``, ``a = lr1/lr0``;
      ``lr0 * a`` for ``t >= T``.
    * ``wsd``: decay over ``D = max(1, min(int(decay_phase_ratio * N), T))`` steps after a
      stable phase of ``S = T - D`` steps: ``lr0`` for ``t < S``; then with
      ``tau = clip((t - S)/D, 0, 1)``: ``inverse_linear`` ``1 / (tau/lr1 + (1 - tau)/lr0)``,
      ``cosine`` ``lr1 + (lr0 - lr1)/2 * (1 + cos(pi tau))``, ``linear``
      ``lr0 + (lr1 - lr0) tau``; ``lr1`` for ``t >= T``.

    ``stop_lr`` is ``stop_lr`` or ``stop_lr_ratio * start_lr`` (normalization fills ``stop_lr``
    with :data:`~sezm.config.DEFAULT_STOP_LR` when neither is given).
    """

    def __init__(self, section: dict[str, Any], numb_steps: int) -> None:
        self.kind = section["type"]
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown learning-rate type {self.kind!r}; use one of {SCHEDULES}")
        self.start_lr = float(section["start_lr"])
        ratio = section["stop_lr_ratio"]
        self.stop_lr = float(section["stop_lr"] if ratio is None else self.start_lr * ratio)
        warmup_ratio = section["warmup_ratio"]
        self.warmup_steps = (
            int(warmup_ratio * numb_steps)
            if warmup_ratio is not None
            else int(section["warmup_steps"])
        )
        self.warmup_start_lr = float(section["warmup_start_factor"]) * self.start_lr
        self.numb_steps = numb_steps
        self.decay_total = numb_steps - self.warmup_steps
        if self.start_lr <= 0 or not math.isfinite(self.start_lr):
            raise ValueError(f"start_lr must be positive and finite, got {self.start_lr}")
        if numb_steps < 0 or self.warmup_steps < 0:
            raise ValueError("numb_steps and the warm-up length must be non-negative")
        if self.warmup_steps and self.warmup_steps >= numb_steps:
            key = "warmup_steps" if warmup_ratio is None else f"warmup_ratio ({warmup_ratio})"
            raise ValueError(
                f"learning_rate/{key}: the warm-up ({self.warmup_steps} steps) must be shorter "
                f"than training/numb_steps ({numb_steps}); lower it, give "
                "learning_rate/warmup_ratio (a fraction of the run) instead, or train longer"
            )
        getattr(self, f"_setup_{self.kind}")(section)

    def value(self, step: int) -> float:
        """Learning rate at training step ``step`` (counted from 0)."""
        w = self.warmup_steps
        if w > 0 and step < w:
            return self.warmup_start_lr + (self.start_lr - self.warmup_start_lr) * (step / w)
        return float(getattr(self, f"_{self.kind}")(float(max(step - w, 0))))

    # --- exp -------------------------------------------------------------------------------

    def _setup_exp(self, section: dict[str, Any]) -> None:
        steps = int(section["decay_steps"])
        rate, total = section["decay_rate"], self.decay_total
        if steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {steps}")
        if rate is None and steps >= total:
            steps = 100 if total // 10 > 100 else total // 100 + 1
        if rate is None:
            end = max(self.stop_lr, 1e-10)
            rate = np.exp(np.log(end / self.start_lr) / (total / steps)).item() if total else 1.0
        self.decay_steps, self.decay_rate = steps, float(rate)
        self.smooth = bool(section["smooth"])

    def _exp(self, t: float) -> float:
        exponent = t / self.decay_steps if self.smooth else t // self.decay_steps
        return max(self.start_lr * float(np.power(self.decay_rate, exponent)), self.stop_lr)

    # --- cosine ----------------------------------------------------------------------------

    def _setup_cosine(self, section: dict[str, Any]) -> None:
        self.min_factor = self.stop_lr / self.start_lr

    def _cosine(self, t: float) -> float:
        total, a = self.decay_total, self.min_factor
        if total == 0:
            return self.start_lr
        if t >= total:
            return self.start_lr * a
        return self.start_lr * (a + 0.5 * (1 - a) * (1 + np.cos(np.pi * (t / total))))

    # --- wsd -------------------------------------------------------------------------------

    def _setup_wsd(self, section: dict[str, Any]) -> None:
        ratio = float(section["decay_phase_ratio"])
        self.decay_type = section["decay_type"]
        if self.stop_lr <= 0:
            raise ValueError(f"the wsd schedule needs a positive stop_lr, got {self.stop_lr}")
        if not 0 < ratio <= 1:
            raise ValueError(f"decay_phase_ratio must lie in (0, 1], got {ratio}")
        if self.decay_type not in ("inverse_linear", "cosine", "linear"):
            raise ValueError(f"unknown wsd decay_type {self.decay_type!r}")
        self.decay_phase = max(1, min(int(ratio * self.numb_steps), self.decay_total))
        self.stable_steps = self.decay_total - self.decay_phase

    def _wsd(self, t: float) -> float:
        lr0, lr1 = self.start_lr, self.stop_lr
        if t >= self.decay_total:
            return lr1
        if t < self.stable_steps:
            return lr0
        tau = min(max((t - self.stable_steps) / self.decay_phase, 0.0), 1.0)
        if self.decay_type == "inverse_linear":
            return 1.0 / (tau / lr1 + (1.0 - tau) / lr0)
        if self.decay_type == "cosine":
            return lr1 + (lr0 - lr1) * 0.5 * (1.0 + np.cos(np.pi * tau))
        return lr0 + (lr1 - lr0) * tau
