"""Precision and compile switches of a training run, and the log lines of what is in force.

Training forwards (per model branch):

* ``model.descriptor.use_amp``: bfloat16 autocast of the interaction blocks, CUDA only (the
  descriptor enters it in training mode; geometry, embeddings and read-out stay float32+);
* ``model.enable_tf32``: float32 matmuls at ``"high"`` precision (TF32) during the training
  forward, CUDA only; ``"highest"`` otherwise;
* ``model.use_compile``: the compiled energy + force path of ``compile.py`` (energy models).

Evaluation forwards (the ``disp_freq`` validation and the full validation) follow the inference
settings (``DP_COMPILE_INFER``, ``DP_TF32_INFER``, ``DP_AMP_INFER``, ``DP_TRITON_INFER``);
``validating.compiled_infer`` / ``tf32_infer`` / ``amp_infer`` set the first three to ``1``
unless the shell exports them (the shell wins), as in DeePMD-kit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..infer.settings import InferenceSettings

log = logging.getLogger("sezm.train")

#: ``validating`` option -> the variable it defaults.
INFER_OPTIONS = {
    "compiled_infer": "DP_COMPILE_INFER",
    "tf32_infer": "DP_TF32_INFER",
    "amp_infer": "DP_AMP_INFER",
}


def evaluation_settings(
    validating: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> InferenceSettings:
    """The inference settings of validation forwards: ``validating`` options as defaults of the
    ``DP_*_INFER`` variables, the environment's values first."""
    env = os.environ if environ is None else environ
    defaults = {var: "1" for key, var in INFER_OPTIONS.items() if validating.get(key)}
    return InferenceSettings.from_env({**defaults, **env})


@dataclass(frozen=True)
class Precision:
    """The switches in force for one model branch on ``device``."""

    device: torch.device
    amp: bool  # bf16 blocks in training forwards
    tf32: bool  # TF32 matmuls in training forwards
    compile: bool  # compiled energy + force path in training
    evaluation: InferenceSettings

    @classmethod
    def resolve(
        cls,
        params: Mapping[str, Any],
        device: torch.device,
        evaluation: InferenceSettings,
        compilable: bool,
    ) -> Precision:
        """From a branch's normalised model section; ``compilable``: whether the model has the
        compiled path (energy models)."""
        cuda = device.type == "cuda"
        return cls(
            device=device,
            amp=cuda and bool(params["descriptor"]["use_amp"]),
            tf32=cuda and bool(params["enable_tf32"]),
            compile=compilable and bool(params["use_compile"]),
            evaluation=evaluation,
        )

    @property
    def eval_amp(self) -> bool:
        return self.evaluation.amp and self.device.type == "cuda"

    def describe(self, params: Mapping[str, Any]) -> list[str]:
        """What is in force, and why a requested switch is not."""
        cuda, on = self.device.type == "cuda", {True: "on", False: "off"}
        wanted_amp = bool(params["descriptor"]["use_amp"])
        wanted_tf32 = bool(params["enable_tf32"])
        wanted_compile = bool(params["use_compile"])

        def why(wanted: bool, active: bool, reason: str) -> str:
            return f" ({reason})" if wanted and not active else ""

        cpu = f"CUDA only, running on {self.device.type}"
        ev = self.evaluation
        lines = [
            "training forward: bf16 autocast of the blocks (use_amp) "
            f"{on[self.amp]}{why(wanted_amp, self.amp, cpu)}; TF32 (enable_tf32) "
            f"{on[self.tf32]}{why(wanted_tf32, self.tf32, cpu)}; compile (use_compile) "
            f"{on[self.compile]}{why(wanted_compile, self.compile, 'energy models only')}",
            f"evaluation forward: compile {on[ev.compile]}; float32 matmul precision "
            f"{ev.matmul_precision if cuda else 'highest'}; bf16 blocks {on[self.eval_amp]}"
            f"{why(ev.amp, self.eval_amp, cpu)}",
        ]
        if ev.tf32 and not cuda:
            lines[-1] += f" (DP_TF32_INFER={ev.tf32}: {cpu})"
        if ev.triton:
            lines.append(f"DP_TRITON_INFER={ev.triton}: no fused kernels in sezm; PyTorch path")
        return lines

    @contextlib.contextmanager
    def training_forward(self) -> Iterator[None]:
        """The float32 matmul precision of a training forward (CUDA), restored after."""
        if self.device.type != "cuda":
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)

    def evaluation_forward(self) -> contextlib.AbstractContextManager:
        """The float32 matmul precision of an evaluation forward (``DP_TF32_INFER``)."""
        return self.evaluation.evaluation(self.device)
