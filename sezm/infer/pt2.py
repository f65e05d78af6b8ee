"""The NeighborGraph ``.pt2`` contract, and evaluation of a frozen ``.pt2`` from Python.

A frozen model is an AOTInductor package whose compiled function takes the flat graph of a
batch of frames (DeePMD-kit's ``lower_input_kind = "graph"``), all tensors on one node axis
``N = sum(n_node)``:

    atype (N,) int64            n_node (nf,) int64        n_local (nf,) int64
    edge_index (2, E) int64     [src, dst], node indices; E >= 2 (masked padding allowed)
    edge_vec (E, 3) float64     r_src - r_dst
    edge_mask (E,) bool
    destination_order (E,), destination_row_ptr (N+1,), source_order (E,), source_row_ptr (N+1,)
    [fparam (nf, dim_fparam) f64] [aparam (N, dim_aparam) f64] [charge_spin (nf, 2) f64]

and returns a dict, flattened in the order of ``OUTPUT_KEYS``: atom_energy (N, 1), energy (nf, 1), force (N, 3),
virial (nf, 9), atom_virial (N, 9), all float64. Frame ``f`` owns its first ``n_local[f]``
nodes; only owned nodes enter ``energy`` (and so the forces and virials).

A spin model (``metadata.is_spin``, both schemes) takes ``spin (N, 3) f64`` right after
``source_row_ptr`` (DeePMD-kit's graph-spin ABI: the optional inputs follow it) and returns
``SPIN_OUTPUT_KEYS``: the five above plus ``force_mag (N, 3)`` and ``mask_mag (N, 1)`` bool. The CSR views are
part of the contract (DeePMD-kit's C++ reader always passes them) but sezm does not read them.
The package carries ``extra/metadata.json`` (see ``freeze.metadata``); a message-passing model
also carries the multi-rank package that LAMMPS runs on several MPI ranks (same inputs on one
rank's owned + ghost nodes, plus DeePMD-kit's 8 comm tensors; ``freeze.GraphLowerWithComm``).
"""

from __future__ import annotations

import json
import os
import zipfile
from types import SimpleNamespace

import torch

from ..compat.deepmd import CheckpointError
from ..model.graph import Graph

GRAPH_INPUTS = (
    "atype",
    "n_node",
    "n_local",
    "edge_index",
    "edge_vec",
    "edge_mask",
    "destination_order",
    "destination_row_ptr",
    "source_order",
    "source_row_ptr",
)
OUTPUT_KEYS = ("atom_energy", "energy", "force", "virial", "atom_virial")
SPIN_INPUT = "spin"  # (N, 3) float64, after GRAPH_INPUTS in a spin package
SPIN_OUTPUT_KEYS = (
    "atom_energy",
    "energy",
    "force",
    "force_mag",
    "virial",
    "mask_mag",
    "atom_virial",
)
N_PAD_EDGES = 2  # masked dummy edges appended to every edge list (the exported E is >= 2)


def read_metadata(path: str | os.PathLike) -> dict:
    """``extra/metadata.json`` of a ``.pt2`` package."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frozen model not found: {os.fspath(path)}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/extra/metadata.json")]
            if not names:
                raise CheckpointError(
                    f"{path}: no extra/metadata.json; not a frozen DeePMD-kit/sezm model"
                )
            return json.loads(zf.read(names[0]))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a frozen model (a .pt2 is a zip package written by `sezm freeze` or "
            f"`dp freeze`; {type(err).__name__}: {err})"
        ) from None


def model_params(meta: dict) -> dict:
    """The ``model`` section keys that name a package's inputs, rebuilt from its metadata.

    An energy ``fitting_net`` with ``numb_fparam``/``default_fparam``/``numb_aparam``, a
    ``descriptor`` with ``add_chg_spin_ebd``/``default_chg_spin`` and, for a spin model, the
    ``spin`` block: what ``sezm.data.fields_for_model`` reads to know which inputs a system
    must hold.
    """
    default_fparam = meta.get("default_fparam") if meta.get("has_default_fparam") else None
    params = {
        "type_map": list(meta["type_map"]),
        "fitting_net": {
            "type": "ener",
            "numb_fparam": int(meta["dim_fparam"]),
            "default_fparam": default_fparam,
            "numb_aparam": int(meta["dim_aparam"]),
        },
        "descriptor": {
            "add_chg_spin_ebd": bool(meta.get("dim_chg_spin")),
            "default_chg_spin": meta.get("default_chg_spin"),
        },
    }
    if meta.get("is_spin"):
        # sezm records the checkpoint's spin block; DeePMD-kit's metadata has use_spin only
        params["spin"] = meta.get("sezm", {}).get("spin") or {"use_spin": meta["use_spin"]}
    return params


def no_features_message(path: str | os.PathLike, meta: dict) -> str:
    """Why a ``.pt2`` gives no descriptor or fitting features, and what to use instead."""
    source = meta.get("sezm", {}).get("checkpoint")
    frozen_from = f" ({source})" if source else ""
    return (
        f"{os.fspath(path)}: a frozen .pt2 computes energies, forces and virials only; its graph "
        "contract has no descriptor or fitting-feature output. Use the .pt checkpoint it was "
        f"frozen from{frozen_from} for descriptors and embeddings"
    )


def outputs(result, keys: tuple[str, ...] = OUTPUT_KEYS) -> dict[str, torch.Tensor]:
    """A package's results by name (Python returns the dict, older runtimes a flat sequence
    in the order of ``keys``, the package's ``metadata.output_keys``)."""
    return dict(result) if isinstance(result, dict) else dict(zip(keys, result))


def graph_inputs(
    graph: Graph, n_node: torch.Tensor, n_local: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Contract inputs of a flat ``graph`` (``atype`` of any shape, ``N`` nodes in total).

    Edges are reordered destination-major, two masked padding edges are appended and the
    CSR views are built. ``n_local`` defaults to ``n_node`` (every node owned).
    """
    atype = graph.atype.reshape(-1)
    n = atype.shape[0]
    mask = torch.ones_like(graph.src, dtype=torch.bool)
    if graph.edge_mask is not None:
        mask = graph.edge_mask
    order = torch.argsort(torch.where(mask, graph.dst, n), stable=True)
    src, dst, vec, mask = graph.src[order], graph.dst[order], graph.edge_vec[order], mask[order]
    pad = torch.zeros(N_PAD_EDGES, dtype=src.dtype, device=src.device)
    edge_index = torch.stack([torch.cat([src, pad]), torch.cat([dst, pad])])
    edge_vec = torch.cat(
        [vec.to(torch.float64), vec.new_zeros(N_PAD_EDGES, 3, dtype=torch.float64)]
    )
    edge_mask = torch.cat([mask, torch.zeros(N_PAD_EDGES, dtype=torch.bool, device=src.device)])
    real = torch.nonzero(edge_mask).view(-1)
    padding = torch.nonzero(~edge_mask).view(-1)

    def row_ptr(nodes: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(nodes, minlength=n)
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    src_order = torch.cat([real[torch.argsort(edge_index[0, real], stable=True)], padding])
    return (
        atype,
        n_node,
        n_node.clone() if n_local is None else n_local,  # distinct tensors: traced separately
        edge_index,
        edge_vec,
        edge_mask,
        torch.arange(edge_mask.shape[0], device=src.device),
        row_ptr(edge_index[1, real]),
        src_order,
        row_ptr(edge_index[0, real]),
    )


class FrozenModel:
    """A ``.pt2`` package behind the call interface of ``EnergyModel``, on the device it was
    compiled for (``metadata.sezm.device``: ``cpu`` or ``cuda``).

    ``FrozenModel(path)(graph, atomic_virial=True)`` returns the keys of ``EnergyModel.forward``
    for a ``Graph`` of ``nf`` frames of equal size; ``params`` are the input-defining keys of
    the model section (:func:`model_params`), as ``EnergyModel.params`` holds the full one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.metadata = read_metadata(path)
        meta = self.metadata
        if meta.get("lower_input_kind") != "graph":
            raise CheckpointError(
                f"{path}: lower_input_kind {meta.get('lower_input_kind')!r}; sezm evaluates "
                "graph-schema packages (refreeze with `sezm freeze`)"
            )
        self.has_spin = bool(meta.get("is_spin"))
        self.output_keys = SPIN_OUTPUT_KEYS if self.has_spin else OUTPUT_KEYS
        if tuple(meta["output_keys"]) != self.output_keys:
            raise ValueError(
                f"{path}: output keys {meta['output_keys']}; a sezm "
                f"{'spin' if self.has_spin else 'energy'} package returns {list(self.output_keys)}"
            )
        self.path = os.fspath(path)
        self.type_map = list(meta["type_map"])
        self.rcut = float(meta["rcut"])
        self.fitting_net = SimpleNamespace(
            numb_fparam=int(meta["dim_fparam"]), numb_aparam=int(meta["dim_aparam"])
        )
        self.params = model_params(meta)
        self.device = torch.device(meta.get("sezm", {}).get("device", "cpu"))
        self._package = torch._inductor.aoti_load_package(self.path)

    def to(self, device: torch.device | str) -> FrozenModel:
        if torch.device(device).type != self.device.type:
            raise ValueError(f"{self.path} was compiled for {self.device}, not {device}")
        return self

    def eval(self) -> FrozenModel:
        return self

    @property
    def descriptor(self):
        raise TypeError(no_features_message(self.path, self.metadata))

    def _extras(self, graph: Graph, nf: int, nloc: int) -> list[torch.Tensor]:
        meta, extras, device = self.metadata, [], graph.atype.device
        if meta["dim_fparam"]:
            fparam = graph.fparam
            if fparam is None:
                if not meta.get("has_default_fparam"):
                    raise ValueError("this model needs fparam")
                fparam = torch.tensor(meta["default_fparam"], dtype=torch.float64, device=device)
            extras.append(fparam.to(torch.float64).reshape(-1, meta["dim_fparam"]).expand(nf, -1))
        if meta["dim_aparam"]:
            if graph.aparam is None:
                raise ValueError("this model needs aparam")
            extras.append(graph.aparam.to(torch.float64).reshape(nf * nloc, meta["dim_aparam"]))
        if meta.get("dim_chg_spin"):
            cs = graph.charge_spin
            if cs is None:
                if meta.get("default_chg_spin") is None:
                    raise ValueError("this model embeds a frame [charge, spin]; pass charge_spin")
                cs = torch.tensor(meta["default_chg_spin"], dtype=torch.float64)
            cs = torch.as_tensor(cs, dtype=torch.float64, device=device)
            extras.append(cs.reshape(-1, 2).expand(nf, 2))
        return [t.contiguous() for t in extras]

    def run_package(self, *inputs: torch.Tensor):
        """The compiled package on the graph-contract inputs; its raw outputs."""
        return self._package(*inputs)

    def __call__(
        self, graph: Graph, *, virial: bool = True, atomic_virial: bool = False, **_
    ) -> dict[str, torch.Tensor]:
        nf, nloc = graph.atype.shape
        n_node = torch.full((nf,), nloc, dtype=torch.long, device=graph.atype.device)
        spin = []
        if self.has_spin:
            if graph.spin is None:
                raise ValueError("this is a spin model: give the atomic spins (spin=...)")
            spin = [graph.spin.to(torch.float64).reshape(nf * nloc, 3).contiguous()]
        inputs = [*graph_inputs(graph, n_node), *spin, *self._extras(graph, nf, nloc)]
        out = outputs(self.run_package(*inputs), self.output_keys)
        result = {
            "atom_energy": out["atom_energy"].view(nf, nloc),
            "energy": out["energy"].view(nf),
            "force": out["force"].view(nf, nloc, 3),
            "virial": out["virial"].view(nf, 9),
            "atom_virial": out["atom_virial"].view(nf, nloc, 9),
        }
        if self.has_spin:
            result["force_mag"] = out["force_mag"].view(nf, nloc, 3)
            result["mask_mag"] = out["mask_mag"].view(nf, nloc)
        return result
