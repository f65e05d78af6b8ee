"""The ``model`` section: the ``dpa4`` scaffold, its fittings and the keys every model shares.

Layout (matching DeePMD-kit 3.2): the keys common to all models come first, then the ``type``
switch, whose only choice here is ``dpa4`` (aliases ``DPA4``, ``SeZM``, ``sezm``). The
multi-task form replaces the body by ``model_dict`` (one such model per branch) and
``shared_dict``.
"""

from __future__ import annotations

from dargs import Argument

from ._fields import NO_EFFECT, choice, maybe, one_of, opt, req, section, tagged
from .schema_descriptor import DESCRIPTOR_ALIASES, dpa4_descriptor

MODEL_ALIASES = DESCRIPTOR_ALIASES

# ---------------------------------------------------------------------------------------------
# fittings


def _fitting_io() -> list[Argument]:
    """Frame/atomic parameters and case embedding, shared by both fittings."""
    return [
        opt("numb_fparam", int, 0, "Width of the frame parameters (`fparam.npy` per system)."),
        opt("numb_aparam", int, 0, "Width of the atomic parameters (`aparam.npy` per system)."),
        opt(
            "default_fparam",
            list[float],
            None,
            "Frame parameters used for systems without `fparam.npy`.",
        ),
        opt(
            "dim_case_embd",
            int,
            0,
            "Width of the case (branch) one-hot embedding; in multi-task training set it to the "
            "number of branches.",
        ),
    ]


_TRAINABLE_DOC = "Whether the fitting is trained; a list counts as true only if all entries are."


def dpa4_ener_fitting() -> Argument:
    """``dpa4_ener`` (alias ``sezm_ener``): the GLU energy fitting."""
    return choice(
        "dpa4_ener",
        [
            *_fitting_io(),
            opt(
                "neuron",
                list[int],
                [0],
                "Hidden widths of the GLU fitting; 0 picks a width from the input size.",
                alias=["n_neuron"],
            ),
            opt("activation_function", str, "silu", "Gate activation of the GLU layers."),
            opt("precision", str, "float32", "Parameter precision of the fitting."),
            opt("resnet_dt", bool, False, "Timestep-scaled skip connections (unused by GLU)."),
            opt("trainable", [list[bool], bool], True, _TRAINABLE_DOC),
            opt(
                "rcond",
                [float, type(None)],
                None,
                "rcond of the least-squares fit of the initial per-type energy bias.",
            ),
            opt("seed", [int, None], None, "Seed of the parameter initialization."),
            opt(
                "atom_ener",
                list[float | None],
                [],
                "Per-type energy of an isolated atom (null: not set).",
            ),
            maybe(
                "layer_name",
                list[str],
                "Per-layer names; equal names share parameters across fittings.",
            ),
            opt(
                "use_aparam_as_mask",
                bool,
                False,
                "Use `aparam` only as an atom mask, not as a fitting input.",
            ),
            opt(
                "case_film_embd",
                bool,
                False,
                "Condition on the case embedding by FiLM instead of concatenating it.",
            ),
        ],
        "Energy fitting network of DPA4 (gated linear units).",
        alias=["sezm_ener"],
    )


def property_fitting() -> Argument:
    """``property``: invariant per-structure property fitting."""
    return choice(
        "property",
        [
            *_fitting_io(),
            opt(
                "neuron",
                list[int],
                [120, 120, 120],
                "Hidden widths of the fitting; with DPA4, 0 picks a width from the input size.",
                alias=["n_neuron"],
            ),
            opt("activation_function", str, "tanh", "Activation of the hidden layers."),
            opt("resnet_dt", bool, True, "Timestep-scaled skip connections."),
            opt("precision", str, "default", "Parameter precision of the fitting."),
            maybe("seed", [int, None], "Seed of the parameter initialization."),
            opt("task_dim", int, 1, "Number of property components."),
            opt("intensive", bool, False, "The property does not scale with system size."),
            opt(
                "distinguish_types",
                bool,
                True,
                "Per-type output statistics (otherwise one for all types).",
            ),
            req("property_name", str, "Label name: the data provide `<property_name>.npy`."),
            opt("trainable", [list[bool], bool], True, _TRAINABLE_DOC),
        ],
        "Invariant property fitting.",
    )


# ---------------------------------------------------------------------------------------------
# optional model blocks


def spin_block() -> Argument:
    """The optional ``model/spin`` block: magnetic types and the spin scheme."""
    return section(
        "spin",
        [
            req(
                "use_spin",
                [list[bool], list[int], list[str]],
                "Magnetic types: one boolean per type, or the magnetic types as indices or "
                "element symbols.",
            ),
            maybe("spin_norm", list[float], NO_EFFECT + "Spin magnitude per type."),
            maybe("virtual_len", list[float], NO_EFFECT + "Virtual-atom distance per type."),
            maybe(
                "virtual_scale",
                [list[float], float],
                "Virtual-atom offset per unit spin (per type, per magnetic type, or one value); "
                "required by `deepspin`, ignored by `native`.",
            ),
            opt(
                "scheme",
                str,
                "deepspin",
                "`native`: spin enters the descriptor as an equivariant input and the magnetic "
                "force is -dE/ds. `deepspin`: virtual atoms at r + s·virtual_scale.",
                check=one_of("native", "deepspin", any_case=True),
            ),
            opt(
                "allow_missing_label",
                bool,
                False,
                "(native scheme) accept systems without `spin.npy`, using zero spins.",
            ),
        ],
        "Magnetic (spin) model settings.",
        optional=True,
    )


def lora_block() -> Argument:
    """The optional ``model/lora`` block: low-rank adapters for fine-tuning."""
    return Argument(
        "lora",
        dict,
        [
            req("rank", int, "Rank of the low-rank adapters on every SO(3)/SO(2) linear layer."),
            opt("alpha", float, None, "Scaling numerator (scale = alpha / rank); null: rank."),
        ],
        optional=True,
        default=None,
        doc="Low-rank adaptation for fine-tuning (single-task only): the equivariant linear "
        "weights are frozen and trained through low-rank adapters.",
    )


def _type_embedding_block() -> Argument:
    return section(
        "type_embedding",
        [
            opt("neuron", list[int], [8], "Hidden widths."),
            opt("activation_function", str, "tanh", "Activation."),
            opt("resnet_dt", bool, False, "Timestep-scaled skip connections."),
            opt("precision", str, "default", "Precision."),
            opt("trainable", bool, True, "Trainable."),
            opt("seed", [int, None], None, "Seed."),
            opt("use_econf_tebd", bool, False, "Electronic-configuration type embedding."),
            opt("use_tebd_bias", bool, False, "Bias in the type embedding."),
        ],
        NO_EFFECT + "Separate type embedding of TensorFlow models.",
        optional=True,
    )


def _modifier_block() -> Argument:
    dipole_charge = choice(
        "dipole_charge",
        [
            req("model_name", str, "Frozen dipole model."),
            req("model_charge_map", list[float], "Charges of the Wannier centroids."),
            req("sys_charge_map", list[float], "Charges of the real atoms."),
            opt("ewald_beta", float, 0.4, "Ewald splitting parameter (1/Å)."),
            opt("ewald_h", float, 1.0, "Ewald grid spacing (Å)."),
        ],
        "Long-range correction from Wannier centroid charges.",
    )
    return section(
        "modifier",
        [],
        NO_EFFECT + "Output modifier of TensorFlow models.",
        variants=[tagged([dipole_charge], "Modifier type.")],
        optional=True,
    )


def _compress_block() -> Argument:
    se_e2_a = choice(
        "se_e2_a",
        [
            req("model_file", str, "Model to compress."),
            req("table_config", list[float], "Tabulation settings."),
            req("min_nbor_dist", float, "Smallest neighbour distance."),
        ],
        "Compression of se_e2_a models.",
        alias=["se_a"],
    )
    return section(
        "compress",
        [],
        NO_EFFECT + "Compression settings of TensorFlow models.",
        variants=[tagged([se_e2_a], "Compression type.", default="se_e2_a")],
        optional=True,
    )


def common_model_fields() -> list[Argument]:
    """Keys every DeePMD-kit model accepts, in upstream order."""
    return [
        maybe(
            "type_map",
            list[str],
            'Element name of each atom type, e.g. ["O", "H"].',
            check=((lambda x: len(set(x)) == len(x)), "names an element twice; one name per type"),
        ),
        opt(
            "data_stat_nbatch",
            int,
            10,
            "Frames per system used for the input/output statistics.",
        ),
        opt("data_stat_protect", float, 1e-2, "Floor protecting the statistics of rare types."),
        opt(
            "data_bias_nsample",
            int,
            10,
            "Samples per system used when the energy bias is changed (fine-tuning).",
        ),
        maybe("use_srtab", str, NO_EFFECT + "Short-range pair table file."),
        maybe("smin_alpha", float, NO_EFFECT + "Softmin decay of the pair-table switch."),
        maybe("sw_rmin", float, NO_EFFECT + "Inner radius of the pair-table switch."),
        maybe("sw_rmax", float, NO_EFFECT + "Outer radius of the pair-table switch."),
        opt(
            "pair_exclude_types",
            list,
            [],
            "Type pairs that are not neighbours of each other, e.g. [[0, 1]].",
        ),
        opt("atom_exclude_types", list, [], "Types whose atomic contribution is dropped."),
        opt(
            "preset_out_bias",
            dict[str, list[float | list[float] | None]],
            None,
            'Fixed output bias per type, e.g. {"energy": [null, 0.0]} (null: fitted).',
        ),
        opt("srtab_add_bias", bool, True, NO_EFFECT + "Add the energy bias to the pair table."),
        _type_embedding_block(),
        _modifier_block(),
        _compress_block(),
        spin_block(),
        maybe(
            "finetune_head",
            str,
            "Branch of a multi-task model to fine-tune from ('RANDOM' or unset: a fresh fitting).",
        ),
    ]


def dpa4_model() -> Argument:
    """The ``dpa4`` choice of ``model/type``."""
    return choice(
        "dpa4",
        [
            section(
                "descriptor",
                [],
                "The SeZM descriptor.",
                variants=[tagged([dpa4_descriptor()], "Descriptor type.", default="dpa4")],
            ),
            section(
                "fitting_net",
                [],
                "Fitting network; when omitted, `dpa4_ener` with its defaults.",
                variants=[
                    tagged(
                        [dpa4_ener_fitting(), property_fitting()],
                        "Fitting type.",
                        default="dpa4_ener",
                    )
                ],
                optional=True,
            ),
            opt(
                "use_compile",
                bool,
                False,
                "Compile the training forward/backward graph (experimental).",
            ),
            opt("enable_tf32", bool, True, "TF32 matrix products in CUDA training forwards."),
            opt("model_branch_alias", list[str], [], "Other names of this multi-task branch."),
            opt("info", dict, {}, "Free-form metadata of this branch."),
            opt(
                "bridging_method",
                str,
                "None",
                "Short-range bridging: 'ZBL' (any case) adds the ZBL repulsion and freezes the "
                "learned descriptor below `bridging_r_inner`; 'None' (or '') disables it.",
                check=one_of("ZBL", "None", "", any_case=True),
            ),
            opt(
                "bridging_r_inner",
                float,
                0.5,
                "Radius (Å) below which descriptor distances are frozen; use the same value for "
                "`training/training_data/min_pair_dist`.",
            ),
            opt(
                "bridging_r_outer",
                float,
                0.8,
                "End (Å) of the C³ transition that starts at `bridging_r_inner`.",
            ),
            lora_block(),
        ],
        "DPA4 (SeZM) model: SeZM descriptor plus an energy or property fitting.",
        alias=MODEL_ALIASES,
    )


def model_section(name: str = "model") -> Argument:
    """Single-task ``model``. A missing ``type`` means ``dpa4``."""
    return section(
        name,
        common_model_fields(),
        "The model.",
        variants=[tagged([dpa4_model()], "Model type.", default="dpa4")],
    )


def multitask_model_section() -> Argument:
    """Multi-task ``model``: ``model_dict`` branches plus the ``shared_dict`` they refer to."""
    branches = model_section("model_dict")
    branches.set_repeat(True)
    branches.doc = "One model per branch, keyed by branch name."
    return section(
        "model",
        [
            branches,
            opt(
                "shared_dict",
                dict,
                {},
                "Named type maps, descriptors and fittings that branches refer to by name "
                "(`name` or `name:level`).",
            ),
        ],
        "Multi-task model.",
    )
