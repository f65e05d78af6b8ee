"""Forces and virials from one gradient of the energy with respect to the edge vectors.

The energy depends on positions only through ``v_e = r_src(e) - r_dst(e)`` (+ cell shifts). With
``g_e = dE/dv_e``:

    F_k     = sum_{e: dst=k} g_e - sum_{e: src=k} g_e
    W       = - sum_e g_e (x) v_e                      (virial, 3x3 row-major ``k j``)
    W_k     = 1/2 sum_{e touching k} - g_e (x) v_e     (atomic virial, half to each end)

This is exact for periodic systems too, because cell shifts are constant along the path and
``-sum g (x) v`` is the derivative of the energy with respect to a homogeneous strain.
"""

from __future__ import annotations

import torch


def energy_gradients(
    energy: torch.Tensor, leaves: tuple[torch.Tensor, ...], create_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    """``dE/dx`` for each leaf ``x`` of a scalar (or summed) energy; zeros for a leaf the
    energy does not depend on."""
    grads = torch.autograd.grad(energy.sum(), leaves, create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


def edge_gradient(
    energy: torch.Tensor, edge_vec: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """``dE/dv`` ``(E, 3)`` for a scalar (or summed) energy."""
    return energy_gradients(energy, (edge_vec,), create_graph)[0]


def forces(grad: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Per-atom forces ``(n_atoms, 3)``."""
    out = grad.new_zeros(n_atoms, 3)
    return out.index_add(0, dst, grad).index_add(0, src, -grad)


def edge_virials(grad: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
    """Per-edge virial contributions ``(E, 9)``: ``-g (x) v``."""
    return -(grad.unsqueeze(-1) * edge_vec.unsqueeze(-2)).reshape(-1, 9)


def atomic_virials(
    grad: torch.Tensor, edge_vec: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n_atoms: int
) -> torch.Tensor:
    """Per-atom virials ``(n_atoms, 9)`` (half of each edge's contribution to each end)."""
    half = 0.5 * edge_virials(grad, edge_vec)
    out = grad.new_zeros(n_atoms, 9)
    return out.index_add(0, dst, half).index_add(0, src, half)


def frame_virials(
    grad: torch.Tensor, edge_vec: torch.Tensor, frame_of_edge: torch.Tensor, n_frames: int
) -> torch.Tensor:
    """Per-frame virials ``(nf, 9)``."""
    return grad.new_zeros(n_frames, 9).index_add(0, frame_of_edge, edge_virials(grad, edge_vec))
