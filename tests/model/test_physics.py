"""Physical properties of float64 DPA4 energy models over a spread of options (``physics.py``).

Every model is tiny (8-16 channels, 4 radial functions, lmax <= 2, 2 blocks, rcut 3.5 Å) and
every parameter is perturbed by ``0.1 N(0, 1)`` so that zero-initialised branches (second FFN
layers, layer scales, grid residuals, attention biases) take part. Systems: a 5-atom open
cluster, a 4-atom triclinic cell smaller than the cutoff sphere (atoms see their own images),
and batches of 4-atom frames. The last section breaks the model on purpose and asserts that the
matching check fails, so the checks are known to bite.
"""

from __future__ import annotations

import numpy as np
import physics as P
import pytest
import torch
from model_zoo import COMBOS, RCUT, make_model, model_of

import sezm.data.graph
import sezm.model.forces
import sezm.nn.edge_cache
import sezm.nn.radial
from sezm.geometry import edge_frame
from sezm.geometry.wigner import WignerD
from sezm.model.zbl import zbl_pair_energy

CLUSTER = P.random_cluster(5, 2, seed=0)
CRYSTAL = P.random_crystal(4, 2, seed=0)
OPEN_BATCH = [P.random_cluster(4, 2, seed=s) for s in (1, 2)]
PERIODIC_BATCH = [P.random_crystal(4, 2, seed=s) for s in (1, 2)]

# check -> (check on its system(s), combos it runs on)
ALL = list(COMBOS)
MATRIX = {
    "rotation_open": (lambda m: P.check_rotation(m, CLUSTER), ALL),
    "rotation_periodic": (lambda m: P.check_rotation(m, CRYSTAL, seed=1), ALL),
    "planar_mirror": (
        lambda m: P.check_planar_reflection(m, CLUSTER),
        ["default", "cartesian", "so3_grids", "node_wise_so3"],
    ),
    "translation": (lambda m: P.check_translation(m, CRYSTAL), ALL),
    "permutation": (lambda m: P.check_permutation(m, CRYSTAL), ALL),
    "periodic_images": (lambda m: P.check_periodic_images(m, CRYSTAL), ALL),
    "forces_fd_open": (lambda m: P.check_forces_fd(m, CLUSTER), ALL),
    "forces_fd_periodic": (lambda m: P.check_forces_fd(m, CRYSTAL), ALL),
    "virial_fd_periodic": (lambda m: P.check_virial_fd(m, CRYSTAL), ALL),
    "virial_fd_open": (
        lambda m: P.check_virial_fd(m, CLUSTER),
        ["default", "cartesian", "zbl", "exclude"],
    ),
    "supercell": (lambda m: P.check_supercell(m, CRYSTAL), ALL),
    "locality": (
        lambda m: P.check_locality(m, *OPEN_BATCH),
        ["default", "no_attention", "cartesian", "so3_grids", "zbl", "exclude"],
    ),
    # ZBL has a documented step at rcut: test_zbl_cutoff_step_is_the_zbl_pair_term
    "cutoff": (lambda m: P.check_cutoff_smoothness(m, CLUSTER), [c for c in ALL if c != "zbl"]),
    "batching": (lambda m: P.check_batching(m, PERIODIC_BATCH, OPEN_BATCH), ALL),
    "random_roll": (lambda m: P.check_random_roll(m, CRYSTAL), ALL),
}
CASES = [(check, combo) for check, (_, combos) in MATRIX.items() for combo in combos]


@pytest.mark.parametrize("check, combo", CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_physics(check: str, combo: str) -> None:
    MATRIX[check][0](model_of(combo))


# --- parity ----------------------------------------------------------------------------------------
def test_inversion_invariant_without_directions() -> None:
    """lmax 0 sees distances only, so it must be parity invariant: proves the inversion check
    itself is right, and the chirality below is the models', not the checker's."""
    model = make_model({"lmax": 0, "kmax": 0, "mmax": 0, "mixing_layers": 0})
    P.check_inversion(model, CLUSTER)
    P.check_inversion(model, CRYSTAL)


def test_models_with_directional_features_are_chiral() -> None:
    """DPA4 is SO(3)-, not O(3)-equivariant: the SO(2) convolution's m-mixing weights (and the
    k = +-1 frames of the SO(3) grids) couple parity-odd combinations, so a mirror image is a
    different structure. Recorded so that a change of this behaviour is noticed."""
    for combo in ("default", "so3_grids", "cartesian"):
        model = model_of(combo)
        assert P.reflection_error(model, CLUSTER) > 1e-8, combo
        assert P.out_of_plane_force(model, CLUSTER) > 1e-8, combo
        with pytest.raises(P.PhysicsCheckError):
            P.check_inversion(model, CLUSTER)


@pytest.mark.parametrize(
    "combo", ["default", "no_attention", "cartesian", "s2_e3nn_grids", "node_wise_so3"]
)
def test_isolated_atoms(combo: str) -> None:
    """Atoms farther apart than rcut: each has its isolated-atom energy, no force, no virial."""
    model = model_of(combo)
    far = P.System(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, RCUT + 1.0]]), np.array([0, 1]))
    out = P.evaluate(model, far)
    singles = [
        P.evaluate(model, P.System(far.coord[i : i + 1], far.atype[i : i + 1])) for i in (0, 1)
    ]
    np.testing.assert_allclose(out["atom_energy"], [s["energy"] for s in singles], atol=1e-12)
    np.testing.assert_array_equal(out["force"], 0.0)
    np.testing.assert_array_equal(out["virial"], 0.0)


# --- ZBL bridging ------------------------------------------------------------------------------
def bridging_system() -> P.System:
    """O-H at 0.65 Å (inside r_outer: clamped radial features, partial source gate) and O-O at
    0.45 Å (inside r_inner: frozen, gate zero), plus two spectators."""
    coord = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.65, 0.05, -0.03],
            [0.1, 1.6, 0.2],
            [0.12, 2.05, 0.1],
            [-1.3, 0.6, 1.1],
        ]
    )
    return P.System(coord, np.array([0, 1, 0, 0, 1]))


def test_zbl_bridging_zone_forces_and_symmetries() -> None:
    model = model_of("zbl")
    system = bridging_system()
    P.check_forces_fd(model, system)
    P.check_virial_fd(model, system)
    P.check_rotation(model, system)
    P.check_permutation(model, system)


@pytest.mark.parametrize("start, stop", [(0.40, 0.60), (0.70, 0.90)], ids=["r_inner", "r_outer"])
def test_zbl_scan_through_bridging_radii(start: float, stop: float) -> None:
    """An O-H pair crossing r_inner (gate switching off) or r_outer (clamp releasing): no step."""
    model = model_of("zbl")
    system = bridging_system()
    direction = system.coord[1] / np.linalg.norm(system.coord[1])
    base = system.moved(np.vstack([system.coord[0], start * direction, system.coord[2:]]))
    P.check_line_scan(model, base, 1, direction, np.linspace(0.0, stop - start, 21))


def test_zbl_cutoff_step_is_the_zbl_pair_term() -> None:
    """Upstream adds the full ZBL pair energy for every edge inside rcut, with no switching, so
    the energy steps by V_ZBL(rcut) when a pair crosses rcut (documented DeePMD-kit behaviour).
    The learned part must still be smooth, and the step must be exactly the ZBL pair term."""
    model = model_of("zbl")
    with pytest.raises(P.PhysicsCheckError, match="cutoff crossing"):
        P.check_cutoff_smoothness(model, CLUSTER)
    base, direction = P.crossing_system(model, CLUSTER)
    probe, d = CLUSTER.nat - 1, 1e-3
    energies = []
    for offset in (-d, d):
        coord = base.coord.copy()
        coord[probe] += offset * direction
        energies.append(P.energy(model, base.moved(coord)))
    partner = int(np.argmin(np.linalg.norm(base.coord[:-1] - base.coord[probe], axis=1)))
    z = {0: 8.0, 1: 1.0}
    v = zbl_pair_energy(
        torch.tensor(RCUT - d, dtype=torch.float64),
        torch.tensor(z[int(CLUSTER.atype[probe])], dtype=torch.float64),
        torch.tensor(z[int(CLUSTER.atype[partner])], dtype=torch.float64),
    )
    assert abs((energies[0] - energies[1]) - float(v)) < 1e-6 * abs(float(v)) + 1e-10
    potential, model.inter_potential = model.inter_potential, None
    try:
        P.check_cutoff_smoothness(model, CLUSTER)
    finally:
        model.inter_potential = potential


# --- the checks can fail -----------------------------------------------------------------------
def test_rotation_check_catches_transposed_wigner(monkeypatch) -> None:
    """Wigner-D in the passive instead of the active convention (D^T for D): messages are
    computed in wrong local frames and rotation invariance is lost."""
    model = model_of("default")
    P.check_rotation(model, CLUSTER)
    blocks = WignerD.blocks

    def transposed(self, q):  # every degree block transposed, in the flat block layout
        flat = blocks(self, q)
        parts, start = [], 0
        for l in range(self.lmax + 1):
            n = 2 * l + 1
            parts.append(
                flat[:, start : start + n * n].view(-1, n, n).transpose(1, 2).reshape(-1, n * n)
            )
            start += n * n
        return torch.cat(parts, dim=1)

    monkeypatch.setattr(WignerD, "blocks", transposed)
    with pytest.raises(P.PhysicsCheckError, match="rotation"):
        P.check_rotation(model, CLUSTER)


def test_force_checks_catch_a_missing_reaction_term(monkeypatch) -> None:
    """Forces scattered to edge destinations only (Newton's third law dropped)."""
    model = model_of("default")
    monkeypatch.setattr(
        sezm.model.forces,
        "forces",
        lambda grad, src, dst, n: grad.new_zeros(n, 3).index_add(0, dst, grad),
    )
    with pytest.raises(P.PhysicsCheckError, match="force vs -dE/dr"):
        P.check_forces_fd(model, CLUSTER)
    with pytest.raises(P.PhysicsCheckError, match="net force"):
        P.check_translation(model, CRYSTAL)


def test_virial_check_catches_a_sign_error(monkeypatch) -> None:
    model = model_of("default")
    edge_virials = sezm.model.forces.edge_virials
    monkeypatch.setattr(sezm.model.forces, "edge_virials", lambda g, v: -edge_virials(g, v))
    with pytest.raises(P.PhysicsCheckError, match="virial vs -dE/d eps"):
        P.check_virial_fd(model, CRYSTAL)


def test_cutoff_check_catches_a_c0_envelope(monkeypatch) -> None:
    """An envelope that reaches zero at rcut with a finite slope: continuous energy, but the
    forces jump when a pair crosses rcut."""

    def linear_envelope(r, rcut, p):
        return ((rcut - r) / rcut).clamp(0.0, 1.0)

    model = model_of("default")
    P.check_cutoff_smoothness(model, CLUSTER)
    monkeypatch.setattr(sezm.nn.edge_cache, "c3_envelope", linear_envelope)
    monkeypatch.setattr(sezm.nn.radial, "c3_envelope", linear_envelope)
    with pytest.raises(P.PhysicsCheckError, match="cutoff crossing"):
        P.check_cutoff_smoothness(model, CLUSTER)


def test_supercell_check_catches_dropped_self_images(monkeypatch) -> None:
    """A neighbour list that drops an atom's own periodic images (src == dst): a small cell
    loses those pairs, its 2x2x2 supercell does not."""
    build_edges = sezm.data.graph.build_edges

    def without_self_images(coord, cell, rcut):
        edges = build_edges(coord, cell, rcut)
        keep = edges.src != edges.dst
        return type(edges)(
            edges.src[keep], edges.dst[keep], edges.vec[keep], edges.shift[keep], edges.coincident
        )

    model = model_of("default")
    graph = P.graph_of(model, [CRYSTAL])
    assert bool((graph.src == graph.dst).any()), "CRYSTAL must be smaller than the cutoff sphere"
    monkeypatch.setattr(sezm.data.graph, "build_edges", without_self_images)
    with pytest.raises(P.PhysicsCheckError, match="supercell"):
        P.check_supercell(model, CRYSTAL)


def test_batching_check_catches_frames_mixed_in_the_virial(monkeypatch) -> None:
    """Every edge's virial booked to frame 0."""
    frame_virials = sezm.model.forces.frame_virials
    monkeypatch.setattr(
        sezm.model.forces,
        "frame_virials",
        lambda g, v, frame, nf: frame_virials(g, v, torch.zeros_like(frame), nf),
    )
    with pytest.raises(P.PhysicsCheckError, match="virial"):
        P.check_batching(model_of("default"), PERIODIC_BATCH, OPEN_BATCH)


def test_periodic_image_check_catches_a_27_cell_neighbour_search(monkeypatch) -> None:
    """A neighbour search that only looks one cell image away (a classic bug for atoms outside
    the cell): moving atoms by several lattice vectors loses pairs."""
    build_edges = sezm.data.graph.build_edges

    def nearest_images_only(coord, cell, rcut):
        edges = build_edges(coord, cell, rcut)
        keep = np.abs(edges.shift).max(axis=1) <= 1
        return type(edges)(
            edges.src[keep], edges.dst[keep], edges.vec[keep], edges.shift[keep], edges.coincident
        )

    model = model_of("default")
    monkeypatch.setattr(sezm.data.graph, "build_edges", nearest_images_only)
    with pytest.raises(P.PhysicsCheckError, match="image shift"):
        P.check_periodic_images(model, CRYSTAL)


def test_permutation_check_catches_an_off_by_one_readout(monkeypatch) -> None:
    """Descriptor rows read one atom off (rolled): atoms get a neighbour's environment."""
    model = model_of("default")
    forward = type(model.descriptor).forward

    def rolled(self, *args, **kwargs):
        desc, x = forward(self, *args, **kwargs)
        return desc.roll(1, dims=1), x

    monkeypatch.setattr(type(model.descriptor), "forward", rolled)
    with pytest.raises(P.PhysicsCheckError, match="permutation"):
        P.check_permutation(model, CRYSTAL)


def test_random_roll_check_catches_a_roll_about_the_wrong_axis(monkeypatch) -> None:
    """A training-time 'roll' about local x instead of z changes the edge direction itself."""

    def roll_about_x(q, generator=None):
        half = torch.pi * torch.rand(q.shape[:-1], dtype=q.dtype, generator=generator)
        zero = torch.zeros_like(half)
        return edge_frame.multiply(torch.stack([half.cos(), half.sin(), zero, zero], -1), q)

    model = model_of("default")
    monkeypatch.setattr(edge_frame, "random_roll", roll_about_x)
    with pytest.raises(P.PhysicsCheckError, match="random roll"):
        P.check_random_roll(model, CRYSTAL)
