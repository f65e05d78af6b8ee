"""Muon-family optimizers: orthogonalised momentum updates for weight matrices, Adam for the rest.

``HybridMuon`` routes every parameter by name and shape (:func:`route`) to Adam, AdamW or Muon;
``AdaMuon`` sends every parameter with two or more dimensions to a sign-orthogonalised,
variance-normalised Muon update. Both reproduce DeePMD-kit 3.2's optimizers of the same names,
including their dtypes (bfloat16 / float16 iterations, float32 Adam state), so that runs and
optimizer states carry over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

Coeffs = tuple[float, float, float]

NS_FAST: Coeffs = (3.4445, -4.7750, 2.0315)
NS_POLISH: Coeffs = (2.0, -1.5, 0.5)
NS_SCHEDULE: tuple[Coeffs, ...] = (NS_FAST,) * 8 + (NS_POLISH,) * 2
"""Standard Newton-Schulz: 8 fast quintic steps, then 2 Newton steps that settle sigma at 1."""
NS_EPS = 1e-7
ADAM_EPS = 1e-20

_PE_SAFETY = 1.05
POLAR_EXPRESS: tuple[Coeffs, ...] = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5)
    for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    )
)
"""Gram Newton-Schulz steps: Polar-Express coefficients with a 1.05 safety factor."""
GRAM_RESTART = 2
"""Step at which the Gram iteration folds its transform into ``X`` and recomputes ``R``."""

MAGMA_TAU, MAGMA_DECAY, MAGMA_MIN_SCALE, MAGMA_EPS = 2.0, 0.9, 0.1, 1e-12
_SIG_LO = 1.0 / (1.0 + math.exp(1.0 / MAGMA_TAU))  # sigmoid(-1/tau)
_SIG_HI = 1.0 / (1.0 + math.exp(-1.0 / MAGMA_TAU))  # sigmoid(+1/tau)

ADAMUON_SCHEDULE: tuple[Coeffs, ...] = (NS_FAST,) * 5
ADAMUON_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# orthogonalisation


def newton_schulz(
    g: torch.Tensor, schedule: tuple[Coeffs, ...] = NS_SCHEDULE, eps: float = NS_EPS
) -> torch.Tensor:
    """Approximate ``U V^T`` of ``g = U S V^T`` for a batch ``g: [B, m, n]``, in bfloat16.

    In the wide orientation (``m <= n``, else transposed and back):
    ``X_0 = G / max(|G|_F, eps)``, ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` for each
    ``(a, b, c)`` of ``schedule``.
    """
    x = g.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for a, b, c in schedule:
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def gram_newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """:func:`newton_schulz` for wide matrices ``x: [B, m, n]`` (``m <= n``), iterated on the
    ``m x m`` Gram matrix; returns ``x``'s dtype.

    ``X_0 = X / (|X|_F + 1e-7)`` in float32, then float16. With ``R_0 = X_0 X_0^T`` and per step
    ``k`` the coefficients ``(a, b, c)`` of :data:`POLAR_EXPRESS`:
    ``Z = b R + c R^2``, ``Q = Z + a I`` (first step, restart) or ``Q <- Q (Z + a I)``, and
    ``R <- a RZ + Z RZ`` with ``RZ = a R + R Z`` (``= Q_k R Q_k^T``). At the restart step ``X``
    becomes ``Q X`` and ``R`` is recomputed; the result is ``Q X``. ``Z + a I`` is summed in
    float32 and rounded once, as a fused kernel does.
    """
    dtype = x.dtype
    x = x.float()
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)).half()
    r, q = torch.bmm(x, x.mT), None
    last = len(POLAR_EXPRESS) - 1
    for k, (a, b, c) in enumerate(POLAR_EXPRESS):
        if k == GRAM_RESTART:
            x, q = torch.bmm(q, x), None
            r = torch.bmm(x, x.mT)
        z = torch.baddbmm(r, r, r, beta=b, alpha=c)
        q = _plus_identity(z, a) if q is None else torch.baddbmm(q, q, z, beta=a)
        if k != last and k + 1 != GRAM_RESTART:
            rz = torch.baddbmm(r, r, z, beta=a)
            r = torch.baddbmm(rz, z, rz, beta=a)
    return torch.bmm(q, x).to(dtype)


def _plus_identity(z: torch.Tensor, a: float) -> torch.Tensor:
    out = z.float()
    out.diagonal(dim1=-2, dim2=-1).add_(a)
    return out.to(z.dtype)


def orthogonalize(
    mats: list[torch.Tensor],
    gram: bool = False,
    schedule: tuple[Coeffs, ...] = NS_SCHEDULE,
    eps: float = NS_EPS,
) -> list[torch.Tensor]:
    """Orthogonalise matrix batches ``mats[i]: [B_i, m_i, n_i]`` with as few calls as possible.

    Square matrices, and all of them without ``gram``, go to :func:`newton_schulz` (bfloat16
    result) in one call per shape. With ``gram``, rectangular ones go to
    :func:`gram_newton_schulz` (result in their dtype) in one call per ``min(m, n)``: turned
    wide and zero-padded to the widest, which leaves ``X X^T`` and so the result unchanged.
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        rows, cols = m.shape[-2:]
        key = ("gram", min(rows, cols)) if gram and rows != cols else ("ns", rows, cols)
        groups.setdefault((*key, m.dtype, m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for key, idx in groups.items():
        tall = [mats[i].size(-2) > mats[i].size(-1) for i in idx]
        if key[0] == "ns":
            parts = newton_schulz(torch.cat([mats[i] for i in idx]), schedule, eps)
            widths = [None] * len(idx)
        else:
            wide = [mats[i].mT if t else mats[i] for i, t in zip(idx, tall, strict=True)]
            widths = [w.size(-1) for w in wide]
            padded = [F.pad(w, (0, max(widths) - w.size(-1))) for w in wide]
            parts = gram_newton_schulz(torch.cat(padded))
        parts = parts.split([mats[i].size(0) for i in idx])
        for i, t, width, part in zip(idx, tall, widths, parts, strict=True):
            if width is not None:
                part = part[..., :width]
                part = part.mT if t else part
            out[i] = part
    return out


# ---------------------------------------------------------------------------------------------
# routing


KINDS = ("adam", "adamw", "muon")


class Route(NamedTuple):
    """How HybridMuon updates one parameter: ``kind`` is ``adam`` (no weight decay), ``adamw``
    (decoupled weight decay) or ``muon``; ``matrix`` the ``(batch, rows, cols)`` view of a Muon
    parameter."""

    kind: str
    matrix: tuple[int, int, int] | None = None


def route(name: str, shape: Iterable[int], muon_mode: str = "slice") -> Route:
    """Route a parameter by the last non-numeric segment of its dotted name, then its shape.

    Name (case-insensitive): ``b``, containing ``bias`` or starting ``adam_`` -> ``adam``;
    starting ``adamw_`` -> ``adamw``. Shape, with singleton dimensions dropped: rank < 2 ->
    ``adam``; else the matrix view of ``muon_mode`` -> ``muon``: ``flat`` ``(1, prod(s[:-1]),
    s[-1])``; rank 2 ``(1, s0, s1)``; rank >= 3 in ``slice`` ``(prod(s[:-2]), s[-2], s[-1])``
    (each trailing matrix on its own) and in ``2d`` none -> ``adamw``.
    """
    segments = name.lower().split(".")
    leaf = next((s for s in reversed(segments[1:]) if not s.isdigit()), segments[0])
    if leaf == "b" or "bias" in leaf or leaf.startswith("adam_"):
        return Route("adam")
    if leaf.startswith("adamw_"):
        return Route("adamw")
    dims = tuple(int(d) for d in shape if d != 1)
    if len(dims) < 2:
        return Route("adam")
    if muon_mode == "flat":
        return Route("muon", (1, math.prod(dims[:-1]), dims[-1]))
    if len(dims) == 2:
        return Route("muon", (1, *dims))
    if muon_mode == "slice":
        return Route("muon", (math.prod(dims[:-2]), *dims[-2:]))
    return Route("adamw")


# ---------------------------------------------------------------------------------------------
# shared pieces


def adam_step(
    state: dict, params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float
) -> None:
    """Adam with float32 moments: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p - lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)``."""
    if not params:
        return
    grads = [p.grad.float() for p in params]
    states = [state[p] for p in params]
    for s, p in zip(states, params, strict=True):
        if "exp_avg" not in s:
            s["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            s["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            s["beta1_pow"], s["beta2_pow"] = 1.0, 1.0
        s["beta1_pow"] *= betas[0]
        s["beta2_pow"] *= betas[1]
    m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(m, grads, 1.0 - betas[0])
    torch._foreach_lerp_(v, torch._foreach_mul(grads, grads), 1.0 - betas[1])
    for p, s, mi, vi in zip(params, states, m, v, strict=True):
        denom = (vi / (1 - s["beta2_pow"])).sqrt().add_(eps)
        p.add_((-(lr / (1 - s["beta1_pow"])) * (mi / denom)).to(p.dtype))


def nesterov(
    state: dict, params: list[torch.Tensor], beta: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``m <- b m + (1-b) g`` and the update ``b m + (1-b) g``; returns (grads, m, updates),
    the gradients cast to the momentum dtype (that of the first gradient)."""
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
    bufs = [state[p]["momentum_buffer"] for p in params]
    grads = [p.grad.to(b.dtype) for p, b in zip(params, bufs, strict=True)]
    torch._foreach_lerp_(bufs, grads, 1.0 - beta)
    return grads, bufs, torch._foreach_lerp(grads, bufs, beta)


def _with_grad(group: dict) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def _adam_lr(group: dict) -> float:
    return group["lr"] if group["lr_adjust"] <= 0 else group["lr"] / group["lr_adjust"]


def _shape_scale(group: dict, rows: int, cols: int) -> float:
    """``coeff * sqrt(max(m, n))`` (match Adam's update RMS) or, with ``lr_adjust > 0``,
    ``sqrt(max(1, m/n))``."""
    if group["lr_adjust"] <= 0:
        return group["lr_adjust_coeff"] * math.sqrt(float(max(rows, cols)))
    return max(1.0, rows / cols) ** 0.5


# ---------------------------------------------------------------------------------------------
# HybridMuon


class HybridMuon(Optimizer):
    """Muon for weight matrices, Adam for vectors, biases and ``adam_``/``adamw_`` parameters.

    Routing: :func:`route` by name and shape. Per step with learning rate ``lr``:

    * ``adam``: :func:`adam_step` at ``lr_a = lr`` (``lr / lr_adjust`` if ``lr_adjust > 0``),
      ``eps = 1e-20``; ``adamw``: first ``p <- (1 - lr_a wd) p``.
    * ``muon``: ``p <- (1 - lr wd) p``; Nesterov update ``u`` (:func:`nesterov`, ``momentum``);
      ``p <- p - lr * s * d * O(u)`` per matrix of the view, ``O`` :func:`orthogonalize`
      (Gram iteration for rectangular matrices if ``enable_gram``), ``s`` the shape scale
      (``lr_adjust_coeff * sqrt(max(m, n))`` or ``sqrt(max(1, m/n))``), ``d = 1`` or with
      ``magma_muon`` the damping of :meth:`magma`. ``s`` and ``d`` are applied in the dtype of
      ``O(u)``.

    DeePMD-kit's ``flash_muon`` (a Triton kernel for the same iteration) has no counterpart: the
    iteration always runs on torch matrix products.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        lr: float = 1e-3,
        *,
        momentum: float = 0.95,
        weight_decay: float = 0.001,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        lr_adjust: float = 0.0,
        lr_adjust_coeff: float = 0.18,
        muon_mode: str = "slice",
        enable_gram: bool = True,
        magma_muon: bool = True,
    ) -> None:
        if muon_mode not in ("2d", "flat", "slice"):
            raise ValueError(f"muon_mode must be '2d', 'flat' or 'slice', got {muon_mode!r}")
        named = list(named_params)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            adam_betas=tuple(adam_betas),
            lr_adjust=lr_adjust,
            lr_adjust_coeff=lr_adjust_coeff,
            muon_mode=muon_mode,
            enable_gram=enable_gram,
            magma_muon=magma_muon,
        )
        super().__init__([p for _, p in named], defaults)
        self.routes = {p: route(name, p.shape, muon_mode) for name, p in named}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = _with_grad(group)
            kinds = {k: [p for p in params if self.routes[p].kind == k] for k in KINDS}
            lr_a, wd = _adam_lr(group), group["weight_decay"]
            if wd > 0 and kinds["adamw"]:
                torch._foreach_mul_(kinds["adamw"], 1.0 - lr_a * wd)
            for kind in ("adam", "adamw"):
                adam_step(self.state, kinds[kind], lr_a, group["adam_betas"], ADAM_EPS)
            self._muon(group, kinds["muon"])
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        grads, bufs, updates = nesterov(self.state, params, group["momentum"])
        views = [self.routes[p].matrix for p in params]
        mats = [u.reshape(v) for u, v in zip(updates, views, strict=True)]
        orth = orthogonalize(mats, gram=group["enable_gram"])
        for p, g, m, o, (batch, rows, cols) in zip(params, grads, bufs, orth, views, strict=True):
            o = o * _shape_scale(group, rows, cols)
            if group["magma_muon"]:
                o = o * self.magma(p, g, m, batch).to(o.dtype)[:, None, None]
            p.add_(o.reshape(p.shape), alpha=-lr)

    def magma(
        self, p: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Damping ``d: [batch]`` in [0.1, 1] from how well momentum and gradient agree.

        Per matrix of the view, in float32: ``cos = <m, g> / max(|m| |g|, 1e-12)`` clipped to
        [-1, 1]; ``r = clip((sigmoid(cos/2) - sigmoid(-1/2)) / (sigmoid(1/2) - sigmoid(-1/2)),
        0, 1)``; score ``s <- 0.9 s + 0.1 r`` (``s_0 = 0.5``, kept in the state); ``d = 0.1 +
        0.9 s``.
        """
        g, m = grad.reshape(batch, -1).float(), momentum.reshape(batch, -1).float()
        cos = (m * g).sum(dim=1) / (m.norm(dim=1) * g.norm(dim=1)).clamp(min=MAGMA_EPS)
        raw = (torch.sigmoid(cos.clamp(-1.0, 1.0) / MAGMA_TAU) - _SIG_LO) / (_SIG_HI - _SIG_LO)
        state = self.state[p]
        score = state.get("magma_score")
        if score is None:
            score = torch.full((batch,), 0.5, dtype=torch.float32, device=p.device)
        score = MAGMA_DECAY * score + (1.0 - MAGMA_DECAY) * raw.clamp(0.0, 1.0)
        state["magma_score"] = score
        return MAGMA_MIN_SCALE + (1.0 - MAGMA_MIN_SCALE) * score


# ---------------------------------------------------------------------------------------------
# AdaMuon


class AdaMuon(Optimizer):
    """Muon on the sign of the momentum with a per-element second moment, for all parameters of
    rank >= 2; Adam (``eps = 1e-8``, rate ``lr / lr_adjust`` if ``lr_adjust > 0``) otherwise.

    Matrix path, ``U`` the Nesterov update (:func:`nesterov`) viewed as ``(shape[0], -1)``:
    ``p <- (1 - lr wd) p``; ``o = NS5(sign(U))`` (5 fast Newton-Schulz steps, bfloat16, then
    float32); ``v <- b v + (1-b) o^2``; ``o <- o / (sqrt(v) + 1e-8)``;
    ``o <- 0.2 sqrt(m n) * o / (|o| + 1e-8)``; ``p <- p - lr * s * o`` with ``s`` the shape
    scale (``lr_adjust_coeff sqrt(max(m, n))`` or ``sqrt(max(1, m/n))``).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        *,
        momentum: float = 0.95,
        weight_decay: float = 0.001,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        lr_adjust: float = 10.0,
        lr_adjust_coeff: float = 0.2,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            adam_betas=tuple(adam_betas),
            lr_adjust=lr_adjust,
            lr_adjust_coeff=lr_adjust_coeff,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = _with_grad(group)
            vectors = [p for p in params if p.ndim < 2]
            adam_step(self.state, vectors, _adam_lr(group), group["adam_betas"], ADAMUON_EPS)
            self._muon(group, [p for p in params if p.ndim >= 2])
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        if wd > 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        _, _, updates = nesterov(self.state, params, beta)
        signs = [u.reshape(1, u.shape[0], -1).sign() for u in updates]
        orth = orthogonalize(signs, schedule=ADAMUON_SCHEDULE, eps=ADAMUON_EPS)
        for p, o in zip(params, orth, strict=True):
            rows, cols = o.shape[-2:]
            o = o.flatten().float()
            if "v_buffer" not in self.state[p]:
                self.state[p]["v_buffer"] = torch.zeros_like(o)
            v = self.state[p]["v_buffer"]
            v.mul_(beta).addcmul_(o, o, value=1.0 - beta)
            o = o / v.sqrt().add_(ADAMUON_EPS)
            o.div_(o.norm() + ADAMUON_EPS).mul_(0.2 * math.sqrt(float(rows * cols)))
            o.mul_(_shape_scale(group, rows, cols))
            p.add_(o.view(p.shape).to(p.dtype), alpha=-lr)
