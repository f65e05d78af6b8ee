"""How a run starts: fresh, from weights (``--init-model``), exactly where a checkpoint
stopped (``--restart``) or from a pretrained model (``--finetune``, ``finetune.py``).

This module puts the weights into the branch models; the rest of a restart (optimizer, EMA,
random state, step) is :func:`~sezm.train.run_state.restore_run_state`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..compat.deepmd import Checkpoint, CheckpointError, load_checkpoint, load_into
from .branches import Layout
from .checkpoint import model_differences
from .finetune import FinetuneRule, change_out_bias, transfer_weights
from .lora import apply_lora, has_lora
from .tasks import Task, set_statistics

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

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint whose weights (not a pretrained model's) the run starts from."""
        return self.restart or self.init_model

    @property
    def fresh(self) -> bool:
        """Whether the run starts from initial weights and data statistics."""
        return not (self.checkpoint or self.finetune)


def apply_lora_adapters(tasks: dict[str, Task], seed: int | None) -> bool:
    """Inject each branch's ``model.lora`` adapters (once); whether the run uses LoRA."""
    used = False
    for task in tasks.values():
        lora = task.params["lora"]
        if lora is None:
            continue
        used = True
        if not has_lora(task.model):
            apply_lora(task.model, int(lora["rank"]), lora["alpha"], seed=seed)
            log.info("LoRA adapters: rank %s, alpha %s", lora["rank"], lora["alpha"])
    return used


def load_weights(
    tasks: dict[str, Task], layout: Layout, resume: Resume, device, seed: int | None
) -> dict[str, Checkpoint]:
    """Weights of ``--restart`` / ``--init-model`` into every branch model: the checkpoint
    read for each branch (its optimizer and run state serve a restart)."""
    path = resume.checkpoint
    ckpts = {}
    for task in tasks.values():
        ckpt = load_checkpoint(path, layout.checkpoint_branch(task.name))
        if resume.restart and any(".A_" in k for k in ckpt.state):
            apply_lora_adapters({task.name: task}, seed)  # resume the adapters, not their sum
        try:
            load_into(task.model, {k: v.to(device) for k, v in ckpt.state.items()}, path)
        except CheckpointError as err:
            raise _other_model(path, ckpt, task, resume) or err from None
        ckpts[task.name] = ckpt
    log.info("weights from %s (step %s)", path, ckpt.train_infos.get("step"))
    return ckpts


def _other_model(path: str, ckpt: Checkpoint, task: Task, resume: Resume) -> CheckpointError | None:
    """The error of a ``--restart``/``--init-model`` checkpoint of another model than the
    input describes, in the input's terms (``None`` if the settings agree)."""
    differences = model_differences(ckpt.model_params, task.params)
    if not differences:
        return None
    option = "--restart" if resume.restart else "--init-model"
    shown = "\n  ".join(differences[:12])
    more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
    return CheckpointError(
        f"{option} {path}: the checkpoint holds another model than the input describes:\n"
        f"  {shown}{more}\n"
        "Train with the input the checkpoint was made with, or start a new model from its "
        "weights with --finetune (or --init-model with --use-pretrain-script)"
    )


def load_pretrained(
    tasks: dict[str, Task], path: str, rules: dict[str, FinetuneRule], seed: int | None
) -> None:
    """``--finetune``: each branch takes the weights of its pretrained branch, then its output
    bias: kept (resuming branch), from statistics (new fitting) or changed by statistic."""
    for task in tasks.values():
        rule = rules[task.name]
        ckpt = load_checkpoint(path, rule.branch)
        transfer_weights(task.model, ckpt, rule)
        log.info(
            "%s: weights from %s branch %r (%s fitting)",
            task.name,
            path,
            ckpt.branch,
            "new" if rule.random_fitting else "pretrained",
        )
    for task in tasks.values():
        rule = rules[task.name]
        if rule.resuming:
            log.info("%s resumes its pretrained branch", task.name)
        elif rule.random_fitting:
            set_statistics(task, observed=False)  # set-by-statistic
        else:
            change_out_bias(task.model, task.train_data, task.params, seed)
