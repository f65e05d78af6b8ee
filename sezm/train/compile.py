"""``model.use_compile`` (and ``DP_COMPILE_INFER`` in validation): the energy model's
conservative path under ``torch.compile``.

Training needs the forces inside the graph of the loss (``create_graph=True``), and
``torch.compile`` cannot differentiate twice through AOTAutograd. So the first derivative is
made part of the forward: ``make_fx`` traces

    (parameters, buffers, graph tensors) -> (E_i, g = dE/dv_e)

``atomic_energy`` followed by ``autograd.grad`` over the edge vectors, into one FX graph whose
ops already contain the derivative; ``torch.compile(dynamic=True)`` lowers that graph, and the
optimizer's backward is an ordinary first-order backward of it. Forces and virials are then
assembled from ``g`` by the model as usual. The graph reads the model's own parameter and buffer
tensors, so in-place updates (optimizer steps, EMA swaps, bias changes) are seen. The
``detach`` nodes that tracing inserts for saved tensors are removed; they would cut the second
derivative of the force loss with respect to the parameters.

The trace runs on a synthetic graph whose frame, atom and edge counts are distinct primes that
no parameter dimension shares: symbolic tracing would otherwise specialise a size of 1 (one
frame per batch) or merge equal sizes. A batch without edges takes the eager path. One graph is
traced per (train/eval, create_graph, optional inputs) combination, lazily, at first use.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from ..model import forces as F
from ..model.graph import Graph
from ..runtime import deterministic_compiled

log = logging.getLogger("sezm.train")

_REQUIRED = ("atype", "src", "dst", "edge_vec")
_OPTIONAL = tuple(f.name for f in dataclasses.fields(Graph) if f.name not in _REQUIRED)
#: What the leading axes of each optional graph tensor count.
_PER = {
    "edge_mask": "edge",
    "fparam": "frame",
    "charge_spin": "frame",
    "aparam": "atom",
    "spin": "atom",
}


def _primes(avoid: set[int], count: int, start: int = 5) -> list[int]:
    out, n = [], start
    while len(out) < count:
        if all(n % k for k in range(2, int(n**0.5) + 1)) and n not in avoid:
            out.append(n)
        n += 1
    return out


class CompiledEnergyGradient:
    """``(atom_energy (nf, nloc), dE/dv (E, 3))`` of an energy model through compiled graphs."""

    def __init__(self, model: nn.Module, backend: str | None = "inductor") -> None:
        self.model, self.backend = model, backend
        self._graphs: dict[tuple, Callable] = {}

    def __call__(
        self, graph: Graph, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if graph.src.numel() == 0:  # the descriptor's no-edge branch is not traced
            return self._eager(graph, create_graph)
        present = tuple(f for f in _OPTIONAL if getattr(graph, f) is not None)
        key = (self.model.training, create_graph, present)
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = self._build(graph, present, create_graph)
        inputs = [getattr(graph, f) for f in (*_REQUIRED, *present)]
        with torch.enable_grad() if create_graph else torch.no_grad():
            return fn(*inputs)

    def _eager(self, graph: Graph, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        edge_vec = graph.edge_vec.detach().requires_grad_(True)
        with torch.enable_grad():
            energy = self.model.atomic_energy(graph, edge_vec)
            return energy, F.edge_gradient(energy, edge_vec, create_graph=create_graph)

    def _build(self, graph: Graph, present: tuple[str, ...], create_graph: bool) -> Callable:
        def energy_gradient(atype, src, dst, edge_vec, *optional):
            g = Graph(atype, src, dst, edge_vec, **dict(zip(present, optional)))
            leaf = edge_vec.detach().requires_grad_(True)
            with torch.enable_grad():
                energy = self.model.atomic_energy(g, leaf)
                grad = F.edge_gradient(energy, leaf, create_graph=create_graph)
            return energy, grad

        mode = "training" if self.model.training else "evaluation"
        switch = "model/use_compile" if mode == "training" else "DP_COMPILE_INFER / compiled_infer"
        log.info(
            "compiling the %s energy+force graph (%s): tracing now, lowering at its first "
            "call; this can take minutes ...",
            mode,
            switch,
        )
        start = time.perf_counter()
        devices = [graph.atype.device] if graph.atype.is_cuda else []
        with torch.no_grad(), torch.random.fork_rng(devices):  # fills lazy caches, keeps the RNG
            self.model.atomic_energy(graph, graph.edge_vec)
        sample = self._trace_inputs(graph, present)
        decompositions = torch._decomp.get_decompositions([torch.ops.aten.silu_backward.default])
        traced = make_fx(
            energy_gradient,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
            decomposition_table=decompositions,  # a differentiable SiLU backward
        )(*sample)
        if create_graph:
            traced = _without_detach(traced)
        log.info(
            "compile: traced the %s energy+force graph (%d nodes) in %.1f s; %s lowers it at "
            "the first call",
            mode,
            len(traced.graph.nodes),
            time.perf_counter() - start,
            self.backend,
        )
        if self.backend is None:  # the traced graph itself, unlowered (tests of the capture)
            return traced
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch._dynamo.config.optimize_ddp = False  # not DDP's bucket-wise graph splitting
        compiled = torch.compile(traced, backend=self.backend, dynamic=True)
        # lowered at the first call; scatters kept deterministic (runtime.py)
        return deterministic_compiled(compiled, f"the {mode} graph with {self.backend}")

    def _trace_inputs(self, graph: Graph, present: tuple[str, ...]) -> list[torch.Tensor]:
        """A synthetic graph like ``graph`` with prime frame/atom/edge counts."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        avoid = {0, 1, 2, 3, 4, 9} | {d for t in tensors for d in t.shape}
        avoid |= {d for f in present for d in getattr(graph, f).shape}
        nf, nloc, n_edge = _primes(avoid, 3)
        gen = torch.Generator().manual_seed(0)
        dev, ntypes = graph.atype.device, int(self.model.out_bias.shape[1])
        atype = torch.randint(0, ntypes, (nf, nloc), generator=gen).to(dev)
        ends = torch.randint(0, nf * nloc, (2, n_edge), generator=gen).to(dev)
        direction = torch.nn.functional.normalize(torch.randn(n_edge, 3, generator=gen), dim=-1)
        length = 1.0 + (self.model.rcut - 1.5) * torch.rand(n_edge, 1, generator=gen)
        edge_vec = (direction * length).to(dev, graph.edge_vec.dtype)
        sizes = {"edge": (n_edge,), "frame": (nf,), "atom": (nf, nloc)}
        optional = []
        for f in present:
            value, per = getattr(graph, f), _PER[f]
            row = value.reshape(-1, *value.shape[len(sizes[per]) :])[0]
            optional.append(row.expand(*sizes[per], *row.shape).clone())
        return [atype, ends[0].clone(), ends[1].clone(), edge_vec, *optional]


def _without_detach(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``traced`` with every ``detach`` bypassed, in a freshly built graph.

    Tracing ``autograd.grad(create_graph=True)`` records the tensors the backward formulas
    saved behind ``detach`` nodes, which would cut the second-order path from the force loss
    to the parameters. ``atomic_energy`` detaches nothing itself (the one detach in the
    function, of the input edge vectors, has nothing to cut), so all of them go.
    """
    detach = torch.ops.aten.detach.default
    old = traced.graph
    for node in list(old.nodes):
        if node.op == "call_function" and node.target == detach:
            node.replace_all_uses_with(node.args[0])
            old.erase_node(node)
    graph, copies = torch.fx.Graph(), {}
    for node in old.nodes:  # a fresh node list: erasing leaves stale links Dynamo trips on
        copies[node] = graph.node_copy(node, lambda n: copies[n])
    graph.lint()
    return torch.fx.GraphModule(traced, graph)


def supports_compile(model: nn.Module) -> bool:
    """Whether ``model`` is a plain energy model (the compiled path's scope)."""
    from ..model.energy import EnergyModel

    return type(model) is EnergyModel


class TrainingForward(nn.Module):
    """The forward that training and validation run: each branch's model, its energy path
    compiled where asked (``compiled`` for training, ``compiled_eval`` for evaluation).

    ``forward(name, graph, training)`` returns the model's predictions; in training the forces
    stay in the graph of the loss. This is the module DDP wraps.
    """

    def __init__(
        self,
        models: dict[str, nn.Module],
        compiled: dict[str, CompiledEnergyGradient] | None = None,
        compiled_eval: dict[str, CompiledEnergyGradient] | None = None,
    ) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.compiled = compiled or {}
        self.compiled_eval = compiled_eval or {}

    def forward(self, name: str, graph: Graph, training: bool) -> dict[str, torch.Tensor]:
        model = self.models[name]
        if not hasattr(model, "atomic_energy"):  # a property model: no forces
            return model(graph)
        fast = (self.compiled if training else self.compiled_eval).get(name)
        if fast is None:
            return model(graph, create_graph=training)
        energy, grad = fast(graph, create_graph=training)
        return model._outputs(graph, energy, graph.edge_vec, grad, True, False)
