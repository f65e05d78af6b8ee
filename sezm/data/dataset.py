"""Many systems sampled into training batches, with DeePMD-kit's (PyTorch backend) rules.

* ``systems``: a path or a list of paths; each is a system (a folder with ``type.raw``), a
  folder searched recursively for systems, or a file ASE reads (extxyz, ...; one system per
  atom count and boundary condition, see :mod:`.ase_frames`); glob patterns are expanded.
  Systems found under one folder are sorted by path; files are taken only where named (a
  folder search finds npy systems only).
* ``batch_size`` per system: an int, one int per system, ``"auto"`` / ``"auto:N"``
  (smallest ``bs`` with ``bs * natoms >= N``, N = 32 by default), ``"max:N"``
  (``max(1, N // natoms)``) or ``"filter:N"`` (``"max:N"`` after dropping systems with more
  than N atoms).
* A system has ``ceil(nframes / bs)`` batches per epoch; its frames are reshuffled every epoch
  and the last batch of an epoch may be smaller.
* Each step draws a system with the probabilities of :func:`system_probs` (``sys_probs``
  first, else ``auto_prob``), then that system's next batch.
* ``min_pair_dist > 0``: frames with an atom pair closer than that are never drawn (they are
  found once, when the data are opened, and counted in :attr:`DataSystem.skipped`).
"""

from __future__ import annotations

import glob
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.spin import use_spin_flags, virtual_scales
from ..model.graph import Graph
from .ase_frames import FileOptions, FrameFile
from .frames import InputError
from .graph import build_graph
from .neighbors import build_edges
from .system import LABEL_FIELDS, BaseSystem, DataError, Field, SpinField, System

log = logging.getLogger(__name__)

INPUT_KEYS = ("fparam", "aparam", "charge_spin", "spin")
"""Fields that are model inputs (carried by the :class:`Graph`), not labels."""

_SCAN_ATOMS = 1 << 16  # atoms per neighbour search when scanning frames for close pairs


def expand_systems(
    systems: str | Path | Sequence[str | Path], patterns: Sequence[str] | None = None
) -> list[str]:
    """System folders under ``systems`` (paths, folders to search, or glob patterns), and the
    files among them (read with ASE by :func:`open_systems`).

    With ``patterns`` (``rglob_patterns``) only sub-folders matching one of them are taken.
    """
    roots = [systems] if isinstance(systems, (str, Path)) else list(systems)
    found: list[str] = []
    for root in roots:
        root = str(root)
        matches = sorted(glob.glob(root)) if any(c in root for c in "*?[") else [root]
        if not matches or not Path(matches[0]).exists():
            raise DataError(f"systems: {root!r} does not exist")
        for path in map(Path, matches):
            if path.is_file():
                found.append(str(path))
                continue
            if patterns:
                candidates = [d for pattern in patterns for d in path.rglob(pattern)]
            else:
                candidates = [path, *path.rglob("*")]
            found += sorted({str(d) for d in candidates if (d / "type.raw").is_file()})
    found = list(dict.fromkeys(found))
    if not found:
        raise DataError(f"systems: no system (folder with type.raw) found under {roots}")
    return found


def open_systems(
    path: str | Path,
    type_map: Sequence[str] | None,
    fields: Mapping[str, Field] = LABEL_FIELDS,
    file_options: FileOptions | None = None,
) -> list[BaseSystem]:
    """The system at ``path``: one npy :class:`System` for a folder; for a file, one system per
    atom count and boundary condition of its frames (:class:`~.ase_frames.FrameFile`)."""
    if Path(path).is_file():
        return list(FrameFile(path, type_map, fields, file_options).systems)
    return [System(path, type_map, fields)]


def batch_sizes(rule: int | str | Sequence[int], natoms: Sequence[int]) -> list[int]:
    """Frames per batch of each system, from the ``batch_size`` option."""
    if isinstance(rule, (int, np.integer)) and not isinstance(rule, bool):
        sizes = [int(rule)] * len(natoms)
    elif isinstance(rule, str):
        name, _, value = rule.partition(":")
        if name == "auto" or (name in ("max", "filter") and value):
            budget = _positive_int(value or "32", rule)
            if name == "auto":
                sizes = [-(-budget // n) for n in natoms]  # ceil(budget / natoms)
            else:
                sizes = [max(1, budget // n) for n in natoms]
        elif name in ("mixed", "mix"):
            raise DataError(f"batch_size {rule!r}: frames of different systems are never mixed")
        else:
            raise DataError(f"batch_size {rule!r}: expected an int, a list, 'auto[:N]' or 'max:N'")
    else:
        sizes = [int(b) for b in rule]
        if len(sizes) != len(natoms):
            raise DataError(f"batch_size lists {len(sizes)} sizes for {len(natoms)} systems")
    if any(b < 1 for b in sizes):
        raise DataError(f"batch_size must be positive, got {sizes}")
    return sizes


def _positive_int(text: str, rule: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"batch_size {rule!r}: N must be a positive integer")
    return value


def system_probs(
    nbatches: Sequence[int],
    sys_probs: Sequence[float] | None = None,
    auto_prob: str = "prob_sys_size",
) -> np.ndarray:
    """Probability of drawing each system at a step.

    ``sys_probs``: one entry per system; entries ``>= 0`` are taken as given (their sum must
    not exceed 1) and the rest of the probability is spread over the negative entries in
    proportion to their batch counts. Otherwise ``auto_prob``: ``"prob_uniform"``;
    ``"prob_sys_size"`` (proportional to batch counts); ``"prob_sys_size;a:b:w;..."``: the
    systems ``a..b-1`` share the weight ``w`` (weights normalised over the blocks), in
    proportion to their batch counts; systems outside every block get 0.
    """
    nbatches = np.asarray(nbatches, dtype=np.float64)
    n = len(nbatches)
    if sys_probs is not None:
        return _explicit_probs(np.asarray(sys_probs, dtype=np.float64), nbatches)
    if auto_prob == "prob_uniform":
        return np.full(n, 1.0 / n)
    if auto_prob == "prob_sys_size":
        auto_prob = f"prob_sys_size;0:{n}:1.0"
    name, *blocks = auto_prob.split(";")
    if name != "prob_sys_size" or not blocks:
        raise DataError(
            f"auto_prob {auto_prob!r}: expected 'prob_uniform', 'prob_sys_size' or "
            "'prob_sys_size;start:end:weight;...'"
        )
    spans = [_block(b, auto_prob) for b in blocks]
    weights = np.array([w for _, _, w in spans])
    probs = np.zeros(n)
    for (start, end, _), share in zip(spans, weights / weights.sum()):
        probs[start:end] = nbatches[start:end] / nbatches[start:end].sum() * share
    return probs


def _block(text: str, style: str) -> tuple[int, int, float]:
    try:
        start, end, weight = text.split(":")
        block = int(start), int(end), float(weight)
    except ValueError:
        raise DataError(f"auto_prob {style!r}: block {text!r} is not 'start:end:weight'") from None
    if block[2] < 0 or block[0] >= block[1]:
        raise DataError(f"auto_prob {style!r}: block {text!r} needs start < end, weight >= 0")
    return block


def _explicit_probs(given: np.ndarray, nbatches: np.ndarray) -> np.ndarray:
    if len(given) != len(nbatches):
        raise DataError(f"sys_probs has {len(given)} entries for {len(nbatches)} systems")
    assigned = given >= 0
    total = given[assigned].sum()
    if total > 1.0 + 1e-8:
        raise DataError(f"sys_probs: the given probabilities sum to {total} > 1")
    probs = np.where(assigned, given, 0.0)
    rest = 1.0 - total
    if not np.isclose(rest, 0.0):
        if assigned.all():
            raise DataError(f"sys_probs sum to {total}, not 1; use -1 for 'the rest'")
        open_batches = np.where(assigned, 0.0, nbatches)
        probs = probs + rest * open_batches / open_batches.sum()
    return probs


def close_pair_frames(system: BaseSystem, min_dist: float) -> np.ndarray:
    """``(nframes,)`` bool: frames with a pair of atoms closer than ``min_dist`` Å.

    Every periodic image counts; atoms marked ``-1`` (mixed-type padding) are ignored.
    """
    return closest_pairs(system, min_dist) < min_dist


def closest_pairs(system: BaseSystem, min_dist: float) -> np.ndarray:
    """``(nframes,)``: each frame's shortest distance between two atoms (Å) where it is below
    ``min_dist``, else ``inf``. Periodic images and padding as in :func:`close_pair_frames`."""
    closest = np.full(system.nframes, np.inf)
    step = max(1, _SCAN_ATOMS // system.nat)
    for start in range(0, system.nframes, step):
        index = np.arange(start, min(start + step, system.nframes))
        data = system.frames(index, keys=())
        real = data["atype"].reshape(-1) >= 0  # (n * nat,)
        edges = build_edges(data["coord"], data.get("box"), min_dist)
        dist = np.linalg.norm(edges.vec, axis=1)
        hit = (dist < min_dist) & (edges.src != edges.dst) & real[edges.src] & real[edges.dst]
        pairs = edges.coincident  # (K, 2) (dst, src): distance ~0
        pair_hit = real[pairs[:, 0]] & real[pairs[:, 1]]
        frame = np.concatenate([edges.dst[hit], pairs[pair_hit, 0]]) // system.nat
        found = np.concatenate([dist[hit], np.zeros(int(pair_hit.sum()))])
        np.minimum.at(closest, start + frame, found)
    return closest


@dataclass
class Batch:
    """Frames of one system, ready for the model; unpacks as ``(graph, labels, find)``.

    ``labels``: float64 tensors, e.g. ``energy (nf,)``, ``force (nf, nloc, 3)``,
    ``virial (nf, 9)``, ``atom_ener (nf, nloc)``, ``atom_pref (nf, nloc)``,
    ``<property_name> (nf, task_dim)``; only labels the system has. ``find``: for every label field,
    whether the system has it. ``coord (nf, nloc, 3)`` / ``box (nf, 3, 3) | None``: the frames.
    """

    graph: Graph
    labels: dict[str, torch.Tensor]
    find: dict[str, bool]
    system: int
    frames: np.ndarray
    coord: np.ndarray
    box: np.ndarray | None

    def __iter__(self) -> Iterator:
        return iter((self.graph, self.labels, self.find))


class DataSystem:
    """The systems of ``training_data`` / ``validation_data`` and a seeded batch sampler.

    ``file_options``: how files in ``systems`` are read with ASE (format, label names).
    """

    def __init__(
        self,
        systems: str | Path | Sequence[str | Path],
        type_map: Sequence[str] | None,
        *,
        batch_size: int | str | Sequence[int] = "auto",
        auto_prob: str = "prob_sys_size",
        sys_probs: Sequence[float] | None = None,
        min_pair_dist: float = 0.0,
        numb_btch: int = 1,
        rglob_patterns: Sequence[str] | None = None,
        fields: Mapping[str, Field] = LABEL_FIELDS,
        file_options: FileOptions | None = None,
        seed: int | None = None,
    ) -> None:
        self.type_map = None if type_map is None else list(type_map)
        paths = expand_systems(systems, rglob_patterns)
        (file_options or FileOptions()).check(fields)
        self.systems = [
            s for p in paths for s in open_systems(p, self.type_map, fields, file_options)
        ]
        if isinstance(batch_size, str) and batch_size.startswith("filter:"):
            self._drop_large(_positive_int(batch_size.partition(":")[2], batch_size))
        self.batch_size = batch_sizes(batch_size, [s.nat for s in self.systems])
        self.nbatches = [math.ceil(s.nframes / b) for s, b in zip(self.systems, self.batch_size)]
        self.probs = system_probs(self.nbatches, sys_probs, auto_prob)
        self.numb_btch = int(numb_btch)
        self.min_pair_dist = float(min_pair_dist)
        closest = [self._closest_pairs(s) for s in self.systems]
        self.kept = [np.flatnonzero(~(c < self.min_pair_dist)) for c in closest]
        self.skipped = [s.nframes - len(k) for s, k in zip(self.systems, self.kept)]
        self._report_skipped(closest)
        self._exclude_empty()
        self._rng = np.random.default_rng(seed)
        self._order = [np.zeros(0, dtype=np.int64) for _ in self.systems]  # epoch permutations
        self._cursor = [0] * len(self.systems)

    @classmethod
    def from_config(
        cls,
        params: Mapping,
        type_map: Sequence[str] | None,
        fields: Mapping[str, Field] = LABEL_FIELDS,
        seed: int | None = None,
    ) -> DataSystem:
        """From a normalised ``training_data`` / ``validation_data`` section."""
        # min_pair_dist is a training_data key only, numb_btch a validation_data key only
        own = {key: params[key] for key in ("min_pair_dist", "numb_btch") if key in params}
        return cls(
            params["systems"],
            type_map,
            batch_size=params["batch_size"],
            auto_prob=params["auto_prob"],
            sys_probs=params["sys_probs"],
            rglob_patterns=params["rglob_patterns"],
            fields=fields,
            file_options=FileOptions.from_config(params),
            seed=seed,
            **own,
        )

    def __len__(self) -> int:
        return len(self.systems)

    # -- construction ----------------------------------------------------------------------

    def _drop_large(self, limit: int) -> None:
        large = [s for s in self.systems if s.nat > limit]
        if large:
            log.warning(
                "batch_size filter:%d drops %d system(s) with more atoms", limit, len(large)
            )
        self.systems = [s for s in self.systems if s.nat <= limit]
        if not self.systems:
            raise DataError(
                f"batch_size 'filter:{limit}': every system has more than {limit} atoms"
            )

    def _closest_pairs(self, system: BaseSystem) -> np.ndarray:
        """Per frame: the closest pair below ``min_pair_dist`` (``inf``: none, or no limit)."""
        if self.min_pair_dist <= 0.0:
            return np.full(system.nframes, np.inf)
        return closest_pairs(system, self.min_pair_dist)

    def _report_skipped(self, closest: list[np.ndarray]) -> None:
        """Log the frames ``min_pair_dist`` skips; a system losing all of them is explained
        (in :attr:`_emptied`: its path -> ``(message, widest closest pair of its frames)``)."""
        self._emptied: dict[str, tuple[str, float]] = {}
        for system, dist, skipped in zip(self.systems, closest, self.skipped):
            if skipped == system.nframes:
                self._emptied[str(system.path)] = (
                    f"all {system.nframes} frames of {system.path} have an atom pair closer than "
                    f"min_pair_dist {self.min_pair_dist:g} Å; the closest is "
                    f"{float(dist.min()):.3g} Å",
                    float(dist.max()),
                )
            elif skipped:
                log.info(
                    "%s: %d of %d frames skipped (atom pair closer than min_pair_dist=%g Å)",
                    system.path,
                    skipped,
                    system.nframes,
                    self.min_pair_dist,
                )

    def _exclude_empty(self) -> None:
        empty = np.array([len(k) == 0 for k in self.kept])
        if empty.all():
            keep = max(widest for _, widest in self._emptied.values())
            raise DataError(
                "no frame left to train on: "
                + "; ".join(text for text, _ in self._emptied.values())
                + f". Set `min_pair_dist` to at most {_round_down(keep)} Å to keep some frames "
                "(0 keeps them all), or check the coordinates and their unit (Å)"
            )
        for text, widest in self._emptied.values():
            log.warning(
                "%s; the system is never drawn (min_pair_dist <= %s Å keeps some of its frames)",
                text,
                _round_down(widest),
            )
        if empty.any():
            self.probs = np.where(empty, 0.0, self.probs)
            self.probs = self.probs / self.probs.sum()

    # -- batches ---------------------------------------------------------------------------

    def next_batch(self, rcut: float, device: torch.device | str = "cpu") -> Batch:
        """The next training batch: a system drawn by :attr:`probs`, then its next frames."""
        index = int(self._rng.choice(len(self.systems), p=self.probs))
        return self.batch(index, self._next_frames(index), rcut, device)

    def validation_batches(self, rcut: float, device: torch.device | str = "cpu") -> list[Batch]:
        """``numb_btch`` batches drawn like training batches."""
        return [self.next_batch(rcut, device) for _ in range(self.numb_btch)]

    def iter_batches(
        self,
        index: int,
        rcut: float,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
    ) -> Iterator[Batch]:
        """Every frame of system ``index`` in file order (none skipped), for testing."""
        step = batch_size or self.batch_size[index]
        for start in range(0, self.systems[index].nframes, step):
            frames = np.arange(start, min(start + step, self.systems[index].nframes))
            yield self.batch(index, frames, rcut, device)

    def get_rng_state(self) -> dict:
        """Sampler state (generator, epoch orders, cursors), for an exact restart."""
        return {
            "rng": self._rng.bit_generator.state,
            "order": [o.tolist() for o in self._order],
            "cursor": list(self._cursor),
        }

    def set_rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._order = [np.asarray(o, dtype=np.int64) for o in state["order"]]
        self._cursor = list(state["cursor"])

    def _next_frames(self, index: int) -> np.ndarray:
        if self._cursor[index] >= len(self._order[index]):
            self._order[index] = self._rng.permutation(self.kept[index])
            self._cursor[index] = 0
        start = self._cursor[index]
        self._cursor[index] += self.batch_size[index]
        return self._order[index][start : start + self.batch_size[index]]

    def batch(
        self, index: int, frames: np.ndarray, rcut: float, device: torch.device | str = "cpu"
    ) -> Batch:
        """Frames ``frames`` of system ``index`` as a :class:`Batch`."""
        system = self.systems[index]
        data = system.frames(frames)
        inputs = {k: data.pop(k, None) for k in INPUT_KEYS}
        if "spin" in system.fields and inputs["spin"] is None:  # spin.allow_missing_label
            inputs["spin"] = np.zeros_like(data["coord"])
        try:
            graph = _graph(data["coord"], data.get("box"), data["atype"], rcut, device, inputs)
        except InputError as err:
            raise DataError(f"{system.path}, frames {np.asarray(frames).tolist()}: {err}") from err
        labels = {
            k: torch.as_tensor(v, dtype=torch.float64, device=device)
            for k, v in data.items()
            if k in system.fields
        }
        find = {k: system.present[k] for k in system.fields if k not in INPUT_KEYS}
        return Batch(graph, labels, find, index, np.asarray(frames), data["coord"], data.get("box"))

    def stat_frames(self, nbatch: int, keys: Sequence[str] | None = None) -> list[dict]:
        """Frames of each system for the data statistics: ``nbatch`` batches' worth,
        drawn without replacement from the kept frames (all of them if there are fewer).

        One dict per system with frames: ``atype (n, nat)`` and the present fields of
        ``keys`` (all present fields when ``None``), as from :meth:`System.frames`.
        """
        samples = []
        for system, kept, bs in zip(self.systems, self.kept, self.batch_size):
            if len(kept):
                frames = self._rng.permutation(kept)[: nbatch * bs]
                samples.append(system.frames(np.sort(frames), keys))
        return samples

    def summary(self, name: str = "data") -> str:
        """A table of the systems: atoms, batch size, batches, probability, pbc, skipped."""
        lines = [f"{name}: {len(self.systems)} system(s)"]
        lines.append(
            f"{'system':<48} {'natoms':>6} {'bch_sz':>6} {'n_bch':>6} {'prob':>6} pbc skipped"
        )
        for i, s in enumerate(self.systems):
            path = str(s.path) if len(str(s.path)) <= 48 else "..." + str(s.path)[-45:]
            lines.append(
                f"{path:<48} {s.nat:>6} {self.batch_size[i]:>6} {self.nbatches[i]:>6} "
                f"{self.probs[i]:>6.3f} {'T' if s.pbc else 'F':>3} {self.skipped[i]:>7}"
            )
        return "\n".join(lines)


def _round_down(value: float, digits: int = 3) -> str:
    """``value`` rounded down to ``digits`` significant digits: a threshold that keeps it."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value))) if value > 0 else 1.0
    return f"{math.floor(value * scale) / scale:g}"


def _graph(
    coord: np.ndarray,
    box: np.ndarray | None,
    atype: np.ndarray,
    rcut: float,
    device: torch.device | str,
    inputs: Mapping[str, np.ndarray | None],
) -> Graph:
    """``build_graph`` of the frames; edges touching ``-1`` (padding) atoms are dropped."""
    padded = bool((atype < 0).any())
    graph = build_graph(
        coord, box, atype, rcut, device=device, min_dist=0.0 if padded else 1e-3, **inputs
    )
    if padded:
        real = graph.atype.reshape(-1) >= 0
        keep = real[graph.src] & real[graph.dst]
        graph.src, graph.dst, graph.edge_vec = (
            graph.src[keep],
            graph.dst[keep],
            graph.edge_vec[keep],
        )
    return graph


def fields_for_model(model_params: Mapping) -> dict[str, Field]:
    """The fields a model reads: its labels, and ``fparam``/``aparam``/``charge_spin`` inputs.

    Energy models read :data:`LABEL_FIELDS`; property models read the label
    ``<property_name>`` ``(nf, task_dim)``. ``aparam`` is always required, ``fparam`` unless the fitting has
    ``default_fparam``, ``charge_spin`` unless the descriptor has ``default_chg_spin``;
    spin models read atomic ``spin`` (zeros where absent with ``spin.allow_missing_label``).
    """
    fitting = model_params["fitting_net"]
    if fitting["type"] == "property":
        name, task_dim = fitting["property_name"], int(fitting["task_dim"])
        fields = {name: Field((task_dim,), must=True)}
    else:
        fields = dict(LABEL_FIELDS)
    if fitting["numb_fparam"] > 0:
        fields["fparam"] = Field((fitting["numb_fparam"],), must=fitting["default_fparam"] is None)
    if fitting["numb_aparam"] > 0:
        fields["aparam"] = Field((fitting["numb_aparam"],), atomic=True, must=True)
    descriptor = model_params["descriptor"]
    if descriptor["add_chg_spin_ebd"]:
        fields["charge_spin"] = Field((2,), must=descriptor["default_chg_spin"] is None)
    spin = model_params.get("spin")
    if spin:
        fields["spin"] = _spin_field(spin, model_params.get("type_map"))
    return fields


def _spin_field(spin: Mapping, type_map: Sequence[str] | None) -> SpinField:
    """``spin.npy`` of a spin model, with its magnetic types and virtual scales (for spotting
    data in the older virtual-atom layout)."""
    use_spin: tuple[bool, ...] = ()
    scale = None
    if type_map is not None:
        try:
            use_spin = tuple(use_spin_flags(dict(spin), list(type_map)))
            if spin.get("virtual_scale") is not None:
                scale = tuple(virtual_scales(dict(spin), list(use_spin)))
        except ValueError:  # the model itself reports an inconsistent spin block
            pass
    # a frozen model's metadata (DeePMD-kit's) carries use_spin only: labels required
    must = not spin.get("allow_missing_label", False)
    return SpinField((3,), atomic=True, must=must, use_spin=use_spin, virtual_scale=scale)
