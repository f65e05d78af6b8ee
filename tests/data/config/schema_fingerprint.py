"""A doc-free description of a dargs declaration tree, for comparing two schemas.

Keeps, per option and in declaration order: types, optional/required, default, aliases,
repeat, nested options and ``type`` switches (choices, aliases, default choice). Importable both
by the tests and by make_upstream_refs.py (it needs only dargs).
"""

from __future__ import annotations

import json
from typing import Any


def _type_name(t: Any) -> str:
    if t is None or t is type(None):
        return "None"
    return t.__name__ if isinstance(t, type) and not getattr(t, "__args__", None) else str(t)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def fingerprint(arg: Any, choices: dict[str, list[str]] | None = None, path: str = "") -> dict:
    """``choices`` limits the switch at a path (e.g. ``"loss/type"``) to the listed choices."""
    choices = choices or {}
    out: dict[str, Any] = {
        "dtype": sorted(_type_name(t) for t in arg.dtype),
        "optional": arg.optional,
        "alias": list(arg.alias),
        "repeat": arg.repeat,
    }
    if arg.optional and type(arg.default).__name__ != "_Flags":
        out["default"] = _jsonable(arg.default)
    out["fields"] = [
        [name, fingerprint(sub, choices, f"{path}/{name}".lstrip("/"))]
        for name, sub in arg.sub_fields.items()
    ]
    out["variants"] = {}
    for flag, variant in arg.sub_variants.items():
        keep = choices.get(f"{path}/{flag}".lstrip("/"))
        out["variants"][flag] = {
            "optional": variant.optional,
            "default_tag": variant.default_tag,
            "choices": {
                tag: fingerprint(choice, choices, path)
                for tag, choice in variant.choice_dict.items()
                if keep is None or tag in keep
            },
            "aliases": {
                alias: tag
                for alias, tag in variant.choice_alias.items()
                if keep is None or tag in keep
            },
        }
    return out


LOSSES = ["ener", "dens", "ener_spin", "property"]
SINGLE_TASK_CHOICES = {"model/type": ["dpa4"], "loss/type": LOSSES}
MULTI_TASK_CHOICES = {"model/model_dict/type": ["dpa4"], "loss_dict/type": LOSSES}
