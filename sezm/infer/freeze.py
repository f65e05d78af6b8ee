"""Freeze a DPA4 checkpoint into an AOTInductor ``.pt2`` that DeePMD-kit's C++ ``DeepPotPTExpt``
(LAMMPS ``pair_style deepmd model.pt2``) and ``sezm.DeepPot`` run.

Pipeline (the input/output contract is in ``pt2.py``, the schema choice in ``docs/freeze.md``):

1. ``GraphLower`` wraps the energy model: per-node energies on the flat graph, one backward
   pass to the edge vectors, forces and virials from ``model.forces``.
2. ``make_fx`` (symbolic shapes) records forward and backward as one graph; its ``index_add``
   nodes become ``scatter_add`` / one-hot sums on the CPU (``scatter_rewrite``: faster scatters);
   ``torch.export`` checks that atoms, edges and frames stay dynamic.
3. AOTInductor compiles it with deterministic algorithms on, so accumulating scatters call
   ATen: Inductor's own atomic-add scatters get scheduled after a kernel that reads their
   result in this graph (torch 2.11-2.13, CPU), which silently corrupts the forces.
4. The package is reloaded and compared with eager evaluation on two frames of different
   sizes; a difference beyond floating-point rounding raises ``FreezeError``.
5. Message-passing models get a second package for multi-rank LAMMPS (``GraphLowerWithComm``,
   DeePMD-kit's with-comm ABI), checked the same way on a periodic frame split into owned
   atoms and ghost images, and stored inside the first (``COMM_ENTRY``).

Spin models (both schemes) use ``SpinGraphLower`` (DeePMD-kit's graph-spin ABI, ``pt2.py``) and
run on one MPI rank: no with-comm package.

The package is compiled for one device (``device``, default the CPU). On CUDA with
``DP_TRITON_INFER`` set, the model is traced with the fused edge-frame rotations on: their
custom operators (``sezm.kernels.rotation_triton``) stay nodes of the exported graph and
AOTInductor compiles their Triton kernels into the package. On the CPU the package holds the
PyTorch rotations (the kernels are CUDA-only); a set ``DP_TRITON_INFER`` is logged as having no
effect. A CUDA package has no with-comm companion (its ghost exchange is checked on the CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..compat.deepmd import load_checkpoint
from ..config.descriptor_options import bridging_radii
from ..config.spin import use_spin_flags
from ..data.neighbors import build_edges
from ..kernels import fused_rotation, require_triton
from ..model import forces as F
from ..model.build import load_model
from ..model.dens import DensModel
from ..model.energy import EnergyModel
from ..model.graph import Graph
from ..model.spin import NativeSpinModel, VirtualSpinModel
from ..runtime import deterministic_algorithms
from .comm import COMM_INPUTS, GhostExchange, Halo, halo, register_border_ops
from .pt2 import (
    GRAPH_INPUTS,
    OUTPUT_KEYS,
    SPIN_INPUT,
    SPIN_OUTPUT_KEYS,
    graph_inputs,
    outputs,
)
from .scatter_rewrite import rewrite_index_add
from .settings import InferenceSettings

log = logging.getLogger(__name__)

DPA4_TYPES = ("dpa4", "sezm")


class FreezeError(RuntimeError):
    """A checkpoint that cannot be frozen, or a package that does not reproduce eager results."""


class GraphLower(nn.Module):
    """``EnergyModel`` on the flat NeighborGraph inputs of ``pt2.GRAPH_INPUTS`` (+ extras).

    Every node is passed to the model as a one-atom frame (``atype (N, 1)``), so frames of
    different sizes share one call; per-frame inputs are gathered to their nodes first.
    """

    def __init__(self, model: EnergyModel, extras: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.extras = extras

    def forward(
        self,
        atype: torch.Tensor,
        n_node: torch.Tensor,
        n_local: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vec: torch.Tensor,
        edge_mask: torch.Tensor,
        destination_order: torch.Tensor,
        destination_row_ptr: torch.Tensor,
        source_order: torch.Tensor,
        source_row_ptr: torch.Tensor,
        *extras: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        graph, frame, owned = self.node_graph(
            atype, n_node, n_local, edge_index, edge_vec, edge_mask, extras
        )
        n, nf = atype.shape[0], n_node.shape[0]
        src, dst = edge_index[0], edge_index[1]
        vec = edge_vec.detach().requires_grad_(True)
        with torch.enable_grad():
            atom_energy = self.model.atomic_energy(graph, vec).view(n)  # (N,) float64
            owned_energy = atom_energy * owned.to(atom_energy.dtype)
            grad = F.edge_gradient(owned_energy, vec)  # (E, 3)
        grad = grad * edge_mask.unsqueeze(-1).to(grad.dtype)
        vec = vec.detach()
        energy = owned_energy.new_zeros(nf).index_add(0, frame, owned_energy)
        return {  # the C++ reader takes them flat, in this order (= OUTPUT_KEYS)
            "atom_energy": atom_energy.view(n, 1),
            "energy": energy.view(nf, 1),
            "force": F.forces(grad, src, dst, n),
            "virial": F.frame_virials(grad, vec, frame[dst], nf),
            "atom_virial": F.atomic_virials(grad, vec, src, dst, n),
        }

    def node_graph(
        self, atype, n_node, n_local, edge_index, edge_vec, edge_mask, extras
    ) -> tuple[Graph, torch.Tensor, torch.Tensor]:
        """The contract inputs as a ``Graph`` of one-node frames, with the frame of each node
        ``(N,)`` and whether it is owned ``(N,)`` bool."""
        n, nf = atype.shape[0], n_node.shape[0]
        frame = torch.repeat_interleave(
            torch.arange(nf, device=atype.device), n_node, output_size=n
        )  # (N,)
        first = torch.cumsum(n_node, 0) - n_node  # (nf,) first node of each frame
        owned = torch.arange(n, device=atype.device) - first[frame] < n_local[frame]  # (N,)
        given = dict(zip(self.extras, extras))
        graph = Graph(
            atype=atype.view(n, 1),
            src=edge_index[0],
            dst=edge_index[1],
            edge_vec=edge_vec,
            edge_mask=edge_mask,
            fparam=given["fparam"][frame] if "fparam" in given else None,
            aparam=given["aparam"].unsqueeze(1) if "aparam" in given else None,
            charge_spin=given["charge_spin"][frame] if "charge_spin" in given else None,
        )
        return graph, frame, owned


class SpinGraphLower(GraphLower):
    """A spin model (``native`` or ``deepspin``) on DeePMD-kit's graph-spin inputs:
    ``pt2.GRAPH_INPUTS``, then ``spin (N, 3)``, then the extras; outputs ``SPIN_OUTPUT_KEYS``.

    native    one backward pass of the owned energy to the edge vectors and the spins
              (``force_mag = -dE/ds``), as ``EnergyModel.forward``.
    deepspin  the virtual atoms are made inside the package (``VirtualSpinModel.
              virtual_graph``, masked rather than filtered), the plain model runs on real
              and virtual nodes, and their forces and virials combine as in
              ``VirtualSpinModel.forward``.
    """

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        atype, n_node, n_local, edge_index, edge_vec, edge_mask = inputs[:6]
        extras = inputs[len(GRAPH_INPUTS) :]  # spin first (``extra_inputs``)
        graph, frame, owned = self.node_graph(
            atype, n_node, n_local, edge_index, edge_vec, edge_mask, extras
        )
        spin = extras[0].to(torch.float64).view(-1, 1, 3)  # (N, 1, 3)
        nf = n_node.shape[0]
        if isinstance(self.model, NativeSpinModel):
            out = self.native(graph, spin, frame, owned, nf)
            magnetic = self.model.spin_mask  # (ntypes,) bool
        else:
            out = self.virtual(graph, spin, frame, owned, nf)
            magnetic = self.model.virtual_scale > 0
        out["mask_mag"] = magnetic[atype].view(-1, 1)  # (N, 1) bool
        return {k: out[k] for k in SPIN_OUTPUT_KEYS}

    def native(self, graph: Graph, spin, frame, owned, nf: int) -> dict[str, torch.Tensor]:
        n = frame.shape[0]
        vec = graph.edge_vec.detach().requires_grad_(True)
        spin = spin.detach().requires_grad_(True)
        with torch.enable_grad():
            atom_energy = self.model.atomic_energy(graph, vec, spin).view(n)  # (N,)
            owned_energy = atom_energy * owned.to(atom_energy.dtype)
            grads = torch.autograd.grad(owned_energy.sum(), (vec, spin), allow_unused=True)
        grad, grad_spin = (
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, (vec, spin))
        )
        grad = grad * graph.edge_mask.unsqueeze(-1).to(grad.dtype)
        vec = vec.detach()
        src, dst = graph.src, graph.dst
        return {
            "atom_energy": atom_energy.view(n, 1),
            "energy": owned_energy.new_zeros(nf).index_add(0, frame, owned_energy).view(nf, 1),
            "force": F.forces(grad, src, dst, n),
            "force_mag": -grad_spin.view(n, 3),
            "virial": F.frame_virials(grad, vec, frame[dst], nf),
            "atom_virial": F.atomic_virials(grad, vec, src, dst, n),
        }

    def virtual(self, graph: Graph, spin, frame, owned, nf: int) -> dict[str, torch.Tensor]:
        model, n = self.model, frame.shape[0]
        scale = model.virtual_scale[graph.atype.view(n)].view(n, 1, 1)  # (N, 1, 1)
        disp = spin * scale  # (N, 1, 3) virtual offsets d_i
        doubled = model.virtual_graph(graph, disp)  # node 2k: real atom k, 2k + 1: its partner
        vec = doubled.edge_vec.detach().requires_grad_(True)
        with torch.enable_grad():
            atom_energy = model.atomic_energy(doubled, vec)  # (N, 2)
            owned_energy = atom_energy * owned.to(atom_energy.dtype).unsqueeze(-1)
            grad = F.edge_gradient(owned_energy, vec)  # (E2, 3)
        grad = grad * doubled.edge_mask.unsqueeze(-1).to(grad.dtype)
        vec = vec.detach()
        src, dst = doubled.src, doubled.dst
        force = F.forces(grad, src, dst, 2 * n).view(n, 2, 3)
        f_virt = force[:, 1]  # (N, 3)
        d = disp.view(n, 3).to(f_virt.dtype)
        corr = -(f_virt.unsqueeze(-1) * d.unsqueeze(-2)).reshape(n, 9)  # -F_i' (x) d_i
        atom_virial = F.atomic_virials(grad, vec, src, dst, 2 * n).view(n, 2, 9)
        energy = owned_energy.sum(-1)  # (N,) virtual atoms are excluded: zero
        return {
            "atom_energy": atom_energy[:, 0].reshape(n, 1),
            "energy": energy.new_zeros(nf).index_add(0, frame, energy).view(nf, 1),
            "force": force[:, 0] + f_virt,
            "force_mag": f_virt * scale.view(n, 1).to(f_virt.dtype),
            "virial": F.frame_virials(grad, vec, frame[dst // 2], nf)
            + corr.new_zeros(nf, 9).index_add(0, frame, corr),
            "atom_virial": atom_virial[:, 0] + atom_virial[:, 1] + corr,
        }


class GraphLowerWithComm(GraphLower):
    """``GraphLower`` for one MPI rank of a LAMMPS run (DeePMD-kit's with-comm graph ABI).

    Inputs: the ``GraphLower`` inputs of one frame on the rank's extended node set (owned
    atoms first, ``n_local`` of them, then ghosts; edges end on owned atoms), followed by the
    8 comm tensors ``COMM_INPUTS``. Ghost node features come from their owners through
    ``border_op`` (``comm.GhostExchange``); the backward pass sends ghost gradients back, so
    the forces on owned and ghost nodes are those of the total energy of all ranks.
    """

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        lower, comm = inputs[: -len(COMM_INPUTS)], inputs[-len(COMM_INPUTS) :]
        atype, n_local = lower[0], lower[2]
        owned = torch.arange(atype.shape[0], device=atype.device) < n_local[0]
        with GhostExchange(self.model.descriptor, comm, owned):
            return super().forward(*lower)


# --- sample systems ------------------------------------------------------------------------
def sample_frames(
    ntypes: int, sizes: tuple[int, ...], seed: int, density: float = 0.05
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Periodic frames ``(coord (nat, 3), cell (3, 3), atype (nat,))``: jittered grid points
    in a cube holding ``density`` atoms per Å^3, types cycling through ``ntypes``."""
    rng = np.random.default_rng(seed)
    frames = []
    for nat in sizes:
        side = (nat / density) ** (1 / 3)
        g = math.ceil(nat ** (1 / 3))
        grid = np.stack(np.meshgrid(*[np.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)
        cells = grid[rng.choice(len(grid), nat, replace=False)]
        coord = (cells + 0.5 + rng.uniform(-0.15, 0.15, (nat, 3))) * (side / g)
        frames.append((coord, np.eye(3) * side, np.arange(nat) % ntypes))
    return frames


def flat_graph(frames, rcut: float) -> tuple[Graph, torch.Tensor]:
    """One graph over frames of any sizes (node ``offset_f + i``) and ``n_node (nf,)``."""
    atype, src, dst, vec, offset = [], [], [], [], 0
    for coord, cell, types in frames:
        edges = build_edges(coord[None], cell[None], rcut)
        atype.append(torch.as_tensor(types))
        src.append(torch.as_tensor(edges.src) + offset)
        dst.append(torch.as_tensor(edges.dst) + offset)
        vec.append(torch.as_tensor(edges.vec))
        offset += len(types)
    graph = Graph(
        atype=torch.cat(atype).long(),
        src=torch.cat(src).long(),
        dst=torch.cat(dst).long(),
        edge_vec=torch.cat(vec).to(torch.float64),
    )
    return graph, torch.tensor([len(f[2]) for f in frames])


# --- freezing ------------------------------------------------------------------------------
def extra_inputs(model: EnergyModel) -> tuple[str, ...]:
    """Contract inputs after ``GRAPH_INPUTS`` the model needs, in contract order (``spin``
    first: DeePMD-kit's graph-spin ABI)."""
    names = [SPIN_INPUT] if getattr(model, "has_spin", False) else []
    if model.fitting_net.numb_fparam:
        names.append("fparam")
    if model.fitting_net.numb_aparam:
        names.append("aparam")
    if model.descriptor.opts.add_chg_spin_ebd:
        names.append("charge_spin")
    return tuple(names)


def lower_inputs(model: EnergyModel, frames, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Contract inputs for ``frames`` (random spin / fparam / aparam / charge_spin when
    needed; spins in [-1, 1))."""
    graph, n_node = flat_graph(frames, model.rcut)
    gen = torch.Generator().manual_seed(seed)
    n, nf = graph.atype.shape[0], n_node.shape[0]
    shapes = {
        "fparam": (nf, model.fitting_net.numb_fparam),
        "aparam": (n, model.fitting_net.numb_aparam),
        "charge_spin": (nf, 2),
        SPIN_INPUT: (n, 3),
    }
    extras = [
        torch.rand(shapes[k], generator=gen, dtype=torch.float64) for k in extra_inputs(model)
    ]
    extras = [2 * x - 1 if k == SPIN_INPUT else x for k, x in zip(extra_inputs(model), extras)]
    device = model_device(model)
    return tuple(t.to(device) for t in (*graph_inputs(graph, n_node), *extras))


def halo_inputs(model: EnergyModel, frame, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], Halo]:
    """``GraphLowerWithComm`` inputs for one periodic frame (random extras as ``lower_inputs``;
    ghost rows of ``aparam`` are zero, as DeePMD-kit's C++ reader passes them)."""
    coord, cell, types = frame
    h = halo(coord, cell, types, model.rcut)
    n, nloc = len(h.atype), h.nloc
    graph = Graph(
        atype=torch.as_tensor(h.atype).long(),
        src=torch.as_tensor(h.src).long(),
        dst=torch.as_tensor(h.dst).long(),
        edge_vec=torch.as_tensor(h.vec, dtype=torch.float64),
    )
    local = lower_inputs(model, [frame], seed)
    extras = dict(zip(extra_inputs(model), local[len(GRAPH_INPUTS) :]))
    if "aparam" in extras:
        aparam = extras["aparam"]
        extras["aparam"] = torch.cat([aparam, aparam.new_zeros(n - nloc, aparam.shape[1])])
    base = graph_inputs(graph, torch.tensor([n]), torch.tensor([nloc]))
    return (*base, *extras.values(), *h.plan.tensors), h


def dynamic_shapes(extras: tuple[str, ...], with_comm: bool = False) -> tuple[dict | None, ...]:
    """Dynamic atoms and edges; frames dynamic too, except with comm (one frame, and the
    number of swaps dynamic)."""
    Dim = torch.export.Dim
    nodes, edges = Dim("n_node_total", min=1), Dim("n_edge", min=2)
    frames = None if with_comm else Dim("nframes", min=1)
    per_frame = None if with_comm else {0: frames}
    shapes = {
        "atype": {0: nodes},
        "n_node": per_frame,
        "n_local": per_frame,
        "edge_index": {1: edges},
        "edge_vec": {0: edges},
        "edge_mask": {0: edges},
        "destination_order": {0: edges},
        "destination_row_ptr": {0: nodes + 1},
        "source_order": {0: edges},
        "source_row_ptr": {0: nodes + 1},
        "fparam": per_frame,
        "aparam": {0: nodes},
        "charge_spin": per_frame,
        SPIN_INPUT: {0: nodes},
    }
    specs = tuple(shapes[k] for k in (*GRAPH_INPUTS, *extras))
    if not with_comm:
        return specs
    swaps = Dim("nswap", min=1)
    per_swap = {0: swaps}
    # send_list, send_proc, recv_proc, send_num, recv_num, communicator, nlocal, nghost
    return (*specs, per_swap, per_swap, per_swap, per_swap, per_swap, None, None, None)


def _export(lower: nn.Module, sample, shapes) -> torch.export.ExportedProgram:
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    # Every dynamic size gets its own symbol (no duck shaping), so a sample size that happens
    # to equal a model width cannot be baked into the graph.
    with fx_config.patch(use_duck_shape=False):
        traced = make_fx(lower, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*sample)
        if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in sample):
            # the CPU's deterministic index_add is the slow one; CUDA keeps its own kernels
            rewritten = rewrite_index_add(traced)
            log.debug(
                "freeze: %d index_add nodes rewritten as scatter_add / one-hot sums", rewritten
            )
        try:
            # A shape fact the solver cannot prove (torch < 2.13: ``min(a n, b n) = a n`` in the
            # contiguity of node-tensor views) becomes a runtime check instead of an error.
            return torch.export.export(
                traced,
                sample,
                dynamic_shapes=shapes,
                strict=False,
                prefer_deferred_runtime_asserts_over_guards=True,
            )
        except torch._dynamo.exc.UserError as err:
            if "Constraints violated" not in str(err):
                raise
            raise FreezeError(_constraint_message(err)) from err


def _constraint_message(err: Exception) -> str:
    """A dynamic-shape proof torch could not make: before 2.13 the shape solver cannot show
    ``min(a n, b n) = a n`` for the atom count ``n`` of some node-tensor views (larger models
    have them), though it holds; torch 2.13 and newer prove it."""
    first = next((ln.strip() for ln in str(err).splitlines() if "Not all values" in ln), "")
    return (
        f"torch {torch.__version__} cannot export this model with a dynamic atom count "
        f"({first[:160]}...). Freeze with torch >= 2.13 (e.g. `pip install 'torch>=2.13'` in "
        "a separate environment); the .pt2 it writes loads in LAMMPS and ASE built against "
        "torch 2.11."
    )


def export_lower(model: EnergyModel) -> torch.export.ExportedProgram:
    """Forward + edge-gradient graph of ``model`` with dynamic atoms, edges and frames, traced
    on the model's device."""
    extras = extra_inputs(model)
    lower = (SpinGraphLower if SPIN_INPUT in extras else GraphLower)(model, extras).eval()
    # Three frames of distinct sizes.
    sample = lower_inputs(model, sample_frames(len(model.type_map), (5, 7, 9), seed=1))
    return _export(lower, sample, dynamic_shapes(extras))


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (and so of the tensors it is traced with)."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def export_lower_with_comm(model: EnergyModel) -> torch.export.ExportedProgram:
    """``GraphLowerWithComm`` with dynamic atoms, edges and swaps (one frame)."""
    register_border_ops()
    extras = extra_inputs(model)
    lower = GraphLowerWithComm(model, extras).eval()
    sample, _ = halo_inputs(model, sample_frames(len(model.type_map), (9,), seed=1)[0], seed=1)
    return _export(lower, sample, dynamic_shapes(extras, with_comm=True))


def compile_package(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor package at ``path``, for the device the program was traced on.

    On the CPU, before torch 2.13, Inductor's vectorised C++ code for some fused backward
    kernels of larger models does not compile (``decltype evaluates to float``); there the
    package is built without SIMD vectorisation, which compiles and computes the same numbers,
    more slowly.

    A CPU package's C++ kernels take their OpenMP thread count from the process that runs
    them (``cpp.dynamic_threads``), not from the one that froze them: Inductor would otherwise
    build them for ``torch.get_num_threads()`` at freezing, and a package frozen under
    ``OMP_NUM_THREADS=1`` (a login node, a batch script) would stay serial in a LAMMPS run on
    several threads (tiny, 192 atoms, 2 threads: 29 instead of 45 steps/s, ``docs/freeze.md``).
    """
    options: dict = {"aot_inductor.compile_wrapper_opt_level": "O0"}
    on_cpu = not _traced_on_cuda(program)
    if on_cpu:
        options["cpp.dynamic_threads"] = True
        log.info(
            "freeze: the package's C++ loops will run on the threads of the process running it"
        )
    old_torch = torch.__version__ < (2, 13)  # TorchVersion compares with tuples
    if old_torch and on_cpu:
        options["cpp.simdlen"] = 1  # no ISA has width 1: scalar C++ loops
        log.warning(
            "freeze: torch %s: building the package without SIMD vectorisation (Inductor "
            "before 2.13 miscompiles some vectorised kernels); freeze with torch >= 2.13 for "
            "a faster package, which loads in torch 2.11 as well",
            torch.__version__,
        )
    with deterministic_algorithms():
        torch._inductor.aoti_compile_and_package(
            program, package_path=os.fspath(path), inductor_configs=options
        )


def _traced_on_cuda(program: torch.export.ExportedProgram) -> bool:
    """Whether the program's graph inputs are CUDA tensors."""
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return True
    return False


def output_keys(model: EnergyModel) -> tuple[str, ...]:
    """The package's outputs, in the order it returns them."""
    return SPIN_OUTPUT_KEYS if getattr(model, "has_spin", False) else OUTPUT_KEYS


ENERGY_OUTPUT_DEF = {
    "name": "energy",
    "shape": [1],
    "reducible": True,
    "r_differentiable": True,
    "c_differentiable": True,
    "atomic": True,
    "category": 0,
    "r_hessian": False,
    "magnetic": False,
    "intensive": False,
}


def captured_settings(settings: InferenceSettings, device: torch.device | None = None) -> dict:
    """What the export captures of the inference switches: the values asked for
    (``DP_TF32_INFER``, ``DP_TRITON_INFER`` at freeze time) and what the package runs. Matmuls
    are traced at full float32 on every device (``DP_TF32_INFER`` is not baked in); the fused
    Triton rotations are in a package exported on CUDA with ``DP_TRITON_INFER`` set, and in no
    other (the PyTorch path); the record says which."""
    device = torch.device("cpu") if device is None else device
    return {
        "DP_TF32_INFER": settings.tf32,
        "DP_TRITON_INFER": settings.triton,
        "float32_matmul_precision": "highest",
        "fused_kernels": settings.kernels_text(device),
        "exported_on": device.type,
    }


def metadata(
    model: EnergyModel,
    checkpoint: str,
    head: str | None,
    settings: InferenceSettings | None = None,
    device: torch.device | None = None,
) -> dict:
    """``extra/metadata.json``: the fields DeePMD-kit's C++ reader needs, plus ``sezm``
    (``device``: the one the package is compiled for, default the CPU)."""
    opts, fit = model.descriptor.opts, model.fitting_net
    spin = model.params.get("spin") or None  # the checkpoint's spin block
    if isinstance(model, VirtualSpinModel):  # the cap on real neighbours, not the doubled sel
        sel = [model.real_nsel]
    else:
        sel = _sel(model.params["descriptor"]["sel"])
    default_fparam = fit.default_fparam_tensor
    chg_spin = opts.default_chg_spin
    return {
        "type_map": list(model.type_map),
        "ntypes": len(model.type_map),
        "rcut": float(model.rcut),
        "sel": sel,
        "nnei": sum(sel),
        "lower_input_kind": "graph",
        "graph_edge_dtype": "float64",
        "dim_fparam": int(fit.numb_fparam),
        "dim_aparam": int(fit.numb_aparam),
        "dim_chg_spin": 2 if opts.add_chg_spin_ebd else 0,
        "has_chg_spin_ebd": bool(opts.add_chg_spin_ebd),
        "has_default_chg_spin": chg_spin is not None,
        "default_chg_spin": None if chg_spin is None else list(chg_spin),
        "has_default_fparam": default_fparam is not None,
        "default_fparam": None if default_fparam is None else default_fparam.tolist(),
        "mixed_types": True,
        "has_message_passing": opts.degrees.n_blocks > 0,
        "has_comm_artifact": False,  # set by freeze() when it adds the with-comm package
        "do_atomic_virial": True,
        "pair_exclude_types": [],  # applied inside the package, with the descriptor exclusions
        "output_keys": list(output_keys(model)),
        # a spin model's energy is "magnetic": DeePMD-kit's readers derive force_mag from it
        "fitting_output_defs": [{**ENERGY_OUTPUT_DEF, "magnetic": spin is not None}],
        "sel_type": [],
        "is_spin": spin is not None,
        **spin_metadata(spin, model.type_map),
        "sezm": {
            "version": _sezm_version(),
            "torch_version": torch.__version__,
            "device": "cpu" if device is None else device.type,
            "dtype": str(opts.basics.dtype).removeprefix("torch."),
            "compute_dtype": str(opts.basics.compute_dtype).removeprefix("torch."),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_scatter": True,
            "atom_virial": "each edge's -g (x) v split half/half between its two atoms",
            "checkpoint": os.path.basename(checkpoint),
            "head": head,
            "min_nbor_dist": float(model.min_nbor_dist),  # training data's closest pair (-1: none)
            "inference_settings": captured_settings(settings or InferenceSettings(), device),
            "spin": spin,
        },
    }


def spin_metadata(spin: dict | None, type_map: list[str]) -> dict:
    """DeePMD-kit's spin fields: ``ntypes_spin`` (magnetic types) and ``use_spin`` (per type)."""
    if spin is None:
        return {}
    use_spin = use_spin_flags(spin, list(type_map))
    return {"ntypes_spin": sum(use_spin), "use_spin": use_spin}


def _sel(sel) -> list[int]:
    """``descriptor.sel`` as a list (``[0]`` when it was never resolved, e.g. ``"auto"``)."""
    if isinstance(sel, (list, tuple)):
        return [int(s) for s in sel]
    return [sel if isinstance(sel, int) else 0]


def _sezm_version() -> str:
    from .. import __version__

    return __version__


# DeePMD-kit's C++ reader loads the zip entry whose name ends in
# "/extra/forward_lower_with_comm.pt2". It is not put under "model/extra/": torch's Python loader
# reads every file there as UTF-8 text (torch 2.11 and 2.13), so a nested package there breaks
# aoti_load_package (sezm.DeepPot, DeePMD-kit's Python DeepPot).
COMM_ENTRY = "sezm/extra/forward_lower_with_comm.pt2"


def append_extras(path: Path, meta: dict, model_def: dict, with_comm: Path | None = None) -> None:
    """Add ``extra/metadata.json``, ``extra/model_def_script.json`` and the with-comm package
    (if any) to the package."""
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"{root}/extra/metadata.json", json.dumps(meta, indent=1))
        zf.writestr(f"{root}/extra/model_def_script.json", json.dumps(model_def, indent=1))
        if with_comm is not None:
            zf.write(with_comm, f"{root}/{COMM_ENTRY}")


# --- verification --------------------------------------------------------------------------
def tolerances(dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """``(atol, rtol)`` per output: ``|pt2 - eager| <= atol + rtol * max|eager|``."""
    if dtype == torch.float64:
        return dict.fromkeys((*OUTPUT_KEYS, "force_mag"), (1e-9, 1e-9))
    energy = (1e-5, 1e-6)  # float32 rounding of O(100) eV atomic energies
    derivative = (1e-6, 1e-4)
    return {
        "atom_energy": energy,
        "energy": energy,
        "force": derivative,
        "force_mag": derivative,
        "virial": derivative,
        "atom_virial": derivative,
    }


def eager_reference(model: EnergyModel, frames, inputs) -> dict[str, torch.Tensor]:
    """``EnergyModel.forward`` frame by frame, in the flat output layout."""
    extras = dict(zip(extra_inputs(model), inputs[len(GRAPH_INPUTS) :]))
    outs, start = [], 0
    for f, (coord, cell, types) in enumerate(frames):
        g, _ = flat_graph([(coord, cell, types)], model.rcut)
        g = g.to(inputs[0].device)
        nat = len(types)
        g.atype = g.atype.view(1, nat)
        g.fparam = extras["fparam"][f : f + 1] if "fparam" in extras else None
        g.aparam = extras["aparam"][start : start + nat][None] if "aparam" in extras else None
        g.charge_spin = extras["charge_spin"][f : f + 1] if "charge_spin" in extras else None
        if SPIN_INPUT in extras:
            g.spin = extras[SPIN_INPUT][start : start + nat].view(1, nat, 3)
        outs.append(model(g, atomic_virial=True))
        start += nat
    cat = {
        k: torch.cat([o[k].detach().reshape(-1, *o[k].shape[2:]) for o in outs]) for k in outs[0]
    }
    flat = {
        "atom_energy": cat["atom_energy"].view(-1, 1),
        "energy": cat["energy"].view(-1, 1),
        "force": cat["force"].view(-1, 3),
        "virial": cat["virial"].view(-1, 9),
        "atom_virial": cat["atom_virial"].view(-1, 9),
    }
    if "force_mag" in cat:
        flat["force_mag"] = cat["force_mag"].view(-1, 3)
        flat["mask_mag"] = cat["mask_mag"].view(-1, 1)
    return flat


def verify(path: Path, model: EnergyModel, seed: int = 2) -> dict[str, float]:
    """Max |pt2 - eager| per output on two periodic frames (23 and 31 atoms)."""
    frames = sample_frames(len(model.type_map), (23, 31), seed=seed)
    inputs = lower_inputs(model, frames, seed=seed)
    package = torch._inductor.aoti_load_package(os.fspath(path))
    got = outputs(package(*inputs), output_keys(model))
    return compare(path, model, got, eager_reference(model, frames, inputs))


def owned_outputs(got: dict[str, torch.Tensor], h: Halo) -> dict[str, torch.Tensor]:
    """With-comm outputs of a one-process halo as the eager layout: ghost forces and atomic
    virials folded onto their owners (LAMMPS's reverse communication), owned energies."""
    return {
        "atom_energy": got["atom_energy"][: h.nloc],
        "energy": got["energy"],
        "force": h.fold(got["force"]),
        "virial": got["virial"],
        "atom_virial": h.fold(got["atom_virial"]),
    }


def halo_test_frame(model: EnergyModel, seed: int):
    """A periodic frame of 23 atoms; with ZBL bridging, two pairs of atoms sit across the cell
    faces inside the bridging zone, so the source gate of ghost images matters."""
    coord, cell, types = sample_frames(len(model.type_map), (23,), seed=seed)[0]
    radii = bridging_radii(model.params)
    if radii is not None:
        coord, side, r = coord.copy(), cell[0, 0], sum(radii) / 2
        coord[0], coord[1] = (0.1, 1.0, 1.0), (side + 0.1 - r, 1.0, 1.0)
        coord[2], coord[3] = (3.0, 0.1, side - 0.5), (3.0, side + 0.1 - r, side - 0.5)
    return coord, cell, types


def verify_with_comm(path: Path, model: EnergyModel, seed: int = 3) -> dict[str, float]:
    """Max |pt2 - eager| of the with-comm package on a periodic frame of 23 atoms, given as
    owned atoms plus ghost images exchanged by ``border_op`` within this process."""
    register_border_ops()
    frame = halo_test_frame(model, seed)
    inputs, h = halo_inputs(model, frame, seed=seed)
    package = torch._inductor.aoti_load_package(os.fspath(path))
    got = owned_outputs(outputs(package(*inputs)), h)
    ref = eager_reference(model, [frame], lower_inputs(model, [frame], seed=seed))
    return compare(path, model, got, ref)


def compare(path, model: EnergyModel, got: dict, ref: dict) -> dict[str, float]:
    """Max |got - ref| per output of ``ref``; ``FreezeError`` beyond ``tolerances`` (and for
    any difference of the magnetic-atom mask)."""
    errors, bad = {}, []
    if "mask_mag" in ref and not torch.equal(got["mask_mag"].bool(), ref["mask_mag"].bool()):
        bad.append("mask_mag differs")
    for key, (atol, rtol) in tolerances(model.descriptor.opts.basics.compute_dtype).items():
        if key not in ref:
            continue
        err = float((got[key] - ref[key]).abs().max())
        scale = float(ref[key].abs().max())
        errors[key] = err
        if not err <= atol + rtol * scale:  # also catches NaN
            bad.append(f"{key}: max|pt2 - eager| = {err:.3g} (max|eager| = {scale:.3g})")
    if bad:
        raise FreezeError(f"{path} does not reproduce eager evaluation: " + "; ".join(bad))
    return errors


# --- entry point ---------------------------------------------------------------------------
@dataclass
class FreezeReport:
    """What a freeze wrote: the package path, seconds per stage, and the eager-vs-package errors."""

    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # with-comm ones as "with_comm.<key>"


def freeze_device(device: str | torch.device | None) -> torch.device:
    """The device to compile for: ``cpu`` (default) or an available CUDA device."""
    try:
        resolved = torch.device(device or "cpu")
    except RuntimeError as err:
        raise FreezeError(f"--device {device!r} is not a torch device ({err})") from None
    if resolved.type not in ("cpu", "cuda"):
        raise FreezeError(f"--device {device}: sezm freezes for cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FreezeError(
            f"--device {device}: torch {torch.__version__} sees no CUDA device here; freeze on "
            "the machine that runs the package, or freeze for cpu"
        )
    return resolved


def load_energy_model(checkpoint: str | os.PathLike, head: str | None = None):
    """The energy model of a DPA4 checkpoint (``FreezeError`` for anything else)."""
    params = load_checkpoint(checkpoint, head).model_params
    kind = params.get("type") or params.get("descriptor", {}).get("type", "")
    if str(kind).lower() not in DPA4_TYPES:
        raise FreezeError(f"{checkpoint}: model type {kind!r} is not DPA4; sezm freezes DPA4 only")
    model, ckpt = load_model(checkpoint, head)
    if isinstance(model, DensModel):
        raise FreezeError(
            f"{checkpoint}: the model holds a dens (denoising / direct-force) head; DeePMD-kit's "
            ".pt2 contract has no dens mode, so it cannot be frozen"
        )
    if not isinstance(model, EnergyModel):
        raise FreezeError(
            f"{checkpoint}: {type(model).__name__} cannot be frozen; the .pt2 contract of "
            "DeePMD-kit's DeepPot covers energy models (energy, forces, virials) only"
        )
    return model, ckpt


def _builds_comm_package(model, with_comm: bool, device: torch.device, checkpoint) -> bool:
    """Whether this freeze also writes the multi-rank (with-comm) package, logging why not
    when one was asked for: only message-passing, non-spin models frozen on the CPU have one."""
    if not with_comm or model.descriptor.opts.degrees.n_blocks == 0:
        return False
    if getattr(model, "has_spin", False):
        log.info(
            "freeze: %s is a spin model; sezm builds no multi-rank package for spin models, so "
            "run it on one MPI rank (DeePMD-kit's reader refuses a message-passing package "
            "without one on several ranks)",
            checkpoint,
        )
        return False
    if device.type != "cpu":
        log.info(
            "freeze: no multi-rank (with-comm) package for %s; run the package on one MPI rank, "
            "or freeze on the CPU for several",
            device,
        )
        return False
    return True


def _write_comm_package(model, package: Path, report: FreezeReport, lap, t: float) -> float:
    """Export, compile and verify the with-comm package at ``package``; returns the lap clock."""
    program = export_lower_with_comm(model)
    t = lap("export_comm", t)
    package.parent.mkdir()
    compile_package(program, package)
    t = lap("compile_comm", t)
    errors = verify_with_comm(package, model)
    report.errors.update({f"with_comm.{k}": v for k, v in errors.items()})
    return lap("verify_comm", t)


def freeze(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    head: str | None = None,
    with_comm: bool = True,
    device: str | torch.device | None = None,
) -> FreezeReport:
    """Write ``output`` (suffix ``.pt2``) from ``checkpoint`` and verify it against eager.

    ``with_comm``: also build the multi-rank (with-comm) package of a message-passing model
    (``n_blocks > 0``), which LAMMPS needs on more than one MPI rank; it doubles the time.
    ``device``: the device the package is compiled for and runs on (default the CPU); on CUDA,
    ``DP_TRITON_INFER`` puts the fused rotation kernels into the package.
    """
    start = time.perf_counter()
    device = freeze_device(device)
    settings = InferenceSettings.from_env()  # captured into the package, as DeePMD-kit does
    fused = settings.triton > 0 and device.type == "cuda"
    if fused:
        require_triton(f"DP_TRITON_INFER={settings.triton}")
    for line in settings.describe(device):
        log.info("freeze: %s", line)
    model, ckpt = load_energy_model(checkpoint, head)
    model = model.to(device).eval().requires_grad_(False)
    path = Path(output)
    if path.suffix != ".pt2":
        path = path.with_name(path.name + ".pt2")
    report = FreezeReport(path)
    with_comm = _builds_comm_package(model, with_comm, device, checkpoint)

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        report.seconds[name] = now - t0
        return now

    t = time.perf_counter()
    with fused_rotation(fused):
        program = export_lower(model)
    t = lap("export", t)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(model, os.fspath(checkpoint), head, settings, device)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        # Records under "model/", the archive name DeePMD-kit's readers look up.
        package = Path(tmp) / "model.pt2"
        compile_package(program, package)
        t = lap("compile", t)
        comm_package = None
        if with_comm:
            comm_package = Path(tmp) / "with_comm" / "model.pt2"
            t = _write_comm_package(model, comm_package, report, lap, t)
            meta["has_comm_artifact"] = True
        append_extras(package, meta, ckpt.model_params, comm_package)
        report.errors = {**verify(package, model), **report.errors}
        os.replace(package, path)  # only a verified package reaches the output path
    lap("verify", t)
    report.seconds["total"] = time.perf_counter() - start
    return report
