"""Everything a run needs, built from the normalised input: data, models, optimizer.

The order is DeePMD-kit's and fixes the numbers: seed; open each branch's data; resolve
``sel``; build the models; weights (``--restart`` / ``--init-model`` / ``--finetune``) or data
statistics; shared modules and LoRA adapters; precision and compiled paths; learning rate,
losses, branch draw, optimizer, EMA; checkpoint stores.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compat.deepmd import Checkpoint, read_model_params
from ..config import check_trainable
from ..config.normalize import complete_model
from ..model.build import build_model
from ..runtime import tune_allocator
from .branches import Layout, layout_of
from .checkpoint import CheckpointStore, keep_counts
from .compile import CompiledEnergyGradient, TrainingForward, supports_compile
from .distributed import Distributed, describe, rank_seed, shard_optimizer, wrap_ddp, zero_stage
from .ema import EMA, Models
from .finetune import FinetuneRule, finetune_rules
from .lr import LearningRate
from .multitask import BranchDraw, model_prob
from .optim import build_optimizer
from .precision import Precision, evaluation_settings
from .resume import Resume, apply_lora_adapters, load_pretrained, load_weights
from .tasks import Task, open_tasks, resolve_sel, run_length, set_statistics, task_loss

log = logging.getLogger("sezm.train")


@dataclass
class TrainingSetup:
    """The parts of a run; the step loop and the checkpoints read them from here."""

    config: dict  # normalised input (fine-tuning rules applied)
    layout: Layout
    resume: Resume
    dist: Distributed
    device: torch.device
    seed: int | None  # ``training.seed``; ``None``: not seeded
    tasks: dict[str, Task]
    numb_steps: int
    model: nn.Module  # the trained module: one branch's model, or a ``ModuleDict``
    ema_models: Models  # the same parameters as the EMA names them
    lora: bool
    forward: TrainingForward
    ddp_forward: nn.Module  # ``forward`` under DDP in a multi-process run
    lr: LearningRate
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    draw: BranchDraw
    store: CheckpointStore
    ema_store: CheckpointStore
    zero_stage: int
    restart_from: dict[str, Checkpoint] = field(default_factory=dict)  # per branch
    train_infos: dict[str, Any] = field(default_factory=dict)  # full-validation records
    start_step: int = 0

    @property
    def model_params(self) -> dict:
        """The model section saved in checkpoints (statistics and ``sel`` filled in)."""
        params = {name: task.params for name, task in self.tasks.items()}
        return self.layout.model_params(self.config, params)


def build_setup(
    config: dict, resume: Resume, device: str | None, shared_links: dict | None
) -> TrainingSetup:
    """The parts of a run of the normalised input ``config``."""
    check_trainable(config)  # keys without a DeePMD-kit default, named (not a KeyError)
    dist = Distributed.current()
    config, rules = _prepare_config(config, resume)
    tr = config["training"]
    device = dist.device(device)
    tune_allocator(device)  # edge-sized temporaries reuse memory instead of fragmenting the heap
    seed = tr.get("seed")  # absent: the run is not seeded
    _seed_everything(seed)
    layout = layout_of(config)
    stage = zero_stage(tr, dist)
    tasks = open_tasks(layout, config, seed, dist.rank)
    numb_steps = run_length(tr, tasks)
    restart_from = _build_models(tasks, layout, resume, rules, device, seed)
    models = {name: task.model for name, task in tasks.items()}
    layout.share(models, shared_links)
    lora = apply_lora_adapters(tasks, seed)
    model = layout.module(models)
    forward = _build_forward(config, tasks, device)
    ddp_forward = wrap_ddp(forward, dist)
    ema_models = layout.ema_models(models)
    return TrainingSetup(
        config=config,
        layout=layout,
        resume=resume,
        dist=dist,
        device=device,
        seed=seed,
        tasks=tasks,
        numb_steps=numb_steps,
        model=model,
        ema_models=ema_models,
        lora=lora,
        forward=forward,
        ddp_forward=ddp_forward,
        zero_stage=stage,
        restart_from=restart_from,
        **_optimization(
            config, tasks, model, ema_models, numb_steps, rank_seed(seed, dist.rank), stage
        ),
    )


def _optimization(
    config: dict,
    tasks: dict[str, Task],
    model: nn.Module,
    ema_models: Models,
    numb_steps: int,
    draw_seed: int | None,
    stage: int,
) -> dict[str, Any]:
    """Learning rate, losses, branch draw (seeded with ``draw_seed``), optimizer, EMA and
    checkpoint stores."""
    tr = config["training"]
    lr = LearningRate(config["learning_rate"], numb_steps)
    for task in tasks.values():
        task.loss = task_loss(task, float(config["learning_rate"]["start_lr"]))
    draw = _branch_draw(tr, tasks, draw_seed)
    optimizer = build_optimizer(config["optimizer"], model, lr.value(0))
    if stage == 1:
        optimizer = shard_optimizer(optimizer, list(model.named_parameters()))
    keep, ema_keep = keep_counts(tr, numb_steps)
    return {
        "lr": lr,
        "optimizer": optimizer,
        "ema": EMA(ema_models, tr["ema_decay"]) if tr["enable_ema"] else None,
        "draw": draw,
        "store": CheckpointStore(tr["save_ckpt"], tr["save_dir"], keep),
        "ema_store": CheckpointStore(tr["save_ckpt"] + "_ema", tr["save_dir"], ema_keep, None),
    }


def _seed_everything(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_config(config: dict, resume: Resume) -> tuple[dict, dict[str, FinetuneRule]]:
    """Apply the fine-tuning rules (or ``--use-pretrain-script`` with ``--init-model``)."""
    if resume.finetune:
        model, rules = finetune_rules(
            config["model"], read_model_params(resume.finetune), resume.model_branch,
            resume.use_pretrain_script,
        )  # fmt: skip
        return {**config, "model": model}, rules
    if resume.init_model and resume.use_pretrain_script:
        return {**config, "model": complete_model(read_model_params(resume.init_model))}, {}
    return config, {}


def _build_models(
    tasks: dict[str, Task],
    layout: Layout,
    resume: Resume,
    rules: dict[str, FinetuneRule],
    device: torch.device,
    seed: int | None,
) -> dict[str, Checkpoint]:
    """Each branch's model with its weights, or fresh ones with data statistics; the
    checkpoints read for a restart or ``--init-model``."""
    statistics = not resume.skip_neighbor_stat
    for task in tasks.values():
        resolve_sel(task, statistics, from_weights=resume.checkpoint is not None)
        dens = task.loss_params["type"] == "dens"
        task.model = build_model(task.params, dens=dens).to(device)
    if resume.fresh:
        layout.set_cases(tasks)
    restart_from = {}
    if resume.finetune:
        load_pretrained(tasks, resume.finetune, rules, seed)
    elif resume.checkpoint:
        restart_from = load_weights(tasks, layout, resume, device, seed)
    for task in tasks.values():
        if resume.fresh:
            set_statistics(task)
        if task.min_nbor_dist is not None:
            task.model.min_nbor_dist.fill_(task.min_nbor_dist)
    return restart_from


def _build_forward(config: dict, tasks: dict[str, Task], device: torch.device) -> TrainingForward:
    """Precision switches per branch, the compiled paths, and the forward module that
    training steps call."""
    evaluation = evaluation_settings(config["validating"])
    compiled, compiled_eval = {}, {}
    for name, task in tasks.items():
        fast = supports_compile(task.model)
        task.precision = Precision.resolve(task.params, device, evaluation, fast)
        task.model.descriptor.amp_eval = task.precision.eval_amp
        evaluation.attach_streaming(task.model, device)  # validation forwards
        if task.precision.compile:
            compiled[name] = CompiledEnergyGradient(task.model)
        if evaluation.compile and fast:
            compiled_eval[name] = CompiledEnergyGradient(task.model)
    return TrainingForward({n: t.model for n, t in tasks.items()}, compiled, compiled_eval)


def _branch_draw(training: dict, tasks: dict[str, Task], seed: int | None) -> BranchDraw:
    """The per-step branch draw with ``training.model_prob``."""
    names = list(tasks)
    n_systems = {name: len(task.train_data) for name, task in tasks.items()}
    prob = model_prob(training, names, n_systems)
    if len(names) > 1:
        log.info("branch probabilities: %s", {n: round(float(p), 4) for n, p in zip(names, prob)})
    return BranchDraw(names, prob, seed)


def log_settings(setup: TrainingSetup) -> None:
    """Device, processes, precision and size of the run."""
    first = next(iter(setup.tasks.values())).model
    desc = first.descriptor.opts
    log.info(
        "device: %s, threads: %d, %s",
        setup.device,
        torch.get_num_threads(),
        describe(setup.dist, setup.zero_stage),
    )
    log.info("precision: descriptor %s, fitting %s", desc.basics.precision, first.fitting_net.dtype)
    for task in setup.tasks.values():
        for line in task.precision.describe(task.params):
            log.info("%s%s", f"{task.label}: " if task.label else "", line)
    n_params = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    log.info("model: %d trainable parameters", n_params)


def resolved_config(setup: TrainingSetup) -> dict:
    """The normalized input with each branch's ``descriptor/sel`` as this run resolved it
    (``"auto"`` sized from the data): what ``dp --pt train`` writes to ``out.json``."""
    config = copy.deepcopy(setup.config)
    for name, branch in setup.layout.sections(config["model"]).items():
        branch["descriptor"]["sel"] = setup.tasks[name].params["descriptor"]["sel"]
    return config
