"""Small constructors that keep the dargs schema declarations short and uniform.

Every option is declared once with one of these helpers:

* ``opt``: optional, with a default that normalization fills in;
* ``maybe``: optional, no default (absent stays absent);
* ``req``: required;
* ``section``: a nested dict of options and variants.

``NO_EFFECT`` marks options that DeePMD-kit accepts only for other backends (TensorFlow, Paddle,
its exportable PyTorch backend). sezm accepts them so upstream inputs stay valid, warns when one
is set to a non-default value, and otherwise ignores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dargs import Argument, Variant

NO_EFFECT = "[no effect in sezm] "

_UNSET = object()


def _checked(check: tuple[Callable[[Any], bool], str] | None) -> dict[str, Any]:
    if check is None:
        return {}
    fn, message = check
    return {"extra_check": fn, "extra_check_errmsg": message}


def opt(
    name: str,
    dtype: Any,
    default: Any,
    doc: str,
    *,
    alias: Iterable[str] = (),
    check: tuple[Callable[[Any], bool], str] | None = None,
) -> Argument:
    """Optional option whose default is written into the normalized input."""
    return Argument(
        name, dtype, optional=True, default=default, alias=list(alias), doc=doc, **_checked(check)
    )


def maybe(
    name: str,
    dtype: Any,
    doc: str,
    *,
    alias: Iterable[str] = (),
    check: tuple[Callable[[Any], bool], str] | None = None,
) -> Argument:
    """Optional option without a default: absent in the input, absent after normalization."""
    return Argument(name, dtype, optional=True, alias=list(alias), doc=doc, **_checked(check))


def req(
    name: str, dtype: Any, doc: str, *, check: tuple[Callable[[Any], bool], str] | None = None
) -> Argument:
    """Required option."""
    return Argument(name, dtype, optional=False, doc=doc, **_checked(check))


def section(
    name: str,
    fields: Iterable[Argument],
    doc: str,
    *,
    variants: Iterable[Variant] = (),
    optional: bool = False,
    default: Any = _UNSET,
    alias: Iterable[str] = (),
    repeat: bool = False,
) -> Argument:
    """A nested dict of options (``repeat``: a dict of such dicts keyed by name)."""
    extra = {} if default is _UNSET else {"default": default}
    return Argument(
        name,
        dict,
        list(fields),
        list(variants),
        optional=optional,
        alias=list(alias),
        repeat=repeat,
        doc=doc,
        **extra,
    )


def choice(
    name: str, fields: Iterable[Argument], doc: str, *, alias: Iterable[str] = ()
) -> Argument:
    """One variant of a ``type``-tagged section."""
    return Argument(name, dict, list(fields), alias=list(alias), doc=doc)


def tagged(
    choices: Iterable[Argument], doc: str, *, default: str | None = None, flag: str = "type"
) -> Variant:
    """The ``type`` switch of a section; ``default`` is used when the tag is omitted."""
    if default is None:
        return Variant(flag, list(choices), optional=False, doc=doc)
    return Variant(flag, list(choices), optional=True, default_tag=default, doc=doc)


def one_of(*values: str, any_case: bool = False) -> tuple[Callable[[Any], bool], str]:
    """Value check: the string must be one of ``values`` (``any_case``: in upper or lower
    case alike)."""
    message = "must be one of " + ", ".join(f"'{v}'" for v in values)
    if any_case:
        folded = frozenset(v.lower() for v in values)
        return (lambda x: x.lower() in folded), message + " (in any case)"
    allowed = frozenset(values)
    return (lambda x: x in allowed), message


def at_least(bound: float) -> tuple[Callable[[Any], bool], str]:
    """Value check: ``x >= bound``."""
    return (lambda x: x >= bound), f"must be >= {bound}"


def flag_list(length: int, what: str) -> tuple[Callable[[Any], bool], str]:
    """Value check: one boolean, or a list of exactly ``length`` booleans."""
    return (
        (lambda x: isinstance(x, bool) or len(x) == length),
        f"must be a boolean or a list of {length} booleans: {what}",
    )
