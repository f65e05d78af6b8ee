"""The caching CPU allocator: values kept through splits and merges, the memory of a repeated
pattern reused, the same losses and the same energies and forces as with glibc, and glibc kept
(with the reason) where it cannot be compiled. Each check that compares allocators runs in
processes of its own: an installed allocator stays torch's for the life of the process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import curve_rows, write_input

from sezm import cpu_allocator


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory) -> str:
    """One compilation for the module's processes, in a folder of its own."""
    return str(tmp_path_factory.mktemp("torch_extensions"))


def _run(args: list[str], extensions_dir: str, cwd=None, **env) -> str:
    environ = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions_dir, OMP_NUM_THREADS="1", **env)
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _skip_unless_installed(output: str) -> None:
    if "CPU allocator: sezm's caching allocator" not in output:
        line = next((x for x in output.splitlines() if "CPU allocator" in x), output[-500:])
        pytest.skip(f"the caching allocator is not available here: {line}")


PATTERN = textwrap.dedent(
    """
    import random, torch
    from sezm import cpu_allocator as ca
    print(ca.install())
    if ca.stats() is None:
        raise SystemExit(0)
    MB = 2**20

    def step_pattern(seed):
        # tensors of 64 KB to 48 MB, and of 160 MB (beyond a 128 MB segment), freed in a random
        # order while others are allocated; every live tensor must keep its own value
        rng = random.Random(seed)
        live = {}
        for i in range(300):
            if live and rng.random() < 0.5:
                key = rng.choice(sorted(live))
                t = live.pop(key)
                assert bool((t == key).all()), f"tensor {key} was overwritten"
            else:
                n = rng.choice([16384, 16385, 50000, 262144, 1000003, 3 * 2**20, 12 * 2**20])
                live[i] = torch.full((40 * 2**20 if i % 60 == 0 else n,), float(i))
        for key, t in live.items():
            assert bool((t == key).all()), f"tensor {key} was overwritten"

    reserved = []
    for _ in range(3):
        step_pattern(seed=7)
        s = ca.stats()
        assert s["in_use"] == 0, s  # every block came back,
        assert s["free_blocks"] == s["segments"], s  # and merged into whole segments
        reserved.append(s["reserved"])
    assert reserved[1] == reserved[2], reserved  # the repeated pattern reuses its memory
    print("PATTERN OK", [r // MB for r in reserved], ca.stats()["segments"])
    """
)


def test_blocks_keep_their_values_and_a_repeated_pattern_reuses_its_memory(extensions_dir):
    output = _run(["-c", PATTERN], extensions_dir)
    _skip_unless_installed(output)
    assert "PATTERN OK" in output, output


def test_training_losses_are_the_same_as_with_glibc(tmp_path, extensions_dir):
    curves, logs = {}, {}
    for choice in cpu_allocator.CHOICES:
        folder = tmp_path / choice
        folder.mkdir()
        write_input(folder, steps=4)
        logs[choice] = _run(
            ["-m", "sezm", "train", "input.json"],
            extensions_dir,
            cwd=folder,
            SEZM_CPU_ALLOCATOR=choice,
        )
        curves[choice] = curve_rows(folder / "lcurve.out")
    assert "CPU allocator: glibc's (SEZM_CPU_ALLOCATOR=system)" in logs["system"]
    _skip_unless_installed(logs["caching"])
    assert "MB reserved in" in logs["caching"]  # the run's closing line on the allocator
    assert len(curves["caching"]) == 4
    assert curves["caching"] == curves["system"]  # bitwise: only where tensors live changes


FORKS = textwrap.dedent(
    """
    import os, threading, time, torch
    from sezm import cpu_allocator as ca
    print(ca.install())
    stop = False

    def churn():  # another thread allocating all the time: the forks catch it mid-allocation
        while not stop:
            blocks = [torch.empty(1 << 18) for _ in range(8)]
            del blocks

    thread = threading.Thread(target=churn)
    thread.start()
    hung = 0
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            torch.empty(1 << 20)
            os._exit(0)
        deadline = time.time() + 5
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.time() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
    stop = True
    thread.join()
    print("HUNG CHILDREN", hung)
    """
)


def test_a_forked_child_can_allocate(extensions_dir):
    output = _run(["-c", FORKS], extensions_dir)
    _skip_unless_installed(output)
    assert "HUNG CHILDREN 0" in output, output


EVALUATE = textwrap.dedent(
    """
    import hashlib, logging, numpy as np, sezm
    from sezm.cpu_allocator import stats
    logging.basicConfig(level=logging.INFO)  # the line naming the allocator in force
    P = "tests/data/parity/mini"
    data = np.load(f"{P}/expected.npz")
    coord, box = data["water_pbc_0/coord"].reshape(1, -1), data["water_pbc_0/box"].reshape(1, 9)
    atype = data["water_pbc_0/atype"]
    dp = sezm.DeepPot(f"{P}/model.pt", device="cpu")
    out = dp.eval(np.tile(coord, (2, 1)), np.tile(box, (2, 1)), atype, atomic=True)
    print("IN USE", stats() and stats()["peak_in_use"] > 0)
    print("HASH", hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in out)).hexdigest())
    """
)


def test_evaluation_gives_bitwise_the_same_numbers(extensions_dir):
    root = Path(__file__).resolve().parent.parent
    outputs = {
        choice: _run(["-c", EVALUATE], extensions_dir, cwd=root, SEZM_CPU_ALLOCATOR=choice)
        for choice in cpu_allocator.CHOICES
    }
    assert "IN USE None" in outputs["system"]
    _skip_unless_installed(outputs["caching"])
    assert "IN USE True" in outputs["caching"]  # the model's tensors went through it
    hashes = {c: re.findall(r"HASH (\w+)", out) for c, out in outputs.items()}
    assert len(hashes["caching"]) == 1 and hashes["caching"] == hashes["system"], outputs


def test_a_failed_compilation_keeps_glibc_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_library", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv(cpu_allocator.ENV, raising=False)
    line = cpu_allocator.install()
    assert line.startswith("CPU allocator: glibc's; sezm's caching allocator"), line
    assert "did not compile" in line and "not found" in line, line
    log_file = cpu_allocator.build_directory() / "build.log"
    assert log_file.is_file() and "no-such-compiler" in log_file.read_text()
    assert cpu_allocator.stats() is None


def test_a_compilation_in_progress_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_library", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(cpu_allocator.ENV, raising=False)
    lock = cpu_allocator.build_directory() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # another process compiling, or one killed while it did
    line = cpu_allocator.install()
    assert "being compiled by another process" in line and str(lock) in line, line
    assert cpu_allocator.stats() is None


def test_the_choice_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_allocator.ENV, "System ")
    assert cpu_allocator.choice() == "system"
    assert cpu_allocator.install() == "CPU allocator: glibc's (SEZM_CPU_ALLOCATOR=system)"
    monkeypatch.setenv(cpu_allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"SEZM_CPU_ALLOCATOR='jemalloc': expected one of"):
        cpu_allocator.choice()


def test_a_misspelt_choice_stops_sezm_train_before_it_starts(monkeypatch, capsys):
    from sezm.cli import run

    monkeypatch.setenv(cpu_allocator.ENV, "jemalloc")
    assert run(["train", "no-such-input.json"]) == 2
    assert "sezm: error: SEZM_CPU_ALLOCATOR='jemalloc': expected one of caching, system" in (
        capsys.readouterr().err
    )


def test_preloading_the_library_installs_it(extensions_dir):
    # a program without Python that links libtorch (LAMMPS) takes it with LD_PRELOAD
    environ = dict(os.environ, TORCH_EXTENSIONS_DIR=extensions_dir)
    built = subprocess.run(
        [sys.executable, "-m", "sezm.cpu_allocator"], env=environ, capture_output=True, text=True
    )
    if built.returncode != 0:
        pytest.skip(f"the caching allocator does not compile here: {built.stderr[-300:]}")
    library = built.stdout.strip().splitlines()[-1]
    script = (
        "import ctypes, torch\n"
        "x = torch.ones(1 << 20)\n"  # 4 MB, allocated by torch with nothing installed by hand
        "out = (ctypes.c_int64 * 5)()\n"
        f"ctypes.CDLL({library!r}).sezm_cpu_allocator_stats(out)\n"
        "print('IN USE', out[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(environ, LD_PRELOAD=library),  # it finds libtorch's libraries by itself
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert int(re.findall(r"IN USE (\d+)", out.stdout)[0]) >= 4 << 20, out.stdout
