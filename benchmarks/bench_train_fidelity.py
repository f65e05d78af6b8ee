"""Training fidelity against DeePMD-kit 3.2: the same run step by step, and accuracy over seeds.

    python benchmarks/bench_train_fidelity.py replay [--recipe PATH] [--steps 200]
    python benchmarks/bench_train_fidelity.py accuracy [--recipe PATH] [--steps 2000] [--seeds 42:7 1:11 2:22]

``replay``: DeePMD-kit trains ``--steps`` steps of the recipe (``dp``'s own trainer, data order
and statistics) and records its initial state, every batch and every loss; sezm's trainer then
runs the same batches from the same state and the two loss curves are compared step by step.
Both sides use DeePMD-kit's batch order: its sampler draws through torch's DataLoader workers
and generators, which sezm does not imitate (sezm's own sampler draws the same distribution).

``accuracy``: both command lines train the recipe for ``--steps`` steps for each
``model_seed:training_seed`` pair (descriptor and fitting ``seed``, ``training.seed``) and test on
``data_3``; the table gives the force and energy RMSE of each run and their mean and spread.

Training data: the bundled water ``data_0..2`` (validation and test ``data_3``). DeePMD-kit runs
in its own interpreter (``--upstream-python``, default ``/tmp/oracle/bin/python``), built by
``../shared/tools/oracle-env.sh``. Runs use one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "water" / "data"
LMP_RECIPE = ROOT.parent / "shared" / "upstream-examples" / "water" / "dpa4" / "lmp" / "input.json"

RECORD = r"""
import json, sys, numpy as np, torch
from deepmd.utils.argcheck import normalize
from deepmd.utils import random as dp_random
from deepmd.pt.entrypoints.main import get_trainer
from deepmd.pt.utils.finetune import get_finetune_rules
from deepmd.pt.utils.multi_task import preprocess_shared_params
from torch.nn.utils import clip_grad_norm_
config, finetune = json.load(open("input.json")), (sys.argv[2] if len(sys.argv) > 2 else None)
multi, shared_links, finetune_links = "model_dict" in config["model"], None, None
if multi:
    config["model"], shared_links = preprocess_shared_params(config["model"])
if finetune:
    config["model"], finetune_links = get_finetune_rules(finetune, config["model"], change_model_params=False)
trainer = get_trainer(normalize(config, multi_task=multi), finetune_model=finetune,
                      shared_links=shared_links, finetune_links=finetune_links)
wrapper, steps = trainer.wrapper, []
init = {k: v.detach().clone() for k, v in wrapper.state_dict().items() if torch.is_tensor(v)}
for step in range(int(sys.argv[1])):
    task = "Default"
    if multi:  # the branch draw of DeePMD-kit's training loop
        task = trainer.model_keys[dp_random.choice(np.arange(trainer.num_model, dtype=np.int_), p=trainer.model_prob)]
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.optimizer.zero_grad(set_to_none=True)
    inputs, labels, log = trainer._next_training_batch(task)
    rng = torch.get_rng_state()  # what the step draws (dens corruption) comes from here
    _, loss, more = wrapper(**inputs, cur_lr=lr, label=labels, task_key=task)
    loss.backward()
    if trainer.gradient_max_norm > 0:
        clip_grad_norm_(wrapper.parameters(), trainer.gradient_max_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    if trainer.model_ema is not None:
        trainer.model_ema.update(trainer.model)
    steps.append({"lr": lr, "loss": loss.item(), "more": {k: float(v) for k, v in more.items()},
                  "task": task, "rng": rng, "sid": int(log["sid"]),
                  "fid": [int(f) for f in torch.as_tensor(log["fid"]).reshape(-1)]})
torch.save({"init": init, "steps": steps}, "upstream_run.pt")
"""


def _set_systems(section: dict, train: list[str], valid: list[str]) -> None:
    section["training_data"]["systems"] = train
    section["validation_data"] = {"systems": valid, "batch_size": 1, "numb_btch": 1}
    section.pop("stat_file", None)


def write_input(
    workdir: Path,
    recipe: Path,
    steps: int,
    seeds: tuple[int, int] | None,
    train: list[str] | None = None,
    valid: list[str] | None = None,
) -> None:
    """``input.json`` of the recipe on ``train``/``valid`` systems (default: the bundled water
    ``data_0..2`` / ``data_3``), every branch of a multi-task recipe on the same data."""
    config = json.loads(recipe.read_text())
    train = train or [str(DATA / f"data_{i}") for i in range(3)]
    valid = valid or [str(DATA / "data_3")]
    tr = config["training"]
    for section in tr.get("data_dict", {"": tr}).values():
        _set_systems(section, train, valid)
    tr.update(numb_steps=steps, save_freq=steps, disp_freq=max(1, steps // 20))
    lr = config.get("learning_rate", {})
    if lr.get("warmup_steps", 0) >= steps:  # a long run's warm-up, shortened to fit
        lr["warmup_steps"] = steps // 10
    if seeds is not None:
        config["model"]["descriptor"]["seed"] = config["model"]["fitting_net"]["seed"] = seeds[0]
        tr["seed"] = seeds[1]
    (workdir / "input.json").write_text(json.dumps(config, indent=1))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def replay(args: argparse.Namespace) -> None:
    import torch

    from sezm.compat.deepmd import from_deepmd_state
    from sezm.config import expand_shared_params, is_multi_task, normalize_input
    from sezm.train.ema import EMA
    from sezm.train.optim import set_lr
    from sezm.train.trainer import Resume, Trainer

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="sezm-replay-"))
    write_input(workdir, args.recipe, args.steps, None, args.train, args.valid)
    finetune = [str(args.finetune.resolve())] if args.finetune else []
    run = subprocess.run(
        [args.upstream_python, "-c", RECORD, str(args.steps), *finetune],
        cwd=workdir, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode:
        sys.exit(f"DeePMD-kit's run failed:\n{run.stderr[-3000:]}")
    record = torch.load(workdir / "upstream_run.pt", weights_only=False)
    os.chdir(workdir)
    raw = json.loads((workdir / "input.json").read_text())
    links = expand_shared_params(raw["model"])[1] if is_multi_task(raw) else None
    resume = Resume(finetune=finetune[0]) if finetune else Resume()
    trainer = Trainer(normalize_input(raw), resume, shared_links=links)
    for name, task in trainer.tasks.items():
        state = from_deepmd_state(record["init"], name)
        result = task.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            sys.exit(f"initial state of {name}: {result}")
    if trainer.setup.ema is not None:
        trainer.setup.ema = EMA(trainer.setup.ema_models, trainer.setup.ema.decay)
    plan = iter(record["steps"])
    current: dict = {}

    def next_batch(rcut, device):
        step = current["step"] = next(plan)
        data = trainer.tasks[step["task"]].train_data
        return data.batch(step["sid"], step["fid"], rcut, device)

    for task in trainer.tasks.values():
        task.train_data.next_batch = next_batch
    trainer.setup.draw.next = lambda: record["steps"][current["n"]]["task"]
    print(f"# {args.recipe}: {args.steps} steps on DeePMD-kit's batches from its initial state")
    print(
        f"# {'step':>5} {'branch':>8} {'lr':>9} {'loss DeePMD':>13} {'loss sezm':>13} {'rel diff':>9}"
    )
    worst: dict[str, float] = {}
    early: dict[str, float] = {}
    for n, up in enumerate(record["steps"]):
        current["n"] = n
        lr = trainer.setup.lr.value(n)
        set_lr(trainer.setup.optimizer, lr)
        torch.set_rng_state(up["rng"])  # the same dens corruption draws
        task, loss, _, _ = trainer.steps.train_step(n, lr, False)
        assert task.name == up["task"]
        rel = abs(float(loss) - up["loss"]) / abs(up["loss"])
        worst[task.name] = max(worst.get(task.name, 0.0), rel)
        if n < args.steps // 5:
            early[task.name] = max(early.get(task.name, 0.0), rel)
        if n < 10 or (n + 1) % max(1, args.steps // 20) == 0:
            print(
                f"  {n + 1:5d} {task.name:>8} {lr:9.2e} {up['loss']:13.6e} {float(loss):13.6e} {rel:9.1e}"
            )
    for name in worst:
        print(
            f"# {name}: largest relative loss difference, first {args.steps // 5} steps "
            f"{early.get(name, 0.0):.1e}, whole run {worst[name]:.1e}"
        )


def test_rmse(log: str) -> tuple[float, float]:
    force = float(re.findall(r"Force\s+RMSE\s*:\s*([0-9.e+-]+)", log)[0])
    energy = float(re.findall(r"Energy RMSE/Natoms\s*:\s*([0-9.e+-]+)", log)[0])
    return force, energy


def accuracy(args: argparse.Namespace) -> None:
    upstream_bin = Path(args.upstream_python).parent
    results: dict[str, list[tuple[float, float]]] = {"sezm": [], "DeePMD-kit": []}
    test_data = str(DATA / "data_3")
    for pair in args.seeds:
        seeds = tuple(int(s) for s in pair.split(":"))
        for engine in ("sezm", "DeePMD-kit"):
            workdir = Path(tempfile.mkdtemp(prefix=f"sezm-acc-{engine}-"))
            write_input(workdir, args.recipe, args.steps, seeds)
            if engine == "sezm":
                train = [sys.executable, "-m", "sezm", "train", "input.json"]
                test = [
                    sys.executable,
                    "-m",
                    "sezm",
                    "test",
                    "-m",
                    "model.ckpt.pt",
                    "-s",
                    test_data,
                ]
            else:
                train = [str(upstream_bin / "dp"), "--pt", "train", "input.json"]
                test = [
                    str(upstream_bin / "dp"),
                    "--pt",
                    "test",
                    "-m",
                    "model.ckpt.pt",
                    "-s",
                    test_data,
                ]
            subprocess.run(train, cwd=workdir, env=_env(), check=True, capture_output=True)
            out = subprocess.run(
                test, cwd=workdir, env=_env(), check=True, capture_output=True, text=True
            )
            force, energy = test_rmse(out.stdout + out.stderr)
            results[engine].append((force, energy))
            print(
                f"{engine:10s} seeds {pair:>6}: force RMSE {force:.4f} eV/A, energy RMSE/atom {energy * 1e3:.2f} meV",
                flush=True,
            )
    print(f"\n# {args.recipe}, {args.steps} steps, test on data_3")
    for engine, rows in results.items():
        forces = [f for f, _ in rows]
        spread = statistics.stdev(forces) if len(forces) > 1 else 0.0
        print(
            f"{engine:10s} force RMSE mean {statistics.mean(forces):.3f} +- {spread:.3f} eV/A over {len(forces)} seeds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("replay", "accuracy"))
    parser.add_argument(
        "--recipe",
        type=Path,
        default=LMP_RECIPE,
        help="input.json to train (default: the shared lmp recipe)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps (default: replay 200, accuracy 2000)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        default=["42:7", "1:11", "2:22"],
        help="model_seed:training_seed pairs",
    )
    parser.add_argument(
        "--train", nargs="+", default=None, help="training systems (default: water data_0..2)"
    )
    parser.add_argument(
        "--valid", nargs="+", default=None, help="validation systems (default: water data_3)"
    )
    parser.add_argument(
        "--finetune", type=Path, default=None, help="replay: fine-tune from this checkpoint"
    )
    parser.add_argument(
        "--upstream-python", default="/tmp/oracle/bin/python", help="DeePMD-kit 3.2's interpreter"
    )
    args = parser.parse_args()
    args.recipe = args.recipe.resolve()
    args.train = args.train and [str(Path(p).resolve()) for p in args.train]
    args.valid = args.valid and [str(Path(p).resolve()) for p in args.valid]
    args.steps = args.steps or (200 if args.mode == "replay" else 2000)
    (replay if args.mode == "replay" else accuracy)(args)


if __name__ == "__main__":
    main()
