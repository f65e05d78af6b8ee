"""Fine-tuning from a pretrained checkpoint (``sezm train --finetune``), DeePMD-kit's rules.

Which pretrained branch each target branch starts from (:func:`finetune_rules`):

* single-task target: ``--model-branch`` or ``model.finetune_head``. A single-task pretrained
  model offers ``Default`` (``""``/``Default``) or ``RANDOM`` (a new fitting); a multi-task
  one offers its branches and their aliases, and ``""``/``RANDOM`` take its first branch with
  a new fitting.
* multi-task target: each branch's ``finetune_head`` (``RANDOM``: first branch, new fitting);
  without one, a branch named like a pretrained branch resumes it (no bias change), any
  other branch starts from the first pretrained branch with a new fitting.

Weights (:func:`transfer_weights`): every tensor of the target model comes from the chosen
branch (LoRA adapters folded), except those outside ``descriptor.`` when the fitting is new.
A changed ``type_map`` moves the per-type rows (type embeddings, ``bias_atom_e``,
``out_bias``/``out_std``, ZBL atomic numbers) by element name; an element the pretrained
model lacks keeps the new model's freshly initialised row.

Energy bias: with the pretrained fitting, "change-by-statistic" (:func:`change_out_bias`):
``out_bias += lstsq(label - prediction)`` over the sampled frames and ``out_std`` = the std
of what remains; with a new fitting, "set-by-statistic" (the usual data statistics).
``--use-pretrain-script`` replaces the input's descriptor (and kept fitting) sections by the
pretrained ones, keeping the input's ``trainable`` flags.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..compat.deepmd import Checkpoint, CheckpointError, load_into
from ..data import out_stat
from ..data.stats import output_stat_mode, preset_bias
from ..model.property_model import PropertyModel
from .lora import fold_lora

log = logging.getLogger("sezm.train")

RANDOM = "RANDOM"

#: Tensors indexed by atom type, and the axis of the type.
PER_TYPE = {
    "out_bias": 1,
    "out_std": 1,
    "fitting_net.bias_atom_e": 0,
    "descriptor.type_embedding.adam_type_embedding": 0,
    "descriptor.env_seed_embedding.env_type_embed.adam_type_embedding": 0,
    "inter_potential.atomic_numbers": 0,
}


@dataclass
class FinetuneRule:
    """Where one target branch starts from."""

    branch: str  # pretrained branch (canonical name)
    pretrained_type_map: list[str]
    type_map: list[str]
    random_fitting: bool = False
    resuming: bool = False

    @property
    def new_types(self) -> list[str]:
        return [t for t in self.type_map if t not in self.pretrained_type_map]


def _branch_names(pretrained: Mapping) -> dict[str, str]:
    """Name or alias -> branch of a pretrained ``model_params`` (``Default`` if single-task)."""
    if "model_dict" not in pretrained:
        return {"Default": "Default"}
    names = {}
    for name, params in pretrained["model_dict"].items():
        names[name] = name
        # a checkpoint's params are read as stored (check_stored_model only warns): a branch
        # without the key has no alias
        names.update({alias: name for alias in params.get("model_branch_alias", [])})
    return names


def _rule(target: dict, pretrained: Mapping, head: str, use_script: bool) -> FinetuneRule:
    """The rule of one target branch for ``head`` (``""``, ``RANDOM`` or a branch/alias);
    with ``use_script`` the branch's sections are replaced in place."""
    multi = "model_dict" in pretrained
    names = _branch_names(pretrained)
    random_fitting = head == RANDOM or (multi and head == "")
    if not multi and head not in ("", "Default", RANDOM):
        raise ValueError(
            f"a single-task pretrained model has only the 'Default' branch, not {head!r}"
        )
    if multi and not random_fitting and head not in names:
        raise ValueError(f"no branch {head!r} in the pretrained model; available: {sorted(names)}")
    if not multi:
        branch = "Default"
    elif random_fitting:
        branch = next(iter(pretrained["model_dict"]))
        log.warning("fitting re-initialised (branch %r's descriptor; set-by-statistic)", branch)
    else:
        branch = names[head]
    chosen = pretrained["model_dict"][branch] if multi else pretrained
    if use_script:
        sections = ("descriptor",) if random_fitting else ("descriptor", "fitting_net")
        for key in sections:
            trainable = target[key]["trainable"]
            target[key] = {**copy.deepcopy(chosen[key]), "trainable": trainable}
    else:
        warn_descriptor_mismatch(target["descriptor"], chosen["descriptor"], branch)
    return FinetuneRule(
        branch, list(chosen["type_map"]), list(target["type_map"]), random_fitting=random_fitting
    )


def finetune_rules(
    model: dict, pretrained: Mapping, model_branch: str = "", use_pretrain_script: bool = False
) -> tuple[dict, dict[str, FinetuneRule]]:
    """``(model section to train, {target branch: rule})`` for a normalised ``model`` section
    and the pretrained checkpoint's ``model_params``."""
    model = copy.deepcopy(model)
    if "model_dict" not in model:
        head = model_branch or model.get("finetune_head") or ""
        return model, {"Default": _rule(model, pretrained, head, use_pretrain_script)}
    if model_branch:
        raise ValueError(
            "--model-branch is for single-task fine-tuning; give each branch a `finetune_head`"
        )
    names = _branch_names(pretrained)
    rules = {}
    for name, branch in model["model_dict"].items():
        head = branch.get("finetune_head")
        resuming = head is None and name in names and names[name] == name
        rule = _rule(
            branch, pretrained, name if resuming else (head or RANDOM), use_pretrain_script
        )
        rule.resuming = resuming
        rules[name] = rule
    return model, rules


def warn_descriptor_mismatch(given: Mapping, pretrained: Mapping, branch: str) -> None:
    """Log the descriptor options that differ between the input and the pretrained model."""
    keys = sorted((set(given) | set(pretrained)) - {"trainable"})
    diffs = [k for k in keys if given.get(k) != pretrained.get(k)]
    if diffs:
        log.warning(
            "descriptor of the input differs from the pretrained branch %r; only compatible "
            "tensors can be reused:\n%s",
            branch,
            "\n".join(
                f"  {k}: input={given.get(k)!r}, pretrained={pretrained.get(k)!r}" for k in diffs
            ),
        )


# -- weights -------------------------------------------------------------------------------


def remap_types(
    key: str, value: torch.Tensor, target: torch.Tensor, old_map: list[str], new_map: list[str]
) -> torch.Tensor:
    """Per-type rows of ``value`` placed by element name into a copy of ``target``; elements
    missing from ``old_map`` (and padding rows past the last type) keep ``target``'s rows."""
    axis = PER_TYPE[key]
    out = target.clone()
    for i, name in enumerate(new_map):
        if name in old_map:
            out.select(axis, i).copy_(value.select(axis, old_map.index(name)))
    return out


def _same_rows(a: torch.Tensor, b: torch.Tensor, axis: int) -> bool:
    """Whether ``a`` and ``b`` agree in every dimension but the type axis."""
    return a.dim() == b.dim() and all(
        x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i != axis
    )


def transfer_weights(model: nn.Module, ckpt: Checkpoint, rule: FinetuneRule) -> None:
    """Load the pretrained branch ``ckpt`` into ``model`` following ``rule``."""
    pretrained = fold_lora(ckpt.state)
    own = model.state_dict()
    remap = rule.type_map != rule.pretrained_type_map
    state, missing = {}, []
    for key, mine in own.items():
        if rule.random_fitting and not key.startswith("descriptor."):
            state[key] = mine
        elif key not in pretrained:
            missing.append(key)
        elif key in PER_TYPE and remap and _same_rows(pretrained[key], mine, PER_TYPE[key]):
            value = pretrained[key].to(mine.device, mine.dtype)
            state[key] = remap_types(key, value, mine, rule.pretrained_type_map, rule.type_map)
        else:
            state[key] = pretrained[key].to(mine.device)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: branch {ckpt.branch!r} lacks tensors the model needs: {missing[:10]}"
        )
    load_into(model, state, ckpt.path)
    if rule.new_types:
        log.info("elements new to the pretrained model (fresh rows): %s", rule.new_types)


# -- energy bias ---------------------------------------------------------------------------


def _stat_batches(data, nbatch: int, rcut: float, device, seed: int | None):
    """``nbatch`` batches' worth of frames of every system (all if fewer), in batches."""
    rng = np.random.default_rng(seed)
    for index, (kept, size) in enumerate(zip(data.kept, data.batch_size)):
        frames = np.sort(rng.permutation(kept)[: nbatch * size])
        for start in range(0, len(frames), size):
            yield data.batch(index, frames[start : start + size], rcut, device)


def _label_key(model: nn.Module) -> str:
    return model.property_name if isinstance(model, PropertyModel) else "energy"


@torch.no_grad()
def _prediction(model: nn.Module, graph) -> torch.Tensor:
    """Frame output ``(nf, dim)`` float64."""
    if isinstance(model, PropertyModel):
        return model(graph)["property"].reshape(graph.atype.shape[0], -1).double()
    return model.atomic_energy(graph, graph.edge_vec).sum(-1, keepdim=True)


def change_out_bias(model: nn.Module, data, params: Mapping, seed: int | None = None) -> None:
    """Change-by-statistic: ``out_bias += b`` with ``b = lstsq(label - prediction)`` over
    ``data_stat_nbatch`` batches per system, ``out_std`` = std of the remaining residual.

    ``params``: a normalized ``model`` section (a checkpoint's stored ``model_params`` are one).
    """
    key = _label_key(model)
    samples = []
    was_training = model.training
    model.eval()
    for batch in _stat_batches(
        data, int(params["data_stat_nbatch"]), model.rcut, model.out_bias.device, seed
    ):
        if not batch.find.get(key, False):
            continue
        label = batch.labels[key].reshape(batch.graph.atype.shape[0], -1)
        residual = label - _prediction(model, batch.graph)
        samples.append({"atype": batch.graph.atype.cpu().numpy(), key: residual.cpu().numpy()})
    model.train(was_training)
    type_map = list(params["type_map"])
    dim = model.out_bias.shape[-1]
    delta, std = out_stat(
        samples,
        key,
        len(type_map),
        **output_stat_mode(params["fitting_net"]),
        preset=preset_bias(params["preset_out_bias"], key, type_map, dim),
        exclude_types=params["atom_exclude_types"],
    )
    before = model.out_bias[0, :, 0].tolist()
    with torch.no_grad():
        model.out_bias.add_(torch.as_tensor(delta, dtype=model.out_bias.dtype)[None])
        model.out_std.copy_(torch.as_tensor(std, dtype=model.out_std.dtype)[None])
    log.info(
        "change output bias of %s from %s to %s",
        type_map,
        np.round(before, 6).tolist(),
        np.round(model.out_bias[0, :, 0].tolist(), 6).tolist(),
    )
