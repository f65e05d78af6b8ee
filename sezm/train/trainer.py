"""``sezm train``: the DeePMD-kit training workflow for DPA4 models.

One step: draw a batch, predict (energy models: forces from the edge gradient, kept in the
graph for the force loss), loss, backward, clip, optimizer step, EMA. Every ``disp_freq`` steps:
validation, ``lcurve.out``, a progress line with the ETA. Every ``save_freq`` steps and at the
end: a checkpoint in DeePMD-kit's layout (``checkpoint.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..compat.deepmd import load_checkpoint, load_into
from ..data import DataSystem, fields_for_model, model_stats, update_sel
from ..model.build import build_model
from ..model.property_model import PropertyModel
from .checkpoint import CheckpointStore, model_state
from .ema import EMA
from .losses import build_loss
from .lr import LearningRate
from .optim import build_optimizer, clip_grad_norm, set_lr
from .progress import LearningCurve, StepTimer, format_metrics

log = logging.getLogger("sezm.train")


@dataclass
class Resume:
    """How a run starts: fresh, from weights (``init``), exactly resumed, or fine-tuned."""

    init_model: str | None = None
    restart: str | None = None
    finetune: str | None = None
    skip_neighbor_stat: bool = False


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
        self, config: dict, resume: Resume | None = None, device: str | None = None
    ) -> None:
        self.config = config
        self.resume = resume or Resume()
        tr = config["training"]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.numb_steps = int(tr["numb_steps"])
        _seed_everything(tr.get("seed"))
        self.model_params = dict(config["model"])
        type_map = self.model_params["type_map"]
        fields = fields_for_model(self.model_params)
        self.train_data = DataSystem.from_config(
            tr["training_data"], type_map, fields, seed=tr.get("seed")
        )
        self.valid_data = None
        if tr.get("validation_data"):
            self.valid_data = DataSystem.from_config(
                tr["validation_data"],
                type_map,
                fields,
                seed=None if tr.get("seed") is None else tr["seed"] + 1,
            )
        log.info(self.train_data.summary("training data"))
        if self.valid_data is not None:
            log.info(self.valid_data.summary("validation data"))
        self._resolve_sel()
        self.model = build_model(self.model_params).to(self.device)
        self.start_step = 0
        restored = self._load_weights()
        if not restored:
            self._set_statistics()
        self.lr = LearningRate(config["learning_rate"], self.numb_steps)
        self.loss = self._build_loss()
        self.optimizer = build_optimizer(
            config.get("optimizer", {"type": "Adam"}), self.model, self.lr.value(0)
        )
        self.ema = EMA(self.model, tr["ema_decay"]) if tr.get("enable_ema") else None
        self.store = CheckpointStore(
            tr.get("save_ckpt", "model.ckpt"), tr.get("save_dir"), tr.get("max_ckpt_keep", 5)
        )
        ema_keep = (
            tr.get("ema_ckpt_keep")
            if tr.get("ema_ckpt_keep") is not None
            else tr.get("max_ckpt_keep", 5)
        )
        self.ema_store = CheckpointStore(
            tr.get("save_ckpt", "model.ckpt") + "_ema", tr.get("save_dir"), ema_keep, None
        )
        if self.resume.restart:
            self._restore_run_state()
        self._log_settings()

    # --- setup ------------------------------------------------------------------------------
    def _resolve_sel(self) -> None:
        desc = dict(self.model_params["descriptor"])
        sel = desc.get("sel", 256)
        needs_stat = isinstance(sel, str) and sel.startswith("auto")
        if self.resume.skip_neighbor_stat or any((self.resume.init_model, self.resume.restart)):
            if needs_stat and not (self.resume.init_model or self.resume.restart):
                raise ValueError(
                    'descriptor.sel "auto" needs the neighbour statistics; drop --skip-neighbor-stat'
                )
            return
        new_sel, min_dist = update_sel(
            self.train_data.systems, float(desc["rcut"]), sel, len(self.model_params["type_map"])
        )
        desc["sel"] = new_sel
        self.model_params["descriptor"] = desc
        self._min_nbor_dist = min_dist
        log.info("neighbour statistics: sel = %s, min_nbor_dist = %.4f A", new_sel, min_dist)

    def _load_weights(self) -> bool:
        path = self.resume.restart or self.resume.init_model or self.resume.finetune
        if path is None:
            if hasattr(self, "_min_nbor_dist"):
                self.model.min_nbor_dist.fill_(self._min_nbor_dist)
            return False
        ckpt = load_checkpoint(path)
        if self.resume.finetune:
            self._finetune_from(ckpt)
            return True
        load_into(self.model, {k: v.to(self.device) for k, v in ckpt.state.items()}, path)
        self._ckpt = ckpt
        log.info("weights from %s (step %s)", path, ckpt.train_infos.get("step"))
        return True

    def _finetune_from(self, ckpt) -> None:
        """Descriptor weights from the pretrained model; fitting too when the head matches.

        A changed ``type_map`` keeps the rows of the types both maps share.
        """
        old_map, new_map = list(ckpt.model_params["type_map"]), list(self.model_params["type_map"])
        own = self.model.state_dict()
        loaded = 0
        for key, value in ckpt.state.items():
            if key not in own:
                continue
            value = _remap_types(key, value, own[key], old_map, new_map)
            if value is not None and value.shape == own[key].shape:
                own[key] = value.to(own[key].device, own[key].dtype)
                loaded += 1
        self.model.load_state_dict(own)
        log.info("fine-tuning from %s: %d of %d tensors taken over", ckpt.path, loaded, len(own))
        self._set_statistics(only_bias=True)

    def _set_statistics(self, only_bias: bool = False) -> None:
        tr = self.config["training"]
        stats = model_stats(
            self.train_data,
            self.model_params,
            tr.get("stat_file"),
            tr.get("stat_file_mode", "update"),
        )
        with torch.no_grad():
            self.model.out_bias.copy_(torch.as_tensor(stats.out_bias))
            self.model.out_std.copy_(torch.as_tensor(stats.out_std))
            fit = self.model.fitting_net
            for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
                value = getattr(stats, name)
                if value is not None and getattr(fit, name, None) is not None and not only_bias:
                    getattr(fit, name).copy_(torch.as_tensor(value))
        info = dict(self.model_params.get("info", {}))
        info["observed_type"] = list(stats.observed_type)
        self.model_params["info"] = info
        log.info(
            "output bias per type: %s",
            np.asarray(stats.out_bias).reshape(len(stats.out_bias[0]), -1).tolist(),
        )

    def _build_loss(self):
        cfg = self.config.get("loss", {"type": "ener"})
        start_lr = float(self.config["learning_rate"]["start_lr"])
        if isinstance(self.model, PropertyModel):
            fit = self.model.fitting_net
            return build_loss(
                cfg,
                start_lr,
                task_dim=fit.task_dim,
                var_name=fit.property_name,
                intensive=fit.intensive,
            )
        return build_loss(cfg, start_lr)

    def _restore_run_state(self) -> None:
        ckpt = self._ckpt
        extra = ckpt.extra
        if "optimizer" in extra:
            self.optimizer.load_state_dict(extra["optimizer"])
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])
        run = extra.get("sezm", {})
        self.start_step = int(run.get("next_step", int(ckpt.train_infos.get("step", -1)) + 1))
        if "rng" in run:
            torch.set_rng_state(run["rng"]["torch"])
            self.train_data.set_rng_state(run["rng"]["train"])
            if self.valid_data is not None and "valid" in run["rng"]:
                self.valid_data.set_rng_state(run["rng"]["valid"])
        log.info("restarting at step %d", self.start_step)

    def _log_settings(self) -> None:
        m = self.model_params
        desc = self.model.descriptor.opts
        cuda = self.device.type == "cuda"
        log.info("device: %s, threads: %d", self.device, torch.get_num_threads())
        log.info(
            "precision: descriptor %s, fitting %s", desc.precision, self.model.fitting_net.dtype
        )
        log.info(
            "AMP (bf16): %s; TF32: %s; compile: %s",
            "on"
            if desc.use_amp and cuda
            else "off" + (" (CPU)" if desc.use_amp and not cuda else ""),
            "on" if m.get("enable_tf32", True) and cuda else "off",
            "off" + (" (requested; the eager path is used)" if m.get("use_compile") else ""),
        )
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model: %d trainable parameters", n_params)

    # --- running ----------------------------------------------------------------------------
    def _predict(self, graph, create_graph: bool):
        if isinstance(self.model, PropertyModel):
            return self.model(graph)
        return self.model(graph, create_graph=create_graph)

    def _step_loss(self, batch, lr: float, training: bool):
        graph, labels, find = batch
        pred = self._predict(graph, create_graph=training)
        natoms = graph.atype.shape[1]
        kwargs = {}
        if isinstance(self.model, PropertyModel):
            kwargs = {"out_bias": self.model.out_bias[0, 0], "out_std": self.model.out_std[0, 0]}
        loss, metrics = self.loss(pred, labels, find, natoms, lr, mask=graph.atype >= 0, **kwargs)
        return loss, {k: float(v) for k, v in metrics.items() if "l2_" not in k}

    def _validate(self, lr: float) -> dict[str, float]:
        if self.valid_data is None:
            return {}
        self.model.eval()
        results = []
        for batch in self.valid_data.validation_batches(self.model.rcut, self.device):
            graph, _, _ = batch
            _, metrics = self._step_loss(batch, lr, training=False)
            results.append((metrics, int((graph.atype >= 0).sum())))
        self.model.train()
        return _mean_metrics(results)

    def run(self) -> None:
        tr = self.config["training"]
        disp_freq, save_freq = int(tr.get("disp_freq", 1000)), int(tr.get("save_freq", 1000))
        disp_avg = bool(tr.get("disp_avg", False))
        disp_file = tr.get("disp_file", "lcurve.out")
        mode = "a" if self.resume.restart else "w"
        if self.resume.restart:
            _truncate_curve(disp_file, self.start_step)
        fresh = mode == "w" or not Path(disp_file).is_file() or Path(disp_file).stat().st_size == 0
        with open(disp_file, mode, buffering=1) as handle:
            curve = LearningCurve(handle, write_header=fresh)
            timer = StepTimer(self.start_step, self.numb_steps)
            self.model.train()
            accumulated: dict[str, float] = {}
            n_acc = 0
            log.info("training %d steps (from step %d)", self.numb_steps, self.start_step)
            for step in range(self.start_step, self.numb_steps):
                lr = self.lr.value(step)
                set_lr(self.optimizer, lr)
                batch = self.train_data.next_batch(self.model.rcut, self.device)
                loss, metrics = self._step_loss(batch, lr, training=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if float(tr.get("gradient_max_norm", 0.0)) > 0:
                    norm = clip_grad_norm(self.model.parameters(), float(tr["gradient_max_norm"]))
                    if not torch.isfinite(norm):
                        raise FloatingPointError(
                            f"step {step + 1}: non-finite gradient norm {float(norm)}"
                        )
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                for k, v in metrics.items():
                    accumulated[k] = accumulated.get(k, 0.0) + v
                n_acc += 1
                shown = step + 1
                if tr.get("disp_training", True) and (shown % disp_freq == 0 or shown == 1):
                    train = {k: v / n_acc for k, v in accumulated.items()} if disp_avg else metrics
                    valid = self._validate(lr)
                    log.info(format_metrics(shown, "trn", train, lr))
                    if valid:
                        log.info(format_metrics(shown, "val", valid, None))
                    elapsed, eta = timer.lap(shown)
                    if tr.get("time_training", True):
                        log.info("batch %7d: wall time %.2f s, eta %s", shown, elapsed, eta)
                    curve.write(shown, lr, train, valid)
                    accumulated, n_acc = {}, 0
                if shown == self.numb_steps or (save_freq > 0 and shown % save_freq == 0):
                    self.save(step, lr)
        log.info(
            "finished; mean step time %.3f s; latest checkpoint %s",
            timer.mean_step_time,
            self.store.path_for(self.numb_steps),
        )

    def save(self, step: int, lr: float) -> Path:
        """Checkpoint after ``step`` (0-based) in DeePMD-kit's layout, plus sezm's run state."""
        shown = step + 1
        rng = {"torch": torch.get_rng_state(), "train": self.train_data.get_rng_state()}
        if self.valid_data is not None:
            rng["valid"] = self.valid_data.get_rng_state()
        obj = {
            "model": model_state(self.model, self.model_params, lr, step),
            "optimizer": self.optimizer.state_dict(),
            "sezm": {"next_step": shown, "rng": rng},
        }
        if self.ema is not None:
            obj["ema"] = self.ema.state_dict()
        path = self.store.save(obj, shown)
        log.info("saved checkpoint %s", path)
        if self.ema is not None:
            with self.ema.swapped_in(self.model):
                self.ema_store.save(
                    {"model": model_state(self.model, self.model_params, lr, step)}, shown
                )
        return path


def _remap_types(key: str, value: torch.Tensor, target: torch.Tensor, old_map, new_map):
    """Rows indexed by atom type follow the new ``type_map`` (shared types keep their rows)."""
    if value.shape == target.shape and old_map == new_map:
        return value
    per_type = key.endswith(("adam_type_embedding", "bias_atom_e")) or key in (
        "out_bias",
        "out_std",
    )
    if not per_type:
        return value
    axis = 1 if key in ("out_bias", "out_std") else 0
    out = target.clone()
    for new_i, name in enumerate(new_map):
        if name in old_map:
            out.select(axis, new_i).copy_(value.select(axis, old_map.index(name)))
    return out


def _truncate_curve(path: str, last_step: int) -> None:
    """Drop learning-curve lines after ``last_step`` so a restart continues the file exactly."""
    file = Path(path)
    if not file.is_file():
        return
    lines = file.read_text().splitlines(keepends=True)
    kept = [
        ln
        for ln in lines
        if ln.startswith("#") or not ln.strip() or int(ln.split()[0]) <= last_step
    ]
    file.write_text("".join(kept))


def write_out_json(config: dict, path: str | os.PathLike = "out.json") -> None:
    Path(path).write_text(json.dumps(config, indent=2))
