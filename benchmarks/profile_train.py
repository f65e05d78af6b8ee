"""Where a training step's time and memory go, in one process.

    python benchmarks/profile_train.py [--input examples/water/input_mini.json] [--steps 6]
    python benchmarks/profile_train.py --live      # tensors alive at the step's peak
    python benchmarks/profile_train.py --ops       # self time by operator and input shapes

sezm's trainer on the input's first training frame, repeated (no validation): thread CPU time
of each step (``time.thread_time``, less sensitive to other load than wall time), the losses
(two code versions that train alike print the same numbers) and the process's peak resident
memory. ``--live`` follows every tensor storage the second step creates and prints the peak of
the bytes alive at once, split by phase (``forward``, ``force pass``: the edge gradient with
``create_graph``, ``loss``, ``backward``) and by the line of sezm that made it (in the backward
passes, the line of the forward operation whose derivative made it: anomaly mode records it).
The resident peak exceeds the live peak by what the heap keeps between allocations.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent


def trainer_on_one_frame(source: Path, workdir: Path):
    """A trainer whose every batch is the first frame of the first training system."""
    from sezm.config.normalize import normalize_input
    from sezm.train.trainer import Resume, Trainer

    config = json.loads(source.read_text())
    tr = config["training"]
    tr["training_data"]["systems"] = [
        str((source.parent / s).resolve()) for s in tr["training_data"]["systems"]
    ]
    tr.pop("validation_data", None)
    tr.pop("stat_file", None)
    os.chdir(workdir)
    trainer = Trainer(normalize_input(config), Resume(skip_neighbor_stat=True))
    task = trainer.tasks["Default"]
    batch = task.train_data.batch(0, [0], task.model.rcut, trainer.setup.device)
    task.train_data.next_batch = lambda rcut, device: batch
    return trainer


def run_step(trainer, step: int) -> tuple[float, float]:
    """``(thread seconds, loss)`` of one optimizer step."""
    from sezm.train.optim import set_lr

    lr = trainer.setup.lr.value(step)
    set_lr(trainer.setup.optimizer, lr)
    start = time.thread_time()
    _, loss, _, _ = trainer.steps.train_step(step, lr, False)
    return time.thread_time() - start, float(loss)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode and still alive; what was alive at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.phase, self.live, self.now = "forward", {}, 0
        self.peak, self.at_peak = 0, collections.Counter()

    def _origin(self) -> str:
        node = torch._C._current_autograd_node()
        frames = traceback.extract_stack(limit=40)
        if node is not None:  # a derivative: the forward line that anomaly mode recorded
            recorded = "".join(node.metadata.get("traceback_", []))
            found = re.findall(r'File "([^"]*/sezm/[^"]*)", line (\d+)', recorded)
            where = f"{Path(found[-1][0]).name}:{found[-1][1]}" if found else "?"
            return f"{self.phase:10s} {where} <{node.name()}>"
        ours = [f for f in frames if "/sezm/" in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        return f"{self.phase:10s} {where}"

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() < 4096:
                continue
            self.live[key] = (storage.nbytes(), self._origin())
            self.now += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
            if self.now > self.peak + (4 << 20):  # a new peak: what is alive, by origin
                self.at_peak = collections.Counter()
                for size, origin in self.live.values():
                    self.at_peak[origin] += size
            self.peak = max(self.peak, self.now)
        return out


def live_report(trainer, rows: int) -> None:
    """Run one step under :class:`LiveBytes`, phases marked, and print the peak's contents."""
    mode, grad, backward = LiveBytes(), torch.autograd.grad, torch.Tensor.backward

    def force_pass(*args, **kwargs):  # the model's edge gradient (create_graph in training)
        mode.phase = "force pass"
        out = grad(*args, **kwargs)
        mode.phase = "loss"
        return out

    def loss_backward(self, *args, **kwargs):
        mode.phase = "backward"
        return backward(self, *args, **kwargs)

    torch.autograd.grad, torch.Tensor.backward = force_pass, loss_backward
    try:
        with torch.autograd.detect_anomaly(check_nan=False), mode:
            run_step(trainer, 1)
    finally:
        torch.autograd.grad, torch.Tensor.backward = grad, backward
    phases = collections.Counter()
    for origin, size in mode.at_peak.items():
        phases[origin[:10].strip()] += size
    print(f"peak of live tensors: {mode.peak / 2**20:.0f} MB; by phase at the peak:")
    print("  " + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in phases.items()))
    for origin, size in mode.at_peak.most_common(rows):
        print(f"{size / 2**20:8.1f} MB  {origin}")


def ops_report(trainer, rows: int) -> None:
    """Self CPU time of one step by operator and input shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_step(trainer, 1)
    events = sorted(
        prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total
    )
    for e in events[:rows]:
        shapes = str(e.input_shapes)[:90]
        print(f"{e.self_cpu_time_total / 1e3:8.1f} ms {e.count:4d}x {e.key:24s} {shapes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, default=ROOT / "examples" / "water" / "input_mini.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--live", action="store_true", help="tensors alive at the step's peak")
    ap.add_argument("--ops", action="store_true", help="self time by operator and shapes")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_on_one_frame(args.input.resolve(), Path(tmp))
        run_step(trainer, 0)  # first touch of every buffer
        if args.live:
            return live_report(trainer, args.rows)
        if args.ops:
            return ops_report(trainer, args.rows)
        steps = [run_step(trainer, i) for i in range(1, args.steps)]
    times = sorted(t for t, _ in steps)
    print("step thread times:", " ".join(f"{t:.3f}" for t, _ in steps), "s")
    print(f"median {times[len(times) // 2]:.3f} s")
    print("losses:", " ".join(f"{loss:.8g}" for _, loss in steps))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak:.0f} MB")


if __name__ == "__main__":
    main()
