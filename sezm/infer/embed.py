"""Model embeddings of systems (npy folders or files ASE reads), written to HDF5 in the layout of DeePMD-kit's ``dp embed``.

One forward pass without forces gives, per frame:

    descriptor          d_i                                                (nat, C)
    atomic_feature      h_i = last hidden activation of the fitting            (nat, H)
    structural_feature  S   = sum_i m_i h_i,  m_i = 0 for excluded atom types  (H,)

for energy models (``h_i``: the last GLU activation; ``S`` through the output layer gives the
energy without biases) and property models (``h_i``: the last residual-MLP activation; ``S`` is
the sum over atoms for intensive properties too, as in DeePMD-kit); ``h_i = d_i`` when the
fitting has no hidden layer. A frozen ``.pt2`` has no such outputs: embed from its checkpoint.

The file holds the attribute ``type_map`` and one group per system, named by the folder's base
name (a file's name, with ``[nat atoms]`` when it holds frames of several sizes; ``name_1``,
``name_2``, ... on a clash), with attributes ``nframes`` and ``system`` and the
datasets ``descriptor``, ``atomic_feature``, ``structural_feature`` (``fp32``/``fp64``, or
``native``: the descriptor in float64, as DeePMD-kit's descriptor interface gives it, the
features in the fitting precision) and ``atom_types`` (int32, ``-1`` for padding atoms of
mixed-type systems), all gzip-9 + shuffle.
Frames are evaluated and written a batch at a time, so memory does not grow with the system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ..data.ase_frames import FileOptions
from ..data.dataset import _graph as data_graph
from ..data.dataset import fields_for_model, open_systems
from ..data.system import BaseSystem
from ..model.energy import EnergyModel
from ..model.fitting import atom_keep_mask
from ..model.graph import Graph
from ..model.property_model import PropertyModel
from .deep_pot import DeepPot
from .pt2 import no_features_message, read_metadata

log = logging.getLogger(__name__)

EMBEDDINGS = ("descriptor", "atomic_feature", "structural_feature")
DTYPES = {"fp32": np.float32, "fp64": np.float64, "native": None}
H5_DATASET = {"compression": "gzip", "compression_opts": 9, "shuffle": True}
_INPUT_KEYS = ("fparam", "aparam", "charge_spin")
EMBEDDABLE = (EnergyModel, PropertyModel)


def frame_embeddings(model: EnergyModel | PropertyModel, graph: Graph) -> dict[str, torch.Tensor]:
    """``descriptor (nf, nat, C)``, ``atomic_feature (nf, nat, H)``, ``structural_feature
    (nf, H)`` of a graph; rows of padding atoms (type ``-1``) are zero."""
    real = graph.atype >= 0  # (nf, nat)
    atype = torch.where(real, graph.atype, 0)
    desc, _ = model.descriptor(
        atype, graph.src, graph.dst, graph.edge_vec, graph.edge_mask, graph.charge_spin
    )
    feat = model.fitting_net.atomic_feature(desc, atype, graph.fparam, graph.aparam)
    keep = atom_keep_mask(graph.atype, model.atom_exclude_types).unsqueeze(-1)
    return {
        "descriptor": desc * real.unsqueeze(-1).to(desc.dtype),
        "atomic_feature": feat * real.unsqueeze(-1).to(feat.dtype),
        "structural_feature": (feat * keep.to(feat.dtype)).sum(1),
    }


def group_name(path: str | Path, used: set[str]) -> str:
    """The system folder's base name, made unique among ``used`` (which it joins)."""
    base = os.path.basename(str(path).rstrip("/")) or "system"
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def check_embeddable(model: str | os.PathLike) -> None:
    """``NotImplementedError`` for a frozen ``.pt2``, which holds no descriptor or features."""
    if os.fspath(model).endswith(".pt2"):
        raise NotImplementedError(no_features_message(model, read_metadata(model)))


class Embedder:
    """Embeddings of a checkpoint's energy or property model; settings (``DP_*_INFER``) read
    once here."""

    def __init__(
        self,
        model: str | os.PathLike,
        head: str | None = None,
        device: str | None = None,
        batch_atoms: int = 1024,
    ) -> None:
        check_embeddable(model)
        self.dp = DeepPot(model, head=head, device=device)
        if not isinstance(self.dp.model, EMBEDDABLE):
            raise NotImplementedError(
                f"{model}: embeddings are defined for energy and property models, "
                f"not {type(self.dp.model).__name__}"
            )
        self.batch_atoms = batch_atoms
        self.inputs = {
            k: f for k, f in fields_for_model(self.dp.model.params).items() if k in _INPUT_KEYS
        }
        net = self.dp.model

        def embed(graph: Graph) -> dict[str, torch.Tensor]:
            return frame_embeddings(net, graph)

        self._embed: Callable[[Graph], dict[str, torch.Tensor]] = self.dp.settings.compiled(embed)

    def batches(
        self, system: BaseSystem
    ) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """``(first frame, atom types (n, nat), embeddings)`` of consecutive frame batches."""
        for start, data in system.chunks(self.batch_atoms):
            inputs = {k: data.get(k) for k in self.inputs}
            graph = data_graph(
                data["coord"],
                data.get("box"),
                data["atype"],
                self.dp.get_rcut(),
                self.dp.device,
                inputs,
            )
            with torch.no_grad(), self.dp.settings.evaluation(self.dp.device):
                out = self._embed(graph)
            yield start, data["atype"], {k: v.detach().cpu().numpy() for k, v in out.items()}

    def write_system(self, h5: h5py.File, system: BaseSystem, name: str, dtype: str) -> None:
        """One system's embeddings as the group ``name`` of ``h5``."""
        group = h5.create_group(name)
        group.attrs["nframes"] = system.nframes
        group.attrs["system"] = str(system.path)
        types = group.create_dataset(
            "atom_types", shape=(system.nframes, system.nat), dtype=np.int32, **H5_DATASET
        )
        for start, atype, out in self.batches(system):
            stop = start + len(atype)
            types[start:stop] = atype
            for key in EMBEDDINGS:
                value = out[key]
                if key not in group:
                    shape, kind = (system.nframes, *value.shape[1:]), DTYPES[dtype]
                    if kind is None:
                        kind = np.float64 if key == "descriptor" else value.dtype
                    group.create_dataset(key, shape=shape, dtype=kind, **H5_DATASET)
                group[key][start:stop] = value
        log.info(
            "%s: %d frames -> group %r (%s)",
            system.path,
            system.nframes,
            name,
            ", ".join(f"{k} {group[k].shape}" for k in EMBEDDINGS),
        )

    def write(
        self,
        systems: Sequence[str | Path],
        output: str | Path,
        dtype: str = "fp32",
        file_options: FileOptions | None = None,
    ) -> Path:
        """Embeddings of every system in ``systems`` written to the HDF5 file ``output``
        (``file_options``: how files among them are read with ASE)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not systems:
            raise ValueError("no system to embed")
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        with h5py.File(output, "w") as h5:
            h5.attrs["type_map"] = np.array(self.dp.type_map, dtype=h5py.string_dtype())
            for path in systems:
                for system in open_systems(path, self.dp.type_map, self.inputs, file_options):
                    self.write_system(h5, system, group_name(system.path, used), dtype)
        log.info("embeddings of %d system(s) written to %s", len(systems), output)
        return output


def embed(
    model: str | os.PathLike,
    systems: Sequence[str | Path],
    output: str | Path = "embedding.hdf5",
    *,
    dtype: str = "fp32",
    head: str | None = None,
    device: str | None = None,
    file_options: FileOptions | None = None,
) -> Path:
    """Write the embeddings of ``systems`` (npy system folders or files ASE reads) under
    ``model`` to ``output``."""
    embedder = Embedder(model, head=head, device=device)
    return embedder.write(systems, output, dtype, file_options)
