"""Multi-process training under ``torchrun``: the process group, per-rank seeds, DDP, ZeRO.

``torchrun --nproc_per_node=N -m sezm train input.json`` starts N processes whose environment
names their rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); :func:`init_from_env` joins them in
one process group (``nccl`` for CUDA tensors, ``gloo`` for CPU ones). Every rank draws its own
batches (data seeded by :func:`rank_seed`), :func:`wrap_ddp` averages the gradients over the
ranks after each backward, and rank 0 alone writes logs and checkpoints.

``training.zero_stage`` follows DeePMD-kit's ZeRO stages: 0 plain DDP; 1 DDP with the optimizer
state sharded over the ranks (:func:`shard_optimizer`, ``ZeroRedundancyOptimizer``); 2 and 3
(FSDP2: gradients and parameters sharded too) are not available in sezm and raise. A
single-process run ignores the stage, as DeePMD-kit does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from .muon import HybridMuon

log = logging.getLogger("sezm.train")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> Distributed:
        """The initialised process group, or a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local)

    def device(self, requested: str | None = None) -> torch.device:
        """``requested``, else this rank's GPU (``cuda:<local_rank>``) or the CPU."""
        if requested:
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_from_env(environ: Mapping[str, str] | None = None) -> Distributed:
    """Join the process group that ``torchrun`` describes in ``environ`` (a no-op without
    ``LOCAL_RANK``, or when a group exists already)."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" not in env or not dist.is_available() or dist.is_initialized():
        return Distributed.current()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
        dist.init_process_group(backend="cuda:nccl,cpu:gloo")
    else:
        dist.init_process_group(backend="gloo")
    ctx = Distributed.current()
    log.info("process group: rank %d of %d (%s)", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def close() -> None:
    """End the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int | None, rank: int) -> int | None:
    """The data seed of ``rank``: ``seed`` itself on rank 0 (a one-process run is rank 0),
    an independent stream derived from ``(seed, rank)`` elsewhere."""
    if seed is None or rank == 0:
        return seed
    return int(np.random.SeedSequence([int(seed), rank]).generate_state(1)[0])


def zero_stage(training: Mapping[str, Any], ctx: Distributed) -> int:
    """The ZeRO stage in force: ``training.zero_stage`` in a multi-process run, else 0."""
    stage = int(training.get("zero_stage", 0))
    if not 0 <= stage <= 3:
        raise ValueError(f"training.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if not ctx.enabled:
        if stage:
            log.info("training.zero_stage = %d has no effect in a single process", stage)
        return 0
    if stage >= 2:
        raise NotImplementedError(
            f"training.zero_stage = {stage} (FSDP2: sharded gradients"
            f"{' and parameters' if stage == 3 else ''}) is not available in sezm; use 0 (DDP) "
            "or 1 (DDP with the optimizer state sharded over the ranks)"
        )
    if training.get("change_bias_after_training"):
        raise ValueError("training.zero_stage does not support change_bias_after_training")
    return stage


def any_rank(ctx: Distributed, flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the processes of a multi-process run (one small all-reduce)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def describe(ctx: Distributed, stage: int) -> str:
    """How the run is parallelised, for the log (``stage``: the ZeRO stage, 0 or 1)."""
    if not ctx.enabled:
        return "single process"
    kind = "DDP" if stage == 0 else "DDP + ZeRO stage 1 (optimizer state sharded)"
    return f"{ctx.world_size} processes, {kind}"


def wrap_ddp(module: nn.Module, ctx: Distributed) -> nn.Module:
    """``module`` under DistributedDataParallel (gradients averaged over the ranks); ranks start
    from rank 0's parameters and buffers. Branches or modules a step leaves unused are allowed
    (``find_unused_parameters``), as multi-task steps train one branch."""
    if not ctx.enabled:
        return module
    cuda = next(module.parameters()).is_cuda
    return DistributedDataParallel(
        module,
        device_ids=[ctx.local_rank] if cuda else None,
        output_device=ctx.local_rank if cuda else None,
        find_unused_parameters=True,
    )


def shard_optimizer(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]
) -> ZeroRedundancyOptimizer:
    """``optimizer`` rebuilt as a ZeroRedundancyOptimizer: each rank keeps the state of its
    share of the parameters and broadcasts their updates."""
    cls, names = type(optimizer), {id(p): n for n, p in named}

    def local(groups: list[dict], **defaults: Any) -> torch.optim.Optimizer:
        if cls is HybridMuon:  # routes parameters by name
            params = [p for g in groups for p in g["params"]]
            return HybridMuon([(names[id(p)], p) for p in params], **defaults)
        return cls(groups, **defaults)

    return ZeroRedundancyOptimizer(
        [p for _, p in named], optimizer_class=local, **optimizer.defaults
    )


def optimizer_state(optimizer: torch.optim.Optimizer, ctx: Distributed) -> dict | None:
    """The full optimizer state on rank 0 (``None`` elsewhere); collective under ZeRO."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if ctx.is_main else None
