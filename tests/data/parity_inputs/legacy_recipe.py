"""Parity case ``legacy_v10``: the ``tiny`` checkpoint without ``descriptor.version_tensor`` (a
descriptor state written before it carried a version, read as format 1.0) and DeePMD-kit 3.2's
outputs for three of its frames. Run with DeePMD-kit's Python:
``python tests/data/parity_inputs/legacy_recipe.py tests/data/parity/legacy_v10``."""

import sys
from pathlib import Path

import numpy as np
import torch
from deepmd.infer import DeepPot

SOURCE = Path(__file__).parents[1] / "parity" / "tiny"
FRAMES = ("water_nopbc", "small_cell", "water_triclinic")


def main(out: Path) -> None:
    ckpt = torch.load(SOURCE / "model.pt", map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt)
    for key in [k for k in state if k.endswith("descriptor.version_tensor")]:
        del state[key]
    torch.save(ckpt, out / "model.pt")
    dp = DeepPot(str(out / "model.pt"))
    ref = np.load(SOURCE / "expected.npz")
    res = {}
    for name in FRAMES:
        coord, atype = ref[f"{name}/coord"], ref[f"{name}/atype"]
        box = ref[f"{name}/box"].reshape(1, 9) if f"{name}/box" in ref.files else None
        e, f, v, ae, av = dp.eval(coord.reshape(1, -1), box, atype, atomic=True)
        desc = dp.eval_descriptor(coord.reshape(1, -1), box, atype)
        res.update({f"{name}/coord": coord, f"{name}/atype": atype})
        if box is not None:
            res[f"{name}/box"] = box.reshape(3, 3)
        n = len(atype)
        outputs = {"energy": e.reshape(1), "force": f.reshape(n, 3), "virial": v.reshape(3, 3)}
        outputs.update(atom_energy=ae.reshape(n), atom_virial=av.reshape(n, 9))
        outputs["descriptor"] = desc.reshape(n, -1)
        res.update({f"{name}/{k}": val for k, val in outputs.items()})
    np.savez(out / "expected.npz", **res)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
