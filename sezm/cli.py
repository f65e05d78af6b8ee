"""Command line: ``sezm train | test | model-devi | change-bias | show | check | doc-train-input | embed | freeze | neighbor-stat | plot`` (and ``--version``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

log = logging.getLogger("sezm")

DEFAULT_DEVICE = "default: cuda if available, else cpu"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its help text already states it or the
    option has none (its help then says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


@contextlib.contextmanager
def _exit_on(errors: type[BaseException] | tuple[type[BaseException], ...], prefix: str = ""):
    """A command's own failures as its message (``SystemExit`` with text: one line, status 2
    through :func:`run`)."""
    try:
        yield
    except errors as err:
        raise SystemExit(f"{prefix}{err}") from None


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
    """``sezm train``: train (or restart, fine-tune) a model from a DeePMD-kit input file."""
    from .train.distributed import close, init_from_env

    ctx = init_from_env()  # under torchrun: one process per rank
    if not ctx.is_main:  # rank 0 reports; the others only warn
        logging.getLogger("sezm").setLevel(logging.WARNING)
    try:
        _train(args, write_files=ctx.is_main)
    finally:
        close()


def _train(args: argparse.Namespace, write_files: bool) -> None:
    from . import cpu_allocator
    from .config import (
        check_trainable,
        expand_shared_params,
        is_multi_task,
        normalize_input,
        override_numb_steps,
    )
    from .train.faults import TrainingStopped
    from .train.resume import Resume
    from .train.trainer import Trainer, write_out_json

    raw = _read_input(args.input)
    if args.numb_steps is not None:  # before the checks: they see the steps that will run
        raw = override_numb_steps(raw, args.numb_steps)
        log.info("training/numb_steps = %d (from --numb-steps)", args.numb_steps)
    config = normalize_input(raw, source=args.input)
    check_trainable(config, source=args.input)
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
        write_out_json(trainer.resolved_config, args.output)
    try:
        trainer.run()
    except TrainingStopped as stop:
        stop.restart_command = _restart_command(args, stop.checkpoint)
        raise
    if (held := cpu_allocator.stats()) is not None:
        log.info(
            "CPU allocator: peak %.0f MB in use, %.0f MB reserved in %d segments",
            held["peak_in_use"] / 2**20,
            held["reserved"] / 2**20,
            held["segments"],
        )


def _restart_command(args: argparse.Namespace, checkpoint) -> str | None:
    """The command line that continues a stopped run from ``checkpoint``."""
    if checkpoint is None:
        return None
    argv = ["sezm", "train", args.input, "--restart", str(checkpoint)]
    if os.environ.get("WORLD_SIZE", "1") != "1":
        argv[:1] = ["torchrun", f"--nproc_per_node={os.environ['WORLD_SIZE']}", "-m", "sezm"]
    for flag, value in (("--numb-steps", args.numb_steps), ("--device", args.device)):
        if value is not None:
            argv += [flag, str(value)]
    if args.output != "out.json":
        argv += ["-o", args.output]
    return shlex.join(argv)


def _with_pt(path: str | None) -> str | None:
    """A checkpoint prefix gets ``.pt`` appended, as ``dp --pt train`` does."""
    return path if path is None or path.endswith(".pt") else path + ".pt"


def cmd_neighbor_stat(args: argparse.Namespace) -> None:
    """``sezm neighbor-stat``: minimal distance and largest neighbour count per type in ``rcut``."""
    from .data.neighbor_stat import neighbor_stat_command

    neighbor_stat_command(
        args.system, args.rcut, type_map=args.type_map, file_options=_file_options(args)
    )


def cmd_test(args: argparse.Namespace) -> None:
    """``sezm test``: a model's errors on labelled systems (detail tables, parity plots)."""
    from .infer.test import run_test

    log.info("testing model %s on the systems under %s", args.model, args.system)
    with tempfile.TemporaryDirectory() as tmp:
        detail = args.detail_file or (str(Path(tmp) / "detail") if args.plot else None)
        run_test(
            args.model,
            args.system,
            numb_test=args.numb_test,
            detail_file=detail,
            head=args.head,
            file_options=_file_options(args),
        )
        if args.plot:
            _parity_plot(detail, args.plot)


def _parity_plot(detail: str, output: str) -> None:
    from .parity_plot import plot_parity
    from .plot import PlotError

    with _exit_on(PlotError):
        plot_parity(detail, output)
    log.info("wrote parity plots to %s", output)


def cmd_embed(args: argparse.Namespace) -> None:
    """``sezm embed``: per-atom descriptors of every frame of the systems, written to one file."""
    from .data import expand_systems
    from .infer.embed import embed

    if args.datafile:
        lines = Path(args.datafile).read_text().splitlines()
        systems = [line.strip() for line in lines if line.strip()]
    else:
        systems = expand_systems(args.system)
    log.info("embedding %d system(s) with model %s into %s", len(systems), args.model, args.output)
    with _exit_on(NotImplementedError, "embed failed: "):  # a .pt2: no descriptor output
        embed(
            args.model,
            systems,
            args.output,
            dtype=args.dtype,
            head=args.head,
            device=args.device,
            file_options=_file_options(args),
        )


def cmd_freeze(args: argparse.Namespace) -> None:
    """``sezm freeze``: a checkpoint compiled into a ``.pt2`` package, reloaded and checked."""
    from .infer.freeze import FreezeError, freeze

    log.info("freezing %s into %s.pt2", args.checkpoint, args.output)
    with _exit_on(FreezeError, "freeze failed: "):
        report = freeze(
            args.checkpoint,
            args.output,
            head=args.head,
            with_comm=args.with_comm,
            device=args.device,
        )
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    errs = ", ".join(f"{k} {v:.2g}" for k, v in report.errors.items())
    log.info("wrote %s (%s)", report.path, secs)
    log.info("reloaded and checked against eager evaluation, max|pt2 - eager|: %s", errs)


def cmd_plot(args: argparse.Namespace) -> None:
    """``sezm plot``: learning curves of ``lcurve.out`` files as one PNG."""
    from .plot import PlotError, plot_lcurves

    with _exit_on(PlotError):  # not a learning curve, or matplotlib missing
        fig = plot_lcurves(args.files, args.output, dpi=args.dpi)
    panels = [ax.get_title(loc="left") or ax.get_ylabel() for ax in fig.axes]
    log.info("wrote %s (%d file(s); panels: %s)", args.output, len(args.files), ", ".join(panels))


def cmd_model_devi(args: argparse.Namespace) -> None:
    """``sezm model-devi``: the spread of several models' forces and virials on each frame."""
    from .infer.model_devi import model_devi

    if args.frequency < 0 or min(args.relative or 0, args.relative_v or 0) < 0:
        raise SystemExit("model-devi: --frequency, --relative and --relative-v must be >= 0")
    log.info("model deviation of %d models on the systems under %s", len(args.models), args.system)
    model_devi(
        args.models,
        args.system,
        args.output,
        frequency=args.frequency,
        relative=args.relative,
        relative_v=args.relative_v,
        atomic=args.atomic,
        file_options=_file_options(args),
    )


def cmd_change_bias(args: argparse.Namespace) -> None:
    """``sezm change-bias``: a checkpoint with a new per-type output bias."""
    from .infer.change_bias import ChangeBiasError, change_bias

    with _exit_on(ChangeBiasError, "change-bias failed: "):
        change_bias(
            args.model,
            args.system,
            datafile=args.datafile,
            bias_value=args.bias_value,
            numb_batch=args.numb_batch,
            mode=args.mode,
            output=args.output,
            head=args.model_branch,
            device=args.device,
            file_options=_file_options(args),
        )


def cmd_check(args: argparse.Namespace) -> None:
    """``sezm check``: physics checks of a model; exit status 1 if any fails."""
    from .infer.check import CheckError, CheckOptions, check, format_table

    options = CheckOptions(
        fd_atoms=args.fd_atoms,
        nve_steps=args.nve_steps,
        nve_dt=args.nve_dt,
        temperature=args.temperature,
        seed=args.seed,
    )
    log.info("checking %s on %s", args.model, args.structure or "the bundled water frame")
    with _exit_on(CheckError, "check: "):
        results = check(
            args.model,
            args.structure,
            args.frame,
            pt2=args.pt2,
            checkpoint=args.checkpoint,
            head=args.head,
            options=options,
        )
    sys.stdout.write(format_table(results) + "\n")
    failed = [r.name for r in results if r.failed]
    if failed:
        log.error("%d check(s) failed: %s", len(failed), "; ".join(failed))
        raise SystemExit(1)
    log.info("all checks passed (%d skipped)", sum(r.status == "SKIP" for r in results))


def cmd_show(args: argparse.Namespace) -> None:
    """``sezm show``: the requested attributes of a checkpoint or frozen model."""
    from .infer.show import show

    show(args.model, args.attributes)


def cmd_doc_train_input(args: argparse.Namespace) -> None:
    """``sezm doc-train-input``: the documentation of every input key (rst, JSON, JSON schema)."""
    from .config.doc import doc_train_input

    text = doc_train_input(args.out_type, multi_task=args.multi_task)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `sezm doc-train-input | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def build_parser() -> argparse.ArgumentParser:
    """The ``sezm`` argument parser: global options and one sub-command per ``cmd_*``."""
    from .runtime import version_text

    parser = argparse.ArgumentParser(
        prog="sezm",
        description="DPA4 / SeZM interatomic potentials",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages shown",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (also SEZM_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_test(sub)
    _add_embed(sub)
    _add_freeze(sub)
    _add_neighbor_stat(sub)
    _add_plot(sub)
    _add_model_devi(sub)
    _add_change_bias(sub)
    _add_show(sub)
    _add_check(sub)
    _add_doc_train_input(sub)
    return parser


def _command(sub, name: str, text: str, func) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
    command.set_defaults(func=func)
    return command


def _add_train(sub) -> None:
    train = _command(
        sub,
        "train",
        "train a model from a DeePMD-kit input.json "
        "(several processes: torchrun --nproc_per_node=N -m sezm train ...)",
        cmd_train,
    )
    train.add_argument("input", help="input.json (DeePMD-kit format, model.type dpa4)")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "-i", "--init-model", help="start from the weights of this checkpoint (default: fresh)"
    )
    start.add_argument(
        "-r",
        "--restart",
        help="resume this checkpoint exactly: step, optimizer, RNG (default: fresh)",
    )
    start.add_argument(
        "-t", "--finetune", help="fine-tune from this pretrained checkpoint (default: fresh)"
    )
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
    train.add_argument(
        "--numb-steps",
        type=int,
        help="train this many steps (default: training.numb_steps of the input)",
    )
    train.add_argument("--device", help=f"torch device ({DEFAULT_DEVICE})")
    train.add_argument(
        "-o", "--output", default="out.json", help="where to write the expanded input"
    )


_SYSTEM_HELP = (
    "npy system directory (searched recursively for systems) or a file ASE reads "
    "(.xyz, .extxyz, ...; see docs/data.md)"
)


def _add_file_arguments(command: argparse.ArgumentParser) -> None:
    """``--file-format`` and ``--label-key``: how files given as systems are read with ASE."""
    command.add_argument(
        "--file-format",
        help="ASE format of files given as systems, e.g. extxyz (default: ASE tells it from "
        "the file name and contents)",
    )
    command.add_argument(
        "--label-key",
        action="append",
        default=[],
        metavar="LABEL=NAME",
        help="where files read with ASE keep a label, e.g. energy=REF_energy, force=REF_forces, "
        "stress=REF_stress; repeat for several (default: energy, forces, virial, stress)",
    )


def _file_options(args: argparse.Namespace):
    """The :class:`~sezm.data.FileOptions` of ``--file-format`` / ``--label-key``."""
    from .data import FileOptions

    keys = {}
    for item in args.label_key:
        label, _, name = item.partition("=")
        if not label or not name:
            raise SystemExit(f"--label-key {item!r}: expected LABEL=NAME, e.g. energy=REF_energy")
        keys[label] = name
    return FileOptions(args.file_format, keys)


def _add_test(sub) -> None:
    test = _command(sub, "test", "errors of a model on labelled systems (like `dp test`)", cmd_test)
    test.add_argument(
        "-m", "--model", default="model.ckpt.pt", help="checkpoint (.pt) or frozen model (.pt2)"
    )
    test.add_argument("-s", "--system", default=".", help=_SYSTEM_HELP)
    _add_file_arguments(test)
    test.add_argument("-n", "--numb-test", type=int, default=0, help="frames per system (0 = all)")
    test.add_argument(
        "-d", "--detail-file", help="prefix of per-frame detail files (default: none written)"
    )
    test.add_argument("--head", help="branch of a multi-task model (default: the only one)")
    test.add_argument(
        "--plot",
        nargs="?",
        const="parity.png",
        help="also write parity plots (energy/atom, forces, virial/atom) to this PNG "
        "(default: none; without a file name parity.png); needs matplotlib",
    )


def _add_embed(sub) -> None:
    emb = _command(sub, "embed", "descriptor and fitting features to HDF5 (`dp embed`)", cmd_embed)
    emb.add_argument(
        "-m", "--model", default="model.ckpt.pt", help="checkpoint (.pt) or frozen model (.pt2)"
    )
    source = emb.add_mutually_exclusive_group()
    source.add_argument("-s", "--system", default=".", help=_SYSTEM_HELP)
    source.add_argument(
        "-f", "--datafile", help="file listing system directories, one a line (default: -s)"
    )
    _add_file_arguments(emb)
    emb.add_argument("-o", "--output", default="embedding.hdf5", help="HDF5 file written")
    emb.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp64", "native"],
        help="precision of the stored features (native: the model's own)",
    )
    emb.add_argument(
        "--head", "--model-branch", help="branch of a multi-task model (default: the only one)"
    )
    emb.add_argument("--device", help=f"torch device ({DEFAULT_DEVICE})")


def _add_freeze(sub) -> None:
    frz = _command(
        sub,
        "freeze",
        "compile a checkpoint into a .pt2 for LAMMPS / DeePMD-kit C++ and DeepPot",
        cmd_freeze,
    )
    frz.add_argument("-c", "--checkpoint", default="model.ckpt.pt", help="checkpoint to freeze")
    frz.add_argument(
        "-o", "--output", default="frozen_model", help="output path, written with suffix .pt2"
    )
    frz.add_argument(
        "--head", "--model-branch", help="branch of a multi-task model (default: the only one)"
    )
    frz.add_argument(
        "--no-with-comm",
        dest="with_comm",
        action="store_false",
        help="skip the multi-rank (MPI) package: about half the freeze time, single-rank LAMMPS "
        "only (default: the package is included)",
    )
    frz.add_argument(
        "--device",
        default="cpu",
        help="device the package is compiled for and runs on: cpu (default) or cuda; on cuda, "
        "DP_TRITON_INFER=1 puts the fused Triton rotations into the package",
    )


def _add_neighbor_stat(sub) -> None:
    nstat = _command(
        sub,
        "neighbor-stat",
        "neighbour counts and minimal distance of a dataset",
        cmd_neighbor_stat,
    )
    nstat.add_argument("-s", "--system", default=".", help=_SYSTEM_HELP)
    _add_file_arguments(nstat)
    nstat.add_argument("-r", "--rcut", type=float, default=6.0, help="cutoff radius (Å)")
    nstat.add_argument(
        "-t",
        "--type-map",
        nargs="+",
        help="element names in type order (default: from the systems' type_map.raw)",
    )


def _add_plot(sub) -> None:
    plot = _command(
        sub,
        "plot",
        "learning curves of lcurve.out files as a PNG (needs matplotlib: pip install sezm[plot])",
        cmd_plot,
    )
    plot.add_argument(
        "files",
        nargs="+",
        metavar="lcurve.out",
        help="learning-curve files (DeePMD-kit format), drawn over each other",
    )
    plot.add_argument("-o", "--output", default="lcurve.png", help="PNG file written")
    plot.add_argument("--dpi", type=int, default=150, help="resolution of the PNG")


def _add_model_devi(sub) -> None:
    devi = _command(
        sub,
        "model-devi",
        "deviation of a committee of models on systems, for active learning (`dp model-devi`)",
        cmd_model_devi,
    )
    devi.add_argument(
        "-m",
        "--models",
        nargs="+",
        required=True,
        help="checkpoints (.pt) or frozen models (.pt2) sharing one type_map (no default)",
    )
    devi.add_argument("-s", "--system", default=".", help=_SYSTEM_HELP)
    _add_file_arguments(devi)
    devi.add_argument("-o", "--output", default="model_devi.out", help="deviation table written")
    devi.add_argument(
        "-f",
        "--frequency",
        type=int,
        default=1,
        help="MD steps between frames: the step column is frame index times this",
    )
    devi.add_argument(
        "--relative",
        type=float,
        help="relative force deviation: divide by |mean force| + this level (default: absolute)",
    )
    devi.add_argument(
        "--relative-v",
        "--relative_v",
        type=float,
        help="relative virial deviation: divide by |mean virial|/natoms + this level "
        "(default: absolute)",
    )
    devi.add_argument(
        "--atomic", action="store_true", help="append the force deviation of every atom"
    )


def _add_change_bias(sub) -> None:
    cb = _command(
        sub,
        "change-bias",
        "refit or set the per-type energy bias of a checkpoint (`dp change-bias`)",
        cmd_change_bias,
    )
    cb.add_argument("model", metavar="MODEL.pt", help="training checkpoint to change")
    _add_file_arguments(cb)
    source = cb.add_mutually_exclusive_group()
    source.add_argument("-s", "--system", default=".", help=_SYSTEM_HELP)
    source.add_argument(
        "-f", "--datafile", help="file listing system directories, one a line (default: -s)"
    )
    source.add_argument(
        "-b",
        "--bias-value",
        type=float,
        nargs="+",
        help="bias of each type in the model's type_map order, e.g. -b -93.57 -187.1; energy "
        "models only (default: fitted on the systems)",
    )
    cb.add_argument(
        "-n",
        "--numb-batch",
        type=int,
        default=0,
        help="frames drawn from each system (0 = all)",
    )
    cb.add_argument(
        "-m",
        "--mode",
        default="change",
        choices=["change", "set"],
        help="change: add the least-squares fit of label - prediction to the bias; "
        "set: the least-squares fit of the labels alone",
    )
    cb.add_argument(
        "-o", "--output", help="checkpoint written (default: MODEL_updated.pt next to MODEL.pt)"
    )
    cb.add_argument(
        "--model-branch",
        "--head",
        help="branch of a multi-task checkpoint to change (default: the only one)",
    )
    cb.add_argument("--device", help=f"torch device ({DEFAULT_DEVICE})")


def _show_attribute(name: str) -> str:
    from .infer.show import ATTRIBUTES

    if name not in ATTRIBUTES:
        raise argparse.ArgumentTypeError(
            f"invalid attribute {name!r} (choose from {', '.join(ATTRIBUTES)})"
        )
    return name


def _add_show(sub) -> None:
    from .infer.show import ATTRIBUTES

    show = _command(
        sub,
        "show",
        "settings, size, training steps and versions of a checkpoint or .pt2 (`dp show`)",
        cmd_show,
    )
    show.add_argument("model", metavar="MODEL", help="checkpoint (.pt) or frozen model (.pt2)")
    show.add_argument(
        "attributes",
        nargs="*",
        type=_show_attribute,
        metavar="ATTRIBUTE",
        help="what to show (default: all that apply): "
        + "; ".join(f"{k}: {v}" for k, v in ATTRIBUTES.items()),
    )


def _add_check(sub) -> None:
    chk = _command(
        sub,
        "check",
        "physics self-test of a checkpoint or .pt2 on a structure: symmetries, forces and virial "
        "against finite differences, cutoff smoothness, NVE drift, training distance range "
        "(exit status 1 if a check fails)",
        cmd_check,
    )
    chk.add_argument("model", metavar="MODEL", help="checkpoint (.pt) or frozen model (.pt2)")
    chk.add_argument(
        "-s",
        "--structure",
        help="any file ASE reads, or a DeePMD npy system folder (default: a bundled 192-atom "
        "water frame)",
    )
    chk.add_argument("-f", "--frame", type=int, default=0, help="frame of the structure file")
    other = chk.add_mutually_exclusive_group()
    other.add_argument(
        "--pt2", help="also compare this frozen model with the checkpoint MODEL (default: none)"
    )
    other.add_argument(
        "--checkpoint",
        help="checkpoint a .pt2 MODEL was frozen from: compared with it, and its training "
        "statistics used (default: none)",
    )
    chk.add_argument("--head", help="branch of a multi-task checkpoint (default: the only one)")
    chk.add_argument(
        "--fd-atoms", type=int, default=4, help="atoms whose forces are finite-differenced"
    )
    chk.add_argument(
        "--nve-steps", type=int, default=200, help="velocity-Verlet steps of the NVE run (0: none)"
    )
    chk.add_argument("--nve-dt", type=float, default=0.5, help="NVE time step (fs)")
    chk.add_argument("--temperature", type=float, default=300.0, help="initial NVE temperature (K)")
    chk.add_argument(
        "--seed", type=int, default=0, help="seed of rotations, shifts, atoms and velocities"
    )


def _add_doc_train_input(sub) -> None:
    doc = _command(
        sub,
        "doc-train-input",
        "print the documented input.json schema (`dp doc-train-input`)",
        cmd_doc_train_input,
    )
    doc.add_argument(
        "--out-type",
        default="rst",
        choices=["rst", "json", "json_schema"],
        help="rst: reStructuredText text; json: the schema declarations; json_schema: a JSON "
        "Schema for editors",
    )
    doc.add_argument("--multi-task", action="store_true", help="the schema of a multi-task input")
    doc.set_defaults(log_runtime=False)  # stdout is the document


def _log_runtime(args: argparse.Namespace) -> None:
    """Versions and device as the first log line (once: rank 0 under torchrun)."""
    from .runtime import describe_runtime

    if int(os.environ.get("RANK", "0")) == 0 and getattr(args, "log_runtime", True):
        log.info(describe_runtime(getattr(args, "device", None)))


def main(argv: list[str] | None = None) -> None:
    """Run one command; errors propagate (the console entry point is :func:`run`)."""
    from .cpu_allocator import choice

    args = build_parser().parse_args(argv)
    try:
        choice()  # a misspelt SEZM_CPU_ALLOCATOR stops a command before it starts
    except ValueError as err:
        raise SystemExit(str(err)) from None
    _setup_logging(args.log_level)
    _log_runtime(args)
    _create_output_folder(args)
    args.func(args)


def _create_output_folder(args: argparse.Namespace) -> None:
    """The folder of a command's ``-o/--output`` file, made before the work (not found
    missing after it)."""
    output = getattr(args, "output", None)
    if isinstance(output, str) and output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input, files or environment."""
    from .compat.deepmd import CheckpointError
    from .config.errors import ConfigError
    from .data.frames import InputError
    from .data.system import DataError
    from .infer.freeze import FreezeError
    from .train.faults import TrainingError

    user = (ConfigError, DataError, InputError, CheckpointError, FreezeError, TrainingError)
    return (*user, OSError)


def _out_of_memory(err: BaseException) -> bool:
    from .train.faults import is_out_of_memory

    return is_out_of_memory(err)


def run(argv: list[str] | None = None) -> int:
    """The ``sezm`` command: :func:`main` inside one error boundary.

    An error in the user's input, data, checkpoint or files ends in one ``sezm: error: ...``
    line on stderr and exit status 2; anything else is an internal error, shown with its
    traceback and exit status 1. ``--debug`` (or ``SEZM_DEBUG=1``) shows the traceback of
    every error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("SEZM_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except KeyboardInterrupt as stop:  # Ctrl-C; TrainingStopped: a stop signal, handled
        print(f"sezm: {stop}" if str(stop) else "sezm: interrupted", file=sys.stderr)
        if getattr(stop, "restart_command", None):
            print(f"sezm: to continue: {stop.restart_command}", file=sys.stderr)
        return getattr(stop, "exit_status", 130)
    except SystemExit as stop:  # a command's own message (argparse exits carry a number)
        if not isinstance(stop.code, str):
            raise
        print(f"sezm: error: {stop.code}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _user_errors()) or _out_of_memory(err):
            print(f"sezm: error: {err}", file=sys.stderr)
            print("(run with --debug to see where it happened)", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"sezm: internal error: {type(err).__name__}: {err}\n"
            "This is a bug in sezm: please report it with the traceback above and the command.",
            file=sys.stderr,
        )
        return 1
    return 0


def console() -> None:
    """Entry point of the ``sezm`` script and ``python -m sezm``."""
    raise SystemExit(run())


if __name__ == "__main__":
    console()
