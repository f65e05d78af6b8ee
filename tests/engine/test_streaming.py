"""Streamed evaluation (block edge work chunk by chunk, recomputed for the gradient) gives the
plain path's numbers: every option combination of the physics suite, in float64, for chunks of
one atom, of many atoms and of the whole system, on systems with isolated atoms and with an atom
that has hundreds of neighbours. Streaming changes only the order of floating-point sums, so the
tolerance is float64 rounding: ``max|a - b| <= 1e-12 (1 + max|b|)``.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import physics as P
import pytest
import torch
from model_zoo import COMBOS, model_of

from sezm.data.graph import build_graph
from sezm.engine.chunks import merge_chunks, plan_chunks
from sezm.engine.stream import ATOM_CHUNK_RATIO, CPU_LIMITS, MIN_CHUNK_EDGES, StreamPolicy
from sezm.infer.settings import InferenceSettings, parse_edge_chunk
from sezm.model.build import load_model

TOL = 1e-12
ONE_CHUNK, PER_ATOM, SOME_ATOMS = 10**9, 1, 29


def isolated_cluster() -> P.System:
    """A cluster plus an atom beyond every cutoff and a pair that sees only each other."""
    base = P.random_cluster(6, 2, seed=3)
    far = np.array([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0], [0.0, 31.2, 0.0]])
    return P.System(np.vstack([base.coord, far]), np.concatenate([base.atype, [0, 1, 0]]))


def crowded_cluster() -> P.System:
    """A 6^3 grid of spacing 0.5 Å: inner atoms have over 200 neighbours within the 3.5 Å cutoff."""
    axis = 0.5 * np.arange(6)
    coord = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return P.System(coord, np.arange(len(coord)) % 2)


SYSTEMS = {
    "crystal": P.random_crystal(10, 2, seed=5),
    "isolated": isolated_cluster(),
}


def outputs(model, system: P.System, chunk: int | None) -> dict[str, np.ndarray]:
    model.descriptor.streaming = None if chunk is None else StreamPolicy(1, fixed=chunk)
    try:
        return P.evaluate(model, system)
    finally:
        model.descriptor.streaming = None


def assert_same(got: dict, want: dict) -> None:
    for key, ref in want.items():
        err = np.max(np.abs(got[key] - ref))
        assert err <= TOL * (1 + np.max(np.abs(ref))), f"{key}: streamed differs by {err:.2e}"


@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("combo", list(COMBOS))
def test_streamed_equals_plain(combo: str, system: str) -> None:
    model = model_of(combo)
    want = outputs(model, SYSTEMS[system], None)
    for chunk in (ONE_CHUNK, PER_ATOM, SOME_ATOMS):
        assert_same(outputs(model, SYSTEMS[system], chunk), want)


def test_an_atom_with_hundreds_of_neighbours_gets_its_own_chunk() -> None:
    model = model_of("default")
    system = crowded_cluster()
    graph = P.graph_of(model, [system])
    counts = torch.bincount(graph.dst, minlength=system.nat)
    assert int(counts.max()) >= 200
    want = outputs(model, system, None)
    assert_same(outputs(model, system, 150), want)


def test_chunks_cover_whole_atoms_within_the_edge_limit() -> None:
    dst = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 3, 5])  # atoms 1 and 4 have no edges
    chunks = plan_chunks(dst, 7, 4)
    assert chunks[0].node_start == 0 and chunks[-1].node_stop == 7
    assert chunks[0].edge_start == 0 and chunks[-1].edge_stop == len(dst)
    for a, b in itertools.pairwise(chunks):
        assert a.node_stop == b.node_start and a.edge_stop == b.edge_start
    for c in chunks:
        inside = dst[c.edge_start : c.edge_stop]
        assert bool(((inside >= c.node_start) & (inside < c.node_stop)).all())
        assert len(inside) <= 4 or c.node_stop - c.node_start == 1  # atom 3 alone: 6 edges
    assert [(c.node_start, c.node_stop) for c in chunks] == [(0, 2), (2, 3), (3, 4), (4, 7)]


def test_training_never_streams() -> None:
    model = model_of("default")
    model.descriptor.streaming = StreamPolicy(1, fixed=PER_ATOM)
    try:
        model.train()
        assert model.descriptor._edge_chunk(1000) is None
    finally:
        model.eval()
        model.descriptor.streaming = None


def test_automatic_policy_streams_only_systems_larger_than_a_chunk(caplog) -> None:
    policy = StreamPolicy(bytes_per_edge=10**9)  # a chunk of the minimum size
    plain_chunks = CPU_LIMITS.plain_chunks
    with caplog.at_level(logging.INFO, logger="sezm.engine.stream"):
        assert policy.chunk_for(plain_chunks * MIN_CHUNK_EDGES) is None
        assert policy.chunk_for(plain_chunks * MIN_CHUNK_EDGES + 1) == MIN_CHUNK_EDGES
    text = caplog.text
    assert "plain" in text and f"streamed, chunks of at most {MIN_CHUNK_EDGES} edges" in text
    assert StreamPolicy(1, fixed=0).chunk_for(10**6) is None


MINI_BYTES_PER_EDGE = 29952  # Descriptor.edge_bytes() of the DPA4-Mini parity checkpoint


def test_automatic_policy_on_cuda_takes_few_large_chunks(monkeypatch) -> None:
    """On a GPU each chunk costs ~1,000 kernel launches whatever its size. Measured on one H200
    (141 GB), DPA4-Mini: 12,288 water atoms (1.09M edges) 216 ms plain; 98,304 atoms (8.7M
    edges) 79 s in chunks of ~9,000 edges (the CPU's sizes), 2.4 s in chunks of 1M edges."""

    def device_of(gib: int):
        props = SimpleNamespace(total_memory=gib << 30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
        return torch.device("cuda")

    h200 = StreamPolicy(MINI_BYTES_PER_EDGE, device=device_of(140))
    assert h200.chunk_for(1_093_376) is None
    assert h200.chunk_for(8_747_008) >= 1_000_000
    small_gpu = StreamPolicy(MINI_BYTES_PER_EDGE, device=device_of(24))
    assert 100_000 <= small_gpu.chunk_for(50_000 * 90) <= 300_000  # 50k atoms stream in 24 GB
    assert small_gpu.chunk_for(1536 * 90) is None
    cpu = StreamPolicy(MINI_BYTES_PER_EDGE, device=torch.device("cpu"))
    assert cpu.chunk_for(8_747_008) <= (256 << 20) // MINI_BYTES_PER_EDGE  # cache-sized chunks
    mini, _ = load_model(PARITY / "mini" / "model.pt")
    assert mini.descriptor.edge_bytes() == MINI_BYTES_PER_EDGE


def test_edge_chunk_setting_is_read_and_checked() -> None:
    assert parse_edge_chunk(None) is None and parse_edge_chunk("auto") is None
    assert parse_edge_chunk("0") == 0 and parse_edge_chunk(" 5000 ") == 5000
    for bad in ("-3", "many"):
        with pytest.raises(ValueError, match="SEZM_EDGE_CHUNK"):
            parse_edge_chunk(bad)
    settings = InferenceSettings.from_env({"SEZM_EDGE_CHUNK": "4096"})
    model = model_of("default")
    try:
        settings.apply(model, torch.device("cpu"))
        assert model.descriptor.streaming.chunk_for(100) == 4096
    finally:
        model.descriptor.streaming = None


PARITY = Path(__file__).parents[1] / "data" / "parity"
FRAME_INPUTS = ("fparam", "aparam", "charge_spin", "spin")


def parity_graph(case: str, model):
    """The first stored frame of a parity case, with the extra inputs it carries."""
    data = np.load(PARITY / case / "expected.npz")
    frame = sorted({k.split("/")[0] for k in data.files})[0]
    nat = len(data[f"{frame}/atype"])
    extra = {k: data[f"{frame}/{k}"][None] for k in FRAME_INPUTS if f"{frame}/{k}" in data.files}
    if "spin" in extra:
        extra["spin"] = extra["spin"].reshape(1, nat, 3)
    box = data[f"{frame}/box"].reshape(1, 3, 3) if f"{frame}/box" in data.files else None
    return build_graph(
        data[f"{frame}/coord"].reshape(1, nat, 3),
        box,
        data[f"{frame}/atype"][None],
        model.rcut,
        **extra,
    )


STORED = sorted(d.name for d in PARITY.iterdir() if (d / "model.pt").is_file())


@pytest.mark.parametrize("case", STORED)
def test_streamed_equals_plain_on_stored_models(case: str) -> None:
    """Every stored parity checkpoint, including options the physics combinations do not build
    (spin, dens, property, frame inputs, LoRA, ...), evaluated in float64."""
    model, _ = load_model(PARITY / case / "model.pt", precision="float64")
    graph = parity_graph(case, model)

    def run(chunk: int | None) -> dict[str, np.ndarray]:
        model.descriptor.streaming = None if chunk is None else StreamPolicy(1, fixed=chunk)
        out = model(graph)
        return {
            k: v.detach().double().numpy()
            for k, v in out.items()
            if torch.is_tensor(v) and v.is_floating_point()
        }

    want = run(None)
    assert_same(run(SOME_ATOMS), want)


def test_atom_chunks_join_whole_chunks_up_to_the_atom_limit() -> None:
    dst = torch.repeat_interleave(torch.arange(10), 3)  # 10 atoms, 3 edges each
    chunks = plan_chunks(dst, 10, 6)  # two atoms per chunk
    merged = merge_chunks(chunks, 5)
    assert [(c.node_start, c.node_stop) for c in merged] == [(0, 4), (4, 8), (8, 10)]
    assert [(c.edge_start, c.edge_stop) for c in merged] == [(0, 12), (12, 24), (24, 30)]
    assert merge_chunks(chunks, 1) == chunks


def test_per_atom_work_in_merged_batches_equals_plain() -> None:
    model = model_of("so3_grids")
    system = SYSTEMS["crystal"]
    want = outputs(model, system, None)
    assert_same(outputs(model, system, ATOM_CHUNK_RATIO * SOME_ATOMS), want)


def out_of_memory_on(dp, when) -> list[int | None]:
    """Make ``dp``'s passes raise the device's out-of-memory error when ``when(chunk)``, as a
    GPU would; returns the chunk sizes that were tried."""
    descriptor = dp.model.descriptor
    choose = descriptor._edge_chunk
    tried = []

    def guarded(n_edges: int) -> int | None:
        chunk = choose(n_edges)
        tried.append(chunk)
        if when(chunk):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return chunk

    descriptor._edge_chunk = guarded
    return tried


def water_frame():
    data = np.load(PARITY / "tiny" / "expected.npz")
    return (data[f"water_pbc_0/{k}"] for k in ("coord", "box", "atype"))


def test_out_of_memory_on_the_plain_path_evaluates_again_in_chunks(caplog) -> None:
    import sezm

    coord, box, atype = water_frame()
    plain = sezm.DeepPot(PARITY / "tiny" / "model.pt").eval(coord[None], box[None], atype)
    dp = sezm.DeepPot(PARITY / "tiny" / "model.pt")
    tried = out_of_memory_on(dp, lambda chunk: chunk is None)
    with caplog.at_level(logging.WARNING, logger="sezm.engine.stream"):
        got = dp.eval(coord[None], box[None], atype)
        again = dp.eval(coord[None], box[None], atype)  # keeps the smaller size: no new error
    n_edges = 17084  # water_pbc_0 at tiny's cutoff
    assert tried == [None, n_edges // 2, n_edges // 2]
    assert caplog.text.count("out of device memory on the plain path") == 1
    for a, b, c in zip(plain, got, again):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(c, b)


def test_out_of_memory_stands_with_a_fixed_size_or_at_the_smallest_chunk() -> None:
    import sezm

    coord, box, atype = water_frame()
    fixed = sezm.DeepPot(PARITY / "tiny" / "model.pt")
    fixed.model.descriptor.streaming.fixed = 0  # SEZM_EDGE_CHUNK=0: the user's choice
    out_of_memory_on(fixed, lambda chunk: True)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.eval(coord[None], box[None], atype)
    auto = sezm.DeepPot(PARITY / "tiny" / "model.pt")
    tried = out_of_memory_on(auto, lambda chunk: True)
    with pytest.raises(torch.OutOfMemoryError):
        auto.eval(coord[None], box[None], atype)
    assert tried[0] is None and tried[-1] == MIN_CHUNK_EDGES  # halved down to the floor
    assert all(b < (a or 10**9) for a, b in itertools.pairwise(tried))
