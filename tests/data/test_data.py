"""The data layer: npy systems, validation, batching, sampling, statistics, neighbour statistics.

Reference numbers marked "DeePMD-kit" come from tests/data/systems/make_upstream_stats.py
(``out_bias``/``out_std``/fparam/aparam statistics, ``sel``, ``min_nbor_dist``) and from
``dp --pt neighbor-stat`` on the same systems (per-type neighbour counts).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.config import normalize_model
from sezm.data import (
    DataError,
    DataSystem,
    Field,
    StatFile,
    System,
    batch_sizes,
    expand_systems,
    fields_for_model,
    model_stats,
    neighbor_stat,
    neighbor_stat_command,
    resolve_sel,
    system_probs,
    update_sel,
)
from sezm.data.graph import build_graph

DATA = Path(__file__).parents[1] / "data" / "systems"
WATER = [DATA / "water/data_0", DATA / "water/data_1"]
NOPBC = DATA / "nopbc"
PROPERTY = DATA / "property"
PROPERTY_FIELDS = {"band_prop": Field((3,), must=True)}


def normalized(model: dict) -> dict:
    """The model section ``model`` normalized, with a default descriptor."""
    return normalize_model({"descriptor": {}, **model})


# DeePMD-kit 3.2 (make_upstream_stats.py) ------------------------------------------------------
REF_WATER = {
    "sel": 112,
    "min_nbor_dist": 0.9152600620857202,
    "out_bias": [-93.57444797092013, -187.14889594184027],
    "out_std": [0.5489212640231201, 0.5489212640231201],
}
REF_NOPBC = {
    "sel": 12,
    "min_nbor_dist": 0.8823997616377142,
    "out_bias": [-14.924984163850388, -1028.5301942567594, -2048.539817356417],
    "out_std": [3.1906935606940374] * 3,
    "fparam_avg": [0.02064000000000004, 0.2866733333333334],
    "fparam_inv_std": [0.8996704937728323, 0.9746316090561148],
    "aparam_avg": [0.4311056],
    "aparam_inv_std": [3.6563448701429215],
}
REF_NOPBC_PRESET = {
    "out_bias": [-32.04310071790609, -1000.0, -2054.2458562077686, 0.0],
    "out_std": [44.55804312768004] * 4,
}
REF_PROPERTY_INTENSIVE = {
    "out_bias": [[-0.23127499781548977, 0.06543750036507845, 0.29670000076293945]] * 4,
    "out_std": [[0.009803285051685729, 0.010538019641326406, 0.010522597687652763]] * 4,
}
REF_PROPERTY_EXTENSIVE = {
    "out_bias": [
        [-0.009503884543035475, 0.004993243205889657, 0.014493918952506936],
        [-0.00776706072124277, 0.0022719594700312254, 0.010038513539207969],
        [-0.006030236899450007, -0.00044932426582719746, 0.0055831081259089515],
        [-0.04047483447435734, -0.005866553596648815, 0.034626351468063685],
    ],
    "out_std": [[0.007012978385490018, 0.005377820788892386, 0.010290046751528748]] * 4,
}


def close(actual, expected, atol=1e-8):
    np.testing.assert_allclose(
        np.asarray(actual).reshape(-1), np.ravel(expected), rtol=0, atol=atol
    )


def copy_system(src: Path, tmp_path: Path, name: str = "sys") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    for path in dst.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return dst


# -- reading -------------------------------------------------------------------------------------


def test_standard_system_is_read_and_remapped():
    system = System(DATA / "water/data_1", ["H", "O"])  # type_map.raw is "O H"
    assert (system.nat, system.nframes, system.pbc, system.mixed_type) == (192, 5, True, False)
    assert system.set_frames.tolist() == [3, 2]
    assert system.present == {
        "energy": True,
        "force": True,
        "virial": False,
        "atom_ener": False,
        "atom_pref": False,
        "force_mag": False,
    }
    raw = np.loadtxt(DATA / "water/data_1/type.raw", dtype=int)
    np.testing.assert_array_equal(system.atom_type, 1 - raw)
    data = system.frames([4, 0])  # frame 4 is frame 1 of set.001
    coord = np.load(DATA / "water/data_1/set.001/coord.npy")[1].reshape(192, 3)
    np.testing.assert_array_equal(data["coord"][0], coord)
    assert data["coord"].dtype == np.float64
    assert data["box"].shape == (2, 3, 3) and data["force"].shape == (2, 192, 3)
    assert data["energy"].shape == (2,) and "virial" not in data


def test_nopbc_system_has_no_box():
    data = System(NOPBC / "C1H4O2", ["H", "C", "O"]).frames([0, 1])
    assert "box" not in data and data["coord"].shape == (2, 7, 3)
    assert data["atype"][0].tolist() == [0, 0, 0, 0, 1, 2, 2]


def test_mixed_type_system_has_per_frame_types():
    model_map = ["O", "N", "C", "H"]  # type_map.raw is "H C N O"
    system = System(PROPERTY / "data_0", model_map, PROPERTY_FIELDS)
    assert system.mixed_type and system.present == {"band_prop": True}
    data = system.frames([1, 3])
    raw = np.load(PROPERTY / "data_0/set.000000/real_atom_types.npy")[[1, 3]]
    np.testing.assert_array_equal(data["atype"], np.array([3, 2, 1, 0])[raw])
    assert data["band_prop"].shape == (2, 3)


def test_element_missing_from_model_type_map():
    with pytest.raises(DataError, match=r"data_0.*\['H'\].*not in the model type_map"):
        System(WATER[0], ["O"])


# -- validation ----------------------------------------------------------------------------------


def _break(path: Path, how: str) -> None:  # noqa: C901  (one branch per breakage case)
    s0 = path / "set.000"
    if how == "force_shape":
        np.save(s0 / "force.npy", np.load(s0 / "force.npy")[:, :-3])
    elif how == "frame_count":
        np.save(s0 / "energy.npy", np.load(s0 / "energy.npy")[:-1])
    elif how == "nan_coord":
        coord = np.load(s0 / "coord.npy")
        coord[2, 4] = np.nan
        np.save(s0 / "coord.npy", coord)
    elif how == "inf_energy":
        energy = np.load(s0 / "energy.npy")
        energy[3] = np.inf
        np.save(s0 / "energy.npy", energy)
    elif how == "no_coord":
        (s0 / "coord.npy").unlink()
    elif how == "no_box":
        (path / "nopbc").unlink()
    elif how == "empty_types":
        (path / "type.raw").write_text("")
    elif how == "zero_frames":
        np.save(s0 / "coord.npy", np.zeros((0, 21)))
    elif how == "type_range":
        (path / "type.raw").write_text("1 1 1 1 0 2 3\n")
    elif how == "no_sets":
        shutil.rmtree(s0)
    elif how == "one_set_only":
        shutil.copytree(s0, path / "set.001")
        (path / "set.001/force.npy").unlink()
    elif how == "box_degenerate":
        (path / "nopbc").unlink()
        box = np.tile(np.eye(3).reshape(1, 9) * 10.0, (5, 1))
        box[1, 8] = 0.0
        np.save(s0 / "box.npy", box)


@pytest.mark.parametrize(
    "how, message",
    [
        (
            "force_shape",
            r"set.000/force.npy: shape \(5, 18\) gives 18 values per frame.*expected 21",
        ),
        ("frame_count", r"energy.npy: 4 frame\(s\).*coord.npy of the set has 5"),
        ("nan_coord", r"coord.npy: frame 2 holds NaN or inf"),
        ("inf_energy", r"energy.npy: frame 3 holds NaN or inf"),
        ("no_coord", r"set.000: coord.npy is missing"),
        ("no_box", r"set.000: box.npy is missing"),
        ("empty_types", r"type.raw: lists no atoms"),
        ("zero_frames", r"coord.npy: holds 0 frames"),
        ("type_range", r"type.raw: type 3 at atom 6 is outside 0..2"),
        ("no_sets", r"no set.\* folder"),
        ("one_set_only", r"force.npy is missing from \['set.001'\]"),
        ("box_degenerate", r"box.npy: frame 1 has a degenerate cell"),
    ],
)
def test_validation_errors(tmp_path, how, message):
    path = copy_system(NOPBC / "C1H4O2", tmp_path)
    _break(path, how)
    with pytest.raises(DataError, match=message) as err:
        System(path, ["H", "C", "O"])
    assert str(path) in str(err.value)


def test_required_field_and_mixed_type_errors(tmp_path):
    path = copy_system(NOPBC / "C1H4O2", tmp_path)
    with pytest.raises(DataError, match=r"charge_spin.npy is missing; it is required"):
        System(path, ["H", "C", "O"], {"charge_spin": Field((2,), must=True)})
    mixed = copy_system(PROPERTY / "data_0", tmp_path, "mixed")
    types = np.load(mixed / "set.000000/real_atom_types.npy")
    types[2, 5] = 4
    np.save(mixed / "set.000000/real_atom_types.npy", types)
    with pytest.raises(DataError, match=r"real_atom_types.npy: type 4 at frame 2, atom 5"):
        System(mixed, ["H", "C", "N", "O"], PROPERTY_FIELDS)


def test_arrays_are_memory_mapped():
    from sezm.data.system import _mmap

    assert isinstance(_mmap(str(WATER[0] / "set.000/coord.npy")), np.memmap)


# -- systems, batch sizes, probabilities ---------------------------------------------------------


def test_expand_systems():
    assert expand_systems(DATA / "water") == [str(p) for p in WATER]
    assert expand_systems(str(DATA / "water/data_*")) == [str(p) for p in WATER]
    assert expand_systems([WATER[1], WATER[0]]) == [str(WATER[1]), str(WATER[0])]
    assert expand_systems(DATA, patterns=["C*"]) == sorted(str(p) for p in NOPBC.glob("C*"))
    with pytest.raises(DataError, match="does not exist"):
        expand_systems(DATA / "missing")


def test_batch_size_rules():
    natoms = [192, 7, 10, 8]
    assert batch_sizes("auto", natoms) == [1, 5, 4, 4]
    assert batch_sizes("auto:100", natoms) == [1, 15, 10, 13]
    assert batch_sizes("max:100", natoms) == [1, 14, 10, 12]
    assert batch_sizes(3, natoms) == [3, 3, 3, 3]
    assert batch_sizes([1, 2, 3, 4], natoms) == [1, 2, 3, 4]
    for bad in ("mix:64", "mixed:4", "auto:x", "foo", [1, 2]):
        with pytest.raises(DataError):
            batch_sizes(bad, natoms)


def test_filter_rule_and_batch_counts():
    data = DataSystem(DATA, ["H", "C", "N", "O"], batch_size="filter:20")
    assert [s.path.name for s in data.systems] == ["C1H4O2", "C3H3O4", "C4H3O1", "data_0"]
    assert data.batch_size == [2, 2, 2, 1]
    assert data.nbatches == [3, 3, 3, 4]  # ceil(nframes / batch size)


def test_probability_rules():
    nbatch = [4, 5, 1, 2]
    close(system_probs(nbatch), [4 / 12, 5 / 12, 1 / 12, 2 / 12], 1e-15)
    close(system_probs(nbatch, auto_prob="prob_uniform"), [0.25] * 4, 1e-15)
    close(
        system_probs(nbatch, auto_prob="prob_sys_size;0:2:0.5;2:4:0.5"),
        [2 / 9, 5 / 18, 1 / 6, 1 / 3],
        1e-15,
    )
    close(
        system_probs(nbatch, auto_prob="prob_sys_size;0:1:3;2:4:1"), [0.75, 0, 1 / 12, 1 / 6], 1e-15
    )
    close(system_probs(nbatch, sys_probs=[0.5, -1, -1, 0.1]), [0.5, 1 / 3, 1 / 15, 0.1], 1e-15)
    for kwargs in ({"sys_probs": [0.6, 0.6, 0, 0]}, {"sys_probs": [0.5]}, {"auto_prob": "prob_x"}):
        with pytest.raises(DataError):
            system_probs(nbatch, **kwargs)


# -- sampling and batches ------------------------------------------------------------------------


def _draws(data: DataSystem, n: int) -> list[tuple[int, list[int]]]:
    out = []
    for _ in range(n):
        index = int(data._rng.choice(len(data.systems), p=data.probs))
        out.append((index, data._next_frames(index).tolist()))
    return out


def test_sampling_is_deterministic_and_covers_epochs():
    make = lambda seed: DataSystem(NOPBC, ["H", "C", "O"], batch_size=2, seed=seed)  # noqa: E731
    first, again, other = _draws(make(7), 30), _draws(make(7), 30), _draws(make(8), 30)
    assert first == again and first != other
    for index in range(3):  # each epoch of a system visits its 5 frames once
        frames = [f for i, batch in first if i == index for f in batch]
        epochs = [frames[k : k + 5] for k in range(0, len(frames) - 4, 5)]
        assert epochs and all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)


def test_min_pair_dist_skips_frames(caplog):
    threshold = 0.97
    with caplog.at_level(logging.INFO, logger="sezm.data.dataset"):
        data = DataSystem(NOPBC, ["H", "C", "O"], batch_size=2, min_pair_dist=threshold, seed=0)
    expected = []
    for system in data.systems:
        coord = system.frames(np.arange(system.nframes))["coord"]
        dist = np.linalg.norm(coord[:, :, None] - coord[:, None], axis=-1)
        dist[:, np.arange(system.nat), np.arange(system.nat)] = np.inf
        expected.append(int((dist.min(axis=(1, 2)) < threshold).sum()))
    assert data.skipped == expected and 0 < sum(expected) < 15
    assert "frames skipped" in caplog.text
    for index, frames in _draws(data, 40):
        assert set(frames) <= set(data.kept[index].tolist())


def test_min_pair_dist_removing_every_frame_is_explained():
    """The dens example's min_pair_dist 1.0 removes every water frame (O-H bonds are shorter):
    the error names the system, the threshold, the closest pair and a value that keeps
    frames."""
    with pytest.raises(DataError) as info:
        DataSystem(WATER[0], ["O", "H"], min_pair_dist=1.0)
    message = str(info.value)
    assert f"all 4 frames of {WATER[0]} have an atom pair closer than min_pair_dist 1 Å" in message
    assert f"the closest is {REF_WATER['min_nbor_dist']:.3g} Å" in message
    keep = float(message.split("to at most ")[1].split(" Å")[0])
    kept = DataSystem(WATER[0], ["O", "H"], min_pair_dist=keep)
    assert 0 < len(kept.kept[0]) < 4


def test_min_pair_dist_removing_one_system_warns(caplog):
    with caplog.at_level(logging.INFO, logger="sezm.data.dataset"):
        data = DataSystem(WATER, ["O", "H"], min_pair_dist=0.93, seed=0)
    assert data.skipped == [3, 5] and data.probs.tolist() == [1.0, 0.0]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING).getMessage()
    assert f"all 5 frames of {WATER[1]}" in warning and "never drawn" in warning
    assert "the closest is 0.917 Å" in warning and "min_pair_dist <= 0.927 Å" in warning
    assert f"{WATER[0]}: 3 of 4 frames skipped" in caplog.text


def test_training_batch(tmp_path):
    model = normalized(
        {"type_map": ["H", "C", "O"], "fitting_net": {"numb_fparam": 2, "numb_aparam": 1}}
    )
    data = DataSystem(NOPBC, model["type_map"], fields=fields_for_model(model), seed=3)
    graph, labels, find = data.next_batch(rcut=4.0)
    nf, nloc = graph.atype.shape
    assert set(labels) == {"energy", "force"}
    assert labels["energy"].shape == (nf,) and labels["force"].shape == (nf, nloc, 3)
    assert all(v.dtype == torch.float64 for v in labels.values())
    assert find["energy"] and find["force"] and not find["virial"] and "fparam" not in find
    assert graph.fparam.shape == (nf, 2) and graph.aparam.shape == (nf, nloc, 1)
    batch = data.batch(0, np.array([1, 3]), rcut=4.0)
    system = data.systems[0]
    frames = system.frames([1, 3])
    direct = build_graph(frames["coord"], None, frames["atype"], 4.0)
    assert torch.equal(batch.graph.src, direct.src) and torch.equal(
        batch.graph.edge_vec, direct.edge_vec
    )
    np.testing.assert_array_equal(batch.labels["force"].numpy(), frames["force"])
    periodic = DataSystem(WATER, ["O", "H"], batch_size=1, seed=0).next_batch(rcut=6.0)
    assert periodic.box.shape == (1, 3, 3) and periodic.graph.edge_vec.shape[0] > 0


def test_property_batch_and_padding_atoms(tmp_path):
    path = copy_system(PROPERTY / "data_0", tmp_path)
    types = np.load(path / "set.000000/real_atom_types.npy")
    types[:, -1] = -1  # the last atom of every frame is padding
    np.save(path / "set.000000/real_atom_types.npy", types)
    data = DataSystem(path, ["H", "C", "N", "O"], batch_size=4, fields=PROPERTY_FIELDS)
    graph, labels, find = data.next_batch(rcut=4.0)
    assert labels["band_prop"].shape == (4, 3) and find == {"band_prop": True}
    last = torch.arange(4) * 20 + 19
    assert not torch.isin(graph.src, last).any() and not torch.isin(graph.dst, last).any()
    assert (graph.atype[:, -1] == -1).all()


def test_iter_batches_keeps_file_order():
    data = DataSystem(WATER[1], ["O", "H"], batch_size=2)
    frames = [b.frames.tolist() for b in data.iter_batches(0, rcut=3.0)]
    assert frames == [[0, 1], [2, 3], [4]]


# -- statistics ----------------------------------------------------------------------------------


def test_energy_bias_water():
    model = normalized({"type_map": ["O", "H"], "fitting_net": {}})
    stats = model_stats(DataSystem(WATER, model["type_map"], batch_size=1, seed=0), model)
    assert stats.out_bias.shape == (1, 2, 1) and stats.out_std.shape == (1, 2, 1)
    close(stats.out_bias, REF_WATER["out_bias"])
    close(stats.out_std, REF_WATER["out_std"])
    assert stats.observed_type == ["H", "O"] and stats.fparam_avg is None


def test_energy_bias_and_param_stats_nopbc():
    model = normalized(
        {"type_map": ["H", "C", "O"], "fitting_net": {"numb_fparam": 2, "numb_aparam": 1}}
    )
    data = DataSystem(NOPBC, model["type_map"], fields=fields_for_model(model), seed=0)
    stats = model_stats(data, model)
    close(stats.out_bias, REF_NOPBC["out_bias"])
    close(stats.out_std, REF_NOPBC["out_std"])
    for key in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
        close(getattr(stats, key), REF_NOPBC[key], 1e-12)


def test_energy_bias_preset():
    model = normalized(
        {
            "type_map": ["H", "C", "O", "N"],
            "fitting_net": {},
            "preset_out_bias": {"energy": [None, -1000.0, None, None]},
            "data_stat_nbatch": 1,
        }
    )
    stats = model_stats(DataSystem(NOPBC, model["type_map"], batch_size=8, seed=0), model)
    close(stats.out_bias, REF_NOPBC_PRESET["out_bias"])
    close(stats.out_std, REF_NOPBC_PRESET["out_std"])


@pytest.mark.parametrize(
    "intensive, distinguish, ref",
    [(True, False, REF_PROPERTY_INTENSIVE), (False, True, REF_PROPERTY_EXTENSIVE)],
)
def test_property_out_stat(intensive, distinguish, ref):
    fitting = {
        "type": "property",
        "property_name": "band_prop",
        "task_dim": 3,
        "intensive": intensive,
        "distinguish_types": distinguish,
    }
    model = normalized({"type_map": ["H", "C", "N", "O"], "fitting_net": fitting})
    data = DataSystem(PROPERTY, model["type_map"], batch_size=4, fields=fields_for_model(model))
    stats = model_stats(data, model)
    assert stats.out_bias.shape == (1, 4, 3)
    close(stats.out_bias, ref["out_bias"])
    close(stats.out_std, ref["out_std"])


class _NoSampling:
    def stat_frames(self, nbatch, keys=None):
        raise AssertionError("statistics were recomputed instead of read from the stat file")


def test_reads_upstream_stat_file():
    model = normalized({"type_map": ["O", "H"], "fitting_net": {}})
    stats = model_stats(_NoSampling(), model, DATA / "upstream_stat.h5", "read")
    close(stats.out_bias, REF_WATER["out_bias"])
    close(stats.out_std, REF_WATER["out_std"])
    assert stats.observed_type == ["H", "O"]


@pytest.mark.parametrize("name", ["stat.h5", "stat_dir"])
def test_stat_file_round_trip(tmp_path, name):
    model = normalized(
        {"type_map": ["H", "C", "O"], "fitting_net": {"numb_fparam": 2, "numb_aparam": 1}}
    )
    data = DataSystem(NOPBC, model["type_map"], fields=fields_for_model(model), seed=0)
    written = model_stats(data, model, tmp_path / name)
    read = model_stats(_NoSampling(), model, tmp_path / name, "read")
    for key in ("out_bias", "out_std", "fparam_avg", "fparam_inv_std", "aparam_inv_std"):
        np.testing.assert_array_equal(getattr(read, key), getattr(written, key))
    stored = StatFile(tmp_path / name, model["type_map"], "read")
    assert stored.get("fparam").shape == (2, 3) and stored.get("bias_atom_energy").shape == (3, 1)
    with pytest.raises(DataError, match="lacks"):
        model_stats(_NoSampling(), normalized({"type_map": ["O", "H"]}), tmp_path / name, "read")
    with pytest.raises(DataError, match="does not exist"):
        model_stats(_NoSampling(), model, tmp_path / "missing.h5", "read")


# -- neighbour statistics ------------------------------------------------------------------------


def test_neighbor_stat_and_sel_auto_match_upstream():
    water = DataSystem(WATER, ["O", "H"]).systems
    assert update_sel(water, 6.0, "auto") == (REF_WATER["sel"], REF_WATER["min_nbor_dist"])
    stat = neighbor_stat(water, 6.0)
    assert stat.max_nbor_size.tolist() == [36, 69] and stat.max_nbor_total == 102
    nopbc = DataSystem(NOPBC, ["H", "C", "O"]).systems
    assert update_sel(nopbc, 4.0, "auto:1.5") == (REF_NOPBC["sel"], REF_NOPBC["min_nbor_dist"])
    assert neighbor_stat(nopbc, 4.0).max_nbor_size.tolist() == [4, 3, 4]
    assert neighbor_stat_command(PROPERTY, 4.0) == (0.9616078466214345, [13, 7, 1, 2])


def test_resolve_sel(caplog):
    assert resolve_sel("auto", 102) == 112  # int(112.2) -> 112
    assert resolve_sel("auto:1.0", 101) == 104
    assert resolve_sel("auto:1.5", 7) == 12
    assert resolve_sel([40], 10) == 40
    with caplog.at_level(logging.WARNING, logger="sezm.data.neighbor_stat"):
        assert resolve_sel(50, 102) == 50
    assert "below the 102 neighbours" in caplog.text
    for bad in ("auto:x", "automatic", "auto:1:2"):
        with pytest.raises(DataError):
            resolve_sel(bad, 10)


def test_overlapping_atoms_are_reported(tmp_path):
    path = copy_system(NOPBC / "C1H4O2", tmp_path)
    coord = np.load(path / "set.000/coord.npy")
    coord[3, 3:6] = coord[3, 0:3]
    np.save(path / "set.000/coord.npy", coord)
    with pytest.raises(DataError, match=r"frame 3: atoms 0 and 1 overlap"):
        neighbor_stat([System(path, ["H", "C", "O"])], 4.0)
