"""The GPU check: CUDA parity, Triton rotations against dense, the neighbour search on the
device, training step times, evaluation throughput and memory, and ``.pt2`` packages frozen for
CUDA with and without the Triton rotations, written to one Markdown summary.

    python benchmarks/gpu/gpu_check.py [--out FILE] [--budget SECONDS] [--cpu-dry-run]

Run through ``benchmarks/gpu/check.sh``, which installs the carried wheels first. Every section
catches its own failure and records it, so one broken part does not hide the others; sections
that would start after the time budget is spent are recorded as skipped. ``--cpu-dry-run`` runs
every section on the CPU with tiny sizes (the parity subset, the smallest cell, a few training
steps) to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests" / "data" / "parity"
WATER = ROOT / "examples" / "water"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ENERGY_CASES = [
    "tiny", "mini", "pretrained", "cart_edge", "case_film", "chg_spin", "excl_fp64",
    "excl_model", "focus_fmix", "focus_heads", "fparam1", "fparam2", "lmax0", "lora",
    "mixed_type", "no_env_seed", "parity_node", "radial_gauss", "s2_grids", "s2_mixed",
    "schedule", "sezm_written", "so3_grids", "zbl", "zbl_radii", "zero_block",
]  # fmt: skip
TARGET_ATOMS = (7, 3, 2)  # water_pbc_0 replicas: 8,064 atoms, near the 8,000-atom target


@dataclass
class Check:
    device: torch.device
    dry_run: bool
    deadline: float
    out: Path
    lines: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)

    def section(self, title: str, body: Callable[[Check], None], needs_s: float) -> None:
        self.add("", f"## {title}", "")
        if self.left() < needs_s:
            self.add(
                f"skipped: {self.left():.0f} s of the budget left, the section needs ~{needs_s:.0f} s"
            )
            return
        start = time.perf_counter()
        try:
            body(self)
        except Exception as err:  # recorded, and the next section runs
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.add(f"FAILED: {type(err).__name__}: {str(err)[:400]}", "```", *tail, "```")
        self.add("", f"({time.perf_counter() - start:.1f} s)")
        self.write()

    def write(self) -> None:
        """The summary so far (written after every section: a killed run keeps its results)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(self.lines) + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], repeats: int) -> float:
        """Median wall time (s) of ``fn`` after one warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


def full_float32() -> None:
    """TF32 off everywhere: parity is checked at full float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# --- sections ------------------------------------------------------------------------------
def environment(c: Check) -> None:
    import sezm

    triton = "absent"
    if importlib.util.find_spec("triton") is not None:
        import triton as triton_module

        triton = triton_module.__version__
    name = torch.cuda.get_device_name(c.device) if c.device.type == "cuda" else "cpu"
    c.add(
        f"- device: {name}",
        f"- torch {torch.__version__}, triton {triton}, numpy {np.__version__}, "
        f"python {sys.version.split()[0]}, sezm from {Path(sezm.__file__).parent}",
    )


def parity(c: Check) -> None:
    """Upstream outputs of every energy case against sezm on the device, full float32."""
    import sezm

    full_float32()
    cases = ["tiny"] if c.dry_run else ENERGY_CASES
    c.add(
        "| case | frames | max abs dE/atom (eV) | max abs dF (eV/Å) | max abs dvirial/atom | match |"
    )
    c.add("|---|---|---|---|---|---|")
    failures = 0
    for case in cases:
        data = np.load(PARITY / case / "expected.npz")
        frames = sorted({k.split("/")[0] for k in data.files if k.endswith("/energy")})
        dp = sezm.DeepPot(PARITY / case / "model.pt", device=str(c.device))
        worst, ok = np.zeros(3), True
        for frame in frames:
            get = functools.partial(frame_entry, data, frame)
            nat = len(get("atype"))
            box = get("box")
            kwargs = {
                k: get(k)[None] for k in ("fparam", "aparam", "charge_spin") if get(k) is not None
            }
            e, f, v = dp.eval(
                get("coord")[None], None if box is None else box[None], get("atype"), **kwargs
            )
            ref_f, ref_v = get("force"), get("virial").reshape(-1)
            de = abs(float(e.reshape(-1)[0] - get("energy")[0])) / nat
            df = float(np.abs(f.reshape(-1, 3) - ref_f).max())
            dv = float(np.abs(v.reshape(-1) - ref_v).max()) / nat
            ok &= de <= 1e-5 and df <= 1e-5 + 1e-4 * np.abs(ref_f).max()
            ok &= dv <= 1e-5 + 1e-4 * np.abs(ref_v).max() / nat
            worst = np.maximum(worst, [de, df, dv])
        failures += not ok
        c.add(
            f"| {case} | {len(frames)} | {worst[0]:.2e} | {worst[1]:.2e} | {worst[2]:.2e} | {'yes' if ok else '**NO**'} |"
        )
    c.add(
        "",
        f"{len(cases) - failures} of {len(cases)} cases match (README tolerances of tests/data/parity)",
    )


def frame_entry(data, frame: str, key: str):
    """``data[frame/key]`` of an ``expected.npz``, or ``None``."""
    name = f"{frame}/{key}"
    return data[name] if name in data.files else None


def triton_rotation(c: Check) -> None:
    """Kernel-level errors and times of the fused rotations, then a model with them."""
    from sezm.kernels import fused_rotation, triton_available

    if not triton_available():
        c.add("skipped: triton is not installed")
        return
    from sezm.kernels import rotation_triton as kernels

    n_edges, channels = (300, 16) if c.dry_run else (200_000, 64)  # Mini at 8k atoms: ~700k edges
    c.add(
        "| lmax, mmax | dtype | max abs err forward (to_local, to_global) | max abs err gradients (blocks, x, y, w) | dense / fused ms (fwd + bwd) |"
    )
    c.add("|---|---|---|---|---|")
    for lmax, mmax in [(2, 1), (4, 2), (6, 2)][: 1 if c.dry_run else 3]:
        for dtype in (torch.float32, torch.float64):
            c.add(rotation_case(c, kernels, lmax, mmax, dtype, n_edges, channels))
    if c.dry_run:
        c.add(
            "- model with fused rotations: not in the dry run (tests/kernels/test_triton_rotation.py)"
        )
        return
    import sezm

    full_float32()
    for case in ("tiny", "mini"):
        dp = sezm.DeepPot(PARITY / case / "model.pt", device=str(c.device))
        coord, box, atype = water_cell(TARGET_ATOMS)
        ref = dp.eval(coord[None], box[None], atype)
        t_dense = time.perf_counter()
        dp.eval(coord[None], box[None], atype)
        t_dense = time.perf_counter() - t_dense
        with fused_rotation():
            got = dp.eval(coord[None], box[None], atype)
            t_fused = time.perf_counter()
            dp.eval(coord[None], box[None], atype)
            t_fused = time.perf_counter() - t_fused
        de = abs(float(got[0][0, 0] - ref[0][0, 0])) / len(atype)
        df = float(np.abs(got[1] - ref[1]).max())
        c.add(
            f"- {case}, {len(atype)} atoms (DeepPot.eval, incl. neighbour search): fused vs dense |dE|/atom {de:.2e} eV, max|dF| {df:.2e} eV/Å; {t_dense * 1e3:.1f} ms dense, {t_fused * 1e3:.1f} ms fused"
        )


def rotation_case(
    c: Check, kernels, lmax: int, mmax: int, dtype, n_edges: int, channels: int
) -> str:
    """One table row: fused against dense, forward and every input gradient, and times."""
    from sezm.geometry.edge_frame import edge_quaternion
    from sezm.geometry.rotate import EdgeRotation
    from sezm.geometry.wigner import WignerD

    gen = torch.Generator(device=c.device).manual_seed(0)
    vec = torch.randn(n_edges, 3, dtype=dtype, device=c.device, generator=gen)
    blocks = WignerD(lmax, dtype).to(c.device).blocks(edge_quaternion(vec, 1e-8))
    blocks = blocks.detach().requires_grad_()
    rot = EdgeRotation(lmax, mmax)
    dim, dm = (lmax + 1) ** 2, len(rot.rows)
    x = torch.randn(
        n_edges, dim, channels, dtype=dtype, device=c.device, generator=gen
    ).requires_grad_()
    y = torch.randn(
        n_edges, dm, channels, dtype=dtype, device=c.device, generator=gen
    ).requires_grad_()
    w = torch.rand(n_edges, 1, dtype=dtype, device=c.device, generator=gen).requires_grad_()

    def dense_pass():
        ops = rot.matrices(blocks)
        a, b = rot.to_local(ops, x), rot.to_global(ops, y, w)
        return a, b, *torch.autograd.grad(a.square().sum() + b.square().sum(), (blocks, x, y, w))

    def fused_pass():
        a = kernels.to_local(blocks, x, lmax, mmax)
        b = kernels.to_global(blocks, y, lmax, mmax, w)
        return a, b, *torch.autograd.grad(a.square().sum() + b.square().sum(), (blocks, x, y, w))

    err = [float((p - q).detach().abs().max()) for p, q in zip(dense_pass(), fused_pass())]
    times = ""
    if not c.dry_run:
        times = f"{c.timed(dense_pass, 5) * 1e3:.2f} / {c.timed(fused_pass, 5) * 1e3:.2f}"
    return (
        f"| {lmax}, {mmax} | {str(dtype)[6:]} | {err[0]:.1e}, {err[1]:.1e} "
        f"| {err[2]:.1e}, {err[3]:.1e}, {err[4]:.1e}, {err[5]:.1e} | {times} |"
    )


def water_cell(reps: tuple[int, int, int]):
    """``water_pbc_0`` (192 atoms) replicated ``reps`` times: ``(coord, box, atype)``."""
    data = np.load(PARITY / "tiny" / "expected.npz")
    coord, box, atype = (data[f"water_pbc_0/{k}"] for k in ("coord", "box", "atype"))
    shifts = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
    big = (coord[None] + (shifts @ box)[:, None]).reshape(-1, 3)
    return big, box * np.array(reps)[:, None], np.tile(atype, len(shifts))


def device_neighbours(c: Check) -> None:
    """vesin-torch on the device against the host search, on the four parity frames."""
    from sezm.data.neighbors import build_edges, device_edge_batch, device_search_available

    if not device_search_available():
        c.add("skipped: vesin-torch is not installed (DeepPot searches on the host)")
        return
    data = np.load(PARITY / "tiny" / "expected.npz")
    for frame in ("water_pbc_0", "water_triclinic", "water_nopbc", "small_cell"):
        coord = data[f"{frame}/coord"][None]
        box = data[f"{frame}/box"][None] if f"{frame}/box" in data.files else None
        host = build_edges(coord, box, 6.0)
        src, dst, vec = device_edge_batch(coord, box, 6.0, c.device)
        same = np.array_equal(src.cpu().numpy(), host.src) and np.array_equal(
            dst.cpu().numpy(), host.dst
        )
        err = float(np.abs(vec.cpu().numpy() - host.vec).max()) if same else float("nan")
        c.add(
            f"- {frame}: {len(host)} edges, device edges {'identical' if same else 'DIFFERENT'}"
            f" (max |dvec| {err:.1e} Å)"
        )


def throughput(c: Check) -> None:
    """Energy + forces + virial on water cells of growing size until memory or time runs out."""
    from sezm.data.graph import build_graph
    from sezm.data.neighbors import device_edge_batch, device_search_available
    from sezm.infer.settings import InferenceSettings
    from sezm.model.build import load_model

    full_float32()
    sizes = (
        [(1, 1, 1)]
        if c.dry_run
        else [
            (1, 1, 1),
            (2, 2, 2),
            TARGET_ATOMS,
            (4, 4, 4),
            (8, 8, 8),
        ]
    )
    c.add(
        "| model | atoms | edges | path (automatic) | neighbour search ms, host vesin / device vesin-torch | model ms | atoms/ms | peak GPU MB | MB/atom |"
    )
    c.add("|---|---|---|---|---|---|---|---|---|")
    on_device = device_search_available()
    for case in ("tiny", "mini"):
        model, _ = load_model(PARITY / case / "model.pt")
        model = model.to(c.device).eval().requires_grad_(False)
        InferenceSettings().attach_streaming(model, c.device)  # as DeepPot: automatic streaming
        for reps in sizes:
            if c.left() < 45:
                c.add(f"| {case} | ... | | | | | | | stopped: time budget |")
                break
            coord, box, atype = water_cell(reps)
            t = time.perf_counter()
            graph = build_graph(coord[None], box[None], atype[None], model.rcut)
            t_nl = time.perf_counter() - t
            t_dev = float("nan")
            if on_device:
                search = functools.partial(
                    device_edge_batch, coord[None], box[None], model.rcut, c.device
                )
                t_dev = c.timed(search, 1 if c.dry_run else 3)
            graph = graph.to(c.device)
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(c.device)
            try:
                seconds = c.timed(functools.partial(model, graph), 1 if c.dry_run else 3)
            except torch.OutOfMemoryError:
                seconds = None
            _, chunk = model.descriptor.streaming.last_pass  # the path the model's policy chose
            path = "plain" if chunk is None else f"streamed, {chunk} edges a chunk"
            if seconds is None:
                c.add(
                    f"| {case} | {len(atype)} | {len(graph.src)} | {path} | | out of memory | | | |"
                )
                break
            peak = (
                torch.cuda.max_memory_allocated(c.device) / 2**20
                if c.device.type == "cuda"
                else float("nan")
            )
            c.add(
                f"| {case} | {len(atype)} | {len(graph.src)} | {path} | {t_nl * 1e3:.0f} / {t_dev * 1e3:.1f} | {seconds * 1e3:.2f} | {len(atype) / (seconds * 1e3):.1f} | {peak:.0f} | {peak / len(atype):.3f} |"
            )
            del graph
        del model


def side_by_side(c: Check) -> None:
    """Time and peak memory of both engines on growing water cells (``side_by_side.py``)."""
    from side_by_side import section

    section(c)


def training(c: Check, variants: tuple[tuple[str, dict], ...]) -> None:
    """Mean step time of ``sezm train`` on DPA4-Mini (water, batch 1, 192 atoms)."""
    from bench_train import prepare, step_time

    from sezm.cli import main as sezm_main

    source = WATER / ("input.json" if c.dry_run else "input_mini.json")
    steps, every = (6, 2) if c.dry_run else (60, 15)
    c.add(
        f"input {source.relative_to(ROOT)}, {steps} steps, mean over the display intervals after the first two"
    )
    for label, model_keys in variants:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            prepare(work, source, steps, every)
            config = json.loads((work / "input.json").read_text())
            config["model"]["descriptor"]["use_amp"] = model_keys.pop("use_amp", False)
            config["model"].update(model_keys)
            (work / "input.json").write_text(json.dumps(config))
            log_file = work / "train.log"
            with contextlib.chdir(work), capture_log(log_file):
                if c.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(c.device)
                sezm_main(
                    ["train", "input.json", "--skip-neighbor-stat", "--device", str(c.device)]
                )
            mean = step_time(log_file.read_text(), every)
            peak = (
                torch.cuda.max_memory_allocated(c.device) / 2**20
                if c.device.type == "cuda"
                else float("nan")
            )
            c.add(f"- {label}: {mean * 1e3:.1f} ms/step, peak GPU memory {peak:.0f} MB")


def training_eager_and_amp(c: Check) -> None:
    training(c, (("eager, float32", {}), ("use_amp (bf16 blocks)", {"use_amp": True})))


def training_compiled(c: Check) -> None:
    if c.dry_run:
        c.add("skipped in the dry run (compiling takes minutes on a CPU)")
        return
    training(c, (("use_compile", {"use_compile": True}),))


@contextlib.contextmanager
def capture_log(path: Path):
    import logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """``os.environ[name] = value`` within the context, then the previous state."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def frozen_on_cuda(c: Check) -> None:
    """``sezm freeze --device cuda`` of ``tiny`` with ``DP_TRITON_INFER=1`` (the Triton kernels
    compiled into the package), then, if the budget allows, with the PyTorch rotations: export,
    AOTInductor compile and freeze's own check against eager; then ``DeepPot`` on each package
    against eager ``DeepPot`` on a water cell, and its evaluation time. The dry run freezes for
    the CPU (the PyTorch rotations: the kernels are CUDA-only) on the 192-atom cell."""
    import sezm
    from sezm.infer import freeze as fz
    from sezm.infer.pt2 import read_metadata
    from sezm.kernels import triton_available

    full_float32()
    checkpoint = PARITY / "tiny" / "model.pt"
    coord, box, atype = water_cell((1, 1, 1) if c.dry_run else TARGET_ATOMS)
    eager = sezm.DeepPot(checkpoint, device=str(c.device))
    ref = eager.eval(coord[None], box[None], atype)
    variants = [("Triton rotations", "1"), ("PyTorch rotations", "0")]
    if c.dry_run or not triton_available():
        c.add("- Triton package: " + ("not in the dry run" if c.dry_run else "triton absent"))
        variants = variants[1:]
    with tempfile.TemporaryDirectory() as tmp:
        for label, level in variants:
            if c.left() < 60:
                c.add(f"- {label}: skipped, {c.left():.0f} s of the budget left")
                continue
            path = Path(tmp) / f"tiny_triton{level}.pt2"
            with environment_variable("DP_TRITON_INFER", level):
                report = fz.freeze(checkpoint, path, with_comm=False, device=str(c.device))
            meta = read_metadata(path)["sezm"]
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            cubins = sum(n.endswith((".cubin", ".hsaco")) for n in names)
            dp = sezm.DeepPot(path)
            got = dp.eval(coord[None], box[None], atype)
            seconds = c.timed(lambda dp=dp: dp.eval(coord[None], box[None], atype), 3)
            de = abs(float(got[0][0, 0] - ref[0][0, 0])) / len(atype)
            df = float(np.abs(got[1] - ref[1]).max())
            dv = float(np.abs(got[2] - ref[2]).max())
            checked = ", ".join(f"{k} {v:.1e}" for k, v in report.errors.items())
            c.add(
                f"- {label}: export {report.seconds['export']:.1f} s, compile "
                f"{report.seconds['compile']:.1f} s, {path.stat().st_size / 2**20:.1f} MB, "
                f"{cubins} kernel binaries, recorded fused_kernels "
                f"'{meta['inference_settings']['fused_kernels']}' on {meta['device']}",
                f"  - freeze check max|pt2 - eager|: {checked}",
                f"  - DeepPot(.pt2) on {len(atype)} atoms against eager: |dE|/atom {de:.1e} eV, "
                f"max|dF| {df:.1e} eV/Å, max|dV| {dv:.1e} eV; {seconds * 1e3:.1f} ms per eval "
                "(incl. neighbour search)",
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections")
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device; use --cpu-dry-run to check the script on a CPU"
        )
    out = args.out or (
        Path(os.environ["OUT"]) / "gpu_summary.md"
        if os.environ.get("OUT")
        else ROOT / "benchmarks" / "gpu" / "summary.md"
    )
    if args.cpu_dry_run:  # Triton's interpreter; read when triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    c = Check(device, args.cpu_dry_run, time.perf_counter() + args.budget, out)
    c.add("# sezm GPU check" + (" (CPU dry run)" if args.cpu_dry_run else ""), "")
    c.add(f"{time.strftime('%Y-%m-%d %H:%M:%S')}, budget {args.budget:.0f} s")
    c.section("Environment", environment, 0)
    c.section("CUDA parity (float32, TF32 off)", parity, 60)
    c.section("Triton rotations against dense", triton_rotation, 40)
    c.section("Neighbour search on the device", device_neighbours, 5)
    c.section("Evaluation throughput (energy + forces + virial)", throughput, 60)
    c.section("Side by side with DeePMD-kit 3.2 (DeepPot.eval, E+F+V)", side_by_side, 90)
    c.section("Training step, DPA4-Mini", training_eager_and_amp, 60)
    c.section(".pt2 on CUDA (tiny), PyTorch and Triton rotations", frozen_on_cuda, 120)
    c.section("Training step, DPA4-Mini, use_compile", training_compiled, 120)
    c.write()
    print(f"summary written to {out}")


if __name__ == "__main__":
    main()
