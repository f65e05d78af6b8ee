"""ASE calculator of a DPA4 energy model.

Every call gives ``energy`` (= ``free_energy``), per-atom ``energies`` (eV), ``forces`` (eV/Å)
and, for periodic atoms, ``stress`` (eV/Å^3, Voigt order xx, yy, zz, yz, xz, xy) from the
virial ``W``:

    sigma = -(W + W^T) / (2 V)

Atoms must be periodic along all three cell vectors or along none (give a slab a vacuum gap
and ``pbc=True``). ``atoms.info`` may carry ``fparam``, ``aparam`` and ``charge_spin`` for
models that read them. The neighbour list is rebuilt at every call; it costs a few per cent
of an evaluation, so no Verlet skin is kept. The atom types are cached while the numbers of
the atoms stay the same.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..engine.stream import evaluate
from .deep_pot import DeepPot


def stress_from_virial(virial: np.ndarray, volume: float) -> np.ndarray:
    """ASE stress ``(6,)`` (Voigt xx, yy, zz, yz, xz, xy) of a virial ``(3, 3)``."""
    sigma = -0.5 * (virial + virial.T) / volume
    return sigma.flat[[0, 4, 8, 5, 2, 1]]


class SeZMCalculator(Calculator):
    """``atoms.calc = SeZMCalculator("model.pt")``; ``model`` may also be a loaded DeepPot.

    ``device`` (default: CUDA if available) and ``head`` (branch of a multi-task checkpoint)
    apply when loading; the ``DP_*_INFER`` settings are read once, here.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "energies",
        "forces",
        "stress",
    ]

    def __init__(
        self,
        model: str | os.PathLike | DeepPot,
        device: str | None = None,
        head: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(model, DeepPot):
            if device is not None or head is not None:
                raise ValueError("device and head apply when loading; pass a checkpoint path")
            self.dp = model
        else:
            self.dp = DeepPot(model, head=head, device=device)
        self._types_of: tuple[bytes, np.ndarray] | None = None  # (numbers, model types)

    def _types(self, atoms: Atoms) -> np.ndarray:
        key = atoms.numbers.tobytes()
        if self._types_of is None or self._types_of[0] != key:
            type_map = self.dp.get_type_map()
            symbols = atoms.get_chemical_symbols()
            unknown = sorted(set(symbols) - set(type_map))
            if unknown:
                raise ValueError(f"elements {unknown} are not in the model type_map {type_map}")
            self._types_of = (key, np.array([type_map.index(s) for s in symbols]))
        return self._types_of[1]

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        atoms = self.atoms
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ValueError(
                f"pbc={atoms.pbc.tolist()}: periodic along some cell vectors only; "
                "use pbc=True with a vacuum gap, or pbc=False"
            )
        periodic = bool(atoms.pbc.all())
        if "stress" in (properties or ()) and not periodic:
            raise PropertyNotImplementedError("stress needs a periodic cell (pbc=True)")
        dp = self.dp
        info = atoms.info
        graph = dp._graph(
            atoms.positions[None],
            atoms.cell.array[None] if periodic else None,
            self._types(atoms),
            info.get("fparam"),
            info.get("aparam"),
            info.get("charge_spin"),
        )
        with dp.settings.evaluation(dp.device):
            out = evaluate(dp.model, graph, virial=periodic)

        def arr(key: str) -> np.ndarray:
            return out[key][0].detach().double().cpu().numpy()

        energy = float(arr("energy"))
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": arr("atom_energy"),
            "forces": arr("force"),
        }
        if periodic:
            virial = arr("virial").reshape(3, 3)
            self.results["stress"] = stress_from_virial(virial, atoms.get_volume())
