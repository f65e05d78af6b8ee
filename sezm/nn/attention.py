"""Envelope-gated softmax over the incoming edges of each node."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def envelope_gated_softmax(
    logits: torch.Tensor,
    env: torch.Tensor,
    dst: torch.Tensor,
    n_nodes: int,
    z_bias_raw: torch.Tensor,
    eps: float,
    src_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights ``(E, F, H)``:

        alpha_e = w_e^2 eta_e exp(l_e) / (softplus(z) + eps + sum_{e' -> dst_e} w_e'^2 eta_e' exp(l_e'))

    with ``w`` the cutoff envelope and ``eta`` the optional source gate. The null mass in the
    denominator lets a node attend to "nothing", and since ``alpha -> 0`` as ``w -> 0`` the
    aggregation is smooth at the cutoff without degree normalisation. Computed in log space
    with a per-destination shift (which cancels exactly, so it carries no gradient), in
    float32 at least: under bfloat16 autocast the weights come back in the logits' dtype.
    """
    dtype = logits.dtype
    if dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(logits.device.type, enabled=False):
            alpha = envelope_gated_softmax(
                logits.float(), env.float(), dst, n_nodes, z_bias_raw, eps,
                None if src_gate is None else src_gate.float(),
            )  # fmt: skip
        return alpha.to(dtype)
    n_edge, n_focus, n_head = logits.shape
    logits = logits.reshape(n_edge, -1)
    weight = env.reshape(n_edge, 1).square()
    if src_gate is not None:
        weight = weight * src_gate.reshape(n_edge, 1)
    active = weight > 0
    log_weight = torch.log(torch.where(active, weight, torch.ones_like(weight)))
    scores = torch.where(active, logits + log_weight, torch.full_like(logits, float("-inf")))
    null = torch.log(F.softplus(z_bias_raw.reshape(1, -1).to(logits.dtype)) + eps)  # (1, F*H)
    with torch.no_grad():
        shift = null.expand(n_nodes, -1).clone()
        shift = shift.scatter_reduce(0, dst.view(-1, 1).expand_as(scores), scores, "amax")
    edge_exp = torch.exp(scores - shift.index_select(0, dst))
    denom = torch.exp(null - shift).index_add(0, dst, edge_exp)
    return (edge_exp / denom.index_select(0, dst)).view(n_edge, n_focus, n_head)
