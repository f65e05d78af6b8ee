"""Rules across several keys that DeePMD-kit checks while normalizing an input.

They run on already normalized sections (defaults present, aliases resolved) and raise
:class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

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


def check_training(training: dict[str, Any], multi_task: bool) -> None:
    """Step-count, statistics-cache and EMA rules of the ``training`` section."""
    data_sections = (
        {f"training/data_dict/{k}": v for k, v in training.get("data_dict", {}).items()}
        if multi_task
        else {"training": training}
    )
    for path, data in data_sections.items():
        if data.get("stat_file_mode") == "read" and not data.get("stat_file"):
            raise ConfigError(join_path(path, "stat_file_mode"), "'read' needs `stat_file`")

    if training.get("enable_ema") and training.get("zero_stage", 0) >= 2:
        raise ConfigError("training/enable_ema", "needs `zero_stage` < 2")

    steps, epochs = training.get("numb_steps"), training.get("numb_epoch")
    if not multi_task:
        if steps is not None and epochs is not None:
            raise ConfigError("training", "`numb_steps` and `numb_epoch` exclude each other")
        if steps is None and epochs is None:
            raise ConfigError("training", "give `numb_steps` or `numb_epoch`")
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
