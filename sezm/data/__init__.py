"""Training and test data: DeePMD-kit npy systems, batching, statistics, neighbour statistics."""

from .dataset import (
    Batch,
    DataSystem,
    batch_sizes,
    expand_systems,
    fields_for_model,
    system_probs,
)
from .neighbor_stat import (
    NeighborStat,
    neighbor_stat,
    neighbor_stat_command,
    resolve_sel,
    update_sel,
)
from .stats import ModelStats, StatFile, model_stats, out_stat
from .system import LABEL_FIELDS, DataError, Field, System

__all__ = [
    "LABEL_FIELDS",
    "Batch",
    "DataError",
    "DataSystem",
    "Field",
    "ModelStats",
    "NeighborStat",
    "StatFile",
    "System",
    "batch_sizes",
    "expand_systems",
    "fields_for_model",
    "model_stats",
    "neighbor_stat",
    "neighbor_stat_command",
    "out_stat",
    "resolve_sel",
    "system_probs",
    "update_sel",
]
