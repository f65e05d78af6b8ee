"""Everything in an input file besides ``model``: learning rate, optimizer, loss, training and
validating, with DeePMD-kit 3.2 names, aliases, types and defaults (PyTorch backend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dargs import Argument

from ._fields import NO_EFFECT, at_least, choice, maybe, one_of, opt, req, section, tagged
from .schema_model import model_section, multitask_model_section

# ---------------------------------------------------------------------------------------------
# learning rate


def learning_rate_section() -> Argument:
    """The ``learning_rate`` section: start/stop rates and warm-up, then the schedule (``exp``,
    ``cosine``, ``wsd``) by ``type``."""
    common = [
        req("start_lr", float, "Learning rate after the warm-up."),
        opt("stop_lr", float, None, "Final learning rate. Exclusive with `stop_lr_ratio`."),
        opt(
            "stop_lr_ratio",
            float,
            None,
            "Final learning rate as a fraction of `start_lr`. Exclusive with `stop_lr`; when "
            "neither is given, `stop_lr` is 5e-8.",
        ),
        opt(
            "warmup_steps",
            int,
            0,
            "Linear warm-up steps from `warmup_start_factor·start_lr`. Exclusive with "
            "`warmup_ratio`.",
        ),
        opt("warmup_ratio", float, None, "Warm-up length as a fraction of the training steps."),
        opt("warmup_start_factor", float, 0.0, "Warm-up starts at this fraction of `start_lr`."),
        opt(
            "scale_by_worker",
            str,
            "linear",
            "How the rate scales with the number of workers: linear, sqrt or none.",
        ),
    ]
    schedules = [
        choice(
            "exp",
            [
                opt("decay_steps", int, 5000, "Steps between exponential decays."),
                opt(
                    "decay_rate",
                    float,
                    None,
                    "Decay factor per `decay_steps`; null derives it from `start_lr` and "
                    "`stop_lr`.",
                ),
                opt("smooth", bool, False, "Decay continuously instead of in steps."),
            ],
            "Exponential decay.",
        ),
        choice("cosine", [], "Cosine annealing from `start_lr` to `stop_lr`."),
        choice(
            "wsd",
            [
                opt(
                    "decay_phase_ratio",
                    float,
                    0.1,
                    "Fraction of the training spent decaying; the rest after warm-up is stable.",
                ),
                opt(
                    "decay_type",
                    str,
                    "inverse_linear",
                    "Decay rule: inverse_linear, cosine or linear.",
                ),
            ],
            "Warm-up, stable, decay.",
        ),
    ]
    return section(
        "learning_rate",
        common,
        "Learning-rate schedule.",
        variants=[tagged(schedules, "Schedule type.", default="exp")],
        optional=True,
    )


# ---------------------------------------------------------------------------------------------
# optimizer


def _adam_like(beta2: float, weight_decay: float) -> list[Argument]:
    return [
        opt("adam_beta1", float, 0.9, "First-moment decay."),
        opt("adam_beta2", float, beta2, "Second-moment decay."),
        opt("weight_decay", float, weight_decay, "Weight decay."),
    ]


def _muon_common(lr_adjust: float, lr_adjust_coeff: float) -> list[Argument]:
    return [
        opt(
            "momentum",
            float,
            0.95,
            "Momentum of the Muon (matrix) updates.",
            alias=["muon_momentum"],
        ),
        *_adam_like(0.95, 0.001),
        opt(
            "lr_adjust",
            float,
            lr_adjust,
            "<= 0: match-RMS scaling of Muon updates and Adam at the plain rate; > 0: "
            "rectangular scaling and Adam at rate / lr_adjust.",
        ),
        opt("lr_adjust_coeff", float, lr_adjust_coeff, "Coefficient of match-RMS scaling."),
    ]


def optimizer_section() -> Argument:
    """The ``optimizer`` section: Adam, AdamW, LKF, AdaMuon or HybridMuon by ``type``."""
    kinds = [
        choice("Adam", _adam_like(0.999, 0.0), "Adam (weight decay as an L2 gradient term)."),
        choice("AdamW", _adam_like(0.999, 0.001), "AdamW (decoupled weight decay)."),
        choice(
            "LKF",
            [
                opt("kf_blocksize", int, 5120, "Block size of the Kalman filter."),
                opt("kf_start_pref_e", float, 1.0, "Initial energy prefactor."),
                opt("kf_limit_pref_e", float, 1.0, "Final energy prefactor."),
                opt("kf_start_pref_f", float, 1.0, "Initial force prefactor."),
                opt("kf_limit_pref_f", float, 1.0, "Final force prefactor."),
            ],
            "Layer-wise extended Kalman filter.",
        ),
        choice("AdaMuon", _muon_common(10.0, 0.2), "AdaMuon."),
        choice(
            "HybridMuon",
            [
                *_muon_common(0.0, 0.18),
                opt(
                    "muon_mode",
                    str,
                    "slice",
                    "Which parameters take Muon updates: `2d` (matrices only), `flat` "
                    "(higher ranks flattened to matrices) or `slice` (per trailing 2-D slice).",
                ),
                opt("enable_gram", bool, True, "Gram Newton-Schulz for rectangular matrices."),
                opt("flash_muon", bool, True, "Triton Newton-Schulz kernel when available."),
                opt("magma_muon", bool, True, "Alignment-based damping of Muon updates."),
            ],
            "Muon for matrices, Adam for vectors, biases and `adam_`-named parameters.",
        ),
    ]
    return section(
        "optimizer",
        [],
        "Optimizer.",
        variants=[tagged(kinds, "Optimizer type.", default="Adam")],
        optional=True,
    )


# ---------------------------------------------------------------------------------------------
# loss

_NUM = [float, int]


def _prefs(item: str, start: float, limit: float, what: str) -> list[Argument]:
    return [
        opt(f"start_pref_{item}", _NUM, start, f"Initial prefactor of the {what} loss."),
        opt(f"limit_pref_{item}", _NUM, limit, f"Final prefactor of the {what} loss."),
    ]


_RELATIVE_F = "Use force errors relative to |F_label| + relative_f."
_ATOM_ENER_COEFF = "Energy is sum_i c_i E_i with c_i from `atom_ener_coeff.npy`."
_INTENSIVE = "Normalize MSE energy/virial terms by 1/N² instead of 1/N."


def _ener_loss() -> Argument:
    return choice(
        "ener",
        [
            *_prefs("e", 0.02, 1.0, "energy"),
            *_prefs("f", 1000, 1.0, "force"),
            *_prefs("v", 0.0, 0.0, "virial"),
            *_prefs("h", 0.0, 0.0, "Hessian"),
            *_prefs("ae", 0.0, 0.0, "atomic energy"),
            *_prefs("pf", 0.0, 0.0, "atom-weighted force"),
            opt("use_default_pf", bool, False, "Weight 1 for atoms without `atom_pref.npy`."),
            maybe("relative_f", [float, None], _RELATIVE_F),
            opt("enable_atom_ener_coeff", [bool], False, _ATOM_ENER_COEFF),
            opt("start_pref_gf", float, 0.0, "Initial prefactor of the generalized-force loss."),
            opt("limit_pref_gf", float, 0.0, "Final prefactor of the generalized-force loss."),
            opt("numb_generalized_coord", int, 0, "Number of generalized coordinates."),
            opt("use_huber", bool, False, "Huber loss on energy, force and virial."),
            opt("loss_func", str, "mse", "`mse` or `mae`."),
            opt(
                "f_use_norm",
                bool,
                False,
                "With mae or Huber: use the per-atom norm of the force error vector.",
            ),
            opt(
                "huber_delta",
                [float, list[float]],
                0.01,
                "Huber threshold, one value or [energy, force, virial].",
            ),
            opt("intensive_ener_virial", bool, False, _INTENSIVE),
        ],
        "Energy, force and virial loss.",
        alias=["ener_hess"],
    )


def _dens_loss() -> Argument:
    return choice(
        "dens",
        [
            *_prefs("e", 0.02, 1.0, "energy"),
            *_prefs("f", 1000, 1.0, "force"),
            opt("loss_func", str, "mae", "`mae` (force-vector norms) or `mse` (components)."),
            opt("dens_prob", _NUM, 0.5, "Probability that a batch takes the denoising path."),
            opt("dens_fixed_noise_std", bool, True, "Fixed noise width (the only mode)."),
            opt("dens_std", _NUM, 0.025, "Standard deviation of the coordinate noise (Å)."),
            opt(
                "dens_corrupt_ratio",
                [float, int, None],
                0.5,
                "Fraction of atoms corrupted in a denoising batch (null: all).",
            ),
            opt(
                "dens_denoising_pos_coefficient",
                _NUM,
                10.0,
                "Loss weight of corrupted atoms, whose target is their noise vector.",
            ),
        ],
        "Energy plus direct-force / denoising loss (DPA4 only).",
    )


def _ener_spin_loss() -> Argument:
    return choice(
        "ener_spin",
        [
            *_prefs("e", 0.02, 1.0, "energy"),
            *_prefs("fr", 1000, 1.0, "real-atom force"),
            *_prefs("fm", 10000, 10.0, "magnetic force"),
            *_prefs("v", 0.0, 0.0, "virial"),
            *_prefs("ae", 0.0, 0.0, "atomic energy"),
            *_prefs("pf", 0.0, 0.0, "atom-weighted force"),
            maybe("relative_f", [float, None], _RELATIVE_F),
            opt("enable_atom_ener_coeff", [bool], False, _ATOM_ENER_COEFF),
            opt("loss_func", str, "mse", "`mse` or `mae`."),
            opt("intensive_ener_virial", bool, False, _INTENSIVE),
        ],
        "Energy, real-atom force, magnetic force and virial loss.",
    )


def _property_loss() -> Argument:
    return choice(
        "property",
        [
            opt("loss_func", str, "smooth_mae", "Loss function, e.g. `mae`, `smooth_mae`."),
            opt("metric", list, ["mae"], "Displayed metrics: smooth_mae, mae, mse, rmse."),
            opt("beta", _NUM, 1.0, "`beta` of the smooth-MAE loss."),
        ],
        "Property loss.",
    )


def loss_section(name: str = "loss") -> Argument:
    """The loss section ``name`` (``loss``, or ``loss_dict`` of a multi-task input): ``ener``,
    ``dens``, ``ener_spin`` or ``property`` by ``type``."""
    kinds = [_ener_loss(), _dens_loss(), _ener_spin_loss(), _property_loss()]
    return section(
        name,
        [],
        "Loss function.",
        variants=[tagged(kinds, "Loss type.", default="ener")],
        optional=True,
    )


def _loss_dict() -> Argument:
    losses = loss_section("loss_dict")
    losses.set_repeat(True)
    losses.doc = "Loss of each branch, keyed by branch name."
    return losses


# ---------------------------------------------------------------------------------------------
# training

_SYSTEMS = (
    "DeePMD npy system folders, folders searched recursively for them, or files that ASE reads "
    "(`.xyz`/`.extxyz`, ASE `.traj`, VASP `OUTCAR`, ...; frames grouped into one system per atom "
    "count and boundary condition; a folder search finds npy systems only)."
)
_FILE_FORMAT = (
    '[sezm only] ASE format name of the files in `systems` (e.g. "extxyz", "vasp-out", '
    '"lammps-dump-text"); by default ASE tells it from each file\'s name and contents. '
    "Folders are always npy systems."
)
_LABEL_KEYS = (
    "[sezm only] Where files read with ASE keep the labels: sezm label -> name in the "
    "calculator results, `atoms.info` or `atoms.arrays`, e.g. "
    '{"energy": "REF_energy", "force": "REF_forces", "stress": "REF_stress"}. Defaults: '
    "energy -> energy (eV), force -> forces (eV/Å), virial -> virial (eV, 9 values), "
    "stress -> stress (eV/Å^3, used when there is no virial, as virial = -stress * volume), "
    "atom_ener -> energies; other inputs and labels (fparam, aparam, ...) by their own name."
)
SEZM_ONLY_DATA_KEYS = ("file_format", "label_keys")
"""Keys of `training_data` / `validation_data` that DeePMD-kit does not have."""


def _names_to_names(value: Any) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())


_BATCH_SIZE = (
    'Frames per batch: an int, one int per system, "auto" / "auto:N" (at least N atoms, '
    'default 32), "max:N", "filter:N", "mixed:N" or "mix:N".'
)
_AUTO_PROB = (
    'System sampling: "prob_uniform", "prob_sys_size" or '
    '"prob_sys_size;start:end:weight;..." (weights per block of systems).'
)


def _dataset_fields() -> list[Argument]:
    return [
        req("systems", [list[str], str], _SYSTEMS),
        opt("rglob_patterns", [list[str]], None, "Glob patterns used when searching systems."),
        opt("batch_size", [list[int], int, str], "auto", _BATCH_SIZE),
        opt("auto_prob", str, "prob_sys_size", _AUTO_PROB, alias=["auto_prob_style"]),
        opt(
            "sys_probs",
            list[float],
            None,
            "Explicit sampling probability per system (overrides `auto_prob`).",
            alias=["sys_weights"],
        ),
    ]


def _file_fields() -> list[Argument]:
    """How files in `systems` are read with ASE (sezm only; declared last in each section)."""
    return [
        maybe("file_format", str, _FILE_FORMAT),
        maybe(
            "label_keys",
            dict,
            _LABEL_KEYS,
            check=(_names_to_names, "must map label names to non-empty names (strings)"),
        ),
    ]


def _data_fields() -> list[Argument]:
    training_data = section(
        "training_data",
        [
            *_dataset_fields(),
            opt(
                "min_pair_dist",
                float,
                0.0,
                "Skip frames with an atom pair closer than this (Å); 0 disables.",
            ),
            *_file_fields(),
        ],
        "Training data.",
        optional=True,
    )
    validation_data = section(
        "validation_data",
        [
            *_dataset_fields(),
            opt(
                "numb_btch",
                int,
                1,
                "Batches drawn per validation.",
                alias=["numb_batch"],
            ),
            *_file_fields(),
        ],
        "Validation data.",
        optional=True,
        default=None,
    )
    return [
        training_data,
        validation_data,
        maybe("stat_file", str, "File (.h5/.hdf5) or directory caching the data statistics."),
        opt(
            "stat_file_mode",
            str,
            "update",
            "`update`: create or complete the cache; `read`: require a complete cache, read-only.",
            check=one_of("read", "update"),
        ),
    ]


def _between(lo: float, hi: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda x: x is None or lo < x < hi), f"must lie strictly between {lo} and {hi}"


def _run_fields() -> list[Argument]:
    mixed_precision = section(
        "mixed_precision",
        [
            opt("output_prec", str, "float32", "Precision of the trainable variables."),
            req("compute_prec", str, "Compute precision."),
        ],
        NO_EFFECT + "Mixed precision of TensorFlow training.",
        optional=True,
    )
    return [
        mixed_precision,
        maybe(
            "numb_steps",
            int,
            "Training steps. Exclusive with `numb_epoch`.",
            alias=["stop_batch", "num_step", "num_steps", "numb_step"],
            check=at_least(0),
        ),
        maybe(
            "numb_epoch",
            [int, float],
            "Expected epochs (single-task); converted to steps from the number of batches.",
            alias=["num_epochs", "num_epoch", "numb_epochs"],
            check=((lambda x: x > 0), "must be > 0"),
        ),
        maybe("seed", [int, None], "Seed of the data sampling."),
        opt("disp_file", str, "lcurve.out", "Learning-curve file."),
        opt("disp_freq", int, 1000, "Steps between learning-curve lines.", check=at_least(1)),
        opt("save_freq", int, 1000, "Steps between checkpoints."),
        opt("save_dir", [str, None], None, "Directory of the periodic checkpoints."),
        opt("save_ckpt", str, "model.ckpt", "Checkpoint path prefix."),
        opt("max_ckpt_keep", int, 5, "Periodic checkpoints kept."),
        opt(
            "ckpt_keep_ratio",
            [float, None],
            None,
            "Keep this fraction of all periodic checkpoints (overrides the keep counts).",
            check=_between(0.0, 1.0),
        ),
        opt("enable_ema", bool, False, "Keep an exponential moving average of the weights."),
        opt(
            "ema_decay",
            float,
            0.999,
            "EMA decay: ema = decay·ema + (1 - decay)·param.",
            check=((lambda x: 0.0 <= x < 1.0), "must be >= 0 and < 1"),
        ),
        opt(
            "ema_ckpt_keep",
            [int, None],
            None,
            "EMA checkpoints kept (null: `max_ckpt_keep`).",
            check=((lambda x: x is None or x > 0), "must be > 0"),
        ),
        opt(
            "change_bias_after_training",
            bool,
            False,
            "Refit the output bias on the training data after the last step.",
        ),
        opt("disp_training", bool, True, "Print training progress."),
        opt("time_training", bool, True, "Print timings."),
        opt("disp_avg", bool, False, "Report training losses averaged over the interval."),
        opt("profiling", bool, False, "Write a Chrome trace of the training."),
        opt("profiling_file", str, "timeline.json", "Chrome trace file."),
        opt("enable_profiler", bool, False, "Write profiler data to `tensorboard_log_dir`."),
        opt("tensorboard", bool, False, "Write TensorBoard events."),
        opt("tensorboard_log_dir", str, "log", "TensorBoard directory."),
        opt("tensorboard_freq", int, 1, "Steps between TensorBoard events.", check=at_least(1)),
        maybe("gradient_max_norm", float, "Clip the gradient norm to this value (0: no clip)."),
        opt("acc_freq", int, 1, NO_EFFECT + "Gradient accumulation steps (Paddle)."),
        opt(
            "zero_stage",
            int,
            0,
            "Distributed memory sharding: 0 DDP, 1 sharded optimizer state, 2 also gradients, "
            "3 also parameters.",
        ),
        opt(
            "neighbor_graph_method",
            str,
            "auto",
            NO_EFFECT + "Neighbour-graph builder of the exportable backend.",
            check=one_of("auto", "dense", "nv"),
        ),
        opt("enable_compile", bool, False, NO_EFFECT + "Compiler switch of other backends."),
        opt(
            "enable_tf32",
            bool,
            False,
            NO_EFFECT + "TF32 switch of other backends (see `model/enable_tf32`).",
        ),
    ]


def training_section(multi_task: bool = False) -> Argument:
    """The ``training`` section: its data (per branch in ``data_dict`` when ``multi_task``), then
    steps, seeds, display, checkpoints and other run settings."""
    if multi_task:
        data = [
            opt("model_prob", dict, {}, "Sampling probability of each branch."),
            opt(
                "num_epoch_dict",
                dict,
                {},
                "Epochs per branch; derives the branch probabilities and the total steps.",
            ),
            section("data_dict", _data_fields(), "Data of each branch.", repeat=True),
        ]
    else:
        data = _data_fields()
    return section("training", [*data, *_run_fields()], "Training run.")


# ---------------------------------------------------------------------------------------------
# validating

_METRIC_FAMILIES = {
    "energy": ("e", "f", "s", "v"),
    "spin": ("e", "fr", "fm", "s", "v"),
}
# the loss prefactor pair that must be non-zero for each metric family
METRIC_PREFACTOR = {"e": "e", "f": "f", "fr": "fr", "fm": "fm", "s": "v", "v": "v"}


def validation_metrics(profile: str) -> tuple[str, ...]:
    """Accepted (lower-case) `validation_metric` values for the `energy` or `spin` profile."""
    return tuple(f"{fam}:{kind}" for fam in _METRIC_FAMILIES[profile] for kind in ("mae", "rmse"))


_ALL_METRICS = frozenset(validation_metrics("energy") + validation_metrics("spin"))


def validating_section() -> Argument:
    """The ``validating`` section: periodic validation on the whole validation set, its metric,
    the best checkpoints it keeps, its output file and how it is evaluated."""
    return section(
        "validating",
        [
            opt(
                "full_validation",
                bool,
                False,
                "Periodically evaluate the whole validation set (single-task energy or spin).",
            ),
            opt(
                "ema_full_validation",
                bool,
                False,
                "Run the full validation on the EMA weights (needs `training/enable_ema`).",
            ),
            opt("validation_freq", int, 5000, "Steps between full validations.", check=at_least(1)),
            opt("save_best", bool, True, "Save a checkpoint when the metric improves."),
            opt("save_best_dir", [str, None], None, "Directory of the best checkpoints."),
            opt("max_best_ckpt", int, 1, "Best checkpoints kept.", check=at_least(1)),
            opt(
                "validation_metric",
                str,
                "E:MAE",
                "Metric ranking checkpoints, case-insensitive `<E|F|S|V|FR|FM>:<MAE|RMSE>`; its "
                "loss prefactors must be non-zero.",
                check=(
                    (lambda x: x.strip().lower() in _ALL_METRICS),
                    "must be one of " + ", ".join(sorted(m.upper() for m in _ALL_METRICS)),
                ),
            ),
            opt("full_val_file", str, "val.log", "Full-validation log."),
            opt(
                "full_val_start",
                [int, float],
                0.5,
                "First full validation: 0 at once, a value in (0, 1) a fraction of the steps, "
                "1 never, larger values a step number.",
                check=at_least(0),
            ),
            opt("compiled_infer", bool, False, "Compile evaluation forwards (DP_COMPILE_INFER)."),
            opt("tf32_infer", bool, False, "TF32 in evaluation forwards (DP_TF32_INFER)."),
            opt("amp_infer", bool, False, "bfloat16 autocast in evaluation (DP_AMP_INFER)."),
        ],
        "Full-validation and evaluation settings.",
        optional=True,
        default={},
    )


# ---------------------------------------------------------------------------------------------
# whole input


def input_schema(multi_task: bool = False) -> Argument:
    """The whole input file (a root argument; its value is the input dict)."""
    if multi_task:
        parts = [
            multitask_model_section(),
            learning_rate_section(),
            optimizer_section(),
            _loss_dict(),
            training_section(multi_task=True),
            validating_section(),
        ]
    else:
        parts = [
            model_section(),
            learning_rate_section(),
            optimizer_section(),
            loss_section(),
            training_section(),
            validating_section(),
        ]
    return section("input", parts, "A sezm (DeePMD-kit compatible) input file.")
