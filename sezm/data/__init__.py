"""The input pipeline: user-input checks, neighbour search and the model's graph; training and
test data (DeePMD-kit npy systems, files ASE reads, ...), batching, statistics, neighbour
statistics."""

from .ase_frames import AseSystem, FileOptions, FrameFile
from .dataset import (
    Batch,
    DataSystem,
    batch_sizes,
    expand_systems,
    fields_for_model,
    open_systems,
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
from .system import LABEL_FIELDS, BaseSystem, DataError, Field, System

__all__ = [
    "LABEL_FIELDS",
    "AseSystem",
    "BaseSystem",
    "Batch",
    "DataError",
    "DataSystem",
    "Field",
    "FileOptions",
    "FrameFile",
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
    "open_systems",
    "out_stat",
    "resolve_sel",
    "system_probs",
    "update_sel",
]
