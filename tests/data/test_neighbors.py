"""Neighbour search against explicit image enumeration, and input validation messages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sezm.data.frames import InputError, check_overlaps, normalize_frames
from sezm.data.neighbors import EdgeList, _edge_order, build_edges

RNG_SEED = 20260101


def brute_force(coord: np.ndarray, cell: np.ndarray | None, rcut: float) -> dict:
    """``{(frame, i, j, s0, s1, s2): vec}`` for every pair within ``rcut``, all images."""
    out = {}
    for f, pos in enumerate(coord):
        if cell is None:
            shifts = np.zeros((1, 3), dtype=np.int64)
            box = np.zeros((3, 3))
        else:
            box = cell[f]
            inv = np.linalg.inv(box)
            frac = pos @ inv
            spacing = 1.0 / np.linalg.norm(inv, axis=0)  # distance between lattice planes
            reach = np.ceil(rcut / spacing + np.ptp(frac, axis=0)).astype(int) + 1
            shifts = np.array(list(itertools.product(*[range(-n, n + 1) for n in reach])))
        vec = pos[None, None, :, :] + (shifts @ box)[:, None, None, :] - pos[None, :, None, :]
        dist2 = (vec**2).sum(-1)  # [S, i, j]
        for s, i, j in zip(*np.nonzero((dist2 > 1e-10) & (dist2 <= rcut * rcut)), strict=True):
            out[(f, i, j, *shifts[s].tolist())] = vec[s, i, j]
    return out


def as_dict(edges: EdgeList, nat: int) -> dict:
    keys = zip(
        (edges.dst // nat).tolist(),
        (edges.dst % nat).tolist(),
        (edges.src % nat).tolist(),
        *edges.shift.T.tolist(),
        strict=True,
    )
    return dict(zip(keys, edges.vec, strict=True))


def assert_matches_brute_force(coord, cell, rcut):
    edges = build_edges(coord, cell, rcut)
    nat = coord.shape[1]
    got, ref = as_dict(edges, nat), brute_force(coord, cell, rcut)
    assert len(got) == len(edges), "duplicate edges"
    assert got.keys() == ref.keys()
    for key, vec in ref.items():
        np.testing.assert_allclose(got[key], vec, atol=1e-12)
    assert edges.src.dtype == edges.dst.dtype == edges.shift.dtype == np.int64
    assert edges.vec.dtype == np.float64
    np.testing.assert_array_equal(edges.src // nat, edges.dst // nat)  # never across frames
    return edges


def random_frame(rng, cell, nat, offset=0.0):
    return rng.random((nat, 3)) @ cell + offset


def test_orthorhombic_water_density():
    rng = np.random.default_rng(RNG_SEED)
    cell = np.diag([9.0, 9.5, 10.0])
    nat = 86  # ~0.1 atoms / Å^3, like liquid water
    coord = random_frame(rng, cell, nat)[None]
    assert_matches_brute_force(coord, cell[None], 6.0)


def test_triclinic_unwrapped():
    rng = np.random.default_rng(RNG_SEED + 1)
    cell = np.array([[7.0, 0.0, 0.0], [3.1, 6.2, 0.0], [-1.4, 2.3, 6.6]])
    coord = random_frame(rng, cell, 30, offset=np.array([40.0, -25.0, 13.0]))[None]
    coord[0, :5] += np.array([2, -1, 3]) @ cell  # atoms far outside the home cell
    assert_matches_brute_force(coord, cell[None], 5.5)


def test_strongly_skewed_cell():
    rng = np.random.default_rng(RNG_SEED + 2)
    cell = np.array([[5.0, 0.0, 0.0], [12.0, 2.0, 0.0], [7.0, 3.0, 6.0]])
    coord = random_frame(rng, cell, 8)[None]
    assert_matches_brute_force(coord, cell[None], 5.0)


def test_small_cell_many_self_images():
    rng = np.random.default_rng(RNG_SEED + 3)
    cell = np.array([[4.3, 0.0, 0.0], [0.2, 4.2, 0.0], [0.1, -0.3, 4.4]])
    coord = random_frame(rng, cell, 6)[None]
    edges = assert_matches_brute_force(coord, cell[None], 6.0)
    self_images = edges.src == edges.dst
    assert self_images.sum() >= 6 * 6  # each atom sees >= 6 of its own images
    assert np.all(np.abs(edges.shift).max(axis=1)[self_images] >= 1)


def test_cell_thinner_than_cutoff():
    rng = np.random.default_rng(RNG_SEED + 4)
    slab = np.diag([12.0, 12.0, 1.2])
    needle = np.diag([1.0, 1.1, 0.9])
    assert_matches_brute_force(random_frame(rng, slab, 5)[None], slab[None], 3.0)
    assert_matches_brute_force(random_frame(rng, needle, 2)[None], needle[None], 3.0)


def test_pairs_exactly_at_cutoff_are_edges():
    cell = np.eye(3) * 3.0
    coord = np.array([[[0.5, 0.5, 0.5], [0.5, 0.5, 2.0]]])
    edges = assert_matches_brute_force(coord, cell[None], 3.0)
    dist = np.linalg.norm(edges.vec, axis=1)
    assert np.sum(np.isclose(dist, 3.0)) == 2 * 6  # 6 self images per atom at exactly rcut


def test_non_periodic():
    rng = np.random.default_rng(RNG_SEED + 5)
    coord = rng.random((2, 40, 3)) * 8.0
    edges = assert_matches_brute_force(coord, None, 4.0)
    assert not edges.shift.any()


def test_several_frames_with_different_cells():
    rng = np.random.default_rng(RNG_SEED + 6)
    cells = np.stack(
        [
            np.diag([8.0, 8.0, 8.0]),
            np.array([[6.0, 0.0, 0.0], [2.0, 5.5, 0.0], [1.0, 1.5, 6.2]]),
            np.diag([4.3, 4.5, 4.4]),
        ]
    )
    coord = np.stack([random_frame(rng, c, 12) for c in cells])
    edges = assert_matches_brute_force(coord, cells, 5.0)
    single = build_edges(coord[1:2], cells[1:2], 5.0)
    in_frame_1 = edges.dst // 12 == 1
    np.testing.assert_array_equal(edges.dst[in_frame_1] - 12, single.dst)
    np.testing.assert_array_equal(edges.shift[in_frame_1], single.shift)


def test_sorted_and_deterministic():
    rng = np.random.default_rng(RNG_SEED + 7)
    cell = np.diag([5.0, 5.2, 5.4])
    coord = random_frame(rng, cell, 10)[None]
    edges = build_edges(coord, cell[None], 6.0)
    keys = np.column_stack([edges.dst, edges.src, edges.shift])
    order = np.lexsort(keys.T[::-1])
    np.testing.assert_array_equal(order, np.arange(len(edges)))
    again = build_edges(coord, cell[None], 6.0)
    np.testing.assert_array_equal(again.vec, edges.vec)


def test_permutation_gives_same_edges():
    rng = np.random.default_rng(RNG_SEED + 8)
    cell = np.array([[6.0, 0.0, 0.0], [1.0, 6.0, 0.0], [0.5, 0.5, 6.0]])
    coord = random_frame(rng, cell, 20)[None]
    perm = rng.permutation(20)
    base = as_dict(build_edges(coord, cell[None], 5.0), 20)
    permuted = as_dict(build_edges(coord[:, perm], cell[None], 5.0), 20)
    mapped = {(f, perm[i], perm[j], *s): v for (f, i, j, *s), v in permuted.items()}
    assert mapped.keys() == base.keys()
    for key, vec in base.items():
        np.testing.assert_allclose(mapped[key], vec, atol=1e-12)


def test_empty_inputs():
    edges = build_edges(np.zeros((1, 0, 3)), np.eye(3)[None] * 5.0, 3.0)
    assert len(edges) == 0
    assert len(build_edges(np.zeros((1, 1, 3)), None, 3.0)) == 0


def test_image_explosion_refused():
    with pytest.raises(InputError, match="frame 0: the cell"):
        build_edges(np.zeros((1, 2, 3)), np.eye(3)[None] * 0.01, 6.0)


def test_edge_vectors_follow_the_shifts():
    """``vec = r[src] + shift @ cell[frame] - r[dst]`` for every edge of triclinic frames."""
    rng = np.random.default_rng(RNG_SEED + 9)
    cells = np.stack([np.diag([5.0, 5.5, 6.0]), np.array([[5, 0, 0], [1, 5, 0], [0.5, 1, 5.0]])])
    coord = np.stack([random_frame(rng, c, 7) for c in cells])
    edges = build_edges(coord, cells, 4.5)
    flat, frame = coord.reshape(-1, 3), edges.dst // 7
    shift_cart = np.einsum("ea,eab->eb", edges.shift, cells[frame])
    np.testing.assert_allclose(flat[edges.src] + shift_cart - flat[edges.dst], edges.vec)
    assert len(edges) > 0 and np.abs(edges.shift).sum() > 0


# ----------------------------------------------------------------------------- frames.py


def test_normalize_layouts():
    coord = np.arange(12.0).reshape(4, 3)
    cell = np.eye(3) * 10.0
    types = [0, 1, 1, 0]
    for c in (coord, coord.ravel(), coord[None], coord.reshape(1, 12)):
        x, box, at = normalize_frames(c, cell.ravel(), types, ntypes=2)
        assert x.shape == (1, 4, 3) and box.shape == (1, 3, 3) and at.shape == (1, 4)
        assert x.dtype == np.float64 and at.dtype == np.int64
    x, box, at = normalize_frames(np.stack([coord] * 3), np.stack([cell] * 3), types, 2)
    assert x.shape == (3, 4, 3) and box.shape == (3, 3, 3) and at.shape == (3, 4)
    x, box, at = normalize_frames(np.stack([coord] * 2), None, [types, types[::-1]], 2)
    assert box is None and at.tolist() == [types, types[::-1]]
    x, box, at = normalize_frames(np.stack([coord] * 2), cell, types, 2)
    assert box.shape == (2, 3, 3)  # one cell shared by every frame


GOOD_COORD = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.5, 0.0]])
GOOD_CELL = np.eye(3) * 10.0


@pytest.mark.parametrize(
    ("coords", "cells", "types", "pattern"),
    [
        (np.zeros((2, 7)), None, [0, 1, 1], r"expected shape \(nf, 9\).*got \(2, 7\)"),
        (np.zeros((2, 3, 4)), None, [0, 1, 1], r"got \(2, 3, 4\)"),
        (np.zeros((0, 9)), None, [0, 1, 1], "0 frames"),
        (GOOD_COORD, None, np.zeros((1, 1, 3)), r"atom_types: expected shape.*\(1, 1, 3\)"),
        (GOOD_COORD, None, [0.5, 1, 1], "must be integers"),
        (GOOD_COORD, None, [], "empty: atom_types lists 0 atoms"),
        ([GOOD_COORD] * 2, None, [[0, 1, 1]] * 3, "atom_types has 3 frames.*coords has 2"),
        ([GOOD_COORD] * 2, [GOOD_CELL] * 3, [0, 1, 1], "cells has 3 frames.*coords has 2"),
        (GOOD_COORD, np.eye(4), [0, 1, 1], r"cells: expected shape.*got \(4, 4\)"),
        ("abc", None, [0, 1, 1], "coords cannot be read"),
    ],
)
def test_shape_errors(coords, cells, types, pattern):
    with pytest.raises(InputError, match=pattern):
        normalize_frames(coords, cells, types, ntypes=2)


def test_non_finite_coordinates_name_frame_and_atom():
    coords = np.stack([GOOD_COORD] * 3)
    coords[2, 1, 0] = np.nan
    coords[2, 2, 2] = np.inf
    with pytest.raises(InputError, match=r"frame 2: non-finite.*atom\(s\) \[1, 2\]"):
        normalize_frames(coords, None, [0, 1, 1], ntypes=2)


def test_non_finite_cell_names_frame():
    cells = np.stack([GOOD_CELL] * 2)
    cells[1, 0, 0] = np.nan
    with pytest.raises(InputError, match="frame 1: cell contains NaN"):
        normalize_frames(np.stack([GOOD_COORD] * 2), cells, [0, 1, 1], ntypes=2)


def test_unknown_types_list_type_map():
    with pytest.raises(
        InputError, match=r"frame 1: unknown atom type\(s\) \[2\] at atom\(s\) \[0\]"
    ):
        normalize_frames([GOOD_COORD] * 2, None, [[0, 1, 1], [2, 1, 1]], ntypes=2)
    with pytest.raises(InputError, match=r"\[-1\].*valid types are 0=O, 1=H"):
        normalize_frames(GOOD_COORD, None, [0, -1, 1], ntypes=2, type_map=["O", "H"])


@pytest.mark.parametrize(
    "bad_cell",
    [
        np.diag([10.0, 10.0, 0.0]),  # a zero vector (slab given without vacuum)
        np.array([[10.0, 0, 0], [0, 10.0, 0], [10.0, 10.0, 1e-6]]),  # nearly coplanar
        np.eye(3) * 1e-2,  # tiny
    ],
)
def test_degenerate_cell_reports_volume(bad_cell):
    cells = np.stack([GOOD_CELL, bad_cell])
    with pytest.raises(InputError, match=r"frame 1: degenerate cell, volume [0-9.e+-]+ Å\^3"):
        normalize_frames([GOOD_COORD] * 2, cells, [0, 1, 1], ntypes=2)


def test_check_overlaps():
    coord = np.stack([GOOD_COORD, GOOD_COORD])
    cells = np.stack([GOOD_CELL, GOOD_CELL])
    check_overlaps(build_edges(coord, cells, 3.0), nat=3)  # fine system passes

    close = coord.copy()
    close[1, 2] = close[1, 1] + [0.0, 0.0, 5e-4]
    with pytest.raises(InputError, match=r"frame 1: atoms 1 and 2 are 0.0005 Å apart"):
        check_overlaps(build_edges(close, cells, 3.0), nat=3)

    on_top = coord.copy()
    on_top[0, 2] = on_top[0, 0]
    with pytest.raises(InputError, match="frame 0: atoms 0 and 2 sit on top of each other"):
        check_overlaps(build_edges(on_top, cells, 3.0), nat=3)

    through_image = coord.copy()
    through_image[1, 2] = [9.9999, 0.0, 0.0]  # 1e-4 Å from atom 0 across the boundary
    with pytest.raises(InputError, match=r"frame 1: atoms 0 and 2 .* through periodic image"):
        check_overlaps(build_edges(through_image, cells, 3.0), nat=3)


@pytest.mark.parametrize("n_nodes", [7, 2**31])  # a packed key, and the lexsort fallback
def test_edge_order_is_lexicographic(n_nodes):
    rng = np.random.default_rng(RNG_SEED + 9)
    dst, src = rng.integers(0, n_nodes, (2, 500))
    shift = rng.integers(-2, 3, (500, 3))
    # one edge per (centre, neighbour, image), as in every neighbour list; drawn order kept
    _, first = np.unique(np.column_stack([dst, src, shift]), axis=0, return_index=True)
    keep = np.sort(first)
    dst, src, shift = dst[keep], src[keep], shift[keep]
    expected = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], src, dst))
    np.testing.assert_array_equal(_edge_order(src, dst, shift), expected)
