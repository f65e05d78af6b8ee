"""The ``model/spin`` block: magnetic types and virtual-atom scales read against the type
map, a bad block refused with an error that names its key."""

from __future__ import annotations

import pytest

from sezm.config import ConfigError, normalize_model
from sezm.config.spin import spin_scheme, use_spin_flags, virtual_scales

TYPE_MAP = ["Ni", "O", "H"]


@pytest.mark.parametrize(
    ("use_spin", "flags"),
    [
        ([True, False, False], [True, False, False]),
        ([0, 2], [True, False, True]),
        (["O"], [False, True, False]),
        ([], [False, False, False]),
    ],
)
def test_use_spin_forms_become_one_flag_per_type(use_spin, flags) -> None:
    assert use_spin_flags({"use_spin": use_spin}, TYPE_MAP) == flags


@pytest.mark.parametrize(
    ("use_spin", "words"),
    [
        ([True, False], "2 flags for 3 types"),
        (["Fe"], "['Fe'], which are not in type_map"),
        ([3], "out of range [0, 3)"),
    ],
)
def test_bad_use_spin_names_the_key(use_spin, words) -> None:
    with pytest.raises(ConfigError) as err:
        use_spin_flags({"use_spin": use_spin}, TYPE_MAP)
    assert err.value.path == "model/spin/use_spin"
    assert words in err.value.message


@pytest.mark.parametrize(
    ("scale", "per_type"),
    [
        (0.3, [0.3, 0.0, 0.0]),  # once: zero off the magnetic types
        ([0.3, 0.5, 0.7], [0.3, 0.0, 0.0]),  # per type
        ([0.4], [0.4, 0.0, 0.0]),  # per magnetic type
    ],
)
def test_virtual_scale_forms(scale, per_type) -> None:
    assert virtual_scales({"virtual_scale": scale}, [True, False, False]) == per_type


@pytest.mark.parametrize(
    ("spin", "words"), [({}, "deepspin scheme needs it"), ({"virtual_scale": [1, 2]}, "2 values")]
)
def test_bad_virtual_scale_names_the_key(spin, words) -> None:
    with pytest.raises(ConfigError) as err:
        virtual_scales(spin, [True, False, False])
    assert err.value.path == "model/spin/virtual_scale"
    assert words in err.value.message


def _model(scheme: str) -> dict:
    return {
        "type_map": TYPE_MAP,
        "descriptor": {"type": "dpa4"},
        "spin": {"use_spin": [True, False, False], "scheme": scheme},
    }


def test_spin_scheme_in_any_case() -> None:
    assert spin_scheme(normalize_model(_model("Native"))) == "native"
    assert spin_scheme(normalize_model(_model("DEEPSPIN"))) == "deepspin"


def test_unknown_spin_scheme_names_key_value_and_choices() -> None:
    with pytest.raises(ConfigError) as err:
        normalize_model(_model("virtual"))
    assert err.value.path == "model/spin/scheme"
    assert "'virtual'" in err.value.message and "'native', 'deepspin'" in err.value.message
