"""Options of the ``dpa4`` descriptor (aliases ``DPA4``, ``SeZM``, ``sezm``).

Names, types, defaults and declaration order follow DeePMD-kit 3.2 exactly, so a normalized
descriptor section is key-for-key what upstream stores in its checkpoints. The order below is
also the order in which defaults appear in the normalized dict.
"""

from __future__ import annotations

from dargs import Argument

from ._fields import at_least, choice, flag_list, one_of, opt

DESCRIPTOR_ALIASES = ("DPA4", "SeZM", "sezm")

_ATTN_RES = one_of("none", "independent", "dependent")


def _grid_branch_ok(x: object) -> bool:
    def count(v: object) -> bool:
        return isinstance(v, int) and v >= 0

    return count(x) or (isinstance(x, list) and len(x) == 3 and all(count(v) for v in x))


def _length(n: int, what: str) -> tuple:
    """Value check: a list of exactly ``n`` entries."""
    return (lambda x: len(x) == n), f"must be a list of {n}: {what}"


def _null_or(check: tuple, what: str) -> tuple:
    """``check`` for a value that may also be null."""
    test = check[0]
    return (lambda x: x is None or test(x)), f"must be null or {what}"


_NON_NEGATIVE_LIST = ((lambda x: all(v >= 0 for v in x)), "entries must be >= 0")


_NEIGHBORS = [
    opt(
        "sel",
        [int, list[int], str],
        256,
        "Neighbour capacity. On the energy path it is only the initial capacity of the "
        "neighbour search, which grows on demand and never drops neighbours inside `rcut`; the "
        "`dens` and virtual-spin paths truncate the list at `sum(sel)`. A list gives per-type "
        'capacities (only the sum is used); "auto" or "auto:<factor>" sizes it from neighbour '
        "statistics of the training data.",
    ),
    opt("rcut", float, 6.0, "Cutoff radius (Å)."),
    opt(
        "env_exp",
        list[int],
        [7, 5],
        "Exponents `[rbf, edge]` of the C³ cutoff envelopes applied to the radial basis and to the "
        "message weights. Larger exponents suppress less.",
        check=_length(2, "[rbf, edge]"),
    ),
]

_WIDTH_AND_RADIAL = [
    opt("channels", int, 64, "Channels per (l, m) coefficient; also the descriptor width."),
    opt(
        "basis_type",
        str,
        "bessel",
        "Radial basis: `bessel` or `gaussian` (any case).",
        check=((lambda x: x.lower() in ("bessel", "gaussian")), "must be 'bessel' or 'gaussian'"),
    ),
    opt("n_radial", int, 16, "Number of radial basis functions."),
    opt(
        "radial_mlp",
        list[int],
        [0],
        "Hidden widths of the radial network (0 stands for `channels`). The output layer, sized "
        "for the initial node degree, is appended automatically.",
    ),
    opt(
        "edge_norm",
        bool,
        True,
        "RMS-normalize the branches that vanish at the cutoff (radial network, environment FiLM, "
        "cross-focus scalars). `false` (recommended) drops these norms and uses a unit floor in "
        "the post-SO(2) message scaling.",
    ),
]

_INITIAL_STATE = [
    opt(
        "use_env_seed",
        bool,
        True,
        "Seed the initial node state from the local environment: FiLM of the l=0 features from "
        "the environment matrix, plus a geometric embedding of the l>0 features. Its internal "
        "sizes derive from `channels`.",
    ),
    opt(
        "random_gamma",
        bool,
        True,
        "During training, rotate each edge frame by a random angle about its axis before "
        "building Wigner-D matrices (fresh per edge and per call).",
    ),
]

_CARTESIAN = [
    opt(
        "edge_cartesian",
        bool,
        False,
        "Blocks of message degree 1 or 2 replace the edge-frame SO(2) product by the equivalent "
        "global-frame Cartesian rank-2 product (no per-edge Wigner-D rotations).",
    ),
    opt(
        "node_cartesian",
        [str, int],
        "none",
        "Per-node Cartesian rank-2 product of the aggregated message with the node, in blocks of "
        'message degree 1 or 2: "<default|parity>:<layers>", an int N meaning "default:N", or '
        '"none" / 0.',
    ),
]

_DEGREES_AND_DEPTH = [
    opt(
        "lmax",
        int,
        3,
        "Maximum degree l of every block (ignored when `l_schedule` is set).",
        check=at_least(0),
    ),
    opt(
        "l_schedule",
        list[int],
        None,
        "Per-block maximum degree, non-increasing, e.g. [3, 3, 2]; overrides `lmax` and "
        "`n_blocks`.",
        check=_null_or(_NON_NEGATIVE_LIST, "a list of non-negative degrees"),
    ),
    opt(
        "mmax",
        [int, None],
        1,
        "Maximum order |m| kept in the SO(2) convolution (null: the block's lmax); ignored when "
        "`m_schedule` is set.",
        check=_null_or(at_least(0), ">= 0"),
    ),
    opt(
        "kmax",
        int,
        1,
        "Frame order of the SO(3) grid networks (frames 0, ±1, ..., ±kmax).",
        check=at_least(0),
    ),
    opt(
        "m_schedule",
        list[int],
        None,
        "Per-block |m| limit, same length as `l_schedule`, `m_schedule[i] <= l_schedule[i]`.",
        check=_null_or(_NON_NEGATIVE_LIST, "a list of non-negative orders"),
    ),
    opt(
        "extra_node_l",
        int,
        0,
        "Node features carry degree `l + extra_node_l` while messages use degree l.",
        check=at_least(0),
    ),
    opt(
        "n_blocks",
        int,
        3,
        "Number of interaction blocks (ignored when `l_schedule` is set). 0 builds the "
        "block-free descriptor (embeddings then read-out).",
        check=at_least(0),
    ),
]

_SO2_CONVOLUTION = [
    opt("so2_norm", bool, False, "Equivariant RMS norm between consecutive SO(2) mixing layers."),
    opt(
        "mixing_layers",
        int,
        4,
        "SO(2) mixing layers per block; 0 keeps only the radial modulation of the message.",
        alias=["so2_layers"],
        check=at_least(0),
    ),
    opt(
        "so2_attn_res",
        str,
        "none",
        "Depth attention residual over the SO(2) layers of a block: none, independent, dependent.",
        check=_ATTN_RES,
    ),
    opt(
        "radial_so2_mode",
        str,
        "degree_channel",
        "Radial conditioning inside the SO(2) convolution: `none` (elementwise), `degree` "
        "(radius-dependent mixing across degrees, shared by channels) or `degree_channel` (per "
        "channel).",
        check=one_of("none", "degree", "degree_channel"),
    ),
    opt(
        "radial_so2_rank",
        int,
        1,
        "Low-rank channel factorization of `degree_channel` mixing; 0 means full rank.",
        check=at_least(0),
    ),
    opt(
        "n_focus",
        int,
        1,
        "Parallel focus streams inside the SO(2) convolution.",
        check=at_least(1),
    ),
    opt(
        "focus_dim",
        int,
        0,
        "Width of each focus stream (0: `channels`).",
        check=at_least(0),
    ),
]

_ATTENTION = [
    opt(
        "n_atten_head",
        int,
        1,
        "Attention heads of the message aggregation; 0 aggregates by an envelope-weighted sum. "
        "Must divide the attention width (`focus_dim`, times `n_focus` with `atten_f_mix`).",
        check=at_least(0),
    ),
    opt("atten_f_mix", bool, False, "Attend over all focus streams merged into one stream."),
    opt("atten_v_proj", bool, False, "Degree-aware value projection inside the attention."),
    opt("atten_o_proj", bool, False, "Degree-aware output projection after the head gate."),
]

_FFN = [
    opt(
        "ffn_neurons",
        int,
        0,
        "Hidden width of the block FFNs and the scalar output FFN; 0 picks 4·channels (8/3 with "
        "GLU) rounded up to a multiple of 32, per path.",
        check=at_least(0),
    ),
    opt(
        "grid_mlp",
        [bool, list[bool]],
        False,
        "Use the point-wise polynomial grid MLP on the grid paths `[node_wise, message_node, "
        "ffn]` (one boolean for all).",
        check=flag_list(3, "[node_wise, message_node, ffn]"),
    ),
    opt(
        "grid_branch",
        [int, list[int]],
        0,
        "Number of scalar-routed quadratic branches per grid path `[node_wise, message_node, "
        "ffn]` (one int for all); positive values take precedence over `grid_mlp`.",
        check=(
            _grid_branch_ok,
            "must be a non-negative int or a list of three non-negative ints",
        ),
    ),
    opt("ffn_blocks", int, 1, "FFN sub-layers per interaction block.", check=at_least(1)),
]

_NORMS_AND_RESIDUALS = [
    opt(
        "sandwich_norm",
        list[bool],
        [False, True, True, False],
        "Norm switches `[so2_pre, so2_post, ffn_pre, ffn_post]` around the residual branches.",
        check=_length(4, "[so2_pre, so2_post, ffn_pre, ffn_post]"),
    ),
    opt(
        "mlp_bias",
        bool,
        False,
        "Biases in the equivariant layers (l=0 only), gates, depth-attention queries and the "
        "environment-seed MLPs.",
    ),
    opt(
        "layer_scale",
        bool,
        False,
        "Learnable residual scales (initialized to 1e-3) on every SO(2) and FFN branch.",
    ),
    opt(
        "full_attn_res",
        str,
        "none",
        "Descriptor-level attention residual over every unit output: none, independent, "
        "dependent. Exclusive with `block_attn_res`.",
        check=_ATTN_RES,
    ),
    opt(
        "block_attn_res",
        str,
        "none",
        "Descriptor-level attention residual over block summaries: none, independent, "
        "dependent. Exclusive with `full_attn_res`.",
        check=_ATTN_RES,
    ),
]

_GRID_PATHS = [
    opt(
        "s2_activation",
        list[bool],
        [False, True],
        "`[so2, ffn]`: use the S2-grid SwiGLU activation on that path (forces silu; the FFN "
        "path also forces GLU).",
        check=((lambda x: len(x) == 2), "must be a list of two booleans: [so2, ffn]"),
    ),
    opt(
        "ffn_so3_grid",
        bool,
        False,
        "Block FFNs act on the SO(3) Wigner-D grid (overrides `s2_activation[1]`).",
    ),
    opt("node_wise_s2", bool, False, "Edge-local S2 product of source and destination features."),
    opt(
        "node_wise_so3",
        bool,
        False,
        "Edge-local SO(3)-grid product of source and destination features (wins over "
        "`node_wise_s2`).",
    ),
    opt(
        "message_node_s2",
        bool,
        False,
        "S2 product of the aggregated message with the destination node.",
    ),
    opt(
        "message_node_so3",
        bool,
        False,
        "SO(3)-grid product of the aggregated message with the destination node (wins over "
        "`message_node_s2`).",
    ),
]

_READOUT = [
    opt(
        "so3_readout",
        str,
        "none",
        "Read-out of the scalar descriptor: `none` (scalar FFN on l=0), `glu` or `mlp` "
        "(equivariant SO(3)-grid FFN folding l>0 into l=0 first).",
        check=one_of("none", "glu", "mlp"),
    ),
    opt(
        "readout_layers",
        int,
        1,
        "Stacked residual read-out FFNs.",
        check=at_least(1),
    ),
    opt(
        "lebedev_quadrature",
        [bool, list[bool]],
        True,
        "Lebedev quadrature (instead of a product grid) for the S2 projectors `[so2, ffn]` (one "
        "boolean for both).",
        check=flag_list(2, "[so2, ffn]"),
    ),
]

_ACTIVATION_AND_RUNTIME = [
    opt(
        "activation_function",
        str,
        "silu",
        "Base activation of helper MLPs, gated activations and the output FFN.",
    ),
    opt(
        "glu_activation",
        bool,
        True,
        "GLU form of the FFNs (silu becomes SwiGLU); forced on for S2/SO(3)-grid block FFNs.",
    ),
    opt("use_amp", bool, True, "bfloat16 autocast of the blocks when training on CUDA."),
]

_CONDITIONING = [
    opt(
        "add_chg_spin_ebd",
        bool,
        False,
        "Add a frame-level `[charge, spin]` embedding to the type embedding.",
    ),
    opt(
        "default_chg_spin",
        list[float],
        None,
        "`[charge, spin]` used when the data give none (needs `add_chg_spin_ebd`).",
        check=_null_or(_length(2, "[charge, spin]"), "[charge, spin]"),
    ),
    opt(
        "exclude_types",
        list[list[int]],
        [],
        "Type pairs that do not interact, e.g. [[0, 1]]; must equal the model's "
        "`pair_exclude_types` when both are given.",
    ),
]

_NUMERICS = [
    opt(
        "precision",
        str,
        "float32",
        "Parameter and block precision.",
        check=one_of("float32", "float64", "float16", "bfloat16", "default"),
    ),
    opt("eps", float, 1e-7, "Small constant guarding norms and divisions."),
    opt("trainable", bool, True, "Whether the descriptor parameters are trained."),
    opt("seed", [int, None], None, "Seed of the parameter initialization."),
]


def dpa4_descriptor() -> Argument:
    """The ``dpa4`` choice of ``model/descriptor``."""
    return choice(
        "dpa4",
        [
            *_NEIGHBORS,
            *_WIDTH_AND_RADIAL,
            *_INITIAL_STATE,
            *_CARTESIAN,
            *_DEGREES_AND_DEPTH,
            *_SO2_CONVOLUTION,
            *_ATTENTION,
            *_FFN,
            *_NORMS_AND_RESIDUALS,
            *_GRID_PATHS,
            *_READOUT,
            *_ACTIVATION_AND_RUNTIME,
            *_CONDITIONING,
            *_NUMERICS,
        ],
        "SeZM equivariant message-passing descriptor.",
        alias=DESCRIPTOR_ALIASES,
    )
