"""Every equivariant layer of the package through the generic check of ``equivariance.py``.

The layers are the production objects of float64 models built from small input sections
(``build_model``), taken by their checkpoint names, every parameter perturbed by ``0.1 N(0, 1)``
so that zero-initialised branches take part. Inputs are packed node features ``(N, (L+1)^2,
F, C)``, the positions of a 6-atom cluster (edges and edge frames built from them) and invariant
radial features. Rotations must hold to 1e-10 relative; the inversion (degree ``l`` times
``(-1)^l``) where the layer is achiral: linears, norms, gates, S2 grids and their FFNs. SO(2)
mixing (``W_v`` couples ``+m`` and ``-m``), the SO(3) grids and the Cartesian edge product are
chiral, so whole blocks, descriptors and models are checked under rotations only, and a test
asserts that the inversion check does fail on them.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from equivariance import F64, SCALAR, TENSOR2, VECTOR, assert_equivariant, packed

from sezm.config import normalize_model
from sezm.data.graph import build_graph
from sezm.model.build import build_model
from sezm.nn.edge_cache import build_edge_cache

RCUT = 3.5
CHANNELS = 8
N_ATOMS = 6

# name -> descriptor overrides
CONFIGS: dict[str, dict] = {
    "default": {},
    "gated_ffn": {"s2_activation": [False, False]},
    "plain_gates": {"s2_activation": [False, False], "glu_activation": False},
    "s2_grids_e3nn": {
        "s2_activation": [True, True],
        "lebedev_quadrature": False,
        "node_wise_s2": True,
        "message_node_s2": True,
    },
    "so3_grids": {
        "ffn_so3_grid": True,
        "node_wise_so3": True,
        "message_node_so3": True,
        "so3_readout": "mlp",
    },
    "cartesian": {"edge_cartesian": True, "node_cartesian": "parity:1"},
    "focus_attention": {"channels": 16, "n_focus": 2, "focus_dim": 8, "n_atten_head": 2},
    "no_attention_degree_mixer": {"n_atten_head": 0, "radial_so2_mode": "degree", "so2_norm": True},
    "depth_attention": {
        "full_attn_res": "dependent",
        "so2_attn_res": "independent",
        "layer_scale": True,
        "sandwich_norm": [True] * 4,
    },
    "extra_node_l": {"extra_node_l": 1, "l_schedule": [2, 1]},
}


@cache
def model_of(name: str):
    desc = {
        "type": "dpa4",
        "rcut": RCUT,
        "channels": CHANNELS,
        "n_radial": 4,
        "lmax": 2,
        "n_blocks": 2,
        "mixing_layers": 2,
        "precision": "float64",
        "seed": 1,
        **CONFIGS[name],
    }
    raw = {
        "type_map": ["O", "H"],
        "descriptor": desc,
        "fitting_net": {"neuron": [8], "precision": "float64", "seed": 1},
    }
    net = build_model(normalize_model(raw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net.eval()


def descriptor_of(name: str):
    return model_of(name).descriptor


def cluster() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions ``(6, 3)``, types ``(1, 6)`` and every pair within ``RCUT`` as ``src, dst``."""
    gen = torch.Generator().manual_seed(3)
    pos = 2.5 * torch.rand(N_ATOMS, 3, dtype=F64, generator=gen)
    i, j = torch.meshgrid(torch.arange(N_ATOMS), torch.arange(N_ATOMS), indexing="ij")
    near = (i != j) & ((pos[i] - pos[j]).norm(dim=-1) < RCUT)
    atype = torch.tensor([[0, 1, 0, 1, 1, 0]])
    return pos, atype, j[near], i[near]


POS, ATYPE, SRC, DST = cluster()


def features(rows: int, width: int, seed: int = 1) -> torch.Tensor:
    """Random packed node features ``(N, rows, 1, width)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_ATOMS, rows, 1, width, dtype=F64, generator=gen)


def radial_features(lmax: int, width: int) -> torch.Tensor:
    """Invariant per-edge radial features ``(E, L+1, C)``."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(SRC.numel(), lmax + 1, width, dtype=F64, generator=gen)


def edges_at(desc, pos: torch.Tensor):
    """The edge cache of the cluster at ``pos``: envelopes, radial basis, frames, Wigner-D."""
    opts = desc.opts
    return build_edge_cache(
        src=SRC,
        dst=DST,
        edge_vec=pos[SRC] - pos[DST],
        keep=torch.ones(SRC.numel(), dtype=torch.bool),
        n_nodes=N_ATOMS,
        rcut=opts.geometry.rcut,
        edge_env_exp=opts.geometry.edge_env_exp,
        radial_basis=desc.radial_basis,
        wigner=desc.wigner_calc,
        eps=opts.basics.eps,
        deg_floor=0.25,
        dtype=F64,
    )


def rows(lmax: int) -> int:
    return (lmax + 1) ** 2


# --- whole descriptor, blocks, convolutions ---------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_descriptor(name):
    """Scalar descriptor invariant, final node state of degree ``L`` equivariant."""
    desc = descriptor_of(name)
    lmax = desc.opts.degrees.node_readout_lmax

    def run(pos):
        return desc(ATYPE, SRC, DST, pos[SRC] - pos[DST])

    assert_equivariant(run, [POS], [VECTOR], [SCALAR, packed(lmax)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interaction_blocks(name):
    desc = descriptor_of(name)
    for index, block in enumerate(desc.blocks):
        degrees = desc.opts.degrees.block(index)
        width = desc.dim_out
        radial = radial_features(degrees.lmax, width)

        def run(x, pos, block=block, radial=radial):
            return block(x, edges_at(desc, pos), radial)

        x = features(rows(degrees.node_lmax), width)
        node = packed(degrees.node_lmax)
        assert_equivariant(run, [x, POS], [node, VECTOR], [node])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_so2_convolution(name):
    """Edge messages in the bond frames (or the Cartesian product), aggregated: ``(N, D, C)``."""
    desc = descriptor_of(name)
    degrees = desc.opts.degrees.block(0)
    conv = desc.blocks[0].so2_conv
    radial = radial_features(degrees.lmax, desc.dim_out)

    def run(x, pos):
        return conv(x, edges_at(desc, pos), radial)

    x = features(rows(degrees.lmax), desc.dim_out)[:, :, 0]
    assert_equivariant(run, [x, POS], [packed(degrees.lmax), VECTOR], [packed(degrees.lmax)])


# --- node-wise layers -------------------------------------------------------------------------
def test_so3_linear():
    linear = descriptor_of("focus_attention").blocks[0].so2_conv.pre_focus_mix
    x = features(rows(2), 16)
    assert linear(x).shape == (N_ATOMS, rows(2), 1, 16)
    assert_equivariant(linear, [x], [packed(2)], [packed(2)], inversion=True)


@pytest.mark.parametrize("norm", ["pre_ffn_norms.0", "post_so2_norm"])
def test_equivariant_rms_norm(norm):
    module = descriptor_of("depth_attention").blocks[0].get_submodule(norm)
    assert type(module).__name__ == "EquivariantRMSNorm"
    x = features(rows(2), CHANNELS)
    assert_equivariant(module, [x], [packed(2)], [packed(2)], inversion=True)


@pytest.mark.parametrize("name", ["gated_ffn", "plain_gates"])
def test_gated_activation(name):
    ffn = descriptor_of(name).blocks[0].ffns[0]
    act = ffn.act
    assert type(act).__name__ == "GatedActivation"
    hidden = features(rows(2), 2 * act.channels if ffn.glu_activation else act.channels)
    if ffn.glu_activation:  # act(value, gate)
        value, gate = hidden.chunk(2, dim=-1)
        assert_equivariant(act, [value, gate], [packed(2)] * 2, [packed(2)], inversion=True)
    else:
        assert_equivariant(act, [hidden], [packed(2)], [packed(2)], inversion=True)


@pytest.mark.parametrize("name", ["default", "s2_grids_e3nn"])
def test_s2_grid_net(name):
    """The S2-grid SwiGLU of a block FFN (Lebedev by default, e3nn's product grid otherwise)."""
    act = descriptor_of(name).blocks[0].ffns[0].act
    assert type(act).__name__ == "S2GridNet"
    x = features(rows(2), 2 * act.channels)  # self mode: [a | b]
    assert_equivariant(act, [x], [packed(2)], [packed(2)], inversion=True)


def test_message_node_s2_product():
    """The cross S2 product of the aggregated message with the centre, ``(N, D, F, C_f)``."""
    product = descriptor_of("s2_grids_e3nn").blocks[0].so2_conv.message_node_grid_product
    message, node = features(rows(2), CHANNELS), features(rows(2), CHANNELS, 5)
    assert_equivariant(product, [message, node], [packed(2)] * 2, [packed(2)], inversion=True)


@pytest.mark.parametrize(
    "name,inversion",
    [("gated_ffn", True), ("plain_gates", True), ("default", True), ("so3_grids", False)],
)
def test_equivariant_ffn(name, inversion):
    ffn = descriptor_of(name).blocks[0].ffns[0]
    x = features(rows(2), CHANNELS)
    assert_equivariant(ffn, [x], [packed(2)], [packed(2)], inversion=inversion)


# --- the energy model -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "cartesian", "so3_grids"])
def test_energy_model(name):
    """Energy and atomic energies invariant, forces ``R F``, virial ``R W R^T``."""
    model = model_of(name)

    def run(pos):
        graph = build_graph(pos.numpy()[None], None, ATYPE.numpy(), RCUT)
        out = model(graph, virial=True)
        return out["energy"], out["atom_energy"], out["force"], out["virial"]

    assert_equivariant(run, [POS], [VECTOR], [SCALAR, SCALAR, VECTOR, TENSOR2])


# --- the check bites --------------------------------------------------------------------------
def test_check_fails_on_a_broken_layer():
    """A constant added to the l = 1 rows breaks rotation equivariance; the check must say so."""
    linear = descriptor_of("default").blocks[0].ffns[0].so3_linear_1
    x = features(rows(2), CHANNELS)

    def broken(v):
        y = linear(v)
        return torch.cat([y[:, :1], y[:, 1:4] + 0.01, y[:, 4:]], dim=1)

    with pytest.raises(AssertionError, match="not equivariant under rotation 0"):
        assert_equivariant(broken, [x], [packed(2)], [packed(2)])


def test_check_fails_on_wrong_degree_order():
    """Declaring the wrong representation (an l = 1 row read as a scalar) is caught too."""
    linear = descriptor_of("default").blocks[0].ffns[0].so3_linear_1
    x = features(rows(2), CHANNELS)
    with pytest.raises(AssertionError):
        assert_equivariant(lambda v: linear(v)[:, 1], [x], [packed(2)], [SCALAR])


@pytest.mark.parametrize("name", ["default", "cartesian"])
def test_descriptor_is_chiral(name):
    """DPA4 is not inversion-equivariant: the check under the inversion must fail."""
    desc = descriptor_of(name)
    lmax = desc.opts.degrees.node_readout_lmax

    def run(pos):
        return desc(ATYPE, SRC, DST, pos[SRC] - pos[DST])

    with pytest.raises(AssertionError, match="inversion"):
        assert_equivariant(run, [POS], [VECTOR], [SCALAR, packed(lmax)], inversion=True)
