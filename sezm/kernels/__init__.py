"""Hand-written operations below the model: autograd nodes and optional fused (Triton) kernels.

Always used, plain PyTorch: row gathers and scatter-sums whose autograd nodes keep only the index
(:mod:`sezm.kernels.gather_scatter`), the gather + rotate node of the edge-frame rotation
(:mod:`sezm.kernels.gather_rotate`), and per-edge matrix products that a compiler can fuse when
the model is traced (:mod:`sezm.kernels.edge_matmul`). Optional, switched on per evaluation by
the inference settings: the fused rotation kernels.

Nothing here imports Triton: :mod:`sezm.kernels.rotation_triton` is loaded on first use. The
switch is a context, not an environment variable read deep in the maths:
:meth:`sezm.infer.settings.InferenceSettings.evaluation` enters :func:`fused_rotation` when
``DP_TRITON_INFER`` asks for it, and the rotation plans (:mod:`sezm.geometry.rotate`) ask
:func:`fused_rotation_for` whether a given tensor takes the fused path.

A tensor takes it when the switch is on and the tensor is on CUDA, or on the CPU while Triton's
interpreter is on (``TRITON_INTERPRET=1``, how the kernels are tested without a GPU). The
kernels are custom operators (``torch.library.triton_op``): ``torch.export`` keeps them as
graph nodes, so ``sezm freeze --device cuda`` with ``DP_TRITON_INFER`` embeds them in the
``.pt2``. Code compiled by ``torch.compile`` (``DP_COMPILE_INFER``) keeps the PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .edge_matmul import edge_matmul, select_columns, tracing

_FUSED_ROTATION: ContextVar[bool] = ContextVar("sezm_fused_rotation", default=False)


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    """Whether Triton runs its kernels in the Python interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def require_triton(what: str) -> None:
    """Raise a clear error when ``triton`` is missing."""
    if not triton_available():
        raise RuntimeError(
            f"{what} needs the triton package, which CUDA builds of torch install; "
            "pip install triton (CPU machines: only with TRITON_INTERPRET=1, for testing)"
        )


@contextmanager
def fused_rotation(enabled: bool = True) -> Iterator[None]:
    """Within this context, edge-frame rotations of eligible tensors run the Triton kernels."""
    if enabled:
        require_triton("DP_TRITON_INFER (fused edge-frame rotations)")
    token = _FUSED_ROTATION.set(enabled)
    try:
        yield
    finally:
        _FUSED_ROTATION.reset(token)


def fused_rotation_for(tensor: torch.Tensor) -> bool:
    """Whether rotations of ``tensor`` take the fused path here and now."""
    if torch.compiler.is_dynamo_compiling() or not _FUSED_ROTATION.get():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreter_on())


__all__ = [
    "edge_matmul",
    "fused_rotation",
    "fused_rotation_for",
    "require_triton",
    "select_columns",
    "tracing",
    "triton_available",
    "triton_interpreter_on",
]
