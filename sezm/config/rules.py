"""Rules across several keys that DeePMD-kit checks while normalizing an input.

They run on already normalized sections (defaults present, aliases resolved) and raise
:class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import ConfigError, join_path
from .schema_training import METRIC_PREFACTOR, validation_metrics

DEFAULT_STOP_LR = 5e-8
WSD_DECAY_TYPES = ("inverse_linear", "cosine", "linear")


def check_learning_rate(lr: dict[str, Any], path: str = "learning_rate") -> None:
    """Check a normalized ``learning_rate`` section; fill ``stop_lr`` when it has no end point.

    ``stop_lr`` and ``stop_lr_ratio`` exclude each other, and so do a non-zero
    ``warmup_steps`` and ``warmup_ratio``. Without either end point, ``stop_lr`` becomes
    ``DEFAULT_STOP_LR`` (in place).
    """
    if lr.get("stop_lr") is not None and lr.get("stop_lr_ratio") is not None:
        raise ConfigError(path, "`stop_lr` and `stop_lr_ratio` exclude each other; give one")
    if lr.get("stop_lr") is None and lr.get("stop_lr_ratio") is None:
        lr["stop_lr"] = DEFAULT_STOP_LR
    if lr.get("warmup_steps", 0) != 0 and lr.get("warmup_ratio") is not None:
        raise ConfigError(path, "`warmup_steps` and `warmup_ratio` exclude each other; give one")

    def require(key: str, ok: bool, what: str) -> None:
        if lr.get(key) is not None and not ok:
            raise ConfigError(join_path(path, key), f"{what}, got {lr[key]!r}")

    kind = lr.get("type", "exp")
    if kind == "exp":
        require("decay_steps", (lr.get("decay_steps") or 0) > 0, "must be positive")
        rate = lr.get("decay_rate")
        require("decay_rate", rate is not None and 0 < rate <= 1, "must lie in (0, 1]")
    elif kind == "wsd":
        for key in ("start_lr", "stop_lr", "stop_lr_ratio"):
            require(key, (lr.get(key) or 0) > 0, "must be positive for the wsd schedule")
        ratio = lr.get("decay_phase_ratio")
        require("decay_phase_ratio", ratio is not None and 0 < ratio <= 1, "must lie in (0, 1]")
        require(
            "decay_type",
            lr.get("decay_type") in WSD_DECAY_TYPES,
            "must be one of " + ", ".join(WSD_DECAY_TYPES),
        )


_NO_DEFAULT = {
    "learning_rate/start_lr": (
        'DeePMD-kit has no default learning rate; e.g. "learning_rate": {"start_lr": 0.001}'
    ),
    "training/numb_steps": (
        "or `training/numb_epoch`; DeePMD-kit has no default run length; "
        "`sezm train --numb-steps N` also sets it"
    ),
    "training_data/systems": "the folders of the training systems",
}


def _data_sections(training: dict[str, Any], multi_task: bool) -> dict[str, dict[str, Any]]:
    """The sections holding ``training_data`` etc., keyed by their path."""
    if not multi_task:
        return {"training": training}
    return {f"training/data_dict/{k}": v for k, v in training.get("data_dict", {}).items()}


def missing_keys(data: dict[str, Any], multi_task: bool) -> list[str]:
    """Keys of a normalized input that training needs and DeePMD-kit has no default for: the
    learning rate, the run length (single-task) and the training systems."""
    training = data.get("training") or {}
    missing = []
    if not multi_task and training.get("numb_steps") is None and training.get("numb_epoch") is None:
        missing.append("training/numb_steps")
    if data.get("learning_rate") is None:
        missing.append("learning_rate/start_lr")
    for path, section in _data_sections(training, multi_task).items():
        if not section.get("training_data"):
            missing.append(join_path(path, "training_data/systems"))
    return missing


def check_run_length(data: dict[str, Any], multi_task: bool) -> None:
    """A single-task input needs a run length (DeePMD-kit's rule); the error also names the
    other keys training will need that are missing."""
    missing = missing_keys(data, multi_task)
    if "training/numb_steps" in missing:
        raise _missing_error(missing)


def check_trainable(
    data: dict[str, Any], multi_task: bool | None = None, source: str | None = None
) -> None:
    """Before training a normalized input: every key without a DeePMD-kit default is given.
    DeePMD-kit's own schema accepts the input without them and its trainer stops on a bare
    ``KeyError``; here one :class:`ConfigError` names them all (and ``source``, the file)."""
    if multi_task is None:
        multi_task = "model_dict" in (data.get("model") or {})
    missing = missing_keys(data, multi_task)
    if missing:
        raise _missing_error(missing).with_source(source)


def _missing_error(missing: list[str]) -> ConfigError:
    hints = [_NO_DEFAULT.get(p, _NO_DEFAULT["training_data/systems"]) for p in missing]
    message = f"required key is missing ({hints[0]})"
    if len(missing) > 1:
        message += "; also missing: " + "; ".join(
            f"`{p}` ({h})" for p, h in zip(missing[1:], hints[1:])
        )
    return ConfigError(missing[0], message)


def check_warmup(lr: dict[str, Any] | None, numb_steps: int | None) -> None:
    """The warm-up must end before the last step (DeePMD-kit refuses it when training starts)."""
    if lr is None or numb_steps is None:
        return
    ratio = lr.get("warmup_ratio")
    warmup = int(ratio * numb_steps) if ratio is not None else int(lr.get("warmup_steps", 0))
    if warmup == 0 or warmup < numb_steps:
        return
    if ratio is not None:
        key, given = "warmup_ratio", f"{ratio} of {numb_steps} steps = {warmup} steps"
    else:
        key, given = "warmup_steps", f"{warmup} steps"
    raise ConfigError(
        f"learning_rate/{key}",
        f"the warm-up ({given}) must be shorter than `training/numb_steps` ({numb_steps}); "
        "lower `learning_rate/warmup_steps`, give `learning_rate/warmup_ratio` (a fraction "
        "of the run) instead, or train for more steps",
    )


def check_training(training: dict[str, Any], multi_task: bool) -> None:
    """Step-count, statistics-cache and EMA rules of the ``training`` section."""
    for path, data in _data_sections(training, multi_task).items():
        if data.get("stat_file_mode") == "read" and not data.get("stat_file"):
            raise ConfigError(join_path(path, "stat_file_mode"), "'read' needs `stat_file`")

    if training.get("enable_ema") and training.get("zero_stage", 0) >= 2:
        raise ConfigError("training/enable_ema", "needs `zero_stage` < 2")

    steps, epochs = training.get("numb_steps"), training.get("numb_epoch")
    if not multi_task:
        if steps is not None and epochs is not None:
            raise ConfigError("training", "`numb_steps` and `numb_epoch` exclude each other")
        return
    if epochs is not None:
        raise ConfigError("training/numb_epoch", "single-task only; use `num_epoch_dict`")
    if training.get("num_epoch_dict"):
        if steps is not None:
            raise ConfigError("training", "`num_epoch_dict` and `numb_steps` exclude each other")
        if training.get("model_prob"):
            raise ConfigError("training", "`num_epoch_dict` and `model_prob` exclude each other")
    elif steps is None:
        raise ConfigError("training", "give `numb_steps` or `num_epoch_dict`")


def check_full_validation(data: dict[str, Any], multi_task: bool) -> None:
    """Full validation needs single-task energy/spin training with validation data and a metric
    whose loss prefactors are non-zero."""
    validating = data.get("validating") or {}
    training = data.get("training") or {}
    wanted = validating.get("full_validation", False) or (
        validating.get("ema_full_validation", False) and training.get("enable_ema", False)
    )
    if not wanted or float(validating.get("full_val_start", 0.0)) == 1.0:
        return
    if multi_task:
        raise ConfigError("validating/full_validation", "not supported in multi-task training")
    loss = data.get("loss") or {}
    loss_type = loss.get("type", "ener")
    if loss_type not in ("ener", "ener_spin"):
        raise ConfigError(
            "validating/full_validation", f"needs an `ener` or `ener_spin` loss, not {loss_type!r}"
        )
    metric = str(validating.get("validation_metric", "E:MAE"))
    family = metric.strip().lower()
    allowed = validation_metrics("spin" if loss_type == "ener_spin" else "energy")
    if family not in allowed:
        raise ConfigError(
            "validating/validation_metric",
            f"{metric!r} is not available for {loss_type} training; use one of "
            + ", ".join(m.upper() for m in allowed),
        )
    if not training.get("validation_data"):
        raise ConfigError("training/validation_data", "full validation needs validation data")
    if training.get("zero_stage", 0) >= 2:
        raise ConfigError("validating/full_validation", "needs `training/zero_stage` < 2")
    pref = METRIC_PREFACTOR[family.split(":")[0]]
    keys = (f"start_pref_{pref}", f"limit_pref_{pref}")
    if any(float(loss.get(k, 0.0)) == 0.0 for k in keys):
        raise ConfigError(
            "validating/validation_metric",
            f"{metric!r} needs non-zero `loss/{keys[0]}` and `loss/{keys[1]}`",
        )


def check_no_multitask_lora(model: dict[str, Any]) -> None:
    """LoRA adapters cannot be combined with parameters shared across branches."""
    for name, branch in (model.get("model_dict") or {}).items():
        if branch.get("lora") is not None:
            raise ConfigError(f"model/model_dict/{name}/lora", "LoRA is single-task only")


def block_schedules(desc: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-block degrees and orders ``(l_schedule, m_schedule)`` of a normalized descriptor:
    ``l_schedule``, else ``n_blocks`` times ``lmax``; ``m_schedule``, else ``min(mmax, l)``
    per block (``mmax`` null: ``l``)."""
    given = desc["l_schedule"]
    l_sched = tuple(given) if given is not None else (desc["lmax"],) * desc["n_blocks"]
    if desc["m_schedule"] is not None:
        return l_sched, tuple(desc["m_schedule"])
    mmax = desc["mmax"]
    return l_sched, tuple(l if mmax is None else min(mmax, l) for l in l_sched)


def check_descriptor(desc: dict[str, Any], path: str = "model/descriptor") -> None:
    """Rules across the keys of a normalized ``dpa4`` descriptor section (DeePMD-kit checks
    them when it builds the descriptor): a non-increasing ``l_schedule``, an ``m_schedule``
    with one order ``0 <= m <= l`` per block, ``kmax`` at most the first block's degree,
    at most one descriptor-level attention residual, and heads that divide the attention
    width."""
    l_sched, m_sched = block_schedules(desc)
    if any(a < b for a, b in itertools.pairwise(l_sched)):
        raise ConfigError(
            join_path(path, "l_schedule"), f"must be non-increasing, got {list(l_sched)}"
        )
    if len(m_sched) != len(l_sched):
        raise ConfigError(
            join_path(path, "m_schedule"),
            f"needs one entry per block ({len(l_sched)}), got {len(m_sched)}",
        )
    if any(not 0 <= m <= l for m, l in zip(m_sched, l_sched)):
        raise ConfigError(
            join_path(path, "m_schedule"),
            f"entries must satisfy 0 <= m_schedule[i] <= l_schedule[i] = {list(l_sched)}, "
            f"got {list(m_sched)}",
        )
    lmax = l_sched[0] if l_sched else desc["lmax"]
    if desc["kmax"] > lmax:
        raise ConfigError(join_path(path, "kmax"), f"must be <= lmax = {lmax}, got {desc['kmax']}")
    if desc["full_attn_res"] != "none" and desc["block_attn_res"] != "none":
        raise ConfigError(
            join_path(path, "block_attn_res"),
            "`full_attn_res` and `block_attn_res` exclude each other",
        )
    heads = desc["n_atten_head"]
    focus_dim = desc["focus_dim"] or desc["channels"]
    width = desc["n_focus"] * focus_dim if desc["atten_f_mix"] else focus_dim
    if heads > 0 and width % heads:
        raise ConfigError(
            join_path(path, "n_atten_head"),
            f"{heads} heads do not divide the attention width {width}",
        )


def check_exclusions(model: dict[str, Any], path: str = "model") -> None:
    """The model's ``pair_exclude_types`` and its descriptor's ``exclude_types`` name the same
    pairs when both are given."""
    pairs = sorted(sorted(p) for p in model["pair_exclude_types"])
    desc_pairs = sorted(sorted(p) for p in model["descriptor"]["exclude_types"])
    if pairs and desc_pairs and pairs != desc_pairs:
        raise ConfigError(
            join_path(path, "descriptor/exclude_types"),
            f"{desc_pairs} disagrees with `{join_path(path, 'pair_exclude_types')}` {pairs}",
        )


def check_model(model: dict[str, Any], multi_task: bool) -> None:
    """The descriptor and exclusion rules of every branch of a normalized ``model`` section."""
    if not multi_task:
        branches = {"model": model}
    else:
        branches = {f"model/model_dict/{k}": v for k, v in model["model_dict"].items()}
    for path, branch in branches.items():
        check_descriptor(branch["descriptor"], join_path(path, "descriptor"))
        check_exclusions(branch, path)
