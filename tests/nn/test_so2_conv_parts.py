"""The SO(2) convolution in parts: edge-message and aggregation variants chosen at construction,
their layers registered on the convolution under DeePMD-kit's flat names."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import physics as P
import pytest
import torch
from model_zoo import make_model

from sezm.compat.deepmd import load_checkpoint
from sezm.geometry.layout import SphericalLayout
from sezm.model.build import build_model
from sezm.nn.aggregation import EnvelopeGatedAttention, EnvelopeSum
from sezm.nn.edge_message import CartesianMessage, EdgeFrameMessage, RadialMessage
from sezm.nn.so2 import RadialDegreeMixer
from sezm.train.lora import apply_lora, fold_lora

PARITY = Path(__file__).parents[1] / "data" / "parity"
CASES = sorted(p.name for p in PARITY.iterdir() if (p / "model.pt").is_file())
SYSTEM = P.random_cluster(5, 2, seed=0)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_names_are_deepmd_names(case: str) -> None:
    """Every tensor name of a model built from a DeePMD-kit checkpoint's ``model_params`` is one
    of the checkpoint's, and every checkpoint name is the model's; parameters are named as in
    the state dict (the optimizer state of a restart is matched by these names)."""
    ckpt = load_checkpoint(PARITY / case / "model.pt")
    model = build_model(
        ckpt.model_params, dens=any(k.startswith("dens_fitting_net.") for k in ckpt.state)
    )
    names = set(model.state_dict())
    state = fold_lora(ckpt.state)  # a LoRA checkpoint's adapters fold into the base weights
    stored = set(state) | {"descriptor.version_tensor"}  # 1.0 checkpoints lack it
    assert names == stored, (sorted(names - stored)[:5], sorted(stored - names)[:5])
    assert {n for n, _ in model.named_parameters(remove_duplicate=False)} <= names
    model.load_state_dict({**model.state_dict(), **state}, strict=True)


@pytest.mark.parametrize(
    ("descriptor", "message", "aggregation"),
    [
        ({}, EdgeFrameMessage, EnvelopeGatedAttention),
        ({"n_atten_head": 0}, EdgeFrameMessage, EnvelopeSum),
        ({"edge_cartesian": True}, CartesianMessage, EnvelopeGatedAttention),
        (
            {"mixing_layers": 0, "radial_so2_mode": "none", "n_atten_head": 0},
            RadialMessage,
            EnvelopeSum,
        ),
        (
            {"mixing_layers": 0, "radial_so2_mode": "degree"},
            EdgeFrameMessage,
            EnvelopeGatedAttention,
        ),
    ],
)
def test_variants_are_chosen_at_construction(descriptor, message, aggregation) -> None:
    conv = make_model(descriptor).descriptor.blocks[0].so2_conv
    assert type(conv.message) is message
    assert type(conv.aggregation) is aggregation
    assert not any(".message." in n or ".aggregation." in n for n in conv.state_dict())


def energy_and_forces(model) -> np.ndarray:
    out = P.evaluate(model, SYSTEM)
    return np.concatenate([np.ravel(out["energy"]), np.ravel(out["force"])])


def test_radial_message_equals_the_edge_frame_path() -> None:
    """A per-degree radial scaling commutes with rotations: without mixing layers, degree mixer
    or node-wise product, the frame-free message equals rotate -> scale -> rotate back."""
    model = make_model(
        {"mixing_layers": 0, "radial_so2_mode": "none", "n_atten_head": 0, "lmax": 2, "mmax": 2}
    )
    conv = model.descriptor.blocks[0].so2_conv
    assert type(conv.message) is RadialMessage
    plain = energy_and_forces(model)
    opts = model.descriptor.opts
    degrees = opts.degrees.block(0)
    layout = SphericalLayout.of(degrees.lmax, degrees.mmax)
    conv.register_buffer("degree_index_m", torch.tensor(layout.reduced_degrees), persistent=False)
    conv.message = EdgeFrameMessage(conv, opts.message, degrees, None)
    framed = energy_and_forces(model)
    np.testing.assert_allclose(framed, plain, rtol=0, atol=1e-12 * (1 + np.abs(plain).max()))


def test_lora_adapters_reach_the_aggregation() -> None:
    """Module surgery on the convolution (LoRA replaces ``attn_v_proj``) reaches the part that
    uses the layer, since parts read their layers from the convolution."""
    model = make_model({"atten_v_proj": True, "atten_o_proj": True})
    apply_lora(model, rank=2, seed=0)
    before = energy_and_forces(model)
    adapter = model.descriptor.blocks[0].so2_conv.attn_v_proj
    with torch.no_grad():
        adapter.B_by_l.add_(0.5)
    after = energy_and_forces(model)
    assert np.abs(after - before).max() > 1e-6


def test_a_deep_copy_has_its_own_parts() -> None:
    """Copies (EMA, best-model snapshots) get parts that read the copy's layers."""
    model = make_model({"n_focus": 2, "channels": 16, "focus_dim": 8})
    twin = copy.deepcopy(model)
    conv, twin_conv = model.descriptor.blocks[0].so2_conv, twin.descriptor.blocks[0].so2_conv
    assert twin_conv.message.owner is twin_conv and twin_conv.aggregation.owner is twin_conv
    assert twin_conv.message.competition.owner is twin_conv
    before = energy_and_forces(twin)
    with torch.no_grad():
        conv.adamw_focus_compete_w.add_(1.0)
        conv.adamw_attn_gate_w.add_(1.0)
    assert np.array_equal(energy_and_forces(twin), before)
    assert not np.allclose(energy_and_forces(model), before)


@pytest.mark.parametrize(
    "mode, rank",
    [("degree", 1), ("degree_channel", 1), ("degree_channel", 0), ("degree_channel", 2)],
)
def test_degree_mixer_applies_its_compact_kernel(mode: str, rank: int) -> None:
    """``y[l_out] = sum_{l_in} K[l_in, l_out] x[l_in]`` per ``|m|`` block (shared by -m and +m),
    the kernel read from its compact entries: the same numbers through the dense per-edge
    matrices (one kernel for all channels) and the row-by-row contraction (per channel)."""
    torch.manual_seed(0)
    lmax, mmax, channels, n_edge = 3, 2, 5, 7
    mixer = RadialDegreeMixer(
        lmax=lmax, mmax=mmax, channels=channels, mode=mode, rank=rank, dtype=torch.float64, seed=3
    )
    assert mixer.shared == (mode == "degree" or rank == 1)
    layout = SphericalLayout.of(lmax, mmax)
    x = torch.randn(n_edge, layout.reduced_dim, channels, dtype=torch.float64)
    radial = torch.randn(n_edge, lmax + 1, channels, dtype=torch.float64)
    compact = radial.reshape(n_edge, -1) @ mixer.weight  # (E, K * w)
    w = mixer.kernel_width
    kernel = compact.view(n_edge, -1, w)
    if mixer.channel_basis is not None:
        kernel = kernel @ mixer.channel_basis  # (E, K, C)
    expected, offset = torch.zeros_like(x), 0
    starts = [(0,)] + [(b.neg_start, b.pos_start) for b in layout.m_blocks]
    for n, block_starts in zip(layout.block_sizes, starts):
        k = kernel[:, offset : offset + n * n].view(n_edge, n, n, -1)  # [l_in, l_out]
        for s in block_starts:
            expected[:, s : s + n] = torch.einsum("eioc,eic->eoc", k, x[:, s : s + n])
        offset += n * n
    torch.testing.assert_close(torch.cat(mixer(x, radial), dim=1), expected)
    if mixer.shared:  # the edge-frame rotation multiplies the matrices in before rotating
        scale = mixer.channel_scale()
        folded = torch.bmm(mixer.matrices(radial), x) * (1.0 if scale is None else scale)
        torch.testing.assert_close(folded, expected)
