"""Per-edge geometry computed once per forward pass and shared by every block.

Edge ``e`` carries a message from ``src[e]`` (neighbour j) to ``dst[e]`` (centre i) along
``vec[e] = r_j - r_i``. Padding / excluded edges are kept in place with ``keep = 0``: their
vector is replaced by ``(0, 0, 1)`` (finite everywhere) and every weight is zeroed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..geometry import edge_frame
from ..geometry.rotate import EdgeRotation
from ..geometry.wigner import WignerD
from ..kernels.gather_scatter import scatter_rows
from .radial import BridgingSwitch, InnerClamp, RadialBasis, c3_envelope

if TYPE_CHECKING:
    from ..engine.chunks import EdgeChunk


@dataclass
class EdgeCache:
    """The geometry of every edge (``E`` edges onto ``N`` nodes), computed once per forward pass
    and read by every block: indices, envelope, radial basis, edge frame and Wigner-D."""

    src: torch.Tensor  # (E,) long
    dst: torch.Tensor  # (E,) long
    n_nodes: int
    keep: torch.Tensor  # (E, 1) 1.0 for real edges
    vec: torch.Tensor  # (E, 3) (clamped under bridging)
    env: torch.Tensor  # (E, 1) C^3 envelope (edge exponent), 0 on padding
    rbf: torch.Tensor  # (E, n_radial), envelope (basis exponent) baked in
    quat: torch.Tensor  # (E, 4) global -> local edge frame
    inv_sqrt_deg: torch.Tensor  # (N, 1, 1) 1 / sqrt(sum_e env^2 + floor)
    wigner: torch.Tensor | None = None  # (E, sum_l (2l+1)^2) Wigner-D block entries
    src_gate: torch.Tensor | None = None  # (E, 1) bridging source-freeze gate
    chunks: tuple[EdgeChunk, ...] | None = None  # streamed evaluation plan (edges sorted by dst)
    atom_chunks: tuple[EdgeChunk, ...] | None = None  # the same, merged for per-atom work
    _projections: dict = field(default_factory=dict)

    @property
    def message_weight(self) -> torch.Tensor:
        """``(E, 1)`` envelope times the bridging source gate (if any): how much an edge's
        message counts in a plain envelope-weighted sum."""
        return self.env if self.src_gate is None else self.env * self.src_gate

    def sum_at_dst(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter-add per-edge values ``(E, ...)`` onto destinations -> ``(N, ...)`` (its
        autograd node keeps only the destination index, not the values)."""
        return scatter_rows(values, self.dst, self.n_nodes)

    def _operands(self, lmax: int, mmax: int) -> tuple:
        """Rotation operands for ``(lmax, mmax)``, built once per forward and shared by blocks."""
        key = (lmax, mmax)
        if key not in self._projections:
            self._projections[key] = _rotation(lmax, mmax).matrices(self.wigner)
        return self._projections[key]

    def to_local(self, x: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
        """Packed ``x (E, D, C)`` in the edge frames, ``|m| <= mmax``: ``(E, D_m, C)``."""
        return _rotation(lmax, mmax).to_local(self._operands(lmax, mmax), x)

    def gather_to_local(
        self, x: torch.Tensor, index: torch.Tensor, lmax: int, mmax: int, mix=None
    ) -> torch.Tensor:
        """Rows ``x[index]`` of ``x (N, D, C)`` in the edge frames ``(E, D_m, C)``, times ``mix
        (E, D_m, D_m)`` if given, without keeping the gathered rows for the backward pass."""
        return _rotation(lmax, mmax).gather_to_local(self._operands(lmax, mmax), x, index, mix)

    def to_global(
        self, y: torch.Tensor, lmax: int, mmax: int, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Edge-frame ``y (E, D_m, C)`` back to packed global coefficients ``(E, D, C)``,
        times a per-edge ``weight (E, 1)`` if given."""
        return _rotation(lmax, mmax).to_global(self._operands(lmax, mmax), y, weight)

    def cast(self, dtype: torch.dtype) -> EdgeCache:
        """Copy with float tensors in ``dtype`` (for float64 / float16 blocks)."""
        if self.env.dtype == dtype:
            return self
        conv = {n: None if (t := getattr(self, n)) is None else t.to(dtype) for n in _FLOATS}
        return dataclasses.replace(self, **conv, _projections={})


#: Tensors of an :class:`EdgeCache` with one row per edge, and those that hold floats.
PER_EDGE = ("src", "dst", "keep", "vec", "env", "rbf", "quat", "wigner", "src_gate")
_FLOATS = ("keep", "vec", "env", "rbf", "quat", "inv_sqrt_deg", "wigner", "src_gate")


_ROTATIONS: dict[tuple[int, int], EdgeRotation] = {}


def _rotation(lmax: int, mmax: int) -> EdgeRotation:
    """Shared rotation plan per ``(lmax, mmax)`` (a plain dict: torch.compile traces through it)."""
    if (lmax, mmax) not in _ROTATIONS:
        _ROTATIONS[(lmax, mmax)] = EdgeRotation(lmax, mmax)
    return _ROTATIONS[(lmax, mmax)]


def source_gate_sums(
    length: torch.Tensor,
    keep: torch.Tensor,
    src: torch.Tensor,
    n_nodes: int,
    switch: BridgingSwitch,
) -> torch.Tensor:
    """Per-node ``[sum log w, number of zero factors]`` ``(N, 2)`` over the edges leaving it.

    The bridging source gate is ``eta_j = prod_{e: src_e = j} w(r_e)`` with ``w = 0`` inside
    ``r_inner``: a node with any neighbour in the frozen zone sends no information onwards. The
    product is kept as a sum of logs over non-zero factors plus a zero count (differentiable,
    trace-friendly; sums can be completed across MPI ranks); padding edges count as ``w = 1``.
    """
    w = (switch(length) * keep + (1.0 - keep)).squeeze(-1)  # (E,)
    is_zero = w <= 0
    log_w = torch.log(torch.where(is_zero, torch.ones_like(w), w))
    terms = torch.stack([log_w, is_zero.to(w.dtype)], dim=-1)  # (E, 2)
    return w.new_zeros(n_nodes, 2).index_add(0, src, terms)


def source_gate(sums: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Per-edge gate ``eta[src_e]`` ``(E, 1)`` from the per-node sums of :func:`source_gate_sums`."""
    log_eta, n_zero = sums.unbind(-1)
    eta = torch.where(n_zero > 0.5, torch.zeros_like(log_eta), torch.exp(log_eta))
    return eta.index_select(0, src).unsqueeze(-1)


def build_edge_cache(
    *,
    src: torch.Tensor,
    dst: torch.Tensor,
    edge_vec: torch.Tensor,
    keep: torch.Tensor,
    n_nodes: int,
    rcut: float,
    edge_env_exp: int,
    radial_basis: RadialBasis,
    wigner: WignerD | None,
    eps: float,
    deg_floor: float,
    dtype: torch.dtype,
    inner_clamp: InnerClamp | None = None,
    bridging_switch: BridgingSwitch | None = None,
    random_roll: bool = False,
    complete_node_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EdgeCache:
    """Geometry, envelopes, radial basis and Wigner-D for all edges, in ``dtype``.

    ``complete_node_sums`` (multi-rank freezing only) completes per-node sums over edges that
    other ranks hold; without it every edge of a node is local.
    """
    keep_f = keep.to(dtype).unsqueeze(-1)  # (E, 1)
    vec = edge_vec.to(dtype) * keep_f
    vec = vec + torch.nn.functional.pad(1.0 - keep_f, (2, 0))  # padding edges -> (0, 0, 1)
    length = torch.sqrt(vec.square().sum(-1, keepdim=True) + eps * eps)  # (E, 1)
    if inner_clamp is not None:
        clamped = inner_clamp(length)
        vec = vec * (clamped / length)
        length = clamped
    env = c3_envelope(length, rcut, edge_env_exp) * keep_f
    rbf = radial_basis(length) * keep_f
    quat = edge_frame.edge_quaternion(vec, eps)
    if random_roll:
        quat = edge_frame.random_roll(quat)
    deg = env.new_zeros(n_nodes).index_add(0, dst, env.squeeze(-1).square())
    gate = None
    if bridging_switch is not None:
        sums = source_gate_sums(length, keep_f, src, n_nodes, bridging_switch)
        if complete_node_sums is not None:
            sums = complete_node_sums(sums)
        gate = source_gate(sums, src)
    return EdgeCache(
        src=src,
        dst=dst,
        n_nodes=n_nodes,
        keep=keep_f,
        vec=vec,
        env=env,
        rbf=rbf,
        quat=quat,
        inv_sqrt_deg=torch.rsqrt(deg + deg_floor).view(-1, 1, 1),
        wigner=None if wigner is None else wigner.blocks(quat),
        src_gate=gate,
    )
