"""NumPy-in, NumPy-out evaluation with the interface of DeePMD-kit's ``DeepPot``/``DeepProperty``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..data.frames import InputError, normalize_frames
from ..data.graph import build_graph
from ..data.neighbors import device_search_available
from ..engine.stream import evaluate
from ..model.build import load_model
from ..model.dens import DensModel
from ..model.property_model import PropertyModel
from ..model.spin import VirtualSpinModel
from ..runtime import tune_allocator
from .settings import InferenceSettings

CLOSE_FRACTION = 0.5
"""Pairs closer than this fraction of the training data's closest pair are warned about."""


class InputWarning(UserWarning):
    """Evaluation input outside what the model was trained or built for."""


class _DeepEval:
    _warned_close = _warned_sel = False

    def __init__(
        self, model_file: str | os.PathLike, head: str | None = None, device: str | None = None
    ):
        self.settings = InferenceSettings.from_env()  # DP_*_INFER, read once
        if os.fspath(model_file).endswith(".pt2"):
            self._init_frozen(model_file, head, device)
            tune_allocator(self.device)
            return
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tune_allocator(self.device)  # before the model's tensors are allocated
        self.model, self.checkpoint = load_model(model_file, head)
        # no weight gradients at inference: autograd then keeps fewer tensors for the force pass
        self.model.to(self.device).requires_grad_(False)
        self.settings.apply(self.model, self.device)
        self.type_map = list(self.model.type_map)

    def _init_frozen(self, model_file, head: str | None, device: str | None) -> None:
        """A frozen ``.pt2`` (``sezm freeze``): compiled for one device, settings baked in."""
        from .pt2 import FrozenModel

        if head is not None:
            raise ValueError(f"{model_file}: a frozen model has one head; freeze with --head")
        self.model, self.checkpoint = FrozenModel(model_file), None
        self.device = self.model.device
        if device is not None:
            self.model.to(device)
        self.type_map = list(self.model.type_map)

    @property
    def model_params(self) -> dict:
        """The checkpoint's ``model`` section; of a frozen ``.pt2``, the keys naming its inputs
        (``pt2.model_params``: fparam, aparam, charge_spin)."""
        return self.model.params if self.checkpoint is None else self.checkpoint.model_params

    def get_type_map(self) -> list[str]:
        return list(self.type_map)

    def get_ntypes(self) -> int:
        return len(self.type_map)

    def get_rcut(self) -> float:
        return self.model.rcut

    def get_dim_fparam(self) -> int:
        return self.model.fitting_net.numb_fparam

    def get_dim_aparam(self) -> int:
        return self.model.fitting_net.numb_aparam

    def has_spin(self) -> bool:
        """Whether the model takes atomic spins (``eval(..., spin=...)``)."""
        return bool(getattr(self.model, "has_spin", False))

    def _graph(
        self, coords, cells, atom_types, fparam=None, aparam=None, charge_spin=None, spin=None
    ):
        coord, cell, atype = normalize_frames(
            coords, cells, atom_types, self.get_ntypes(), self.type_map
        )
        nf, nat = atype.shape
        fparam = _per_frame("fparam", fparam, (self.get_dim_fparam(),), nf, "numb_fparam")
        aparam = _per_frame("aparam", aparam, (nat, self.get_dim_aparam()), nf, "numb_aparam")
        if spin is not None and not self.has_spin():
            raise InputError("spin given, but this model takes no atomic spins")
        spin = _per_frame("spin", spin, (nat, 3), nf, "spin")
        graph = build_graph(
            coord,
            cell,
            atype,
            self.model.rcut,
            device=self.device,
            fparam=fparam,
            aparam=aparam,
            charge_spin=charge_spin,
            spin=spin,
            search_on_device=self.device.type == "cuda" and device_search_available(),
        )
        self._check_distances(graph)
        self._check_sel(graph)
        return graph

    def _check_sel(self, graph) -> None:
        """Warn (once per model) when an atom has more neighbours than ``sel`` on the paths
        that keep only the ``sum(sel)`` nearest (dens and spin models, as DeePMD-kit)."""
        truncates = self.has_spin() or isinstance(self.model, DensModel)
        if self._warned_sel or not truncates or self.checkpoint is None:
            return
        sel = self.model_params["descriptor"].get("sel")
        cap = int(sum(sel)) if isinstance(sel, (list, tuple)) else int(sel)
        counts = torch.bincount(graph.dst.reshape(-1))
        if counts.numel() == 0 or int(counts.max()) <= cap:
            return
        self._warned_sel = True
        atom = int(torch.argmax(counts))
        nat = graph.atype.shape[1]
        warnings.warn(
            f"frame {atom // nat}: atom {atom % nat} has {int(counts.max())} neighbours within "
            f"rcut {self.get_rcut()} Å, more than sel = {cap}; this model keeps only the {cap} "
            "nearest (said once per model)",
            InputWarning,
            stacklevel=4,
        )

    def _check_distances(self, graph) -> None:
        """Warn (once per model) when two atoms are far closer than any pair of the training
        data (the checkpoint's ``min_nbor_dist``): coordinates in another unit than Å, or a
        structure the model has never seen."""
        floor = float(getattr(self.model, "min_nbor_dist", -1.0))
        if self._warned_close or floor <= 0 or graph.edge_vec.shape[0] == 0:
            return
        dist = graph.edge_vec.detach().norm(dim=-1)  # (E,)
        if graph.edge_mask is not None:
            dist = torch.where(graph.edge_mask, dist, torch.inf)
        closest = int(torch.argmin(dist))
        if float(dist[closest]) >= CLOSE_FRACTION * floor:
            return
        self._warned_close = True
        nat = graph.atype.shape[1]
        centre, neighbour = int(graph.dst[closest]), int(graph.src[closest])
        frame, i, j = centre // nat, centre % nat, neighbour % nat
        warnings.warn(
            f"frame {frame}: atoms {i} and {j} are {float(dist[closest]):.4g} Å apart, far below "
            f"the closest pair of the training data ({floor:.4g} Å); are the coordinates in Å? "
            "(said once per model)",
            InputWarning,
            stacklevel=4,
        )

    def eval_descriptor(
        self, coords, cells, atom_types, fparam=None, aparam=None, charge_spin=None, spin=None
    ) -> np.ndarray:
        """Per-atom descriptor ``(nf, nat, dim)`` (native-spin models also take ``spin``)."""
        if isinstance(self.model, VirtualSpinModel):
            raise NotImplementedError("the descriptor of a deepspin model includes virtual atoms")
        if isinstance(self.model, DensModel):  # as DeePMD-kit: the ener mode only
            raise NotImplementedError("a dens model has no descriptor evaluation")
        g = self._graph(coords, cells, atom_types, fparam, aparam, charge_spin, spin)
        with torch.no_grad(), self.settings.evaluation(self.device):
            desc, _ = self.model.descriptor(
                g.atype, g.src, g.dst, g.edge_vec, g.edge_mask, g.charge_spin, g.spin
            )
        return desc.double().cpu().numpy()


def _per_frame(name: str, value, shape: tuple[int, ...], nf: int, key: str) -> np.ndarray | None:
    """``value`` as ``(nf, *shape)`` float64: given for every frame or once for all of them;
    a model without this input (its size 0) refuses it by name."""
    if value is None:
        return None
    if shape[-1] == 0:
        raise InputError(
            f"{name} given, but this model takes none (fitting_net/{key} is 0); leave it out"
        )
    array = np.asarray(value, dtype=np.float64)
    per_frame = int(np.prod(shape))
    if array.size not in (per_frame, nf * per_frame):
        raise InputError(
            f"{name} has {array.size} values {tuple(array.shape)}; this model takes "
            f"{per_frame} per frame (shape {shape}, from {key}), for each of the {nf} frame(s) "
            "or once for all"
        )
    if not np.isfinite(array).all():
        raise InputError(f"{name} holds NaN or inf")
    return np.broadcast_to(array.reshape(-1, *shape), (nf, *shape))


class DeepPot(_DeepEval):
    """Energy model evaluation: ``e, f, v = DeepPot("model.pt").eval(coords, cells, atom_types)``."""

    def eval(
        self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None, **kwargs
    ):
        """Energies ``(nf, 1)``, forces ``(nf, nat, 3)``, virials ``(nf, 9)`` [+ atomic energies
        ``(nf, nat, 1)`` and atomic virials ``(nf, nat, 9)`` with ``atomic=True``].

        Spin models take ``spin (nf, nat, 3)`` and append the magnetic forces
        ``(nf, nat, 3)`` and the magnetic-atom mask ``(nf, nat, 1)`` (bool).
        """
        if isinstance(self.model, PropertyModel):
            raise TypeError("this checkpoint is a property model; use sezm.DeepProperty")
        g = self._graph(
            coords,
            cells,
            atom_types,
            fparam,
            aparam,
            kwargs.get("charge_spin"),
            kwargs.get("spin"),
        )
        with self.settings.evaluation(self.device):
            out = evaluate(self.model, g, atomic_virial=atomic)
        nf, nat = g.atype.shape

        def arr(key, shape):
            if key not in out:  # a dens model has no virials: NaN, as in DeePMD-kit
                return np.full(shape, np.nan)
            return out[key].detach().double().cpu().numpy().reshape(shape)

        result = [arr("energy", (nf, 1)), arr("force", (nf, nat, 3)), arr("virial", (nf, 9))]
        if atomic:
            result += [arr("atom_energy", (nf, nat, 1)), arr("atom_virial", (nf, nat, 9))]
        if self.has_spin():
            mask = out["mask_mag"].cpu().numpy().reshape(nf, nat, 1)
            result += [arr("force_mag", (nf, nat, 3)), mask]
        return tuple(result)


class DeepProperty(_DeepEval):
    """Property model evaluation: ``p = DeepProperty("prop.pt").eval(coords, cells, atom_types)``."""

    def get_task_dim(self) -> int:
        return self.model.fitting_net.task_dim

    def get_var_name(self) -> str:
        return self.model.property_name

    def eval(
        self, coords, cells, atom_types, atomic: bool = False, fparam=None, aparam=None, **kwargs
    ):
        """Property ``(nf, task_dim)`` [+ atomic property ``(nf, nat, task_dim)``]."""
        if not isinstance(self.model, PropertyModel):
            raise TypeError("this checkpoint is an energy model; use sezm.DeepPot")
        g = self._graph(coords, cells, atom_types, fparam, aparam, kwargs.get("charge_spin"))
        with torch.no_grad(), self.settings.evaluation(self.device):
            out = evaluate(self.model, g)
        prop = out["property"].double().cpu().numpy()
        if not atomic:
            return (prop,)
        return prop, out["atom_property"].double().cpu().numpy()
