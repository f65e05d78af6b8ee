"""Streamed message passing: a block's edge work done chunk by chunk.

The edges of a chunk are exactly the edges into a run of atoms (:func:`edge_cache.plan_chunks`),
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

from .edge_cache import EdgeCache, EdgeChunk, chunk_cache

log = logging.getLogger(__name__)

MIN_CHUNK_EDGES = 1024  # below this, per-chunk overheads (launches, recompute set-up) dominate
MAX_CHUNK_EDGES = 1 << 16
CHUNK_BUDGET_BYTES = 256 << 20  # working set of one chunk's edge work, at most
MEMORY_FRACTION = 64  # ... and at most this fraction of the device's memory


@dataclass
class StreamPolicy:
    """How an evaluator chooses the edges per chunk of the block edge work for each system.

    ``fixed``: always stream with chunks of at most this many edges (0: never stream);
    ``None``: automatic, a chunk whose working set (``bytes_per_edge`` per edge, estimated
    from the model's widths) fits :func:`chunk_budget`; systems with no more edges than one
    chunk take the plain path, which needs no recomputation.
    """

    bytes_per_edge: int
    fixed: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _reported: set = field(default_factory=set, repr=False)

    def chunk_for(self, n_edges: int) -> int | None:
        """Edges per chunk for a pass over ``n_edges`` edges, or ``None`` for the plain path."""
        if self.fixed is not None:
            chunk = self.fixed or None
        else:
            size = chunk_budget(self.device) // max(1, self.bytes_per_edge)
            size = min(MAX_CHUNK_EDGES, max(MIN_CHUNK_EDGES, size))
            chunk = size if n_edges > size else None
        self._report(n_edges, chunk)
        return chunk

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


def chunk_budget(device: torch.device) -> int:
    """Bytes one chunk's edge work may use on ``device``."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(CHUNK_BUDGET_BYTES, total // MEMORY_FRACTION)

NodeTables = tuple[torch.Tensor | None, ...]
EdgeWork = Callable[[NodeTables, NodeTables, EdgeCache, torch.Tensor], torch.Tensor]
"""``(source tables (N, ...), centre tables (n, ...), edges into the n centres, radial (E_n, ...))``
-> aggregated messages ``(n, D, C')``. Source tables are indexed by ``edges.src``, centre
tables (the rows of the chunk's atoms) by ``edges.dst``."""


def stream_edges(
    edge_work: EdgeWork,
    sources: NodeTables,
    centres: NodeTables,
    edges: EdgeCache,
    radial: torch.Tensor,
) -> torch.Tensor:
    """``edge_work`` over every chunk of ``edges.chunks``, stacked to ``(N, D, C')``."""
    outputs = []
    for chunk in edges.chunks:
        rows = slice(chunk.node_start, chunk.node_stop)
        args = (
            edge_work,
            chunk,
            len(sources),
            len(centres),
            *sources,
            *(None if t is None else t[rows] for t in centres),
            radial[chunk.edge_start : chunk.edge_stop],
            *edges.chunk_tensors(chunk),
        )
        if torch.is_grad_enabled():
            out = checkpoint(_run_chunk, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out = _run_chunk(*args)
        outputs.append(out)
    return torch.cat(outputs)


def _run_chunk(
    edge_work: EdgeWork, chunk: EdgeChunk, n_sources: int, n_centres: int, *tensors
) -> torch.Tensor:
    sources = tensors[:n_sources]
    centres = tensors[n_sources : n_sources + n_centres]
    radial, *edge_tensors = tensors[n_sources + n_centres :]
    return edge_work(sources, centres, chunk_cache(chunk, *edge_tensors), radial)
