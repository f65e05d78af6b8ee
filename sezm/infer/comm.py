"""DeePMD-kit's ghost-exchange operators, for freezing the multi-rank (with-comm) ``.pt2``.

LAMMPS on several MPI ranks gives each rank its owned atoms plus ghost copies of the atoms of
other ranks (and of periodic images). A message-passing model needs the ghosts' node features,
which only their owners can compute; DeePMD-kit's C++ library exchanges them with two custom
operators that the compiled package calls by name:

    deepmd_export::border_op(sendlist, sendproc, recvproc, sendnum, recvnum, g1,
                             communicator, nlocal, nghost) -> Tensor
    deepmd_export::border_op_backward(..., grad_g1, ...) -> Tensor

``border_op`` returns ``g1 (nall, F)`` (float32 or float64) with the ghost rows
``[nlocal, nlocal + nghost)`` overwritten, swap by swap, by rows sent from their owners;
``border_op_backward`` is its transpose (ghost-row gradients are sent back and added to the
rows they were copied from). The comm tensors are LAMMPS's swap plan: ``sendlist`` (nswap,)
int64 holds the address of an ``int*[nswap]`` of send-index arrays, ``sendproc``/``recvproc``/
``sendnum``/``recvnum`` (nswap,) int32, ``communicator`` (1,) int64 (an ``MPI_Comm`` handle),
``nlocal``/``nghost`` 0-d int32.

The real kernels live in ``libdeepmd_op_pt.so`` (loaded by DeePMD-kit's C++ backend, so by
LAMMPS). That library is built against one libtorch and cannot be loaded into another (with
torch 2.13 it fails on an undefined libtorch symbol), so the freezing process registers the
two schemas itself, character for character as in ``libdeepmd_op_pt.so``, with

* a fake (meta) kernel for tracing,
* autograd: the derivative of ``border_op`` is ``border_op_backward`` and vice versa,
* a CPU kernel for one process (every swap a copy within the rank, as on a single MPI rank),
  which reads the send lists through their addresses like the C++ kernel does. It is used to
  check the compiled package against eager evaluation before it is written.

When the real library is already loaded (a DeePMD-kit built for this torch was imported), its
kernels are used and only the missing fake/autograd registrations are added.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import torch

from ..data.neighbors import build_edges

NAMESPACE = "deepmd_export"
_ARGS = (
    "Tensor sendlist, Tensor sendproc, Tensor recvproc, Tensor sendnum, Tensor recvnum, "
    "Tensor {x}, Tensor communicator, Tensor nlocal, Tensor nghost"
)
SCHEMAS = {  # as registered by libdeepmd_op_pt.so (DeePMD-kit 3.2.0, source/op/pt/comm.cc)
    "border_op": f"border_op({_ARGS.format(x='g1')}) -> Tensor",
    "border_op_backward": f"border_op_backward({_ARGS.format(x='grad_g1')}) -> Tensor",
}
COMM_INPUTS = (
    "send_list",
    "send_proc",
    "recv_proc",
    "send_num",
    "recv_num",
    "communicator",
    "nlocal",
    "nghost",
)

_library: torch.library.Library | None = None  # keeps the Python registrations alive
_ready = False


def _has_op(name: str) -> bool:
    return hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), name)


def _send_lists(sendlist: torch.Tensor, sendnum: torch.Tensor) -> list[torch.Tensor]:
    """The int32 send-index arrays behind ``sendlist`` (addresses), copied to int64 tensors."""
    lists = []
    for address, count in zip(sendlist.tolist(), sendnum.tolist()):
        if count == 0:
            lists.append(torch.zeros(0, dtype=torch.long))
            continue
        buffer = (ctypes.c_int32 * count).from_address(address)
        lists.append(torch.from_numpy(np.ctypeslib.as_array(buffer).astype(np.int64)))
    return lists


def _check_local(sendproc, recvproc, communicator) -> None:
    if bool((sendproc != 0).any()) or bool((recvproc != 0).any()) or int(communicator[0]) != 0:
        raise RuntimeError(
            "sezm's Python border_op copies within one process only (every swap to and from "
            "rank 0, null communicator); multi-rank runs need DeePMD-kit's libdeepmd_op_pt.so"
        )


def _border_cpu(sendlist, sendproc, recvproc, sendnum, recvnum, g1, communicator, nlocal, nghost):
    _check_local(sendproc, recvproc, communicator)
    out = g1.clone()
    row = int(nlocal)
    for index, nrecv in zip(_send_lists(sendlist, sendnum), recvnum.tolist()):
        out[row : row + nrecv] = out[index]  # a swap may forward ghosts received before it
        row += nrecv
    return out


def _border_backward_cpu(
    sendlist, sendproc, recvproc, sendnum, recvnum, grad_g1, communicator, nlocal, nghost
):
    _check_local(sendproc, recvproc, communicator)
    grad = grad_g1.clone()
    lists, counts = _send_lists(sendlist, sendnum), recvnum.tolist()
    ends = np.cumsum(counts) + int(nlocal)
    for index, nrecv, end in reversed(list(zip(lists, counts, ends))):
        grad.index_add_(0, index, grad[end - nrecv : end].clone())
    if counts and int(nghost) > 0:  # ghost inputs are overwritten by the forward: no gradient
        grad[int(nlocal) : int(nlocal) + int(nghost)] = 0
    return grad


def _fake(sendlist, sendproc, recvproc, sendnum, recvnum, g1, communicator, nlocal, nghost):
    return torch.empty_like(g1)


def _setup(ctx, inputs, output) -> None:
    ctx.comm = inputs[:5] + inputs[6:]


def _vjp(op_name: str):
    def backward(ctx, grad):
        *plan, communicator, nlocal, nghost = ctx.comm
        op = getattr(getattr(torch.ops, NAMESPACE), op_name)
        g = op(*plan, grad.contiguous(), communicator, nlocal, nghost)
        return None, None, None, None, None, g, None, None, None

    return backward


def register_border_ops() -> None:
    """Make ``torch.ops.deepmd_export.border_op{,_backward}`` traceable and differentiable."""
    global _library, _ready
    if _ready:
        return
    kernels = {"border_op": _border_cpu, "border_op_backward": _border_backward_cpu}
    defined_here = not _has_op("border_op")
    if defined_here:
        _library = torch.library.Library(NAMESPACE, "FRAGMENT")
        for name, schema in SCHEMAS.items():
            _library.define(schema)
            _library.impl(name, kernels[name], "CPU")
    elif not _has_op("border_op_backward"):
        raise RuntimeError(f"{NAMESPACE}::border_op is loaded without border_op_backward")
    for name in SCHEMAS:
        qualname = f"{NAMESPACE}::{name}"
        try:
            torch.library.register_fake(qualname)(_fake)
        except RuntimeError as err:  # the real library may ship its own
            if "already" not in str(err):
                raise
    torch.library.register_autograd(
        f"{NAMESPACE}::border_op", _vjp("border_op_backward"), setup_context=_setup
    )
    torch.library.register_autograd(
        f"{NAMESPACE}::border_op_backward", _vjp("border_op"), setup_context=_setup
    )
    _ready = True


def border_op(comm: tuple[torch.Tensor, ...], g: torch.Tensor) -> torch.Tensor:
    """``border_op`` of a 2-D contiguous ``g (nall, F)`` with the 8 comm tensors ``comm``."""
    send_list, send_proc, recv_proc, send_num, recv_num, communicator, nlocal, nghost = comm
    return torch.ops.deepmd_export.border_op(
        send_list, send_proc, recv_proc, send_num, recv_num, g, communicator, nlocal, nghost
    )


def border_op_backward(comm: tuple[torch.Tensor, ...], g: torch.Tensor) -> torch.Tensor:
    """``border_op_backward`` (ghost rows summed into the rows they were copied from)."""
    send_list, send_proc, recv_proc, send_num, recv_num, communicator, nlocal, nghost = comm
    return torch.ops.deepmd_export.border_op_backward(
        send_list, send_proc, recv_proc, send_num, recv_num, g, communicator, nlocal, nghost
    )


class SwapPlan:
    """Comm tensors of a one-process swap plan; keeps the send-index arrays alive.

    ``swaps``: per swap, the node indices whose rows fill the next ``len(swap)`` ghost rows.
    """

    def __init__(self, swaps: list[np.ndarray], nlocal: int, nghost: int) -> None:
        self.arrays = [np.ascontiguousarray(s, dtype=np.int32) for s in swaps]
        counts = torch.tensor([len(a) for a in self.arrays], dtype=torch.int32)
        addresses = [a.ctypes.data for a in self.arrays]
        zeros = torch.zeros(len(swaps), dtype=torch.int32)
        self.tensors = (
            torch.tensor(addresses, dtype=torch.int64),
            zeros,
            zeros.clone(),
            counts,
            counts.clone(),
            torch.zeros(1, dtype=torch.int64),
            torch.tensor(nlocal, dtype=torch.int32),
            torch.tensor(nghost, dtype=torch.int32),
        )


class GhostExchange:
    """Ghost-node refresh for one descriptor call on an extended node set (multi-rank lower).

    On a rank, edges exist only towards owned atoms (``dst < nlocal``); ghost nodes receive no
    messages, so every per-node quantity that sums over edges is incomplete on ghost rows.
    While attached (``with GhostExchange(descriptor, comm, owned):``) it fixes the two places
    where the descriptor reads such a quantity at a *source* node:

    * node features: a forward pre-hook on every block's ``so2_conv`` (the only operation that
      reads neighbour features) replaces the ghost rows of its input by the owners' rows.
      Block 0 is skipped when the initial state is built from the atom type alone.
    * the bridging source gate ``eta_j = prod_{e: src_e = j} w(r_e)``: per-node partial sums
      (log w, zero count) go to their owners with ``border_op_backward``, the completed sums
      come back with ``border_op`` (``complete_node_sums``, called by the edge cache).

    Only owned rows are sent (ghost rows are zeroed first), so gradients never flow into stale
    ghost values, whichever version of ``libdeepmd_op_pt.so`` runs the package.
    """

    def __init__(self, descriptor, comm: tuple[torch.Tensor, ...], owned: torch.Tensor) -> None:
        self.descriptor = descriptor
        self.comm = tuple(comm)
        self.owned = owned  # (N,) bool
        self._handles = []

    def __enter__(self) -> GhostExchange:
        d = self.descriptor
        local_start = d.env_seed_embedding is None and d.gie is None
        for i, block in enumerate(d.blocks):
            if i == 0 and local_start:
                continue
            self._handles.append(block.so2_conv.register_forward_pre_hook(self._pre_conv))
        d.ghost_exchange = self
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.descriptor.ghost_exchange = None

    def refresh(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, ...)`` with ghost rows replaced by their owners' rows."""
        n = x.shape[0]
        owned = self.owned.view(n, *([1] * (x.dim() - 1)))
        sent = torch.where(owned, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return border_op(self.comm, sent.reshape(n, -1).contiguous()).view(x.shape)

    def _pre_conv(self, module, args):
        x, *rest = args
        return (self.refresh(x), *rest)

    def complete_node_sums(self, partial: torch.Tensor) -> torch.Tensor:
        """Per-node sums over local edges ``(N, k)`` -> totals over all ranks' edges, on owned
        and ghost rows: partial sums go to their owners, the totals come back."""
        return self.refresh(border_op_backward(self.comm, partial.contiguous()))


@dataclasses.dataclass
class Halo:
    """One periodic frame as a rank sees it: owned atoms ``[0, nloc)``, then a ghost node for
    every periodic image that is a neighbour; edges point to owned atoms only."""

    atype: np.ndarray  # (nloc + nghost,)
    src: np.ndarray  # (E,) node index, ghost images >= nloc
    dst: np.ndarray  # (E,) owned atom
    vec: np.ndarray  # (E, 3)
    owner: np.ndarray  # (nghost,) owned atom of each ghost
    plan: SwapPlan

    @property
    def nloc(self) -> int:
        return len(self.atype) - len(self.owner)

    def fold(self, per_node: torch.Tensor) -> torch.Tensor:
        """Per-node values ``(nloc + nghost, ...)`` summed onto owned atoms ``(nloc, ...)``."""
        nloc = self.nloc
        owner = torch.as_tensor(self.owner, device=per_node.device)
        return per_node[:nloc].index_add(0, owner, per_node[nloc:])


def halo(coord, cell, atype, rcut: float, n_swaps: int = 3) -> Halo:
    """The extended graph of one periodic frame, ghosts filled in ``n_swaps`` swaps.

    Ghosts are numbered by (owner, image) and split into consecutive swaps; a ghost whose owner
    already has a ghost copy in an earlier swap is sent from that copy, the way LAMMPS forwards
    ghosts it received. Every swap stays within the process (``SwapPlan``).
    """
    coord, cell, atype = np.asarray(coord), np.asarray(cell), np.asarray(atype)
    edges = build_edges(coord[None], cell[None], rcut)
    nloc = len(atype)
    image = (edges.shift != 0).any(axis=1)
    keys = np.concatenate([edges.src[image, None], edges.shift[image]], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    owner = unique[:, 0]
    src = edges.src.copy()
    src[image] = nloc + inverse.reshape(-1)
    first_copy: dict[int, int] = {}
    swaps = []
    for chunk in np.array_split(np.arange(len(owner)), n_swaps):
        swaps.append(np.array([first_copy.get(owner[g], owner[g]) for g in chunk], dtype=int))
        for g in chunk:
            first_copy.setdefault(owner[g], nloc + g)
    return Halo(
        atype=np.concatenate([atype, atype[owner]]),
        src=src,
        dst=edges.dst.copy(),
        vec=edges.vec.copy(),
        owner=owner,
        plan=SwapPlan(swaps, nloc, len(owner)),
    )
