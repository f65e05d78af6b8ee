"""The stored DeePMD-kit parity cases (``tests/data/parity/<case>/``) and their frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARITY = Path(__file__).parent / "data" / "parity"
CASES = sorted(p.name for p in PARITY.iterdir() if (p / "expected.npz").is_file())


def frames(case: str):
    """``(name, coord (1, n, 3), box (1, 9) | None, atype, expected arrays)`` of each frame."""
    data = np.load(PARITY / case / "expected.npz")
    names = sorted({k.split("/")[0] for k in data.files})
    for name in names:
        box = data[f"{name}/box"].reshape(1, 9) if f"{name}/box" in data.files else None
        yield (
            name,
            data[f"{name}/coord"].reshape(1, -1, 3),
            box,
            data[f"{name}/atype"],
            {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(name + "/")},
        )
