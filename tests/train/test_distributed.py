"""``torchrun --nproc_per_node=2 ... sezm train``: two CPU processes (gloo) train one model.

Each rank draws its own batches, DDP averages the gradients, so both ranks end with the same
parameters; rank 0 alone writes the checkpoint. About 15 s per launch on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import write_input

from sezm.compat.deepmd import to_deepmd_state
from sezm.train.distributed import Distributed, rank_seed, zero_stage

# Runs `sezm train` like `python -m sezm train`, then stores this rank's final parameters and the
# frames it drew, so the test can compare the ranks.
WORKER = """
import sys, torch
from sezm.cli import main
from sezm.data.dataset import DataSystem
from sezm.train.trainer import Trainer

drawn, run = [], Trainer.run
next_batch = DataSystem.next_batch

def record(self, *args, **kwargs):
    batch = next_batch(self, *args, **kwargs)
    drawn.append([int(batch.system), *map(int, batch.frames)])
    return batch

def run_and_dump(self):
    run(self)
    params = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
    torch.save({"params": params, "drawn": drawn}, f"rank{self.dist.rank}.pt")

DataSystem.next_batch = record
Trainer.run = run_and_dump
main(sys.argv[1:])
"""


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_two_processes_train_one_model(tmp_path, zero_stage) -> None:
    inp = write_input(tmp_path, steps=3)
    config = json.loads(inp.read_text())
    config["training"].update(save_freq=3, zero_stage=zero_stage, enable_ema=zero_stage == 1)
    inp.write_text(json.dumps(config))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["worker.py", "train", "input.json", "--skip-neighbor-stat"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes, DDP" in done.stdout

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["drawn"] != ranks[1]["drawn"]  # each rank its own batches
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # rank 0 wrote the one checkpoint, with the common weights
    assert sorted(p.name for p in tmp_path.glob("model.ckpt*-*.pt")) == (
        ["model.ckpt-3.pt", "model.ckpt_ema-3.pt"] if zero_stage else ["model.ckpt-3.pt"]
    )
    ckpt = torch.load(tmp_path / "model.ckpt-3.pt", weights_only=False)
    for name, value in to_deepmd_state(ranks[0]["params"]).items():
        assert torch.equal(ckpt["model"][name], value), name
    assert len(ckpt["sezm"]["rng_ranks"]) == 2
    assert ckpt["optimizer"]["state"]  # the whole optimizer state, gathered under ZeRO-1
    assert Path(tmp_path / "lcurve.out").read_text().count("\n") == 5


def test_zero_stages() -> None:
    two = Distributed(rank=0, world_size=2)
    assert zero_stage({"zero_stage": 1}, two) == 1
    assert zero_stage({"zero_stage": 3}, Distributed()) == 0  # one process: nothing to shard
    with pytest.raises(NotImplementedError, match="FSDP2"):
        zero_stage({"zero_stage": 2}, two)
    with pytest.raises(ValueError, match="change_bias_after_training"):
        zero_stage({"zero_stage": 1, "change_bias_after_training": True}, two)
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) != 7 and rank_seed(None, 1) is None
