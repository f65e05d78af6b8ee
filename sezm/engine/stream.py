"""Streamed message passing: a block's edge work done chunk by chunk.

The edges of a chunk are exactly the edges into a run of atoms (:func:`sezm.engine.chunks.plan_chunks`),
so every per-destination reduction (envelope sums, attention softmax, output gates) is complete
inside the chunk and the chunks' node outputs simply stack. When a gradient will be taken, each
chunk runs under non-reentrant activation checkpointing: its per-edge intermediates are dropped
after the chunk and recomputed, one chunk at a time, in the backward pass. Between blocks only
node states are kept, so memory no longer grows with ``edges x block depth``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..nn.edge_cache import PER_EDGE, EdgeCache
from .chunks import EdgeChunk

log = logging.getLogger(__name__)

MIN_CHUNK_EDGES = 1024  # below this, per-chunk overheads (launches, recompute set-up) dominate
# per-atom work (FFN grids, read-out) runs in batches of edge chunks merged up to
# ``edges per chunk / ATOM_CHUNK_RATIO`` atoms: its working set is a few hundred floats per grid
# point and atom, about that of ATOM_CHUNK_RATIO edges
ATOM_CHUNK_RATIO = 48


@dataclass(frozen=True)
class ChunkLimits:
    """The automatic policy's limits on one kind of device."""

    budget_bytes: int  # working set of one chunk's edge work, at most
    max_edges: int  # edges per chunk, at most
    plain_chunks: int  # systems of up to this many chunks take the plain path (no recompute)


# CPU: cache-sized chunks; the plain path up to four of them (measured: at 1,536 atoms the
# streamed path is 1.2x slower than the plain one, at 192 atoms it is not used)
CPU_LIMITS = ChunkLimits(budget_bytes=256 << 20, max_edges=1 << 16, plain_chunks=4)
CPU_MEMORY_FRACTION = 64  # ... and a chunk at most this fraction of the machine's memory
# CUDA: a chunk costs about the same ~1,000 kernel launches whatever its size, so chunks are as
# large as a quarter of the device's memory and the plain path runs while the edges' estimated
# working set fits in three quarters of it (its measured peak is ~0.65 of that estimate).
# One H200, DPA4-Mini, 98,304 water atoms: chunks of ~9,000 edges took 79 s, of 1M edges 2.4 s.
CUDA_MEMORY_FRACTION = 4
CUDA_MAX_EDGES = 1 << 23
CUDA_PLAIN_CHUNKS = 3


@dataclass
class StreamPolicy:
    """How an evaluator chooses the edges per chunk of the block edge work for each system.

    ``fixed``: always stream with chunks of at most this many edges (0: never stream);
    ``None``: automatic, a chunk whose working set (``bytes_per_edge`` per edge, estimated
    from the model's widths) fits the device's :func:`chunk_limits`; systems of up to
    ``plain_chunks`` chunks take the plain path, which needs no recomputation and is faster
    while it fits.
    """

    bytes_per_edge: int
    fixed: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cap: int | None = None  # edges per chunk at most, set by :meth:`shrink`
    last_pass: tuple[int, int | None] | None = None  # (edges, chunk) of the latest choice
    _reported: set = field(default_factory=set, repr=False)

    def chunk_for(self, n_edges: int) -> int | None:
        """Edges per chunk for a pass over ``n_edges`` edges, or ``None`` for the plain path."""
        if self.fixed is not None:
            chunk = self.fixed or None
        else:
            limits = chunk_limits(self.device)
            size = limits.budget_bytes // max(1, self.bytes_per_edge)
            size = min(limits.max_edges, max(MIN_CHUNK_EDGES, size))
            chunk = size if n_edges > limits.plain_chunks * size else None
            if self.cap is not None and (chunk or n_edges) > self.cap:
                chunk = self.cap
        self.last_pass = (n_edges, chunk)
        self._report(n_edges, chunk)
        return chunk

    def shrink(self) -> bool:
        """After the device ran out of memory in the latest pass: halve its chunk (the plain
        path: all its edges) for it and every later pass. ``False`` when there is nothing to
        shrink: a fixed size (``SEZM_EDGE_CHUNK``), no pass, or chunks of ``MIN_CHUNK_EDGES``."""
        if self.fixed is not None or self.last_pass is None:
            return False
        n_edges, chunk = self.last_pass
        if (chunk or n_edges) <= MIN_CHUNK_EDGES:
            return False
        self.cap = max(MIN_CHUNK_EDGES, (chunk or n_edges) // 2)
        path = "plain path" if chunk is None else f"streamed path ({chunk} edges a chunk)"
        log.warning(
            "out of device memory on the %s; evaluating again in chunks of at most %d edges, "
            "and so from now on (SEZM_EDGE_CHUNK fixes a size)",
            path,
            self.cap,
        )
        self._reported.clear()
        return True

    def _report(self, n_edges: int, chunk: int | None) -> None:
        key = chunk is None
        if key in self._reported:
            return
        self._reported.add(key)
        if chunk is None:
            log.info("evaluation path: plain (all %d edges at once)", n_edges)
        else:
            n = -(-n_edges // chunk)
            log.info(
                "evaluation path: streamed, chunks of at most %d edges (%d edges: ~%d chunks)%s",
                chunk,
                n_edges,
                n,
                "" if self.fixed is None else " [SEZM_EDGE_CHUNK]",
            )


def evaluate(model: torch.nn.Module, graph, **kwargs) -> dict[str, torch.Tensor]:
    """``model(graph, **kwargs)`` in evaluation, again in smaller chunks each time the device
    runs out of memory (:meth:`StreamPolicy.shrink`): the automatic policy's sizes are
    estimates and a GPU may be shared. Without a policy, or with a fixed size, the error
    stands."""
    while True:
        try:
            return model(graph, **kwargs)
        except torch.OutOfMemoryError:
            policy = _policy_of(model)
            if policy is None or not policy.shrink():
                raise
        # outside the handler: the failed pass's tensors are released before the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _policy_of(model) -> StreamPolicy | None:
    """The streaming policy of an eager model; ``None`` for a frozen ``.pt2`` package (not a
    module: its edge work is compiled in)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return getattr(getattr(model, "descriptor", None), "streaming", None)


def chunk_limits(device: torch.device) -> ChunkLimits:
    """The automatic policy's limits on ``device``, from its kind and memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return ChunkLimits(total // CUDA_MEMORY_FRACTION, CUDA_MAX_EDGES, CUDA_PLAIN_CHUNKS)
    if hasattr(os, "sysconf"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:  # no portable way to ask (Windows): assume a machine of 16 GiB
        total = 16 << 30
    budget = min(CPU_LIMITS.budget_bytes, total // CPU_MEMORY_FRACTION)
    return ChunkLimits(budget, CPU_LIMITS.max_edges, CPU_LIMITS.plain_chunks)


NodeTables = tuple[torch.Tensor | None, ...]
EdgeWork = Callable[..., torch.Tensor]
"""``edge_work(sources (N, ...), centres (n, ...), edges into the n centres, *per_edge (E_n, ...))``
-> aggregated messages ``(n, ...)``. Source tables are indexed by ``edges.src``, centre tables
(the rows of the chunk's atoms) by ``edges.dst``; ``per_edge`` are the chunk's rows of per-edge
inputs (radial features, ...)."""


def stream_edges(
    edge_work: EdgeWork,
    sources: NodeTables,
    centres: NodeTables,
    edges: EdgeCache,
    *per_edge: torch.Tensor | None,
) -> torch.Tensor:
    """``edge_work`` over every chunk of ``edges.chunks``, stacked to ``(N, ...)``."""
    outputs = []
    for chunk in edges.chunks:
        rows = slice(chunk.node_start, chunk.node_stop)
        span = slice(chunk.edge_start, chunk.edge_stop)
        args = (
            edge_work,
            chunk,
            (len(sources), len(centres), len(per_edge)),
            *sources,
            *(None if t is None else t[rows] for t in centres),
            *(None if t is None else t[span] for t in per_edge),
            *_chunk_rows(edges, chunk),
        )
        outputs.append(_recomputed(_run_chunk, *args))
    return torch.cat(outputs)


@dataclass(frozen=True)
class ChunkRadial:
    """Per-edge radial features made inside each chunk, never stored for all edges.

    ``make(edges of a chunk, types (N, C), centre types (n, C))`` -> ``(E_c, L+1, C)``; the
    first ``n_degrees`` degrees are used (a block of degree ``l`` reads ``l + 1``).
    """

    make: Callable[[EdgeCache, torch.Tensor, torch.Tensor], torch.Tensor]
    types: torch.Tensor  # (N, C)
    n_degrees: int

    def up_to(self, lmax: int) -> ChunkRadial:
        return ChunkRadial(self.make, self.types, lmax + 1)

    def rows(self, edges: EdgeCache, types: torch.Tensor, centre_types: torch.Tensor):
        """``(E_c, n_degrees, C)`` for the edges of one chunk."""
        return self.make(edges, types, centre_types)[:, : self.n_degrees]


def up_to(radial: torch.Tensor | ChunkRadial, lmax: int) -> torch.Tensor | ChunkRadial:
    """Radial features ``(E, L+1, C)`` (or their chunk recipe) restricted to degrees ``<= lmax``."""
    return radial.up_to(lmax) if isinstance(radial, ChunkRadial) else radial[:, : lmax + 1]


def stream_nodes(
    node_work: Callable[..., torch.Tensor],
    *tensors: torch.Tensor,
    chunks: tuple[EdgeChunk, ...] | None,
) -> torch.Tensor:
    """``node_work`` of per-atom ``tensors (N, ...)``, over the atoms of each chunk in turn
    (checkpointed as in :func:`stream_edges`), or at once when ``chunks`` is ``None``. For work
    that treats every atom on its own (FFNs, grid products, norms)."""
    if chunks is None:
        return node_work(*tensors)
    outputs = []
    for chunk in chunks:
        rows = tuple(t[chunk.node_start : chunk.node_stop] for t in tensors)
        outputs.append(_recomputed(node_work, *rows))
    return torch.cat(outputs)


def _recomputed(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``; when a gradient will be taken, its intermediates are dropped and recomputed
    in the backward pass (non-reentrant checkpointing; evaluation draws no random numbers)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _run_chunk(
    edge_work: EdgeWork, chunk: EdgeChunk, counts: tuple[int, int, int], *tensors
) -> torch.Tensor:
    n_src, n_ctr, n_edge = counts
    sources = tensors[:n_src]
    centres = tensors[n_src : n_src + n_ctr]
    per_edge = tensors[n_src + n_ctr : n_src + n_ctr + n_edge]
    edges = _chunk_cache(chunk, *tensors[n_src + n_ctr + n_edge :])
    return edge_work(sources, centres, edges, *per_edge)


def _chunk_rows(edges: EdgeCache, chunk: EdgeChunk) -> tuple:
    """The per-edge rows (:data:`~sezm.nn.edge_cache.PER_EDGE`) of one chunk and its atoms'
    ``inv_sqrt_deg`` (views), in :func:`_chunk_cache` order."""
    rows = (getattr(edges, name) for name in PER_EDGE)
    per_edge = tuple(None if t is None else t[chunk.edge_start : chunk.edge_stop] for t in rows)
    return (*per_edge, edges.inv_sqrt_deg[chunk.node_start : chunk.node_stop])


def _chunk_cache(chunk: EdgeChunk, *tensors: torch.Tensor | None) -> EdgeCache:
    """The :class:`EdgeCache` of one chunk from :func:`_chunk_rows`: destinations renumbered
    from ``node_start``, so that sums over the chunk's edges land on its own atoms."""
    *rows, inv_sqrt_deg = tensors
    fields = dict(zip(PER_EDGE, rows, strict=True))
    fields["dst"] = fields["dst"] - chunk.node_start
    n_nodes = chunk.node_stop - chunk.node_start
    return EdgeCache(**fields, n_nodes=n_nodes, inv_sqrt_deg=inv_sqrt_deg)
