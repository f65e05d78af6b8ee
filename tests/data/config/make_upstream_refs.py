"""Regenerate the DeePMD-kit reference normalizations used by tests/config/test_config.py.

Run with the Python of an environment that has DeePMD-kit 3.2 installed, from the repository
root:

    /path/to/deepmd-venv/bin/python tests/data/config/make_upstream_refs.py [PARITY_DIR]

For every input (``examples/*.json`` and the entries of ``variations.json``) it applies the
steps ``dp --pt train`` applies before building the model (multi-task shared-dict expansion,
input upgrade, ``deepmd.utils.argcheck.normalize``) and writes ``upstream/<name>.json``.
Upstream requires ``model/fitting_net``; where an input omits it, an empty one is inserted and
the fact recorded under ``patched``. Inputs upstream rejects get ``error`` instead.

It also writes ``upstream_schema.json``: DeePMD-kit's declaration tree of the whole input,
without docs, limited to the model and loss types sezm implements (see schema_fingerprint.py).

With PARITY_DIR (folders holding DeePMD-kit checkpoints ``<case>/model.pt``), the
``model_params`` stored in each checkpoint are written to ``upstream/checkpoint_<case>.json``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import deepmd
from dargs import Argument
from deepmd.utils.argcheck import gen_args, normalize
from deepmd.utils.compat import update_deepmd_input

HERE = Path(__file__).resolve().parent
OUT = HERE / "upstream"
sys.path.insert(0, str(HERE))
from schema_fingerprint import MULTI_TASK_CHOICES, SINGLE_TASK_CHOICES, fingerprint  # noqa: E402


def _insert_fittings(config: dict, multi: bool) -> list[str]:
    patched = []
    branches = config["model"]["model_dict"] if multi else {"": config["model"]}
    for name, branch in branches.items():
        if isinstance(branch, dict) and "fitting_net" not in branch and not name.startswith("_"):
            branch["fitting_net"] = {}
            patched.append("/".join(p for p in ("model", "model_dict" * multi, name) if p))
    return patched


def upstream_normalize(raw: dict) -> dict:
    config = copy.deepcopy(raw)
    multi = "model_dict" in config["model"]
    if multi:
        from deepmd.pt.utils.multi_task import preprocess_shared_params

        config["model"], _ = preprocess_shared_params(config["model"])
    patched = _insert_fittings(config, multi)
    try:
        config = update_deepmd_input(config, warning=False)
        normalized = normalize(config, multi_task=multi)
    except Exception as err:  # recorded: the test expects sezm to reject it too
        return {"error": f"{type(err).__name__}: {err}"}
    return {"patched": patched, "normalized": normalized}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    inputs = {
        p.stem: ("examples/" + p.name, json.loads(p.read_text()))
        for p in sorted((HERE / "examples").glob("*.json"))
    }
    variations = json.loads((HERE / "variations.json").read_text())
    inputs.update({name: (f"variations.json:{name}", raw) for name, raw in variations.items()})
    for name, (origin, raw) in inputs.items():
        ref = {"origin": origin, "deepmd_version": deepmd.__version__, **upstream_normalize(raw)}
        (OUT / f"{name}.json").write_text(json.dumps(ref, indent=1) + "\n")
        print(name, "error" if "error" in ref else "ok")
    schema = {
        "single_task": fingerprint(Argument("input", dict, gen_args()), SINGLE_TASK_CHOICES),
        "multi_task": fingerprint(Argument("input", dict, gen_args(True)), MULTI_TASK_CHOICES),
    }
    (HERE / "upstream_schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    if len(sys.argv) > 1:
        import torch

        for ckpt in sorted(Path(sys.argv[1]).glob("*/model.pt")):
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            params = state["model"]["_extra_state"]["model_params"]
            ref = {"origin": f"{ckpt.parent.name}/model.pt", "model_params": params}
            (OUT / f"checkpoint_{ckpt.parent.name}.json").write_text(
                json.dumps(ref, indent=1) + "\n"
            )
            print("checkpoint", ckpt.parent.name)


if __name__ == "__main__":
    main()
