"""torch-sim ``ModelInterface`` of a DPA4 energy model: every system of a batch in one call.

torch-sim (package ``torch-sim-atomistic``) runs MD and relaxations of many systems at once on
a ``SimState``: all atoms on one axis, ``system_idx (n_atoms,)`` naming the system of each atom,
cells ``(n_systems, 3, 3)`` with the lattice vectors as columns. :class:`SeZMModel` turns such a
state into one flat neighbour graph (the systems' edges side by side, node ``offset_k + i``) and
evaluates it with one model call, through the same ``.pt2`` graph contract that ``sezm freeze``
compiles (``pt2.py``): eagerly with ``freeze.GraphLower`` for a checkpoint, or with the compiled
package for a ``.pt2``. Per system it returns, in torch-sim's metal units:

    energy (n_systems,) eV,  forces (n_atoms, 3) eV/Å,
    stress (n_systems, 3, 3) eV/Å^3 = -(W + W^T) / (2 V)   (W: virial, V: cell volume)

the stress of the ASE calculator (``calculator.py``), positive under tension. Neighbour lists
are rebuilt at every call on the CPU (``data.neighbors``, the lists of ``DeepPot``), so a
GPU state travels to the CPU for the search and its graph back to the GPU.
"""

from __future__ import annotations

import os

import torch
from ase.data import chemical_symbols

from ..data.frames import InputError
from ..data.graph import graph_edges
from ..data.neighbors import device_search_available
from ..model.dens import DensModel
from ..model.energy import EnergyModel
from ..model.graph import Graph
from ..model.property_model import PropertyModel
from .deep_pot import DeepPot
from .freeze import GraphLower
from .pt2 import FrozenModel, graph_inputs, outputs

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as err:
    raise ImportError(
        f"sezm's torch-sim interface needs torch-sim ({err}); "
        'install it with `pip install "sezm[torchsim]"`'
    ) from None

_NOT_RUNNABLE = {
    DensModel: "a dens model (direct forces, no conservative energy)",
    PropertyModel: "a property model (no energy)",
}


class SeZMModel(ModelInterface):
    """``SeZMModel("model.pt")``: a DPA4 checkpoint or frozen ``.pt2`` as a torch-sim model.

    ``model`` is a checkpoint path (DeePMD-kit 3.2 or sezm), a ``.pt2`` (CPU) or a loaded
    :class:`~sezm.DeepPot`; ``head`` and ``device`` (default: CUDA if available) apply when
    loading, and the ``DP_*_INFER`` settings are read once, then. ``dtype`` is the dtype of
    the states the model takes and of its outputs (the graph is float64 either way).
    ``compute_forces`` / ``compute_stress`` select the outputs; both come from one backward
    pass, which runs in any case. Models with ``fparam`` or ``charge_spin`` inputs run with
    their defaults (``default_fparam``, ``default_chg_spin``); models with ``aparam`` do not run.
    """

    def __init__(
        self,
        model: str | os.PathLike | DeepPot,
        *,
        head: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
        compute_forces: bool = True,
        compute_stress: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, DeepPot):
            if device is not None or head is not None:
                raise ValueError("device and head apply when loading; pass a model path")
            dp = model
        else:
            dp = DeepPot(model, head=head, device=None if device is None else str(device))
        source = model_source(dp)
        self._dp = dp
        self._device = dp.device
        on_gpu = dp.device.type == "cuda" and device_search_available()
        self._search_device = dp.device if on_gpu else None  # neighbour search where it runs
        self._dtype = dtype
        self._compute_forces = compute_forces
        self._compute_stress = compute_stress
        self._memory_scales_with = "n_atoms_x_density"  # every pair within rcut is an edge
        check_energy_model(dp, source)
        self._frame_inputs = frame_inputs(dp.model_params, source)  # name -> (1, dim)
        if isinstance(dp.model, FrozenModel):
            self._lower = FrozenLower(dp.model)
        else:
            self._lower = GraphLower(dp.model, tuple(self._frame_inputs)).eval()
        self._type_of_z = type_lookup(dp.get_type_map())  # (119,) long, -1: not in type_map

    @property
    def type_map(self) -> list[str]:
        return self._dp.get_type_map()

    @property
    def rcut(self) -> float:
        return self._dp.get_rcut()

    def forward(self, state: ts.SimState | dict, **kwargs) -> dict[str, torch.Tensor]:
        """``energy (n_systems,)``, ``forces (n_atoms, 3)``, ``stress (n_systems, 3, 3)``
        of every system of ``state`` (a ``SimState`` or a dict of its fields)."""
        if isinstance(state, dict):  # masses do not enter the energy
            state = ts.SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        self._check_state(state)
        periodic = periodic_state(state)
        if self._compute_stress and not periodic:
            raise InputError(
                "stress needs periodic systems (pbc=True); build the model with "
                "SeZMModel(..., compute_stress=False) for open boundaries"
            )
        n_node = torch.bincount(state.system_idx.cpu())  # (n_systems,)
        cells = state.row_vector_cell if periodic else None  # (n_systems, 3, 3), rows a, b, c
        types = self._types(state.atomic_numbers)
        graph = batch_graph(state.positions, cells, n_node, types, self.rcut, self._search_device)
        frame_inputs = [v.expand(len(n_node), -1) for v in self._frame_inputs.values()]
        inputs = [t.to(self._device) for t in (*graph_inputs(graph, n_node), *frame_inputs)]
        with self._dp.settings.evaluation(self._device):
            out = outputs(self._lower(*inputs))
        return self._results(out, cells)

    def _results(self, out: dict, cells: torch.Tensor | None) -> dict[str, torch.Tensor]:
        results = {"energy": out["energy"].detach().view(-1).to(self._dtype)}
        if self._compute_forces:
            results["forces"] = out["force"].detach().to(self._dtype)
        if self._compute_stress:
            virial = out["virial"].detach().view(-1, 3, 3)  # (n_systems, 3, 3)
            volume = torch.linalg.det(cells.to(virial)).abs().view(-1, 1, 1)
            stress = -0.5 * (virial + virial.transpose(1, 2)) / volume
            results["stress"] = stress.to(self._dtype)
        return results

    def _check_state(self, state: ts.SimState) -> None:
        if state.positions.dtype != self._dtype:
            raise TypeError(
                f"the state is {state.positions.dtype}, the model {self._dtype}: build the state "
                f"with dtype={self._dtype} or the model with SeZMModel(..., "
                f"dtype={state.positions.dtype})"
            )
        idx = state.system_idx
        if idx.numel() > 1 and bool((idx[1:] < idx[:-1]).any()):
            raise InputError("system_idx must be sorted: the atoms of system k follow those of k-1")

    def _types(self, numbers: torch.Tensor) -> torch.Tensor:
        """Model types ``(n_atoms,)`` of atomic numbers, with an error naming missing elements."""
        numbers = numbers.to(self._type_of_z.device).long()
        bad = (numbers < 1) | (numbers >= len(self._type_of_z))
        types = self._type_of_z[numbers.clamp(0, len(self._type_of_z) - 1)]
        missing = torch.unique(numbers[bad | (types < 0)]).tolist()
        if missing:
            names = [chemical_symbols[z] if 0 < z < 119 else str(z) for z in missing]
            raise InputError(
                f"elements {names} (atomic numbers {missing}) are not in the model's type_map "
                f"{self.type_map}"
            )
        return types


class FrozenLower:
    """The compiled package of a ``.pt2``, called with the graph contract inputs."""

    def __init__(self, frozen: FrozenModel) -> None:
        self.frozen = frozen

    def __call__(self, *inputs: torch.Tensor):
        return self.frozen.run_package(*inputs)


def model_source(dp: DeepPot) -> str:
    """The file a loaded model came from, for messages."""
    if dp.checkpoint is not None:
        return os.fspath(dp.checkpoint.path)
    return dp.model.path


def frame_inputs(params: dict, source: str) -> dict[str, torch.Tensor]:
    """The optional per-frame contract inputs of a model at their defaults, ``name -> (1, d)``
    float64, in contract order; an error for inputs a torch-sim state cannot supply."""
    fitting, descriptor = params.get("fitting_net", {}), params.get("descriptor", {})
    if fitting.get("numb_aparam"):
        raise ValueError(
            f"{source}: the model reads per-atom aparam, which a torch-sim state does not carry"
        )
    inputs = {}
    if fitting.get("numb_fparam"):
        if fitting.get("default_fparam") is None:
            raise ValueError(f"{source}: the model reads fparam and has no default_fparam")
        inputs["fparam"] = torch.tensor(fitting["default_fparam"], dtype=torch.float64)
    if descriptor.get("add_chg_spin_ebd"):
        if descriptor.get("default_chg_spin") is None:
            raise ValueError(
                f"{source}: the model embeds a frame [charge, spin] and has no default_chg_spin"
            )
        inputs["charge_spin"] = torch.tensor(descriptor["default_chg_spin"], dtype=torch.float64)
    return {name: value.view(1, -1) for name, value in inputs.items()}


def check_energy_model(dp: DeepPot, source: str) -> None:
    """Refuse models whose energy is not a function of the positions alone, or that have none."""
    model = dp.model
    if dp.has_spin():
        reason = "a spin model (atomic spins are not part of a torch-sim state)"
    elif isinstance(model, FrozenModel):
        return
    else:
        reason = _NOT_RUNNABLE.get(type(model))
        if reason is None and not isinstance(model, EnergyModel):
            reason = f"a {type(model).__name__}"
    if reason is not None:
        raise ValueError(f"{source} holds {reason}; torch-sim runs DPA4 energy models")


def type_lookup(type_map: list[str]) -> torch.Tensor:
    """``(119,)`` long: the model type of each atomic number, ``-1`` where it has none."""
    lookup = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
    for t, symbol in enumerate(type_map):
        if symbol in chemical_symbols:
            lookup[chemical_symbols.index(symbol)] = t
    return lookup


def periodic_state(state: ts.SimState) -> bool:
    """Whether every system is periodic along all three cell vectors (``False``: none)."""
    pbc = torch.as_tensor(state.pbc)
    if bool(pbc.all()):
        return True
    if not bool(pbc.any()):
        return False
    raise InputError(
        f"pbc={pbc.tolist()}: periodic along some cell vectors only; use pbc=True with a "
        "vacuum gap, or pbc=False"
    )


def batch_graph(
    positions: torch.Tensor,
    cells: torch.Tensor | None,
    n_node: torch.Tensor,
    atype: torch.Tensor,
    rcut: float,
    search_device: torch.device | None = None,
) -> Graph:
    """One flat graph of systems of any sizes: system ``k`` holds nodes ``offset_k + i``.

    ``positions (N, 3)`` Å, systems one after the other; ``cells (n_systems, 3, 3)`` with the
    lattice vectors as rows, or ``None`` for open boundaries; ``n_node (n_systems,)``;
    ``atype (N,)``. Edges never join two systems. Errors name the system. With
    ``search_device``, the neighbour search runs there (vesin-torch) and the graph lives
    there; otherwise on the CPU.
    """
    coord = positions.detach().to("cpu", torch.float64).numpy()
    boxes = None if cells is None else cells.detach().to("cpu", torch.float64).numpy()
    src, dst, vec = [], [], []
    start = 0
    for k, n in enumerate(n_node.tolist()):
        frame = coord[None, start : start + n]
        box = None if boxes is None else boxes[k : k + 1]
        try:
            s, d, v = graph_edges(
                frame, box, rcut, search_device or "cpu", search_device is not None
            )
        except InputError as err:
            raise InputError(f"system {k}: {str(err).removeprefix('frame 0: ')}") from None
        src.append(s + start)
        dst.append(d + start)
        vec.append(v)
        start += n
    return Graph(
        atype=atype.to(search_device or "cpu"),
        src=torch.cat(src),
        dst=torch.cat(dst),
        edge_vec=torch.cat(vec),
    )
