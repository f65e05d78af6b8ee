"""The branches of a run: a single-task input is a run with one branch, ``Default``.

Training goes over the branches alike (data, model, loss, statistics, steps, learning-curve
columns). What differs between a single-task and a multi-task input is only where DeePMD-kit
keeps a branch's sections in the input and how it lays the branches out in its files; that
lives here, in :class:`SingleTask` and :class:`MultiTask`, chosen once by :func:`layout_of`:

* input: ``model`` / ``loss`` / ``training`` against ``model.model_dict[b]`` /
  ``loss_dict[b]`` / ``training.data_dict[b]``;
* the trained module: the branch's model itself, or a ``ModuleDict`` of the branches (its
  parameter order is the optimizer's, its names the checkpoint's);
* the EMA's parameter names (plain names, or ``<branch>.<name>``);
* the ``model_params`` of a checkpoint (one section, or ``model_dict`` of the branches);
* the random state in ``sezm`` run state (flat, or per branch with the branch draw);
* case one-hots and shared modules (multi-task only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .multitask import case_indices, share_params

log = logging.getLogger("sezm.train")

DEFAULT = "Default"  # DeePMD-kit's name of the one branch of a single-task model


@dataclass(frozen=True)
class BranchSpec:
    """Where one branch's sections are in the normalised input."""

    name: str
    params: dict  # normalised model section of the branch
    data: dict  # its data section: ``training``, or ``training.data_dict[name]``
    loss: dict  # its loss section
    where: str  # the input path of ``data``, for error messages
    label: str  # the branch as logs and learning-curve columns name it ("" for a single task)


class SingleTask:
    """DeePMD-kit's single-task layout: one branch, ``Default``, named nowhere in the files."""

    @staticmethod
    def sections(model: dict) -> dict[str, dict]:
        """The model section of each branch in the ``model`` section."""
        return {DEFAULT: model}

    @staticmethod
    def specs(config: dict) -> list[BranchSpec]:
        tr = config["training"]
        return [BranchSpec(DEFAULT, dict(config["model"]), tr, config["loss"], "training", "")]

    @staticmethod
    def module(models: Mapping[str, nn.Module]) -> nn.Module:
        return models[DEFAULT]

    @staticmethod
    def ema_models(models: Mapping[str, nn.Module]) -> nn.Module:
        return models[DEFAULT]

    @staticmethod
    def model_params(config: dict, params: Mapping[str, dict]) -> dict:
        return params[DEFAULT]

    @staticmethod
    def checkpoint_branch(name: str) -> str | None:
        """The branch to read from a checkpoint (``None``: its single or default branch)."""
        return None

    @staticmethod
    def parameter_prefix(name: str) -> str:
        return ""

    @staticmethod
    def set_cases(tasks: Mapping[str, Any]) -> None:
        """No case one-hots: they tell branches apart."""

    @staticmethod
    def share(models: Mapping[str, nn.Module], links: Any) -> None:
        """Nothing to share: one branch shares with no other."""

    @staticmethod
    def pack_rng(rng: dict, per_branch: dict[str, dict], draw: dict) -> dict:
        return {**rng, **per_branch[DEFAULT]}

    @staticmethod
    def unpack_rng(rng: dict) -> tuple[dict[str, dict], dict | None]:
        return {DEFAULT: rng}, rng.get("draw")  # absent: single-task runs draw no branch


class MultiTask:
    """DeePMD-kit's multi-task layout: branches by name under ``model.<branch>.``."""

    @staticmethod
    def sections(model: dict) -> dict[str, dict]:
        return model["model_dict"]

    @staticmethod
    def specs(config: dict) -> list[BranchSpec]:
        tr = config["training"]
        return [
            BranchSpec(
                name,
                dict(params),
                tr["data_dict"][name],
                config["loss_dict"][name],
                f"training/data_dict/{name}",
                name,
            )
            for name, params in config["model"]["model_dict"].items()
        ]

    @staticmethod
    def module(models: Mapping[str, nn.Module]) -> nn.Module:
        return nn.ModuleDict(models)

    @staticmethod
    def ema_models(models: Mapping[str, nn.Module]) -> Mapping[str, nn.Module]:
        return dict(models)

    @staticmethod
    def model_params(config: dict, params: Mapping[str, dict]) -> dict:
        return {**config["model"], "model_dict": dict(params)}

    @staticmethod
    def checkpoint_branch(name: str) -> str | None:
        return name

    @staticmethod
    def parameter_prefix(name: str) -> str:
        return f"{name}."

    @staticmethod
    def set_cases(tasks: Mapping[str, Any]) -> None:
        """Each branch's case one-hot (``dim_case_embd > 0``), set when a run starts fresh;
        ``tasks``: the branches (:class:`~sezm.train.tasks.Task`) with their models."""
        params = {name: task.params for name, task in tasks.items()}
        for name, index in case_indices(params).items():
            tasks[name].model.fitting_net.set_case(index)

    @staticmethod
    def share(models: Mapping[str, nn.Module], links: Any) -> None:
        """Let the branches use the modules ``links`` (the input's ``shared_links``; ``None``
        when not given) names."""
        if links is None:
            log.warning("no shared_links given: the branches share no parameters")
        share_params(models, links or {})

    @staticmethod
    def pack_rng(rng: dict, per_branch: dict[str, dict], draw: dict) -> dict:
        return {**rng, "tasks": per_branch, "draw": draw}

    @staticmethod
    def unpack_rng(rng: dict) -> tuple[dict[str, dict], dict | None]:
        return rng["tasks"], rng.get("draw")


Layout = type[SingleTask] | type[MultiTask]


def layout_of(config: dict) -> Layout:
    """The layout of a normalised input: multi-task when ``model`` has a ``model_dict``."""
    return MultiTask if "model_dict" in config["model"] else SingleTask
