"""One training step, and the metrics of a batch in evaluation mode.

A step: draw a branch (``training.model_prob``; one branch: always it), draw a batch of it,
predict (energy models: forces from the edge gradient, kept in the graph for the force loss),
loss, backward, clip, optimizer step, EMA. A NaN or infinite loss or gradient norm on any
process stops the run before the optimizer step, naming the step and the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from ..data.dataset import Batch
from ..data.graph import build_graph
from ..model.graph import Graph
from ..model.property_model import PropertyModel
from .distributed import any_rank
from .faults import TrainingError, non_finite_message
from .losses import DensBatch, DensLoss
from .optim import clip_grad_norm
from .setup import TrainingSetup
from .tasks import Task


class StepRunner:
    """Training steps and evaluation-mode metrics of the branches of a run."""

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup
        self._unlabelled: dict[str, frozenset[str]] = {}  # per branch, see `shown`

    def train_step(self, step: int, lr: float, watch: bool):
        """One optimizer step: ``(branch, loss, metrics, gradient norms)``; the norms (see
        :meth:`_clip`) with per-parameter values when ``watch`` (TensorBoard)."""
        s = self.setup
        task = s.tasks[s.draw.next()]
        batch = task.train_data.next_batch(task.model.rcut, s.device)
        loss, metrics = self.step_loss(task, batch, lr, training=True)
        self._check_finite(step, "the loss", loss, task, batch)
        s.optimizer.zero_grad(set_to_none=True)
        # Only the parameters: the coordinates also require a gradient (for the forces), and
        # without `inputs` the backward pass would also differentiate the loss with respect to
        # them, through the geometry and the force pass's graph (~7 % of a Mini step).
        trainable = [p for p in s.model.parameters() if p.requires_grad]
        loss.backward(inputs=trainable or None)
        norms = self._clip(watch)
        if norms is not None:
            self._check_finite(step, "the gradient norm", norms[0], task, batch)
        s.optimizer.step()
        if s.ema is not None:
            s.ema.update(s.ema_models)
        return task, loss.detach(), metrics, norms

    def step_loss(self, task: Task, batch: Batch, lr: float, training: bool):
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
                return self.setup.ddp_forward(task.name, graph, True)
        with task.precision.evaluation_forward():
            return self.setup.forward(task.name, graph, False)

    def _dens_step_loss(self, task: Task, batch: Batch, lr: float, training: bool):
        """:meth:`step_loss` of the ``dens`` loss: corruption, model, loss."""
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
    def evaluating(self):
        """The model in evaluation mode for the block, in training mode after."""
        self.setup.model.eval()
        try:
            yield
        finally:
            self.setup.model.train()

    def validate(self, task: Task, lr: float) -> dict[str, float]:
        """Shown metrics on the branch's validation batches (atom-weighted mean); ``{}``
        without validation data."""
        if task.valid_data is None:
            return {}
        results = []
        with self.evaluating():
            for batch in task.valid_data.validation_batches(task.model.rcut, self.setup.device):
                _, metrics = self.step_loss(task, batch, lr, training=False)
                results.append((self.shown(task, metrics), int((batch.graph.atype >= 0).sum())))
        return mean_metrics(results)

    def probe(self, task: Task, lr: float) -> dict[str, float]:
        """Training metrics of a branch not trained this step: one training batch, eval mode."""
        with self.evaluating():
            batch = task.train_data.next_batch(task.model.rcut, self.setup.device)
            return self.shown(task, self.step_loss(task, batch, lr, training=False)[1])

    def shown(self, task: Task, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics shown in logs and ``lcurve.out``: not the ``l2_*`` loss terms, and not
        the terms whose labels none of the branch's systems has."""
        if task.name not in self._unlabelled:
            data = [task.train_data, task.valid_data]
            systems = [s for d in data if d is not None for s in d.systems]
            self._unlabelled[task.name] = unlabelled_metrics(task.loss, systems)
        hidden = self._unlabelled[task.name]
        return {k: v for k, v in metrics.items() if "l2_" not in k and k not in hidden}

    def _check_finite(self, step: int, what: str, value: torch.Tensor, task: Task, batch) -> None:
        """Stop before the optimizer step when ``value`` is NaN or infinite on any process,
        naming the step and this process's batch (no checkpoint is written)."""
        bad = not bool(torch.isfinite(value).all())
        if not any_rank(self.setup.dist, bad, self.setup.device):
            return
        if not bad:
            raise TrainingError(f"step {step + 1}: {what} is not finite on another process")
        system = task.train_data.systems[batch.system].path
        frames = [int(f) for f in np.asarray(batch.frames).reshape(-1)]
        raise TrainingError(
            non_finite_message(step + 1, what, float(value.detach()), str(system), frames)
        )

    def _clip(self, watch: bool):
        """Clip the gradient norm to ``gradient_max_norm`` (if > 0): ``(norm before clipping,
        [(parameter, its gradient norm)] if watch)``; ``None`` without clipping."""
        max_norm = self.setup.config["training"].get("gradient_max_norm")  # absent: no clipping
        if max_norm is None or float(max_norm) <= 0:
            return None
        model = self.setup.model
        per_param = []
        if watch:
            named = model.named_parameters()
            per_param = [(n, float(p.grad.norm())) for n, p in named if p.grad is not None]
        return clip_grad_norm(model.parameters(), float(max_norm)), per_param


def mean_metrics(batches: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Atom-weighted mean of per-batch metrics (DeePMD-kit's validation average)."""
    total = sum(n for _, n in batches)
    keys = batches[0][0].keys() if batches else []
    return {k: sum(float(m[k]) * n for m, n in batches) / total for k in keys}


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


def dens_inputs(
    loss: DensLoss, batch: Batch, rcut: float, training: bool
) -> tuple[Graph, DensBatch]:
    """A ``dens`` batch before the model (DeePMD-kit's order): the corruption drawn by
    :meth:`DensLoss.corrupt`, the graph of the noisy coordinates (edges touching padding atoms
    dropped), carrying the corrupted atoms and their force labels."""
    graph, labels = batch.graph, batch.labels
    atype = graph.atype
    coord = torch.as_tensor(batch.coord, dtype=torch.float64, device=atype.device)
    force = labels.get("force", torch.zeros_like(coord))  # unlabelled frames: no force input
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
