"""``sezm train``: the DeePMD-kit training workflow for DPA4 models.

One step: draw a branch (multi-task only, by ``model_prob``), draw a batch of it, predict
(energy models: forces from the edge gradient, kept in the graph for the force loss), loss,
backward, clip, optimizer step, EMA. Every ``disp_freq`` steps: validation, ``lcurve.out``,
progress lines with the ETA. Every ``save_freq`` steps and at the end: a checkpoint in
DeePMD-kit's layout (``checkpoint.py``); a LoRA run also writes ``<save_ckpt>_merged.pt``,
the adapters folded into a plain DPA4 checkpoint.

A run starts fresh (data statistics), from weights (``--init-model``), exactly where a
checkpoint stopped (``--restart``) or from a pretrained model (``--finetune``,
``finetune.py``). Multi-task runs (``model.model_dict``) train one model per branch with the
shared modules of ``multitask.py``.

Around the loop: full validation and best checkpoints (``validation.py``), TensorBoard and the
profiler (``monitor.py``), precision and compile switches (``precision.py``, ``compile.py``),
``torchrun`` processes (``distributed.py``), and after the last step
``change_bias_after_training`` (the fine-tuning bias change on the training data).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compat.deepmd import (
    CheckpointError,
    load_checkpoint,
    load_into,
    read_model_params,
    to_deepmd_state,
)
from ..config import check_trainable
from ..data import DataError, DataSystem, StatFile, fields_for_model, model_stats, update_sel
from ..data.dataset import Batch
from ..model.build import build_model
from ..model.dens import DensModel, force_rmsd
from ..model.graph import Graph, build_graph
from ..model.property_model import PropertyModel
from ..nn.lora import apply_lora, has_lora, merged_state_dict, strip_lora
from ..runtime import tune_allocator
from .checkpoint import CheckpointStore, atomic_save, keep_counts, model_differences, model_state
from .compile import CompiledEnergyGradient, TrainingForward, supports_compile
from .distributed import (
    Distributed,
    describe,
    optimizer_state,
    rank_seed,
    shard_optimizer,
    wrap_ddp,
    zero_stage,
)
from .ema import EMA
from .faults import (
    StopSignals,
    TrainingError,
    TrainingStopped,
    is_out_of_memory,
    non_finite_message,
    out_of_memory_message,
)
from .finetune import FinetuneRule, change_out_bias, finetune_rules, transfer_weights
from .losses import DensBatch, DensLoss, build_loss
from .lr import LearningRate
from .monitor import Monitor
from .multitask import MultiTaskCurve, case_indices, model_prob, multitask_state, share_params
from .optim import build_optimizer, clip_grad_norm, set_lr
from .precision import Precision, evaluation_settings
from .progress import LearningCurve, StepTimer, format_metrics, repair_curve
from .validation import FullValidator, evaluate_energy, full_validators

log = logging.getLogger("sezm.train")


@dataclass
class Resume:
    """How a run starts: fresh, from weights (``init``), exactly resumed, or fine-tuned."""

    init_model: str | None = None
    restart: str | None = None
    finetune: str | None = None
    skip_neighbor_stat: bool = False
    model_branch: str = ""
    use_pretrain_script: bool = False


@dataclass
class Task:
    """One model branch (``Default`` in single-task training) with its data and loss."""

    name: str
    params: dict  # normalised model section of the branch
    data_params: dict  # ``training`` (single-task) or ``training.data_dict[name]``
    train_data: DataSystem
    valid_data: DataSystem | None
    model: nn.Module | None = None
    loss: Any = None
    min_nbor_dist: float | None = None
    precision: Precision | None = None


def _seed_everything(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean_metrics(batches: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Atom-weighted mean of per-batch metrics (DeePMD-kit's validation average)."""
    total = sum(n for _, n in batches)
    keys = batches[0][0].keys() if batches else []
    return {k: sum(float(m[k]) * n for m, n in batches) / total for k in keys}


class Trainer:
    def __init__(
        self,
        config: dict,
        resume: Resume | None = None,
        device: str | None = None,
        shared_links: dict[str, list[dict]] | None = None,
    ) -> None:
        check_trainable(config)  # keys without a DeePMD-kit default, named (not a KeyError)
        tune_allocator()  # edge-sized temporaries reuse heap blocks instead of fresh pages
        self.resume = resume or Resume()
        self.finetune_rules: dict[str, FinetuneRule] = {}
        self.dist = Distributed.current()
        self.config = config = self._prepare_config(config)
        tr = config["training"]
        self.device = self.dist.device(device)
        self.seed = tr.get("seed")
        _seed_everything(self.seed)
        self.multi_task = "model_dict" in config["model"]
        self.zero_stage = zero_stage(tr, self.dist)
        self.train_infos: dict[str, Any] = {}  # extra train_infos (full-validation records)
        self._unlabelled: dict[str, frozenset[str]] = {}  # per branch, see _shown
        self.tasks = self._make_tasks()
        self.numb_steps = self._run_length(tr)
        self._build_models(shared_links)
        self._build_forward()
        self._build_optimization()
        if self.resume.restart:
            self._restore_run_state()
            self._check_steps_left()
        self.validators = self._build_validators()
        self.monitor = Monitor(tr, active=self.dist.is_main)
        self._log_settings()

    def _build_models(self, shared_links: dict[str, list[dict]] | None) -> None:
        """Models with their weights (or fresh statistics), shared modules and LoRA adapters."""
        for task in self.tasks.values():
            self._resolve_sel(task)
            dens = self._loss_config(task.name).get("type") == "dens"
            task.model = build_model(task.params, dens=dens).to(self.device)
        models = {n: t.model for n, t in self.tasks.items()}
        self.model = nn.ModuleDict(models) if self.multi_task else models["Default"]
        self._ema_models = models if self.multi_task else self.model
        fresh = not any((self.resume.init_model, self.resume.restart, self.resume.finetune))
        if self.multi_task and fresh:
            for name, index in case_indices(self.config["model"]["model_dict"]).items():
                models[name].fitting_net.set_case(index)
        self.start_step = 0
        restored = self._load_weights()
        for task in self.tasks.values():
            if not restored:
                self._set_statistics(task)
            if task.min_nbor_dist is not None:  # from this run's neighbour statistics
                task.model.min_nbor_dist.fill_(task.min_nbor_dist)
        if self.multi_task:
            if shared_links is None:
                log.warning("no shared_links given: the branches share no parameters")
            share_params(models, shared_links or {})
        self.lora = self._apply_lora()

    def _build_forward(self) -> None:
        """Precision switches per branch, the compiled paths, and the forward module (under
        DDP in a multi-process run) that training steps call."""
        evaluation = evaluation_settings(self.config.get("validating") or {})
        compiled, compiled_eval = {}, {}
        for name, task in self.tasks.items():
            fast = supports_compile(task.model)
            task.precision = Precision.resolve(task.params, self.device, evaluation, fast)
            task.model.descriptor.amp_eval = task.precision.eval_amp
            evaluation.attach_streaming(task.model, self.device)  # validation forwards
            if task.precision.compile:
                compiled[name] = CompiledEnergyGradient(task.model)
            if evaluation.compile and fast:
                compiled_eval[name] = CompiledEnergyGradient(task.model)
        models = {n: t.model for n, t in self.tasks.items()}
        self.forward = TrainingForward(models, compiled, compiled_eval)
        self.ddp_forward = wrap_ddp(self.forward, self.dist)

    def _build_optimization(self) -> None:
        """Learning rate, losses, branch sampling, optimizer, EMA and checkpoint stores."""
        config, tr = self.config, self.config["training"]
        self.lr = LearningRate(config["learning_rate"], self.numb_steps)
        for task in self.tasks.values():
            task.loss = self._build_loss(task)
        self._setup_sampling()
        self.optimizer = build_optimizer(
            config.get("optimizer", {"type": "Adam"}), self.model, self.lr.value(0)
        )
        if self.zero_stage == 1:
            self.optimizer = shard_optimizer(self.optimizer, list(self.model.named_parameters()))
        self.ema = EMA(self._ema_models, tr["ema_decay"]) if tr.get("enable_ema") else None
        save_ckpt = tr.get("save_ckpt", "model.ckpt")
        keep, ema_keep = keep_counts(tr, self.numb_steps)
        self.store = CheckpointStore(save_ckpt, tr.get("save_dir"), keep)
        self.ema_store = CheckpointStore(save_ckpt + "_ema", tr.get("save_dir"), ema_keep, None)

    def _build_validators(self) -> list[tuple[FullValidator, bool]]:
        """The full-validation flows in force: ``(validator, on EMA weights)``."""
        validating = self.config.get("validating") or {}
        task = None if self.multi_task else self.tasks["Default"]
        flows = full_validators(
            validating,
            num_steps=self.numb_steps,
            save_ckpt=self.config["training"].get("save_ckpt", "model.ckpt"),
            resumed_at=self.start_step if self.resume.restart else None,
            is_main=self.dist.is_main,
            train_infos=self.train_infos,
            ema_state=None if self.ema is None else self.ema.validation_state,
        )
        plain = task is not None and not isinstance(task.model, (PropertyModel, DensModel))
        if flows and not (plain and task.valid_data):
            raise ValueError(
                "validating.full_validation needs single-task energy training with "
                "training.validation_data"
            )
        return flows

    # --- setup ------------------------------------------------------------------------------
    @property
    def model_params(self) -> dict:
        """The model section saved in checkpoints (statistics and ``sel`` filled in)."""
        if not self.multi_task:
            return self.tasks["Default"].params
        branches = {n: t.params for n, t in self.tasks.items()}
        return {**self.config["model"], "model_dict": branches}

    def _prepare_config(self, config: dict) -> dict:
        """Apply the fine-tuning rules (or ``--use-pretrain-script`` with ``--init-model``)."""
        r = self.resume
        if r.finetune:
            model, self.finetune_rules = finetune_rules(
                config["model"], read_model_params(r.finetune), r.model_branch,
                r.use_pretrain_script,
            )  # fmt: skip
            return {**config, "model": model}
        if r.init_model and r.use_pretrain_script:
            return {**config, "model": read_model_params(r.init_model)}
        return config

    @property
    def resolved_config(self) -> dict:
        """The normalized input with each branch's ``descriptor/sel`` as this run resolved it
        (``"auto"`` sized from the data): what ``dp --pt train`` writes to ``out.json``."""
        config = copy.deepcopy(self.config)
        model = config["model"]
        branches = model["model_dict"] if self.multi_task else {"Default": model}
        for name, branch in branches.items():
            branch["descriptor"]["sel"] = self.tasks[name].params["descriptor"]["sel"]
        return config

    def _run_length(self, tr: dict) -> int:
        """``numb_steps``, or (single-task) ``numb_epoch`` passes over the training data:
        ``ceil(numb_epoch * max_i(n_batches_i / p_i))`` over the systems drawn with ``p_i > 0``,
        DeePMD-kit's epoch length."""
        if tr.get("numb_steps") is not None:
            return int(tr["numb_steps"])
        if self.multi_task:  # single-task inputs have one of the two (config rules)
            raise ValueError(
                "training/num_epoch_dict is not supported by sezm; give training/numb_steps"
            )
        data = self.tasks["Default"].train_data
        probs, nbatches = np.asarray(data.probs), np.asarray(data.nbatches, dtype=np.float64)
        drawn = probs > 0
        epoch = int(np.ceil(np.max(nbatches[drawn] / probs[drawn])))
        steps = int(np.ceil(float(tr["numb_epoch"]) * epoch))
        log.info(
            "training/numb_steps = %d: numb_epoch %s x %d batches per epoch",
            steps,
            tr["numb_epoch"],
            epoch,
        )
        return steps

    def _make_tasks(self) -> dict[str, Task]:
        cfg, tr = self.config, self.config["training"]
        if self.multi_task:
            specs = [(n, p, tr["data_dict"][n]) for n, p in cfg["model"]["model_dict"].items()]
        else:
            specs = [("Default", cfg["model"], tr)]
        tasks = {}
        for i, (name, params, data) in enumerate(specs):
            params = dict(params)
            seed = rank_seed(None if self.seed is None else self.seed + 2 * i, self.dist.rank)
            fields = fields_for_model(params)
            where = f"training/data_dict/{name}" if self.multi_task else "training"
            train = _open_data(data, "training_data", where, params["type_map"], fields, seed)
            valid = None
            if data.get("validation_data"):
                valid_seed = None if seed is None else seed + 1
                valid = _open_data(
                    data, "validation_data", where, params["type_map"], fields, valid_seed
                )
            suffix = f" of {name}" if self.multi_task else ""
            log.info(train.summary("training data" + suffix))
            if valid is not None:
                log.info(valid.summary("validation data" + suffix))
            tasks[name] = Task(name, params, data, train, valid)
        return tasks

    def _resolve_sel(self, task: Task) -> None:
        desc = dict(task.params["descriptor"])
        sel = desc.get("sel", 256)
        needs_stat = isinstance(sel, str) and sel.startswith("auto")
        if self.resume.skip_neighbor_stat or any((self.resume.init_model, self.resume.restart)):
            if needs_stat and not (self.resume.init_model or self.resume.restart):
                raise ValueError(
                    'descriptor.sel "auto" needs the neighbour statistics; drop --skip-neighbor-stat'
                )
            return
        new_sel, min_dist = update_sel(
            task.train_data.systems, float(desc["rcut"]), sel, len(task.params["type_map"])
        )
        desc["sel"] = new_sel
        task.params["descriptor"] = desc
        task.min_nbor_dist = min_dist
        log.info("neighbour statistics: sel = %s, min_nbor_dist = %.4f A", new_sel, min_dist)

    def _load_weights(self) -> bool:
        """Weights of ``--restart``/``--init-model``/``--finetune``; False for a fresh run."""
        r = self.resume
        if r.finetune:
            self._finetune(r.finetune)
            return True
        path = r.restart or r.init_model
        if path is None:
            return False
        self._ckpts = {}
        for task in self.tasks.values():
            ckpt = load_checkpoint(path, task.name if self.multi_task else None)
            if r.restart and any(".A_" in k for k in ckpt.state):
                self._apply_lora()  # resume the adapters themselves, not their folded sum
            try:
                load_into(task.model, {k: v.to(self.device) for k, v in ckpt.state.items()}, path)
            except CheckpointError as err:
                raise self._other_model(path, ckpt, task) or err from None
            self._ckpts[task.name] = ckpt
        log.info("weights from %s (step %s)", path, ckpt.train_infos.get("step"))
        return True

    def _other_model(self, path: str, ckpt, task: Task) -> CheckpointError | None:
        """The error of a ``--restart``/``--init-model`` checkpoint of another model than the
        input describes, in the input's terms (``None`` if the settings agree)."""
        differences = model_differences(ckpt.model_params, task.params)
        if not differences:
            return None
        option = "--restart" if self.resume.restart else "--init-model"
        shown = "\n  ".join(differences[:12])
        more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
        return CheckpointError(
            f"{option} {path}: the checkpoint holds another model than the input describes:\n"
            f"  {shown}{more}\n"
            "Train with the input the checkpoint was made with, or start a new model from its "
            "weights with --finetune (or --init-model with --use-pretrain-script)"
        )

    def _finetune(self, path: str) -> None:
        for task in self.tasks.values():
            rule = self.finetune_rules[task.name]
            ckpt = load_checkpoint(path, rule.branch)
            transfer_weights(task.model, ckpt, rule)
            log.info(
                "%s: weights from %s branch %r (%s fitting)",
                task.name,
                path,
                ckpt.branch,
                "new" if rule.random_fitting else "pretrained",
            )
        for task in self.tasks.values():
            rule = self.finetune_rules[task.name]
            if rule.resuming:
                log.info("%s resumes its pretrained branch", task.name)
            elif rule.random_fitting:
                self._set_statistics(task, observed=False)  # set-by-statistic
            else:
                change_out_bias(task.model, task.train_data, task.params, self.seed)

    def _apply_lora(self) -> bool:
        """Inject the ``model.lora`` adapters (single-task) once; whether the run uses LoRA."""
        lora = None if self.multi_task else self.tasks["Default"].params.get("lora")
        if lora is None:
            return False
        if not has_lora(self.model):
            apply_lora(self.model, int(lora["rank"]), lora.get("alpha"), seed=self.seed)
            log.info("LoRA adapters: rank %s, alpha %s", lora["rank"], lora.get("alpha"))
        return True

    def _set_statistics(self, task: Task, observed: bool = True) -> None:
        stats = model_stats(
            task.train_data,
            getattr(task.model, "stat_params", task.params),  # deepspin: with virtual types
            task.data_params.get("stat_file"),
            task.data_params.get("stat_file_mode", "update"),
        )
        model = task.model
        stats.apply_to(model)
        if isinstance(model, DensModel):
            with torch.no_grad():
                model.dens_force_rmsd.fill_(self._dens_force_rmsd(task))
        if observed:
            info = dict(task.params.get("info", {}))
            info["observed_type"] = list(stats.observed_type)
            task.params["info"] = info
        log.info(
            "output bias per type%s: %s",
            f" of {task.name}" if self.multi_task else "",
            np.asarray(stats.out_bias).reshape(len(stats.out_bias[0]), -1).tolist(),
        )

    def _dens_force_rmsd(self, task: Task) -> float:
        """``dens_force_rmsd`` of the statistics frames; kept in the stat file as
        ``rmsd_dforce`` (DeePMD-kit's item)."""
        params, data = task.params, task.data_params
        cache = None
        if data.get("stat_file"):
            mode = data.get("stat_file_mode", "update")
            cache = StatFile(data["stat_file"], params["type_map"], mode)
        stored = None if cache is None else cache.get("rmsd_dforce")
        if stored is not None:
            return float(np.asarray(stored).reshape(-1)[0])
        samples = task.train_data.stat_frames(int(params.get("data_stat_nbatch", 10)), ["force"])
        value = force_rmsd(samples, params.get("atom_exclude_types", []))
        if cache is not None:
            cache.put({"rmsd_dforce": np.array([value])})
        log.info("dens force RMSD: %.6g eV/A", value)
        return value

    def _loss_config(self, name: str) -> dict:
        cfg = self.config["loss_dict"][name] if self.multi_task else self.config.get("loss")
        return cfg or {"type": "ener"}

    def _build_loss(self, task: Task):
        cfg = self._loss_config(task.name)
        start_lr = float(self.config["learning_rate"]["start_lr"])
        if isinstance(task.model, PropertyModel):
            fit = task.model.fitting_net
            return build_loss(
                cfg,
                start_lr,
                task_dim=fit.task_dim,
                var_name=fit.property_name,
                intensive=fit.intensive,
            )
        return build_loss(cfg, start_lr)

    def _setup_sampling(self) -> None:
        """Branch probabilities and the generator that draws a branch per step."""
        names = list(self.tasks)
        n_systems = {n: len(t.train_data) for n, t in self.tasks.items()}
        self.task_prob = (
            model_prob(self.config["training"], names, n_systems) if self.multi_task else np.ones(1)
        )
        self._task_rng = np.random.default_rng(rank_seed(self.seed, self.dist.rank))
        if self.multi_task:
            log.info(
                "branch probabilities: %s",
                {n: round(float(p), 4) for n, p in zip(names, self.task_prob)},
            )

    def _restore_run_state(self) -> None:
        ckpt = next(iter(self._ckpts.values()))
        extra = ckpt.extra
        if "optimizer" in extra:
            self.optimizer.load_state_dict(self._reindexed(extra["optimizer"]))
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])
        run = extra.get("sezm", {})
        self.start_step = int(run.get("next_step", int(ckpt.train_infos.get("step", -1)) + 1))
        self.train_infos = {k: v for k, v in ckpt.train_infos.items() if k not in ("lr", "step")}
        rng = self._rank_rng(run)
        if rng:
            torch.set_rng_state(rng["torch"])
            per_task = rng["tasks"] if self.multi_task else {"Default": rng}
            for name, task in self.tasks.items():
                task.train_data.set_rng_state(per_task[name]["train"])
                if task.valid_data is not None and "valid" in per_task[name]:
                    task.valid_data.set_rng_state(per_task[name]["valid"])
            if "draw" in rng:
                self._task_rng.bit_generator.state = rng["draw"]
        log.info("restarting at step %d", self.start_step)

    def _check_steps_left(self) -> None:
        """A restart at or past the end of the run has nothing to train: say so (instead of
        reporting success with no checkpoint written)."""
        if self.start_step < self.numb_steps:
            return
        raise TrainingError(
            f"--restart {self.resume.restart}: the checkpoint is at step {self.start_step} and "
            f"`training/numb_steps` is {self.numb_steps}: nothing left to train. Raise "
            f"`training/numb_steps` (or pass --numb-steps N with N > {self.start_step}) to "
            "train further"
        )

    def _rank_rng(self, run: dict) -> dict | None:
        """This rank's saved sampler state; a run on another number of processes restores
        rank 0's only (the other ranks keep their fresh, rank-seeded streams)."""
        per_rank = run.get("rng_ranks")
        if per_rank and len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        if self.dist.rank == 0:
            return run.get("rng")
        log.warning("rank %d: no sampler state of this rank in the checkpoint", self.dist.rank)
        return None

    def _reindexed(self, saved: dict) -> dict:
        """A saved optimizer state renumbered to this optimizer's parameter order.

        Optimizers number parameters in the module order of the program that wrote them, which
        the checkpoint's tensor order gives (DeePMD-kit registers some modules in another order
        than sezm); shared parameters count once, where they first appear.
        """
        named = dict(self.model.named_parameters(remove_duplicate=False))
        seen, order = set(), []
        for name, ckpt in self._ckpts.items():
            prefix = f"{name}." if self.multi_task else ""
            for key in ckpt.state:
                p = named.get(prefix + key)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    order.append(p)
        groups = self.optimizer.param_groups
        ours = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
        if len(order) != len(ours) or len(saved["param_groups"]) != len(groups):
            raise ValueError(
                "the checkpoint's optimizer state does not match the model's parameters"
            )
        new_index = [ours[id(p)] for p in order]
        start, new_groups = 0, []
        for mine, old in zip(groups, saved["param_groups"]):
            new_groups.append({**old, "params": list(range(start, start + len(mine["params"])))})
            start += len(mine["params"])
        state = {new_index[int(k)]: v for k, v in saved["state"].items()}
        return {"state": state, "param_groups": new_groups}

    def _log_settings(self) -> None:
        first = next(iter(self.tasks.values())).model
        desc = first.descriptor.opts
        log.info(
            "device: %s, threads: %d, %s",
            self.device,
            torch.get_num_threads(),
            describe(self.dist, self.zero_stage),
        )
        log.info(
            "precision: descriptor %s, fitting %s", desc.basics.precision, first.fitting_net.dtype
        )
        for name, task in self.tasks.items():
            for line in task.precision.describe(task.params):
                log.info("%s%s", f"{name}: " if self.multi_task else "", line)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model: %d trainable parameters", n_params)

    # --- running ----------------------------------------------------------------------------
    def _step_loss(self, task: Task, batch, lr: float, training: bool):
        """Loss and every loss metric (floats) of one batch; training forwards go through DDP
        under the training precision, evaluation ones under the inference settings."""
        if isinstance(task.loss, DensLoss):
            return self._dens_step_loss(task, batch, lr, training)
        graph, labels, find = batch
        model = task.model
        pred = self._predict(task, graph, training)
        kwargs = {}
        if isinstance(model, PropertyModel):
            kwargs = {"out_bias": model.out_bias[0, 0], "out_std": model.out_std[0, 0]}
        natoms = graph.atype.shape[1]
        loss, metrics = task.loss(pred, labels, find, natoms, lr, mask=graph.atype >= 0, **kwargs)
        return loss, {k: float(v) for k, v in metrics.items()}

    def _predict(self, task: Task, graph: Graph, training: bool) -> dict[str, torch.Tensor]:
        if training:
            with task.precision.training_forward():
                return self.ddp_forward(task.name, graph, True)
        with task.precision.evaluation_forward():
            return self.forward(task.name, graph, False)

    def _dens_step_loss(self, task: Task, batch: Batch, lr: float, training: bool):
        """:meth:`_step_loss` of the ``dens`` loss: corruption, model, loss."""
        graph, dens = dens_inputs(task.loss, batch, task.model.rcut, training)
        pred = self._predict(task, graph, training)
        model = task.model
        loss, metrics = task.loss(
            pred,
            batch.labels,
            batch.find,
            graph.atype.shape[1],
            lr,
            batch=dens,
            energy_bias=model.energy_bias(graph.atype),
            energy_std=model.out_std[0, 0, 0],
            force_rmsd=model.dens_force_rmsd,
        )
        return loss, {k: float(v) for k, v in metrics.items()}

    @contextlib.contextmanager
    def _evaluating(self):
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def _validate(self, task: Task, lr: float) -> dict[str, float]:
        if task.valid_data is None:
            return {}
        results = []
        with self._evaluating():
            for batch in task.valid_data.validation_batches(task.model.rcut, self.device):
                _, metrics = self._step_loss(task, batch, lr, training=False)
                results.append((self._shown(task, metrics), int((batch.graph.atype >= 0).sum())))
        return _mean_metrics(results)

    def _probe(self, task: Task, lr: float) -> dict[str, float]:
        """Training metrics of a branch not trained this step: one training batch, eval mode."""
        with self._evaluating():
            batch = task.train_data.next_batch(task.model.rcut, self.device)
            return self._shown(task, self._step_loss(task, batch, lr, training=False)[1])

    def _shown(self, task: Task, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics shown in logs and ``lcurve.out``: not the ``l2_*`` loss terms, and not
        the terms whose labels none of the branch's systems has."""
        if task.name not in self._unlabelled:
            data = [task.train_data, task.valid_data]
            systems = [s for d in data if d is not None for s in d.systems]
            self._unlabelled[task.name] = unlabelled_metrics(task.loss, systems)
        hidden = self._unlabelled[task.name]
        return {k: v for k, v in metrics.items() if "l2_" not in k and k not in hidden}

    def _draw_task(self) -> Task:
        if not self.multi_task:
            return self.tasks["Default"]
        names = list(self.tasks)
        return self.tasks[names[int(self._task_rng.choice(len(names), p=self.task_prob))]]

    def _display(self, shown: int, lr: float, task: Task, metrics, acc, counts, curve) -> None:
        """Log lines and ``lcurve.out`` row; with ``disp_avg`` the training metrics are the
        means over the steps since the last display (per branch)."""
        tr = self.config["training"]
        disp_avg = bool(tr.get("disp_avg", False))
        if not self.multi_task:
            n = counts[task.name]
            train = {k: v / n for k, v in acc[task.name].items()} if disp_avg else metrics
            valid = self._validate(task, lr)
            log.info(format_metrics(shown, "trn", train, lr))
            if valid:
                log.info(format_metrics(shown, "val", valid, None))
            curve.write(shown, lr, train, valid)
            return
        trains, valids = {}, {}
        for name, other in self.tasks.items():
            if disp_avg and counts[name]:
                trains[name] = {k: v / counts[name] for k, v in acc[name].items()}
            elif other is task and not disp_avg:
                trains[name] = metrics
            else:
                trains[name] = self._probe(other, lr)
            valids[name] = self._validate(other, lr)
            log.info(format_metrics(shown, f"{name}_trn", trains[name], lr))
            if valids[name]:
                log.info(format_metrics(shown, f"{name}_val", valids[name], None))
        curve.write(shown, lr, trains, valids)

    def _train_step(self, step: int, lr: float, watch: bool):
        """One optimizer step: ``(branch, loss, metrics, gradient norms)``; the norms (see
        :meth:`_clip`) with per-parameter values when ``watch`` (TensorBoard)."""
        task = self._draw_task()
        batch = task.train_data.next_batch(task.model.rcut, self.device)
        loss, metrics = self._step_loss(task, batch, lr, training=True)
        self._check_finite(step, "the loss", loss, task, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = self._clip(step, watch)
        if norms is not None:
            self._check_finite(step, "the gradient norm", norms[0], task, batch)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self._ema_models)
        return task, loss.detach(), metrics, norms

    def _check_finite(self, step: int, what: str, value: torch.Tensor, task: Task, batch) -> None:
        """Stop before the optimizer step when ``value`` is NaN or infinite on any process,
        naming the step and this process's batch (no checkpoint is written)."""
        bad = not bool(torch.isfinite(value).all())
        if not self._on_any_rank(bad):
            return
        if not bad:
            raise TrainingError(f"step {step + 1}: {what} is not finite on another process")
        system = task.train_data.systems[batch.system].path
        frames = [int(f) for f in np.asarray(batch.frames).reshape(-1)]
        raise TrainingError(
            non_finite_message(step + 1, what, float(value.detach()), str(system), frames)
        )

    def _on_any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over the processes of a multi-process run (one small all-reduce)."""
        if not self.dist.enabled:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _clip(self, step: int, watch: bool):
        """Clip the gradient norm to ``gradient_max_norm`` (if > 0): ``(norm before clipping,
        [(parameter, its gradient norm)] if watch)``; ``None`` without clipping."""
        max_norm = float(self.config["training"].get("gradient_max_norm", 0.0))
        if max_norm <= 0:
            return None
        per_param = []
        if watch:
            named = self.model.named_parameters()
            per_param = [(n, float(p.grad.norm())) for n, p in named if p.grad is not None]
        return clip_grad_norm(self.model.parameters(), max_norm), per_param

    def run(self) -> None:
        """Train from :attr:`start_step` to ``numb_steps``; a stop signal ends the run after
        the step in progress with a checkpoint (:class:`TrainingStopped`)."""
        self._remove_stale_temps()
        if self.numb_steps == 0:
            self._save_untrained()
            return
        timer = StepTimer(self.start_step, self.numb_steps)
        log.info("training %d steps (from step %d)", self.numb_steps, self.start_step)
        with StopSignals() as stops, self._learning_curve() as curve:
            self.monitor.start()
            try:
                self._loop(curve, timer, stops)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                raise TrainingError(self._out_of_memory(err)) from err
            finally:
                self.monitor.close()
        steps, mean = timer.steps_run(self.numb_steps), timer.mean_step_time(self.numb_steps)
        last = self.numb_steps - 1
        if self.config["training"].get("change_bias_after_training"):
            self._change_bias_after_training(last)
        if self.lora and self.dist.is_main:
            self.save_merged(last, self.lr.value(last))
            if self.ema is not None:
                self.save_merged(last, self.lr.value(last), use_ema=True)
        log.info(
            "finished: ran steps %d-%d, mean step time %.3f s over these %d steps; "
            "latest checkpoint %s",
            self.start_step + 1,
            self.numb_steps,
            mean,
            steps,
            self.store.path_for(self.numb_steps),
        )

    def _save_untrained(self) -> None:
        """``numb_steps: 0``: no step to train; the model with its data statistics is saved as
        checkpoint 0 (as DeePMD-kit does)."""
        path = self.save(-1, self.lr.value(0))
        if path is not None:
            log.info(
                "training/numb_steps is 0: no training step; saved the untrained model (data "
                "statistics, initial weights) as %s",
                path,
            )

    def _remove_stale_temps(self) -> None:
        """Temporary files of saves that were killed in an earlier run (rank 0)."""
        if not self.dist.is_main:
            return
        for store in (self.store, self.ema_store):
            removed = store.remove_stale_temps()
            if removed:
                log.info(
                    "removed %d temporary file(s) of an interrupted earlier save: %s",
                    len(removed),
                    ", ".join(str(p) for p in removed),
                )

    def _out_of_memory(self, err: BaseException) -> str:
        first = self.tasks[next(iter(self.tasks))]
        desc = first.params["descriptor"]
        size = ", ".join(f"{k} {desc[k]}" for k in ("channels", "lmax", "n_blocks") if k in desc)
        step = getattr(self, "_step_in_progress", self.start_step + 1)
        return out_of_memory_message(
            step,
            str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__,
            first.train_data.batch_size,
            desc.get("sel"),
            size,
            str(self.device),
        )

    def _loop(self, curve, timer: StepTimer, stops: StopSignals) -> None:
        tr = self.config["training"]
        disp_freq, save_freq = int(tr.get("disp_freq", 1000)), int(tr.get("save_freq", 1000))
        self.model.train()
        acc: dict[str, dict[str, float]] = {n: {} for n in self.tasks}
        counts = dict.fromkeys(self.tasks, 0)
        saved = None
        for step in range(self.start_step, self.numb_steps):
            shown = self._step_in_progress = step + 1
            self.monitor.step_begins()
            lr = self.lr.value(step)
            set_lr(self.optimizer, lr)
            task, loss, metrics, norms = self._train_step(step, lr, self.monitor.due(shown))
            for k, v in self._shown(task, metrics).items():
                acc[task.name][k] = acc[task.name].get(k, 0.0) + v
            counts[task.name] += 1
            if tr.get("disp_training", True) and (shown % disp_freq == 0 or shown == 1):
                if self.dist.is_main:
                    self._display(shown, lr, task, self._shown(task, metrics), acc, counts, curve)
                elapsed, eta = timer.lap(shown)
                if tr.get("time_training", True):
                    log.info("batch %7d: wall time %.2f s, eta %s", shown, elapsed, eta)
                acc, counts = {n: {} for n in self.tasks}, dict.fromkeys(self.tasks, 0)
            self._full_validation(step, lr)
            if shown == self.numb_steps or (save_freq > 0 and shown % save_freq == 0):
                self.save(step, lr)
                saved = shown
            if self.monitor.due(shown):
                self.monitor.scalars(shown, task.name, lr, loss, metrics, *(norms or (None,)))
            if shown < self.numb_steps and self._on_any_rank(stops.received is not None):
                path = self.save(step, lr) if saved != shown else self.store.path_for(shown)
                raise TrainingStopped(stops.received or signal.SIGTERM, shown, path)

    @contextlib.contextmanager
    def _learning_curve(self):
        """The ``lcurve.out`` writer (rank 0; ``None`` elsewhere); a restart continues it."""
        if not self.dist.is_main:
            yield None
            return
        disp_file = self.config["training"].get("disp_file", "lcurve.out")
        fresh = not (self.resume.restart and repair_curve(disp_file, self.start_step))
        file = Path(disp_file)
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "a" if self.resume.restart else "w", buffering=1) as handle:
            if self.multi_task:
                yield MultiTaskCurve(handle, list(self.tasks), fresh)
            else:
                yield LearningCurve(handle, write_header=fresh)

    def _full_validation(self, step: int, lr: float) -> None:
        """The full-validation flows due after ``step``: rank 0 evaluates and ranks, every rank
        joins the best-checkpoint save (collective under ZeRO), rank 0 logs."""
        shown = step + 1
        for validator, on_ema in self.validators:
            if not validator.due(shown):
                continue
            self.dist.barrier()
            errors, path, failure = {}, None, None
            if self.dist.is_main:
                try:
                    errors = self._full_errors(on_ema)
                    path = validator.validate(shown, errors)
                except Exception as err:
                    failure = err
            path, failed = self.dist.broadcast((path, failure is not None))
            if failure is not None:
                raise failure
            if failed:
                raise RuntimeError("full validation failed on rank 0")
            if path is not None:
                self._save_best(Path(path), step, lr, on_ema)
            if self.dist.is_main:
                validator.finish(shown, errors, path)
            self.dist.barrier()

    def _full_errors(self, on_ema: bool) -> dict[str, float]:
        task = self.tasks["Default"]
        swap = self.ema.swapped_in(self._ema_models) if on_ema else contextlib.nullcontext()
        with swap, self._evaluating(), task.precision.evaluation_forward():
            return evaluate_energy(
                lambda graph: self.forward(task.name, graph, False),
                task.valid_data,
                task.model.rcut,
                self.device,
            )

    def _change_bias_after_training(self, last: int) -> None:
        """Change-by-statistic of the output bias on the training data (every rank alike, from
        the same frames), then the last checkpoint again."""
        for task in self.tasks.values():
            change_out_bias(task.model, task.train_data, task.params, self.seed)
        self.save(last, self.lr.value(last))

    # --- checkpoints ------------------------------------------------------------------------
    def _model_state(self, lr: float, step: int) -> dict:
        step = max(step, 0)  # the untrained model of `numb_steps: 0` is saved as step 0
        if self.multi_task:
            return multitask_state(dict(self.model.items()), self.model_params, lr, step)
        return model_state(self.model, self.model_params, lr, step, infos=self.train_infos)

    def _rng_state(self) -> dict[str, Any]:
        """This rank's random state: torch, samplers (and the branch draw)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        per_task = {}
        for name, task in self.tasks.items():
            per_task[name] = {"train": task.train_data.get_rng_state()}
            if task.valid_data is not None:
                per_task[name]["valid"] = task.valid_data.get_rng_state()
        if self.multi_task:
            rng.update(tasks=per_task, draw=self._task_rng.bit_generator.state)
        else:
            rng.update(per_task["Default"])
        return rng

    def _checkpoint(self, step: int, lr: float) -> dict | None:
        """The resumable checkpoint after ``step`` (0-based) on rank 0, ``None`` elsewhere.
        Collective: every rank's random state and the (sharded) optimizer state are gathered."""
        rngs = self.dist.gather(self._rng_state())
        optimizer = optimizer_state(self.optimizer, self.dist)
        if not self.dist.is_main:
            return None
        run: dict[str, Any] = {"next_step": step + 1, "rng": rngs[0]}
        if self.dist.enabled:
            run["rng_ranks"] = rngs
        obj = {"model": self._model_state(lr, step), "optimizer": optimizer, "sezm": run}
        if self.ema is not None:
            obj["ema"] = self.ema.state_dict()
        return obj

    def _ema_checkpoint(self, step: int, lr: float) -> dict:
        with self.ema.swapped_in(self._ema_models):
            return {"model": self._model_state(lr, step)}

    def save(self, step: int, lr: float) -> Path | None:
        """Checkpoint after ``step`` (0-based) in DeePMD-kit's layout, plus sezm's run state;
        called on every rank, written by rank 0 (its path; ``None`` elsewhere)."""
        shown = step + 1
        obj = self._checkpoint(step, lr)
        if obj is None:
            return None
        path = self.store.save(obj, shown)
        log.info("saved checkpoint %s", path)
        if self.ema is not None:
            self.ema_store.save(self._ema_checkpoint(step, lr), shown)
        return path

    def _save_best(self, path: Path, step: int, lr: float, on_ema: bool) -> None:
        """A best checkpoint chosen by full validation: the EMA weights alone, or the full
        resumable state; a LoRA run writes it merged (a plain DPA4 checkpoint)."""
        if self.lora:
            if self.dist.is_main:
                self.save_merged(step, lr, use_ema=on_ema, path=path)
            return
        obj = self._ema_checkpoint(step, lr) if on_ema else self._checkpoint(step, lr)
        if self.dist.is_main:
            atomic_save(obj, path)

    def save_merged(
        self, step: int, lr: float, use_ema: bool = False, path: Path | None = None
    ) -> Path:
        """``<save_ckpt>[_ema]_merged.pt`` (or ``path``): the LoRA adapters folded into the
        base weights, ``lora`` dropped from ``model_params``, no optimizer state (a plain DPA4
        checkpoint)."""
        store = self.ema_store if use_ema else self.store
        path = path or store.directory / f"{store.prefix.name}_merged.pt"
        swap = self.ema.swapped_in(self._ema_models) if use_ema else contextlib.nullcontext()
        with swap:
            tensors = {k: v.cpu() for k, v in merged_state_dict(self.model).items()}
        state = {
            "_extra_state": {
                "model_params": strip_lora(self.model_params),
                "train_infos": {**self.train_infos, "lr": float(lr), "step": int(step)},
            },
            **to_deepmd_state(tensors),
        }
        atomic_save({"model": state}, path)
        log.info("saved merged LoRA checkpoint %s", path)
        return path


def dens_inputs(
    loss: DensLoss, batch: Batch, rcut: float, training: bool
) -> tuple[Graph, DensBatch]:
    """A ``dens`` batch before the model (DeePMD-kit's order): the corruption drawn by
    :meth:`DensLoss.corrupt`, the graph of the noisy coordinates (edges touching padding atoms
    dropped), carrying the corrupted atoms and their force labels."""
    graph, labels = batch.graph, batch.labels
    atype = graph.atype
    coord = torch.as_tensor(batch.coord, dtype=torch.float64, device=atype.device)
    force = labels.get("force", torch.zeros_like(coord))
    dens = loss.corrupt(coord, atype, force, training=training)
    if dens.use_dens:
        noisy = build_graph(
            dens.coord.cpu().numpy(), batch.box, atype.cpu().numpy(), rcut,
            device=atype.device, min_dist=0.0,
        )  # fmt: skip
        real = atype.reshape(-1) >= 0
        keep = real[noisy.src] & real[noisy.dst]
        graph = dataclasses.replace(
            graph, src=noisy.src[keep], dst=noisy.dst[keep], edge_vec=noisy.edge_vec[keep]
        )
    graph = dataclasses.replace(graph, force_input=dens.force_input, noise_mask=dens.noise_mask)
    return graph, dens


def _open_data(
    section: dict, key: str, where: str, type_map: list[str], fields: dict, seed: int | None
) -> DataSystem:
    """``DataSystem`` of ``section[key]``; a data error names the input section."""
    try:
        return DataSystem.from_config(section[key], type_map, fields, seed)
    except DataError as err:
        raise DataError(f"{where}/{key}: {err}") from None


def unlabelled_metrics(loss: Any, systems: list) -> frozenset[str]:
    """Metric names of the loss terms whose labels no system has (e.g. a virial term on data
    without ``virial.npy``): they would only ever show ``nan``."""
    labels, names = getattr(loss, "LABELS", None), getattr(loss, "_metric_names", None)
    if labels is None or names is None:
        return frozenset()
    hidden: set[str] = set()
    for item in getattr(loss, "active", ()):
        if not any(all(s.present.get(k, False) for k in labels[item]) for s in systems):
            hidden.update(names(item))
    return frozenset(hidden)


def write_out_json(config: dict, path: str | os.PathLike = "out.json") -> None:
    Path(path).write_text(json.dumps(config, indent=2))
