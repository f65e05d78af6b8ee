"""Command line: ``sezm train | test | embed | neighbor-stat``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("sezm")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="SEZM %(levelname)-5s %(message)s",
        stream=sys.stdout,
    )


def _read_input(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"input file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not valid JSON ({err})") from None


def cmd_train(args: argparse.Namespace) -> None:
    from .train.distributed import close, init_from_env

    ctx = init_from_env()  # under torchrun: one process per rank
    if not ctx.is_main:  # rank 0 reports; the others only warn
        logging.getLogger("sezm").setLevel(logging.WARNING)
    try:
        _train(args, write_files=ctx.is_main)
    finally:
        close()


def _train(args: argparse.Namespace, write_files: bool) -> None:
    from .config import expand_shared_params, is_multi_task, normalize_input
    from .train.trainer import Resume, Trainer, write_out_json

    raw = _read_input(args.input)
    config = normalize_input(raw, source=args.input)
    if args.numb_steps is not None:
        config["training"]["numb_steps"] = args.numb_steps
    links = expand_shared_params(raw["model"])[1] if is_multi_task(raw) else None
    resume = Resume(
        init_model=_with_pt(args.init_model),
        restart=_with_pt(args.restart),
        finetune=args.finetune,
        skip_neighbor_stat=args.skip_neighbor_stat,
        model_branch=args.model_branch,
        use_pretrain_script=args.use_pretrain_script,
    )
    trainer = Trainer(config, resume, device=args.device, shared_links=links)
    if write_files:
        write_out_json(trainer.config, args.output)
    trainer.run()


def _with_pt(path: str | None) -> str | None:
    """A checkpoint prefix gets ``.pt`` appended, as ``dp --pt train`` does."""
    return path if path is None or path.endswith(".pt") else path + ".pt"


def cmd_neighbor_stat(args: argparse.Namespace) -> None:
    from .data.neighbor_stat import neighbor_stat_command

    neighbor_stat_command(args.system, args.rcut, type_map=args.type_map)


def cmd_test(args: argparse.Namespace) -> None:
    from .infer.test import run_test

    run_test(
        args.model,
        args.system,
        numb_test=args.numb_test,
        detail_file=args.detail_file,
        head=args.head,
    )


def cmd_embed(args: argparse.Namespace) -> None:
    from .data import expand_systems
    from .infer.embed import embed

    if args.datafile:
        lines = Path(args.datafile).read_text().splitlines()
        systems = [line.strip() for line in lines if line.strip()]
    else:
        systems = expand_systems(args.system)
    embed(args.model, systems, args.output, dtype=args.dtype, head=args.head, device=args.device)


def cmd_freeze(args: argparse.Namespace) -> None:
    from .infer.freeze import FreezeError, freeze

    try:
        report = freeze(args.checkpoint, args.output, head=args.head, with_comm=args.with_comm)
    except FreezeError as err:
        raise SystemExit(f"freeze failed: {err}") from None
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    errs = ", ".join(f"{k} {v:.2g}" for k, v in report.errors.items())
    log.info("wrote %s (%s)", report.path, secs)
    log.info("reloaded and checked against eager evaluation, max|pt2 - eager|: %s", errs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sezm", description="DPA4 / SeZM interatomic potentials")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a model from a DeePMD-kit input.json "
        "(several processes: torchrun --nproc_per_node=N -m sezm train ...)",
    )
    train.add_argument("input", help="input.json (DeePMD-kit format, model.type dpa4)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("-i", "--init-model", help="start from the weights of this checkpoint")
    start.add_argument(
        "-r", "--restart", help="resume this checkpoint exactly (step, optimizer, RNG)"
    )
    start.add_argument("-t", "--finetune", help="fine-tune from this pretrained checkpoint")
    train.add_argument(
        "--model-branch",
        default="",
        help="branch of a multi-task pretrained model to fine-tune from "
        "(default: its first branch with a new fitting; RANDOM: a new fitting)",
    )
    train.add_argument(
        "--use-pretrain-script",
        action="store_true",
        help="take the descriptor/fitting configuration (with --init-model: the whole model "
        "section) from the pretrained checkpoint",
    )
    train.add_argument(
        "--skip-neighbor-stat",
        action="store_true",
        help="do not scan the data for sel/min distance",
    )
    train.add_argument("--numb-steps", type=int, help="override training.numb_steps")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument(
        "-o", "--output", default="out.json", help="where to write the expanded input"
    )
    train.set_defaults(func=cmd_train)

    test = sub.add_parser("test", help="errors of a model on labelled systems (like `dp test`)")
    test.add_argument("-m", "--model", default="model.ckpt.pt")
    test.add_argument("-s", "--system", default=".", help="system directory (searched recursively)")
    test.add_argument("-n", "--numb-test", type=int, default=0, help="frames per system (0 = all)")
    test.add_argument("-d", "--detail-file", help="prefix of per-frame detail files")
    test.add_argument("--head", help="branch of a multi-task model")
    test.set_defaults(func=cmd_test)

    emb = sub.add_parser("embed", help="descriptor and fitting features to HDF5 (`dp embed`)")
    emb.add_argument("-m", "--model", default="model.ckpt.pt")
    source = emb.add_mutually_exclusive_group()
    source.add_argument("-s", "--system", default=".", help="system directory (recursive)")
    source.add_argument("-f", "--datafile", help="file listing system directories, one a line")
    emb.add_argument("-o", "--output", default="embedding.hdf5")
    emb.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "native"])
    emb.add_argument("--head", "--model-branch", help="branch of a multi-task model")
    emb.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    emb.set_defaults(func=cmd_embed)

    frz = sub.add_parser(
        "freeze", help="compile a checkpoint into a .pt2 for LAMMPS / DeePMD-kit C++ and DeepPot"
    )
    frz.add_argument("-c", "--checkpoint", default="model.ckpt.pt")
    frz.add_argument("-o", "--output", default="frozen_model", help="written with suffix .pt2")
    frz.add_argument("--head", "--model-branch", help="branch of a multi-task model")
    frz.add_argument(
        "--no-with-comm",
        dest="with_comm",
        action="store_false",
        help="skip the multi-rank (MPI) package: about half the freeze time, single-rank LAMMPS only",
    )
    frz.set_defaults(func=cmd_freeze)

    nstat = sub.add_parser(
        "neighbor-stat", help="neighbour counts and minimal distance of a dataset"
    )
    nstat.add_argument("-s", "--system", default=".")
    nstat.add_argument("-r", "--rcut", type=float, default=6.0)
    nstat.add_argument("-t", "--type-map", nargs="+")
    nstat.set_defaults(func=cmd_neighbor_stat)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    args.func(args)


if __name__ == "__main__":
    main()
