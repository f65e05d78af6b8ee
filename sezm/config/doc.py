"""The documented input schema as text (``sezm doc-train-input``, like ``dp doc-train-input``).

Rendered by dargs from the same declarations that check the inputs (:func:`input_schema`):
``rst`` (reStructuredText, one block per top-level section, with anchors and links),
``json`` (the declarations themselves) or ``json_schema`` (a JSON Schema of the whole file,
for editors that validate ``input.json``).
"""

from __future__ import annotations

import json

from .schema_training import input_schema

OUT_TYPES = ("rst", "json", "json_schema")


def doc_train_input(out_type: str = "rst", multi_task: bool = False) -> str:
    """The schema of a single-task (or ``multi_task``) input file in ``out_type``."""
    from dargs import Argument, ArgumentEncoder
    from dargs.json_schema import generate_json_schema

    sections = list(input_schema(multi_task=multi_task).sub_fields.values())
    if out_type == "rst":
        return "\n\n".join(s.gen_doc(make_anchor=True, make_link=True) for s in sections)
    if out_type == "json":
        return json.dumps(tuple(sections), cls=ArgumentEncoder)
    if out_type == "json_schema":
        from .. import __version__

        root = Argument("sezm", dict, sections, doc=f"sezm {__version__} input file")
        return json.dumps(generate_json_schema(root))
    raise ValueError(f"out_type must be one of {OUT_TYPES}, not {out_type!r}")
