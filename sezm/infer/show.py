"""``sezm show``: what a checkpoint (``.pt``) or frozen model (``.pt2``) holds (``dp --pt show``).

Attributes (:data:`ATTRIBUTES`) are DeePMD-kit's names where it has them (``model-branch``,
``type-map``, ``descriptor``, ``fitting-net``, ``size``, ``observed-type``), plus ``rcut``,
``sel``, ``steps`` and ``versions``. They are reported in that order whatever order they are
asked in, one log line each (per branch of a multi-task checkpoint); without any, every one
that applies.

Where the facts come from: a checkpoint's ``_extra_state`` (``model_params``, ``train_infos``)
and, for ``observed-type`` when ``info.observed_type`` is absent, its ``out_bias`` (types with a
non-zero bias, as DeePMD-kit); a ``.pt2``'s ``extra/metadata.json`` and
``extra/model_def_script.json``. Parameter counts follow DeePMD-kit's rule (parameters whose
name contains ``descriptor``; ``fitting`` but not ``_networks``) on the model built from the
configuration, for the first branch of a multi-task model, as DeePMD-kit. The torch and sezm
versions are part of a ``.pt2``'s metadata; ``.pt`` checkpoints do not record them.

Files are shown as stored, never normalized: a key may be missing (a ``.pt2`` without
``model_def_script.json`` has a ``type_map`` only; DeePMD-kit's metadata has no ``sezm`` entry),
so every key is read with a fallback that says what its absence means.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compat.deepmd import CheckpointError

log = logging.getLogger("sezm")

#: Attribute -> what it shows (the ``--help`` of ``sezm show``).
ATTRIBUTES = {
    "model-branch": "branches of a multi-task model, their aliases and info",
    "type-map": "element of each atom type",
    "descriptor": "descriptor settings",
    "fitting-net": "fitting-net settings",
    "rcut": "cut-off radius (Å)",
    "sel": "neighbour selection",
    "size": "parameter counts",
    "observed-type": "elements seen in the training data",
    "steps": "training steps done and the last learning rate",
    "versions": "torch and sezm versions the file was written with",
}


@dataclass
class ModelFile:
    """What :func:`read_model_file` found in a checkpoint or ``.pt2``."""

    path: str
    frozen: bool
    model_params: dict  # a multi-task checkpoint's has ``model_dict``
    train_infos: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # .pt2 only
    out_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> (1, nt, dim)
    dens: dict[str, bool] = field(default_factory=dict)  # branch -> has a dens head
    sezm_run_state: bool = False  # a checkpoint that ``sezm train`` can resume exactly

    @property
    def multi_task(self) -> bool:
        return "model_dict" in self.model_params

    @property
    def branches(self) -> dict[str, dict]:
        if self.multi_task:
            return dict(self.model_params["model_dict"])
        return {"Default": self.model_params}


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Read a ``.pt2`` (by its suffix) or a DeePMD-kit/sezm training checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path}")
    if Path(path).suffix == ".pt2":
        return _read_frozen(path)
    if Path(path).suffix == ".pth":
        raise CheckpointError(
            f"{path}: a TorchScript model (DeePMD-kit's frozen .pth); sezm reads .pt "
            "checkpoints and .pt2 frozen models"
        )
    return _read_checkpoint(path)


def _read_frozen(path: str) -> ModelFile:
    try:
        with zipfile.ZipFile(path) as zf:
            entries = {name.rsplit("/extra/", 1)[-1]: name for name in zf.namelist()}
            meta = _zip_json(zf, entries, "metadata.json", path)
            params = _zip_json(zf, entries, "model_def_script.json", path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a .pt2 package (not a zip archive)") from None
    return ModelFile(path, True, params or {"type_map": meta.get("type_map", [])}, metadata=meta)


def _zip_json(zf: zipfile.ZipFile, entries: dict, name: str, path: str) -> dict:
    if name not in entries:
        if name == "metadata.json":
            raise CheckpointError(
                f"{path}: no extra/metadata.json; not a frozen DeePMD-kit/sezm model"
            )
        return {}
    try:
        return json.loads(zf.read(entries[name]))
    except ValueError as err:
        raise CheckpointError(f"{path}: extra/{name} is not valid JSON ({err})") from None


def _read_checkpoint(path: str) -> ModelFile:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: neither a .pt2 (by its suffix) nor a readable PyTorch checkpoint ({err})"
        ) from err
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    extra = state.get("_extra_state") if isinstance(state, dict) else None
    if not isinstance(extra, dict) or "model_params" not in extra:
        raise CheckpointError(
            f"{path}: no '_extra_state.model_params' entry; not a DeePMD-kit/sezm training "
            "checkpoint"
        )
    info = ModelFile(
        path,
        False,
        extra["model_params"],
        train_infos=dict(extra.get("train_infos") or {}),
        sezm_run_state="sezm" in raw,
    )
    for branch in info.branches:
        prefix = f"model.{branch}.atomic_model."
        info.dens[branch] = any(k.startswith(prefix + "dens_fitting_net.") for k in state)
        bias = state.get(prefix + "out_bias")
        if torch.is_tensor(bias):
            info.out_bias[branch] = bias
    return info


# -- attributes --------------------------------------------------------------------------------


def show(path: str | os.PathLike, attributes: Sequence[str] | None = None) -> list[str]:
    """Log (and return) the lines that describe ``attributes`` of the model at ``path``."""
    unknown = [a for a in attributes or () if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; choose from {list(ATTRIBUTES)}")
    info = read_model_file(path)
    if attributes:
        wanted = set(attributes)
    else:
        wanted = set(ATTRIBUTES) - (set() if info.multi_task else {"model-branch"})
    if "model-branch" in wanted and not info.multi_task:
        raise CheckpointError(
            f"{info.path}: attribute 'model-branch' needs a multi-task model; this is a "
            "single-task one"
        )
    lines = [_header(info)]
    for name in ATTRIBUTES:
        if name in wanted:
            lines += _REPORTS[name](info)
    for line in lines:
        log.info(line)
    return lines


def _header(info: ModelFile) -> str:
    kind = "multitask" if info.multi_task else "singletask"
    if not info.frozen:
        return f"This is a {kind} model (checkpoint {info.path})"
    sezm = info.metadata.get("sezm", {})
    source = sezm.get("checkpoint")
    origin = f", frozen from {source}" if source else ""
    head = f" branch {sezm['head']!r}" if sezm.get("head") else ""
    return f"This is a {kind} model (frozen model {info.path}{origin}{head})"


def _per_branch(info: ModelFile, what: str, value) -> list[str]:
    """``The <what> is <value>`` (``of branch X`` for each branch of a multi-task model)."""
    if not info.multi_task:
        return [f"The {what} is {value(info.model_params, 'Default')}"]
    return [
        f"The {what} of branch {name} is {value(params, name)}"
        for name, params in info.branches.items()
    ]


def _model_branch(info: ModelFile) -> list[str]:
    names = list(info.branches)
    lines = [
        f"Available model branches are {[*names, 'RANDOM']}, where 'RANDOM' means using a "
        "randomly initialized fitting net."
    ]
    for name, params in info.branches.items():
        alias = params.get("model_branch_alias", [])
        lines.append(f"  {name}: alias {alias}, info {json.dumps(params.get('info', {}))}")
    return lines


def _type_map(info: ModelFile) -> list[str]:
    def value(params: dict, branch: str):
        return params.get("type_map", info.metadata.get("type_map"))

    return _per_branch(info, "type_map", value)


def _section(key: str):
    def report(info: ModelFile) -> list[str]:
        def value(params: dict, branch: str) -> str:
            return json.dumps(params[key]) if key in params else "not recorded"

        return _per_branch(info, f"{key} parameter", value)

    return report


def _rcut(info: ModelFile) -> list[str]:
    def value(params: dict, branch: str):
        return params.get("descriptor", {}).get("rcut", info.metadata.get("rcut", "not recorded"))

    return _per_branch(info, "rcut", value)


def _sel(info: ModelFile) -> list[str]:
    def value(params: dict, branch: str):
        return params.get("descriptor", {}).get("sel", info.metadata.get("sel", "not recorded"))

    return _per_branch(info, "sel", value)


def parameter_counts(params: dict, dens: bool = False) -> dict[str, int]:
    """``{"descriptor", "fitting-net", "total"}`` parameters of the model of ``params``."""
    from ..model.build import build_model

    names = {n: p.numel() for n, p in build_model(params, dens=dens).named_parameters()}
    descriptor = sum(v for n, v in names.items() if "descriptor" in n)
    fitting = sum(v for n, v in names.items() if "fitting" in n and "_networks" not in n)
    return {"descriptor": descriptor, "fitting-net": fitting, "total": descriptor + fitting}


def _size(info: ModelFile) -> list[str]:
    branch, params = next(iter(info.branches.items()))
    try:
        counts = parameter_counts(params, info.dens.get(branch, False))
    except (ValueError, KeyError, TypeError) as err:
        return [f"Parameter counts: not available, no sezm model for this configuration ({err})"]
    where = f" for a single branch model (branch {branch})" if info.multi_task else ""
    return [f"Parameter counts{where}:"] + [
        f"Parameters in {k}: {counts[k]:,}" for k in ("descriptor", "fitting-net", "total")
    ]


def _observed(info: ModelFile, params: dict, branch: str) -> list[str] | None:
    """Observed elements: ``info.observed_type``, else the types with a non-zero bias."""
    listed = params.get("info", {}).get("observed_type")
    if listed is not None:
        return list(listed)
    bias = info.out_bias.get(branch)
    if bias is None:
        return None
    from ase.data import atomic_numbers

    type_map = params.get("type_map", [])
    seen = (bias[0, : len(type_map)].abs() > 1e-6).any(dim=-1).tolist()
    names = [t for t, s in zip(type_map, seen) if s]
    return sorted(names, key=lambda e: atomic_numbers.get(e, float("inf")))


def _observed_type(info: ModelFile) -> list[str]:
    if not info.multi_task:
        found = _observed(info, info.model_params, "Default")
        if found is None:
            return ["The observed types for this model: not recorded"]
        return [
            "The observed types for this model: ",
            f"Number of observed types: {len(found)} ",
            f"Observed types: {found} ",
        ]
    lines = ["The observed types for each branch: "]
    total: list[str] = []
    for name, params in info.branches.items():
        found = _observed(info, params, name) or []
        lines.append(f"{name}: Number of observed types: {len(found)} ")
        lines.append(f"{name}: Observed types: {found} ")
        total += [t for t in found if t not in total]
    from ase.data import atomic_numbers

    total.sort(key=lambda e: atomic_numbers.get(e, float("inf")))
    lines.append(f"TOTAL number of observed types in the model: {len(total)} ")
    lines.append(f"TOTAL observed types in the model: {total} ")
    return lines


def _steps(info: ModelFile) -> list[str]:
    if info.frozen:
        source = info.metadata.get("sezm", {}).get("checkpoint")
        origin = f" (frozen from {source})" if source else ""
        return [f"Training steps: not recorded in a frozen model{origin}"]
    step, lr = info.train_infos.get("step"), info.train_infos.get("lr")
    if step is None:
        return ["Training steps: not recorded (no train_infos.step)"]
    rate = f", learning rate {lr:.6g} at the last step" if isinstance(lr, (int, float)) else ""
    return [f"Training steps: {int(step) + 1} (train_infos.step {int(step)}{rate})"]


def _versions(info: ModelFile) -> list[str]:
    if info.frozen:
        sezm = info.metadata.get("sezm", {})
        if not sezm:
            return ["Written with: not recorded (a .pt2 without sezm metadata: DeePMD-kit's)"]
        return [
            f"Written with sezm {sezm.get('version', 'unknown')}, "
            f"torch {sezm.get('torch_version', 'unknown')}"
        ]
    writer = (
        "it holds sezm's run state: it comes from `sezm train`"
        if info.sezm_run_state
        else "no sezm run state: written by DeePMD-kit, or a sezm EMA/best/merged checkpoint"
    )
    return [f"Written with: versions are not recorded in .pt checkpoints ({writer})"]


_REPORTS = {
    "model-branch": _model_branch,
    "type-map": _type_map,
    "descriptor": _section("descriptor"),
    "fitting-net": _section("fitting_net"),
    "rcut": _rcut,
    "sel": _sel,
    "size": _size,
    "observed-type": _observed_type,
    "steps": _steps,
    "versions": _versions,
}
