"""Descriptor options: the schema owns the defaults, the rules across keys run at
normalisation and name the key, and the layers receive named, typed records."""

from __future__ import annotations

import pytest
import torch

from sezm.config import ConfigError, normalize_model
from sezm.config.descriptor_options import bridging_radii, descriptor_options, neighbour_cap
from sezm.config.normalize import complete_model
from sezm.model.build import build_model
from sezm.nn.options import DescriptorOptions

TYPE_MAP = ["O", "H"]


def model(**descriptor) -> dict:
    return {"type_map": TYPE_MAP, "descriptor": {"type": "dpa4", **descriptor}}


def options(**descriptor) -> DescriptorOptions:
    return descriptor_options(normalize_model(model(**descriptor)))


def test_options_read_only_normalised_sections() -> None:
    """No layer default hides behind the schema's: a raw section lacks the keys."""
    raw = {**model(), "pair_exclude_types": [], "bridging_method": "None"}
    with pytest.raises(KeyError):
        descriptor_options(raw)


def test_schema_defaults_reach_the_records() -> None:
    opts = options()
    assert opts.basics.channels == 64 and opts.basics.precision == "float32"
    assert (opts.geometry.rcut, opts.geometry.rbf_env_exp, opts.geometry.edge_env_exp) == (
        6.0,
        7,
        5,
    )
    assert opts.degrees.l_schedule == (3, 3, 3) and opts.degrees.m_schedule == (1, 1, 1)
    assert opts.message.focus_dim == 64  # 0 stands for `channels`
    assert opts.message.s2_activation is False and opts.ffn.s2_activation is True
    residual = opts.residual
    assert (residual.so2_pre_norm, residual.so2_post_norm) == (False, True)
    assert (residual.ffn_pre_norm, residual.ffn_post_norm) == (True, False)
    assert opts.trainable is True


def test_compact_forms_become_named_fields() -> None:
    opts = options(
        sandwich_norm=[True, False, False, True],
        grid_mlp=[True, False, True],
        grid_branch=[0, 2, 0],
        lebedev_quadrature=[False, True],
        node_wise_so3=True,
        message_node_s2=True,
        mmax=None,
        l_schedule=[2, 1],
        focus_dim=16,
        n_focus=2,
    )
    r = opts.residual
    assert (r.so2_pre_norm, r.so2_post_norm, r.ffn_pre_norm, r.ffn_post_norm) == (
        True,
        False,
        False,
        True,
    )
    message = opts.message
    assert message.node_wise.so3 and message.node_wise.op.op_type == "mlp"
    assert message.message_node.s2 and message.message_node.op.op_type == "branch"
    assert opts.ffn.grid.op_type == "mlp"
    assert message.grid_method == "e3nn" and opts.ffn.lebedev
    assert opts.degrees.m_schedule == (2, 1)  # mmax null: the block's degree
    assert message.width == 32
    block = opts.degrees.block(1)
    assert (block.lmax, block.mmax, block.kmax, block.node_lmax) == (1, 1, 1, 1)


def test_derived_settings_live_on_their_record() -> None:
    opts = options(ffn_so3_grid=True, glu_activation=False, activation_function="tanh")
    assert opts.ffn.s2_activation is False  # the SO(3) grid overrides s2_activation[1]
    assert opts.ffn.glu and opts.ffn.activation_function == "tanh"
    assert opts.ffn.width(64) == 192  # GLU: 32 * ceil(8 * 64 / 3 / 32)
    assert opts.message.activation_function == "tanh"
    assert options(s2_activation=[True, True]).message.activation_function == "silu"
    assert options(full_attn_res="dependent").residual.depth_mode == "full"
    assert options(block_attn_res="independent").residual.depth_attn_res == "independent"
    assert options().residual.depth_mode is None


@pytest.mark.parametrize(
    ("descriptor", "key", "words"),
    [
        ({"l_schedule": [1, 2]}, "l_schedule", "non-increasing"),
        ({"l_schedule": [2, 1], "m_schedule": [1]}, "m_schedule", "one entry per block"),
        ({"l_schedule": [2, 1], "m_schedule": [1, 2]}, "m_schedule", "<= l_schedule"),
        ({"lmax": 1, "kmax": 2}, "kmax", "<= lmax = 1"),
        (
            {"full_attn_res": "dependent", "block_attn_res": "dependent"},
            "block_attn_res",
            "exclude",
        ),
        ({"channels": 8, "n_atten_head": 3}, "n_atten_head", "do not divide"),
        ({"sandwich_norm": [True, True, True]}, "sandwich_norm", "list of 4"),
        ({"env_exp": [7]}, "env_exp", "list of 2"),
        ({"n_focus": 0}, "n_focus", ">= 1"),
        ({"ffn_blocks": 0}, "ffn_blocks", ">= 1"),
        ({"precision": "float128"}, "precision", "must be one of"),
        ({"basis_type": "cheb"}, "basis_type", "bessel"),
        ({"default_chg_spin": [0.0]}, "default_chg_spin", "[charge, spin]"),
        ({"mmax": -1}, "mmax", ">= 0"),
    ],
)
def test_bad_descriptor_options_name_the_key(descriptor, key, words) -> None:
    with pytest.raises(ConfigError) as err:
        normalize_model(model(**descriptor))
    assert err.value.path == f"model/descriptor/{key}"
    assert words in err.value.message


def test_rules_name_the_branch_of_a_multitask_model() -> None:
    raw = {
        "shared_dict": {"types": TYPE_MAP},
        "model_dict": {
            "a": {"type_map": "types", "descriptor": {"kmax": 2, "lmax": 1}},
        },
    }
    with pytest.raises(ConfigError) as err:
        normalize_model(raw)
    assert err.value.path == "model/model_dict/a/descriptor/kmax"


def test_pair_exclusions_must_agree() -> None:
    raw = {**model(exclude_types=[[0, 1]]), "pair_exclude_types": [[0, 0]]}
    with pytest.raises(ConfigError) as err:
        normalize_model(raw)
    assert err.value.path == "model/descriptor/exclude_types"
    same = {**model(exclude_types=[[1, 0]]), "pair_exclude_types": [[0, 1]]}
    assert descriptor_options(normalize_model(same)).geometry.exclude_types == ((0, 1),)


def test_a_stored_section_is_completed_before_building() -> None:
    """An old checkpoint's section without most keys, and one with a key of a newer
    DeePMD-kit, build like a normalised section (the unknown key has no effect)."""
    stored = model(channels=8, n_radial=4, lmax=1, n_blocks=1, so2_layers=2)
    full = complete_model(stored)
    assert full == normalize_model(stored) and full["descriptor"]["mixing_layers"] == 2
    newer = model(channels=8, n_radial=4, lmax=1, n_blocks=1, so2_layers=2, future_option=True)
    completed = complete_model(newer)
    assert completed["descriptor"]["future_option"] is True
    assert completed["descriptor"]["kmax"] == 1
    a, b = build_model(stored), build_model(newer)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert a.descriptor.opts == build_model(full).descriptor.opts
    with pytest.raises(ConfigError, match="kmax"):  # the rules still hold on that path
        complete_model(model(lmax=1, kmax=2, future_option=True))


def test_deepspin_cap_is_the_schema_sel() -> None:
    raw = {
        **model(channels=8, n_radial=4, lmax=1, n_blocks=1),
        "spin": {"use_spin": [True, False], "virtual_scale": [0.3]},
    }
    params = normalize_model(raw)
    assert build_model(params).real_nsel == params["descriptor"]["sel"] == 256


@pytest.mark.parametrize("method", ["zbl", "ZBL", "Zbl"])
def test_bridging_method_takes_zbl_in_any_case(method) -> None:
    params = normalize_model({**model(), "bridging_method": method, "bridging_r_inner": 0.4})
    assert bridging_radii(params) == (0.4, 0.8)
    assert descriptor_options(params).geometry.inner_clamp == (0.4, 0.8)


@pytest.mark.parametrize("method", ["None", "none", ""])
def test_bridging_method_none_turns_bridging_off(method) -> None:
    params = normalize_model({**model(), "bridging_method": method})
    assert bridging_radii(params) is None
    assert descriptor_options(params).geometry.inner_clamp is None


def test_unknown_bridging_method_names_key_value_and_choices() -> None:
    with pytest.raises(ConfigError) as err:
        normalize_model({**model(), "bridging_method": "LJ"})
    assert err.value.path == "model/bridging_method"
    assert "'LJ'" in err.value.message and "'ZBL', 'None'" in err.value.message


def test_property_model_refuses_zbl_bridging() -> None:
    raw = {
        **model(channels=8, n_radial=4, lmax=1, n_blocks=1),
        "bridging_method": "Zbl",
        "fitting_net": {"type": "property", "property_name": "gap", "task_dim": 1},
    }
    with pytest.raises(ValueError, match="not available for property models"):
        build_model(normalize_model(raw))
    assert build_model(normalize_model({**raw, "bridging_method": "none"})).property_name == "gap"


def test_neighbour_cap_needs_a_resolved_sel() -> None:
    params = normalize_model(model(sel=[20, 12]))
    assert neighbour_cap(params) == 32
    params["descriptor"]["sel"] = "auto"
    with pytest.raises(ConfigError) as err:
        neighbour_cap(params)
    assert err.value.path == "model/descriptor/sel" and "'auto'" in err.value.message


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_keeps_geometry_embeddings_and_readout_in_float32(precision) -> None:
    """``precision`` sets the interaction blocks; what ``compute_dtype`` owns stays float32."""
    net = build_model(
        {**model(precision=precision, lmax=2, channels=16, so3_readout="mlp"), "fitting_net": {}}
    )
    half = dict(bfloat16=torch.bfloat16, float16=torch.float16)[precision]
    dtypes: dict[str, set] = {}
    for name, p in net.descriptor.named_parameters():
        dtypes.setdefault(name.split(".")[0], set()).add(p.dtype)
    assert dtypes["blocks"] == {half, torch.float32}  # the blocks' norms are float32 too
    for part in ("type_embedding", "radial_embedding", "env_seed_embedding", "output_ffn"):
        assert dtypes[part] == {torch.float32}, part
