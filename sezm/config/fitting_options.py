"""The typed fitting record (``sezm.model.fitting``) of a normalised ``model`` section.

The record's field names are the schema's keys of the head type, so the section is read as it
is: the schema has filled every default (an optional key without one, the property head's
``seed``, keeps the record's) and checked every value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..model.fitting import EnergyFittingOptions, FittingOptions
from ..model.property import PropertyFittingOptions


def fitting_options(model: dict[str, Any]) -> FittingOptions:
    """The ``fitting_net`` of a normalised model section as the record of its head type."""
    section = model["fitting_net"]
    record = PropertyFittingOptions if section["type"] == "property" else EnergyFittingOptions
    names = [f.name for f in dataclasses.fields(record)]
    # a key the section lacks (the property head's optional seed) keeps the record's default
    return record(**{k: _frozen(section[k]) for k in names if k in section})


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
