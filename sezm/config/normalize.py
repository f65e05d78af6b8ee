"""Normalize an input file: validate it, resolve aliases and fill every default.

The dargs schema in ``schema_*.py`` is applied the way DeePMD-kit applies its own, so the
normalized ``model`` section equals what DeePMD-kit 3.2 stores in a checkpoint as
``model_params``. Checking is ours, for precise messages: every error names the key path, the
file, and for a misspelt key the closest valid name.

Deliberate differences from DeePMD-kit's normalization, all on absent sections:

* ``model/fitting_net`` defaults to ``dpa4_ener`` (upstream requires the key);
* ``model/type`` defaults to ``dpa4`` (sezm implements no other model);
* ``loss`` defaults to the loss of the fitting (``ener``, ``ener_spin`` with ``spin``,
  ``property`` for a property fitting), per branch in multi-task inputs;
* ``optimizer`` defaults to Adam with its defaults (upstream's input upgrade does the same);
* ``validating`` is expanded with its defaults (upstream leaves an absent one as ``{}``).

A warm-up as long as the run is refused here, with the values of both keys (DeePMD-kit refuses
it when training starts). Keys that training needs and DeePMD-kit has no default for
(``learning_rate/start_lr``, ``training_data/systems``; its trainer stops on a raw
``KeyError``) are checked before training by :func:`~sezm.config.rules.check_trainable`; the
error of a missing run length already names them.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

from dargs import Argument, Variant
from dargs.dargs import ArgumentError, isinstance_annotation

from ._fields import NO_EFFECT
from .errors import ConfigError, ConfigWarning, did_you_mean, join_path
from .rules import (
    check_full_validation,
    check_learning_rate,
    check_model,
    check_no_multitask_lora,
    check_run_length,
    check_training,
    check_warmup,
)
from .schema_model import model_section, multitask_model_section
from .schema_training import input_schema

SHAREABLE = ("type_map", "descriptor", "fitting_net")


def normalize_input(raw: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Validate a whole input file and return it fully expanded (a new dict).

    ``source`` (e.g. the file name) is quoted in error messages. Multi-task inputs (a
    ``model/model_dict``) have their ``shared_dict`` references resolved first.
    Raises :class:`ConfigError` for unknown keys, wrong types, bad values and broken rules.
    """
    try:
        return _normalize_input(raw)
    except ConfigError as err:
        raise err.with_source(source) from None


def check_stored_model(model_params: Any, source: str) -> None:
    """Warn (:class:`ConfigWarning`) when a checkpoint's stored ``model_params`` do not fit
    the schema, e.g. an unknown key that the model built from them ignores. The model is
    still built as stored: checkpoints of newer DeePMD-kit versions stay readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # options without effect: not news here
        try:
            _normalize_model(_stored_as_input(model_params))
            return
        except ConfigError as err:
            problem = str(err)
    warnings.warn(
        f"{source}: the stored model_params do not fit sezm's schema ({problem}); the model "
        "is built from them as stored, and settings sezm does not know have no effect",
        ConfigWarning,
        stacklevel=3,
    )


def _stored_as_input(model: Any) -> Any:
    """A stored multi-task ``model`` section as an input file names it: a checkpoint keeps
    each branch's ``type_map`` expanded (one list, equal in all branches), where the schema
    asks input files for one reference into ``shared_dict``; other sections as they are."""
    branches = model.get("model_dict") if isinstance(model, dict) else None
    if not isinstance(branches, dict) or not branches:
        return model
    maps = [b.get("type_map") if isinstance(b, dict) else None for b in branches.values()]
    if not all(isinstance(m, list) and m == maps[0] for m in maps):
        return model
    model = copy.deepcopy(model)
    shared = model.setdefault("shared_dict", {})
    name = next((k for k, v in shared.items() if v == maps[0]), None)
    if name is None:
        name = "type_map" if "type_map" not in shared else "_stored_type_map"
        shared[name] = list(maps[0])
    for branch in model["model_dict"].values():
        branch["type_map"] = name
    return model


def complete_model(params: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` section with every default present, for building a model (a new dict).

    Normalized as by :func:`normalize_model` when it fits the schema. A checkpoint's section
    that does not (a newer DeePMD-kit's key; :func:`check_stored_model` warns) gets dargs'
    defaults and aliases only, with keys sezm does not know left for the model to ignore;
    the rules across keys still apply. Warnings about options without effect are not
    repeated here.
    """
    params = _stored_as_input(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            return _normalize_model(params)
        except ConfigError:
            pass
    multi = "model_dict" in params
    model = expand_shared_params(params)[0] if multi else copy.deepcopy(params)
    _fill_fitting(model, multi)
    try:
        model = _schema("model-multi" if multi else "model").normalize_value(
            model, trim_pattern="_*"
        )
    except ArgumentError as err:
        raise ConfigError(join_path("model", err.path), err.message) from None
    check_model(model, multi)
    return model


def normalize_model(raw_model: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Validate and expand only a ``model`` section (single- or multi-task)."""
    try:
        return _normalize_model(raw_model)
    except ConfigError as err:
        raise err.with_source(source) from None


def normalize_section(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Validate and expand one section of a single-task input besides ``model`` (``loss``,
    ``learning_rate``, ``optimizer``, ``training``, ``validating``), alone; a new dict.

    The section's own rules apply (for ``learning_rate``: exclusive keys, ``stop_lr`` filled
    in); the rules that relate sections (a warm-up shorter than the run, the keys training
    needs) do not: they need the whole input, see :func:`normalize_input`.
    """
    fields = _schema("input").sub_fields
    if name == "model" or name not in fields:
        sections = ", ".join(f"`{k}`" for k in fields if k != "model")
        raise ConfigError(name, f"not a section normalized alone; use one of {sections}")
    if not isinstance(raw, dict):
        raise ConfigError(name, f"expected a dict, got {type(raw).__name__}")
    section = _apply(fields[name], copy.deepcopy(raw), [name])
    if name == "learning_rate":
        check_learning_rate(section)
    return section


def override_numb_steps(raw: dict[str, Any], numb_steps: int) -> dict[str, Any]:
    """``raw`` (not normalized) with ``training/numb_steps`` set to ``numb_steps`` in place of
    any run length it gives (``numb_steps``, ``numb_epoch`` and their aliases); a new dict.

    Applied before :func:`normalize_input`, so that the rules on the run length (a warm-up
    shorter than the run) see the value that will be trained."""
    training = raw.get("training") if isinstance(raw, dict) else None
    if not isinstance(training, dict):
        return raw
    fields = _schema("input").sub_fields["training"].sub_fields
    dropped = {n for key in ("numb_steps", "numb_epoch") for n in (key, *fields[key].alias)}
    training = {k: v for k, v in training.items() if k not in dropped}
    return {**raw, "training": {**training, "numb_steps": numb_steps}}


def is_multi_task(raw: dict[str, Any]) -> bool:
    """Whether an input file describes a multi-task model (``model/model_dict``)."""
    model = raw.get("model") if isinstance(raw, dict) else None
    return isinstance(model, dict) and "model_dict" in model


def expand_shared_params(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list]]:
    """Resolve a multi-task ``model`` section's references into ``shared_dict``.

    Keys written directly under ``model`` (besides ``model_dict`` and ``shared_dict``) are
    copied into every branch that does not set them. A branch's ``type_map``, ``descriptor`` or
    ``fitting_net`` given as a string ``"name"`` or ``"name:level"`` is replaced by a copy of
    ``shared_dict[name]``. All branches must take their ``type_map`` from the same entry.

    Returns the expanded copy and the sharing links: for each shared name, the list of
    ``{"model_key", "shared_type", "shared_level"}`` that use it, lowest level first (spin
    branches ahead of others at equal level).
    """
    model = copy.deepcopy(model)
    branches = model.get("model_dict")
    shared = model.get("shared_dict", {})
    if not isinstance(branches, dict):
        raise ConfigError("model/model_dict", "expected a dict of branches keyed by name")
    if not isinstance(shared, dict):
        raise ConfigError("model/shared_dict", "expected a dict of named shared items")
    for key in [k for k in model if k not in ("model_dict", "shared_dict")]:
        value = model.pop(key)
        for branch in branches.values():
            if isinstance(branch, dict):
                branch.setdefault(key, copy.deepcopy(value))
    links = _resolve_references(branches, shared)
    for uses in links.values():
        uses.sort(key=lambda u: u["shared_level"] - 100 * ("spin" in branches[u["model_key"]]))
    return model, links


def _resolve_references(branches: dict[str, Any], shared: dict[str, Any]) -> dict[str, list]:
    links: dict[str, list] = {}
    type_map_refs = set()
    for name, branch in branches.items():
        if not isinstance(branch, dict):
            continue
        for item in [k for k in branch if k in SHAREABLE and isinstance(branch[k], str)]:
            path = f"model/model_dict/{name}/{item}"
            ref = branch[item]
            key, _, level = ref.partition(":")
            if key not in shared:
                raise ConfigError(
                    path,
                    f"`{key}` is not defined in `model/shared_dict`{did_you_mean(key, shared)}",
                )
            if not (level or "0").isdigit():
                raise ConfigError(path, f"share level in {ref!r} must be a non-negative integer")
            branch[item] = copy.deepcopy(shared[key])
            if item == "type_map":
                type_map_refs.add(ref)
            else:
                link = {"model_key": name, "shared_type": item, "shared_level": int(level or 0)}
                links.setdefault(key, []).append(link)
    if len(type_map_refs) != 1:
        raise ConfigError(
            "model/model_dict",
            "all branches must name one shared `type_map` entry of `model/shared_dict`",
        )
    return links


# ---------------------------------------------------------------------------------------------
# orchestration


def _normalize_input(raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError("", f"an input file must be a JSON object, got {type(raw).__name__}")
    multi = is_multi_task(raw)
    data = copy.deepcopy(raw)
    if multi:
        data["model"], _ = expand_shared_params(data["model"])
    _fill_absent_sections(data, multi)
    data = _apply(_schema("input-multi" if multi else "input"), data, [])
    check_model(data["model"], multi)
    check_run_length(data, multi)
    if "learning_rate" in data:
        check_learning_rate(data["learning_rate"])
    check_training(data["training"], multi)
    check_warmup(data.get("learning_rate"), data["training"].get("numb_steps"))
    check_full_validation(data, multi)
    if multi:
        check_no_multitask_lora(data["model"])
    return data


def _normalize_model(raw_model: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw_model, dict):
        raise ConfigError("model", f"expected a dict, got {type(raw_model).__name__}")
    multi = "model_dict" in raw_model
    model = expand_shared_params(raw_model)[0] if multi else copy.deepcopy(raw_model)
    _fill_fitting(model, multi)
    model = _apply(_schema("model-multi" if multi else "model"), model, ["model"])
    check_model(model, multi)
    if multi:
        check_no_multitask_lora(model)
    return model


@functools.cache
def _schema(kind: str) -> Argument:
    return {
        "input": lambda: input_schema(multi_task=False),
        "input-multi": lambda: input_schema(multi_task=True),
        "model": model_section,
        "model-multi": multitask_model_section,
    }[kind]()


def _branches(model: Any, multi: bool) -> list[dict]:
    if not isinstance(model, dict):
        return []
    if not multi:
        return [model]
    return [b for b in (model.get("model_dict") or {}).values() if isinstance(b, dict)]


def _fill_fitting(model: Any, multi: bool) -> None:
    for branch in _branches(model, multi):
        branch.setdefault("fitting_net", {})


def _default_loss(branch: dict) -> dict:
    fitting = branch.get("fitting_net")
    if isinstance(fitting, dict) and fitting.get("type") == "property":
        return {"type": "property"}
    return {"type": "ener_spin" if branch.get("spin") is not None else "ener"}


def _fill_absent_sections(data: dict, multi: bool) -> None:
    model = data.get("model")
    _fill_fitting(model, multi)
    if multi:
        losses = data.setdefault("loss_dict", {})
        if isinstance(losses, dict) and isinstance(model, dict):
            for name, branch in (model.get("model_dict") or {}).items():
                if isinstance(branch, dict):
                    losses.setdefault(name, _default_loss(branch))
    elif isinstance(model, dict) and "loss" not in data:
        data["loss"] = _default_loss(model)
    data.setdefault("optimizer", {})
    data.setdefault("validating", {})


def _apply(schema: Argument, data: dict, root: list[str]) -> dict:
    """Check tags and types, let dargs normalize, then check the result strictly."""
    _precheck(schema, _strip_private(copy.deepcopy(data)), root)
    try:
        data = schema.normalize_value(data, trim_pattern="_*")
    except ArgumentError as err:
        raise ConfigError(join_path(*root, err.path), err.message) from None
    _check(schema, data, root)
    try:  # a safety net: our checks above should already have caught everything
        schema.check_value(data, strict=True)
    except ArgumentError as err:
        raise ConfigError(join_path(*root, err.path), err.message) from None
    return data


# ---------------------------------------------------------------------------------------------
# checks, as dargs traversal hooks; ``path`` is the list of keys leading to the parent dict


def _precheck(schema: Argument, data: dict, root: list[str]) -> None:
    """Before normalization: variant tags, value types, and options without effect."""
    inert: list[str] = []

    def note_no_effect(arg: Argument, parent: dict, path: list[str]) -> None:
        if arg.doc.startswith(NO_EFFECT) and parent.get(arg.name, arg.default) != arg.default:
            inert.append(join_path(*path, arg.name))

    schema.traverse_value(
        data,
        key_hook=note_no_effect,
        value_hook=_check_type,
        variant_hook=_check_tag,
        path=root,
    )
    if inert:  # stacklevel: the caller of normalize_input / normalize_model
        warnings.warn(
            "options of other DeePMD-kit backends have no effect in sezm: "
            + ", ".join(f"`{p}`" for p in inert),
            ConfigWarning,
            stacklevel=5,
        )


def _check(schema: Argument, data: dict, root: list[str]) -> None:
    """After normalization: unknown keys, missing keys, types and values."""
    schema.traverse_value(
        data,
        key_hook=_check_present,
        value_hook=_check_value,
        sub_hook=_check_known_keys,
        path=root,
    )


def _strip_private(obj: Any) -> Any:
    """Drop ``_``-prefixed keys (comments) at every depth; dargs trims them the same way."""
    if isinstance(obj, dict):
        return {
            k: _strip_private(v)
            for k, v in obj.items()
            if not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(obj, list):
        return [_strip_private(v) for v in obj]
    return obj


def _check_tag(variant: Variant, value: dict, path: list[str]) -> None:
    flag = variant.flag_name
    names = [*variant.choice_dict, *variant.choice_alias]
    expected = "one of " + ", ".join(f"`{n}`" for n in names)
    if flag not in value:
        if not variant.optional:
            raise ConfigError(join_path(*path, flag), f"required key is missing ({expected})")
        return
    tag = value[flag]
    if not isinstance(tag, str):
        raise ConfigError(join_path(*path, flag), f"expected {expected}, got {_describe(tag)}")
    if tag not in names:
        raise ConfigError(
            join_path(*path, flag),
            f"unsupported value {tag!r}; sezm accepts {expected}{did_you_mean(tag, names)}",
        )


def _check_present(arg: Argument, parent: dict, path: list[str]) -> None:
    if not arg.optional and arg.name not in parent:
        raise ConfigError(join_path(*path, arg.name), "required key is missing")


def _check_known_keys(arg: Argument, value: dict, path: list[str]) -> None:
    allowed = arg.flatten_sub(value, path)
    if not allowed:  # a free-form dict
        return
    for key in value:
        if key in allowed or key == "$schema":
            continue
        hint = _belongs_elsewhere(arg, value, key) or did_you_mean(key, allowed)
        if not hint and len(allowed) <= 12:
            hint = "; valid keys: " + ", ".join(f"`{k}`" for k in allowed)
        raise ConfigError(join_path(*path, str(key)), f"unknown key{hint}")


def _belongs_elsewhere(arg: Argument, value: dict, key: str) -> str:
    """A hint when ``key`` is an option of another choice of this dict's ``type`` switch."""
    for variant in arg.sub_variants.values():
        chosen = variant.get_choice(value).name
        for tag, option in variant.choice_dict.items():
            names = {n for a in option.sub_fields.values() for n in (a.name, *a.alias)}
            if tag != chosen and key in names:
                return f"; it belongs to {variant.flag_name} `{tag}`, not `{chosen}`"
    return ""


def _check_type(arg: Argument, value: Any, path: list[str]) -> None:
    if any(isinstance_annotation(value, t) for t in arg.dtype):
        return
    expected = " | ".join(sorted(_type_name(t) for t in arg.dtype))
    raise ConfigError(join_path(*path, arg.name), f"expected {expected}, got {_describe(value)}")


def _check_value(arg: Argument, value: Any, path: list[str]) -> None:
    _check_type(arg, value, path)
    if arg.extra_check is not None and not arg.extra_check(value):
        raise ConfigError(
            join_path(*path, arg.name), f"invalid value {value!r}: {arg.extra_check_errmsg}"
        )


def _type_name(t: Any) -> str:
    if t is None or t is type(None):
        return "null"
    return t.__name__ if isinstance(t, type) and not getattr(t, "__args__", None) else str(t)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{_type_name(type(value))} {text}"
