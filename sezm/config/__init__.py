"""Input-file schema: one dargs declaration per option, normalization and checks.

The schema is DeePMD-kit's (3.2, PyTorch backend) restricted to the DPA4 model family, so
DeePMD-kit DPA4 inputs are valid sezm inputs and normalize to the same dicts.
"""

from .errors import ConfigError, ConfigWarning
from .normalize import (
    check_stored_model,
    expand_shared_params,
    is_multi_task,
    normalize_input,
    normalize_model,
    normalize_section,
    override_numb_steps,
)
from .rules import DEFAULT_STOP_LR, check_learning_rate, check_trainable
from .schema_model import model_section, multitask_model_section
from .schema_training import input_schema

__all__ = [
    "DEFAULT_STOP_LR",
    "ConfigError",
    "ConfigWarning",
    "check_learning_rate",
    "check_stored_model",
    "check_trainable",
    "expand_shared_params",
    "input_schema",
    "is_multi_task",
    "model_section",
    "multitask_model_section",
    "normalize_input",
    "normalize_model",
    "normalize_section",
    "override_numb_steps",
]
