"""Edge-aligned local frames as unit quaternions.

Each edge direction ``u`` gets the rotation ``R(q)`` with ``R(q) u = +z`` (global -> local).
Two exact quaternion charts exist, each singular at one pole; they are blended with a C-infinity
step in ``u_z`` so the frame is smooth everywhere. Any frame sending ``u`` to ``+z`` gives the
same model output (every edge-frame operation commutes with rolls about z), but the blend fixes
one smooth choice, which keeps forces smooth and comparisons tight.

Quaternions are ``(w, x, y, z)`` with ``w`` the scalar part.
"""

from __future__ import annotations

import torch


def normalize(q: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide by the smoothed norm ``sqrt(|q|^2 + eps^2)`` (last axis)."""
    return q / torch.sqrt((q * q).sum(-1, keepdim=True) + eps * eps)


def multiply(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``q1 * q2`` of ``(..., 4)`` quaternions."""
    s1, v1 = q1[..., :1], q1[..., 1:]
    s2, v2 = q2[..., :1], q2[..., 1:]
    scalar = s1 * s2 - (v1 * v2).sum(-1, keepdim=True)  # s1 s2 - v1 . v2
    vector = s1 * v2 + s2 * v1 + torch.linalg.cross(v1, v2, dim=-1)
    return torch.cat([scalar, vector], dim=-1)


def _smooth_step(t: torch.Tensor) -> torch.Tensor:
    """C-infinity step on [0, 1]: 0 at 0, 1 at 1, all derivatives vanish at both ends."""
    t = t.clamp(0.0, 1.0)
    tiny = torch.finfo(t.dtype).eps
    rise = torch.exp(-1.0 / t.clamp(min=tiny))
    fall = torch.exp(-1.0 / (1.0 - t).clamp(min=tiny))
    inner = rise / (rise + fall)
    return torch.where(t <= 0, torch.zeros_like(t), torch.where(t >= 1, torch.ones_like(t), inner))


def edge_quaternion(edge_vec: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth unit quaternions ``(E, 4)`` rotating each edge direction onto ``+z``.

    Chart "+": ``(1 + u_z, u_y, -u_x, 0)`` is regular away from ``u = -z``;
    chart "-": ``(-u_x, 0, 1 - u_z, u_y)`` is regular away from ``u = +z``.
    They are nlerp-blended (shortest arc) with weight ``step((u_z + 1) / 2)``.
    """
    u = edge_vec / torch.sqrt((edge_vec * edge_vec).sum(-1, keepdim=True) + eps * eps)
    ux, uy, uz = u.unbind(-1)
    zero = torch.zeros_like(ux)
    q_up = normalize(torch.stack([1 + uz, uy, -ux, zero], -1), eps)
    q_down = normalize(torch.stack([-ux, zero, 1 - uz, uy], -1), eps)
    q_up = torch.where((q_down * q_up).sum(-1, keepdim=True) < 0, -q_up, q_up)
    weight = _smooth_step(0.5 * (uz + 1.0)).unsqueeze(-1)
    return normalize((1 - weight) * q_down + weight * q_up, eps)


def random_roll(q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Compose each frame with an independent random roll about local z (training augmentation)."""
    seeded = {} if generator is None else {"generator": generator}  # traceable when unseeded
    gamma = torch.rand(q.shape[:-1], dtype=q.dtype, device=q.device, **seeded)
    half = torch.pi * gamma  # half of a uniform angle in [0, 2 pi)
    zero = torch.zeros_like(half)
    roll = torch.stack([torch.cos(half), zero, zero, torch.sin(half)], -1)
    return multiply(roll, q)
