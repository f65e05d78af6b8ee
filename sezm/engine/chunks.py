"""Chunk plans of streamed evaluation: edges sorted by destination, cut into runs of whole atoms.

A chunk holds every edge into a run of atoms, so every per-destination reduction (envelope sums,
attention softmax, output gates) is complete inside it (:mod:`sezm.engine.stream` runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EdgeChunk:
    """Edges ``[edge_start, edge_stop)`` are exactly the edges into atoms ``[node_start, node_stop)``."""

    node_start: int
    node_stop: int
    edge_start: int
    edge_stop: int


def merge_chunks(chunks: tuple[EdgeChunk, ...], max_atoms: int) -> tuple[EdgeChunk, ...]:
    """Consecutive chunks joined into runs of at most ``max_atoms`` atoms (a chunk that is
    larger on its own stays whole): fewer, larger batches for per-atom work."""
    merged = [chunks[0]]
    for chunk in chunks[1:]:
        last = merged[-1]
        if chunk.node_stop - last.node_start <= max_atoms:
            merged[-1] = EdgeChunk(
                last.node_start, chunk.node_stop, last.edge_start, chunk.edge_stop
            )
        else:
            merged.append(chunk)
    return tuple(merged)


def sorted_by_destination(
    src: torch.Tensor, dst: torch.Tensor, vec: torch.Tensor, mask: torch.Tensor | None
) -> tuple:
    """``(src, dst, vec, mask)`` reordered so that ``dst`` is non-decreasing (stable), unchanged
    when it already is. The reorder is differentiable: gradients reach ``vec`` in its own order."""
    if dst.numel() < 2 or bool((dst[1:] >= dst[:-1]).all()):
        return src, dst, vec, mask
    order = torch.sort(dst, stable=True).indices
    return src[order], dst[order], vec[order], None if mask is None else mask[order]


def plan_chunks(dst: torch.Tensor, n_nodes: int, max_edges: int) -> tuple[EdgeChunk, ...]:
    """Split edges sorted by destination into runs of whole atoms with at most ``max_edges``
    edges each (an atom with more edges than that gets a chunk of its own)."""
    counts = torch.bincount(dst, minlength=n_nodes).tolist()
    chunks, node_start, edge_start, size = [], 0, 0, 0
    for atom, count in enumerate(counts):
        if size and size + count > max_edges:
            chunks.append(EdgeChunk(node_start, atom, edge_start, edge_start + size))
            node_start, edge_start, size = atom, edge_start + size, 0
        size += count
    chunks.append(EdgeChunk(node_start, n_nodes, edge_start, edge_start + size))
    return tuple(chunks)
