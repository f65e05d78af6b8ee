"""Inference switches, read from the environment once, when an evaluator is built.

=====================  =======================================  ================================
variable               values                                   effect
=====================  =======================================  ================================
``DP_COMPILE_INFER``   boolean (default off)                    ``torch.compile`` of the energy
                                                                (+ force backward) path
``DP_TF32_INFER``      ``0`` / ``1`` / ``2`` (default ``0``)    float32 matmul precision
                                                                highest / high / medium, CUDA only
``DP_TRITON_INFER``    ``0``-``3`` (default ``0``)              CUDA only: Triton kernels for
                                                                the edge-frame rotations (every
                                                                level >= 1 runs the same ones)
``DP_AMP_INFER``       boolean (default off)                    bfloat16 autocast, CUDA only:
                                                                not available, an error there
``SEZM_EDGE_CHUNK``    ``auto`` (default) or edges, ``0`` = off  streamed evaluation
                                                                (:mod:`sezm.engine.stream`): edges
                                                                per chunk of block edge work
=====================  =======================================  ================================

Booleans are ``1/true/yes/on`` or ``0/false/no/off`` (any case); the levels also take those words
(off = 0, on = 1). Anything else raises ``ValueError`` naming the variable and the value.
``DeepPot``, ``DeepProperty``, ``SeZMCalculator`` and ``embed`` call :meth:`from_env` in their
constructor and :meth:`apply` on their model, so the model never reads the environment, and
changing a variable afterwards has no effect (as in DeePMD-kit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.stream import StreamPolicy
from ..kernels import fused_rotation, require_triton
from ..runtime import deterministic_compiled

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
MATMUL_PRECISION = ("highest", "high", "medium")  # DP_TF32_INFER = 0, 1, 2
TRITON_LEVELS = (0, 1, 2, 3)


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    """``raw`` (the value of variable ``name``, ``None`` if unset) as a boolean."""
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={raw!r} is not a boolean; use one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}"
    )


def parse_level(name: str, raw: str | None, levels: tuple[int, ...]) -> int:
    """``raw`` as one of the integer ``levels``; boolean words count as ``0``/``1``."""
    if raw is None or not raw.strip():
        return 0
    value = raw.strip().lower()
    if value in _TRUE[1:] or value in _FALSE[1:]:
        return int(value in _TRUE)
    try:
        level = int(value)
    except ValueError:
        level = None
    if level not in levels:
        raise ValueError(
            f"{name}={raw!r} is not a valid level; use one of {', '.join(map(str, levels))}"
        )
    return level


@dataclass(frozen=True)
class InferenceSettings:
    """The inference switches in force, read from the environment: compile, TF32 matmul
    precision, Triton rotations, bf16 autocast, edge chunk size (``SEZM_EDGE_CHUNK``)."""

    compile: bool = False
    tf32: int = 0  # index into MATMUL_PRECISION
    triton: int = 0
    amp: bool = False
    edge_chunk: int | None = None  # None: automatic; 0: never stream

    @property
    def streaming_text(self) -> str:
        if self.edge_chunk is None:
            return "edge streaming auto"
        return "edge streaming off" if self.edge_chunk == 0 else f"edge chunks {self.edge_chunk}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InferenceSettings:
        """The settings of ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(
            compile=parse_bool("DP_COMPILE_INFER", env.get("DP_COMPILE_INFER")),
            tf32=parse_level("DP_TF32_INFER", env.get("DP_TF32_INFER"), (0, 1, 2)),
            triton=parse_level("DP_TRITON_INFER", env.get("DP_TRITON_INFER"), TRITON_LEVELS),
            amp=parse_bool("DP_AMP_INFER", env.get("DP_AMP_INFER")),
            edge_chunk=parse_edge_chunk(env.get("SEZM_EDGE_CHUNK")),
        )

    @property
    def matmul_precision(self) -> str:
        return MATMUL_PRECISION[self.tf32]

    def describe(self, device: torch.device) -> list[str]:
        """One line of settings in force, then a line for each switch without effect."""
        cuda = device.type == "cuda"
        lines = [
            f"inference settings on {device}: compile {'on' if self.compile else 'off'}, "
            f"float32 matmul precision {self.matmul_precision if cuda else 'highest'}, "
            f"AMP off, fused kernels {self.kernels_text(device)}, {self.streaming_text}"
        ]
        if self.tf32 and not cuda:
            lines.append(f"DP_TF32_INFER={self.tf32} has no effect on {device} (CUDA only)")
        if self.amp and not cuda:
            lines.append(f"DP_AMP_INFER=1 has no effect on {device} (CUDA only)")
        if self.triton and not cuda:
            lines.append(
                f"DP_TRITON_INFER={self.triton}: fused Triton kernels have no effect on {device} "
                "(CUDA only); the PyTorch path runs"
            )
        if self.triton and cuda and self.compile:
            lines.append(
                f"DP_TRITON_INFER={self.triton} with DP_COMPILE_INFER=1: the compiled graph keeps "
                "the PyTorch rotations (the fused kernels run in eager evaluation only)"
            )
        return lines

    def kernels_text(self, device: torch.device) -> str:
        """What runs for ``DP_TRITON_INFER`` on ``device``."""
        if not self.triton or device.type != "cuda":
            return "none"
        return "Triton edge-frame rotations (float32 accumulation)"

    def apply(self, model: nn.Module, device: torch.device) -> None:
        """Log the settings, and prepare ``model`` (on ``device``) for them.

        ``torch.compile`` traces lazily, at the first evaluation (minutes on a CPU); a setup
        where it cannot run raises there, there is no silent fallback to eager. bfloat16
        autocast (``DP_AMP_INFER`` on CUDA) is an error: the interaction blocks mix dtypes in
        their scatters and do not support it.
        """
        if self.amp and device.type == "cuda":
            raise ValueError(
                "DP_AMP_INFER=1: bfloat16 inference is not available in sezm; unset DP_AMP_INFER"
            )
        if self.triton and device.type == "cuda":
            require_triton(f"DP_TRITON_INFER={self.triton}")
        summary, *notes = self.describe(device)
        log.info(summary)
        for note in notes:
            log.warning(note)
        self.attach_streaming(model, device)
        if self.compile:
            _check_compile()
            name = "atomic_energy" if hasattr(model, "atomic_energy") else "forward"
            setattr(model, name, self.compiled(getattr(model, name)))

    def attach_streaming(self, model: nn.Module, device: torch.device) -> None:
        """Give ``model``'s descriptor (if it has one) the streamed-evaluation policy; it acts
        only in evaluation mode (see :class:`~sezm.engine.stream.StreamPolicy`)."""
        descriptor = getattr(model, "descriptor", None)
        if descriptor is not None:
            descriptor.streaming = StreamPolicy(
                descriptor.edge_bytes(), fixed=self.edge_chunk, device=device
            )

    def compiled(self, fn: Callable) -> Callable:
        """``fn`` under ``torch.compile`` (dynamic shapes: atom and edge counts vary)."""
        if not self.compile:
            return fn
        compiled = torch.compile(fn, dynamic=True)
        return deterministic_compiled(compiled, "the model (DP_COMPILE_INFER)")

    @contextmanager
    def evaluation(self, device: torch.device) -> Iterator[None]:
        """Context of one evaluation: the float32 matmul precision on CUDA (then restored), and
        the fused edge-frame rotations (:mod:`sezm.kernels`) where ``DP_TRITON_INFER`` asks."""
        if device.type != "cuda":
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.matmul_precision)
        try:
            with fused_rotation(self.triton > 0):
                yield
        finally:
            torch.set_float32_matmul_precision(previous)


def parse_edge_chunk(raw: str | None) -> int | None:
    """``SEZM_EDGE_CHUNK``: ``auto``/unset -> ``None``; a non-negative edge count."""
    if raw is None or not raw.strip() or raw.strip().lower() == "auto":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"SEZM_EDGE_CHUNK={raw!r} is not an edge count; use auto, 0 (off) or a positive "
            "number of edges per chunk"
        )
    return value


def _check_compile() -> None:
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        raise RuntimeError(
            f"DP_COMPILE_INFER=1, but torch.compile is not supported with torch "
            f"{torch.__version__} on this platform; unset DP_COMPILE_INFER"
        )
