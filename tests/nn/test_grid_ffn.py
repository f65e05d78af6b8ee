"""Grid projectors, grid nets, gated activations and FFNs against DeePMD-kit, plus equivariance.

Reference data: ``tests/module_fixtures/make_grid_ffn.py``. Upstream builds its e3nn product-grid
tables in float32 (torch's default dtype) before casting, so cases on that grid agree to ~1e-7
relative only; every other case agrees to rounding.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.geometry.layout import SphericalLayout
from sezm.geometry.wigner import WignerD
from sezm.nn.activation import GatedActivation
from sezm.nn.ffn import EquivariantFFN
from sezm.nn.grid import (
    S2GridProjector,
    SO3GridProjector,
    lebedev_grid,
    resolve_s2_grid_resolution,
    resolve_so3_grid,
)
from sezm.nn.grid_net import S2GridNet, SO3GridNet
from sezm.nn.options import FFNOptions, GridOp, LayerBasics

DATA = Path(__file__).parents[1] / "data" / "modules"
F64 = torch.float64
TIGHT, FLOAT32_TABLES = 1e-10, 1e-5


@cache
def load(name: str) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    with np.load(DATA / f"{name}.npz") as data:
        for key in data.files:
            case, _, rest = key.partition("/")
            cases.setdefault(case, {})[rest] = data[key]
    return cases


def case_ids(name: str) -> list[str]:
    return list(load(name)) if (DATA / f"{name}.npz").exists() else []


def group(case: dict, prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: torch.from_numpy(v) for k, v in case.items() if k.startswith(prefix + "/")}


def tolerance(config: dict) -> float:
    """Relative tolerance: loose where upstream evaluates its float32-built e3nn grid tables."""
    ffn_s2 = config.get("s2_activation") and not config.get("ffn_so3_grid")
    e3nn = config.get("grid_method") == "e3nn" or (ffn_s2 and not config.get("lebedev_quadrature"))
    return FLOAT32_TABLES if e3nn else TIGHT


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = want.abs().max().item() + 1e-30
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


#: upstream's axis layouts (a constructor argument there) -> sezm's ``(N, J, F, C)`` and back
TO_NODES = {
    "ndfc": lambda x, f: x,
    "nfdc": lambda x, f: x.transpose(1, 2),
    "fndc": lambda x, f: x.permute(1, 2, 0, 3),
    "flat": lambda x, f: x.reshape(x.shape[0], x.shape[1], f, -1),
}
FROM_NODES = {
    "ndfc": lambda x: x,
    "nfdc": lambda x: x.transpose(1, 2),
    "fndc": lambda x: x.permute(2, 0, 1, 3),
    "flat": lambda x: x.flatten(2),
}


def run_in_layout(module: torch.nn.Module, config: dict, inputs: dict) -> torch.Tensor:
    """``module`` on ``inputs`` given in the fixture's upstream axis layout, output likewise."""
    layout, f = config.get("layout", "ndfc"), config.get("n_focus", 1)
    nodes = {k: TO_NODES[layout](v, f) for k, v in inputs.items()}
    return FROM_NODES[layout](module(**nodes))


def equivariant_ffn(
    lmax: int,
    channels: int,
    hidden_channels: int,
    kmax: int = 1,
    mlp_bias: bool = False,
    activation_function: str = "silu",
    glu_activation: bool = True,
    ffn_so3_grid: bool = False,
    s2_activation: bool = False,
    lebedev_quadrature: bool = False,
    grid_mlp: bool = False,
    grid_branch: int = 0,
) -> EquivariantFFN:
    """A float64 FFN from DeePMD-kit's constructor keywords (the fixtures'), through the records."""
    basics = LayerBasics(
        channels=channels,
        precision="float64",
        eps=1e-7,
        mlp_bias=mlp_bias,
        activation_function=activation_function,
        glu_activation=glu_activation,
        edge_norm=False,
        layer_scale=False,
    )
    ffn = FFNOptions(
        blocks=1,
        neurons=hidden_channels,
        s2_activation=s2_activation,
        so3_grid=ffn_so3_grid,
        lebedev=lebedev_quadrature,
        grid=GridOp(mlp=grid_mlp, branches=grid_branch),
        activation_function=activation_function,
        glu=glu_activation,
    )
    return EquivariantFFN(basics, ffn, lmax, kmax, seed=None)


def build(name: str, config: dict) -> torch.nn.Module:
    config = dict(config)
    config.pop("layout", None)
    if name == "grid_s2":
        return S2GridNet(**config, dtype=F64)
    if name == "grid_so3":
        return SO3GridNet(**config, dtype=F64)
    if name == "act_gated":
        config.pop("glu")
        return GatedActivation(**config, dtype=F64)
    return equivariant_ffn(**config)


@pytest.mark.parametrize(
    ("name", "case"),
    [(n, c) for n in ("grid_s2", "grid_so3", "act_gated", "ffn_equivariant") for c in case_ids(n)],
)
def test_module_parity(name: str, case: str) -> None:
    data = load(name)[case]
    config = json.loads(str(data["config"]))
    module = build(name, config)
    state = group(data, "state")
    for key, buffer in module.named_buffers():  # persistent index buffers are built, not loaded
        if key in state:
            assert torch.equal(buffer, state[key]), key
    module.load_state_dict(state, strict=True)
    inputs = {k: v.clone().requires_grad_(True) for k, v in group(data, "in").items()}
    out = run_in_layout(module, config, inputs)
    cot = torch.from_numpy(data["cot"])
    grads = torch.autograd.grad((out * cot).sum(), list(inputs.values()))
    rel = tolerance(config)
    assert_close(out.detach(), torch.from_numpy(data["out"]), rel)
    for key, grad in zip(inputs, grads, strict=True):
        assert_close(grad, torch.from_numpy(data[f"grad/{key}"]), rel)


@pytest.mark.parametrize("case", case_ids("grid_proj"))
def test_projector_parity(case: str) -> None:
    data = load("grid_proj")[case]
    config = json.loads(str(data["config"]))
    shared = {k: config.get(k) for k in ("lmax", "mmax")}
    layout = config.get("coefficient_layout", "packed")
    if config["kind"] == "S2GridNet":
        proj = S2GridProjector(
            **shared,
            dtype=F64,
            coefficient_layout=layout,
            grid_resolution_list=config.get("grid_resolution_list"),
            grid_method=config.get("grid_method", "e3nn"),
        )
    else:
        proj = SO3GridProjector(
            **shared,
            kmax=config["kmax"],
            dtype=F64,
            coefficient_layout=layout,
            lebedev_precision=config.get("lebedev_precision"),
        )
    a, b = torch.from_numpy(data["in/a"]), torch.from_numpy(data["in/b"])
    rel = tolerance(config)
    assert_close(
        proj.from_grid(proj.to_grid(a) * proj.to_grid(b)), torch.from_numpy(data["product"]), rel
    )
    assert_close(proj.from_grid(proj.to_grid(a)), torch.from_numpy(data["roundtrip"]), rel)
    if "product64" in data:  # upstream's e3nn tables rebuilt in float64: agree to rounding
        want = torch.from_numpy(data["product64"])
        assert_close(proj.from_grid(proj.to_grid(a) * proj.to_grid(b)), want, TIGHT)


# ---------------------------------------------------------------- resolution rules and grids


def test_resolution_rules() -> None:
    assert resolve_s2_grid_resolution(1, 1, method="lebedev") == [3, 6]
    assert resolve_s2_grid_resolution(2, 2, method="lebedev") == [7, 26]
    assert resolve_s2_grid_resolution(3, 1, method="lebedev") == [9, 38]
    assert resolve_s2_grid_resolution(3, 1, method="e3nn") == [6, 12]
    assert resolve_s2_grid_resolution(2, 2, method="e3nn") == [8, 8]
    assert resolve_so3_grid(2, kmax=2) == (7, 26, 7)
    assert resolve_so3_grid(3, kmax=0) == (9, 38, 1)


@pytest.mark.parametrize("precision", [3, 7, 9, 17])
def test_lebedev_rule_exactness(precision: int) -> None:
    """Weights sum to one and integrate x^a y^b z^c exactly up to the precision."""
    points, weights = lebedev_grid(precision)
    assert abs(weights.sum().item() - 1) < 1e-14
    x, y, z = points.T
    # <x^2> = 1/3, <x^2 y^2> = 1/15, <x^4> = 1/5 on the unit sphere
    assert abs((weights * x**2).sum().item() - 1 / 3) < 1e-14
    if precision >= 5:
        assert abs((weights * x**2 * y**2).sum().item() - 1 / 15) < 1e-14
        assert abs((weights * z**4).sum().item() - 1 / 5) < 1e-14


@pytest.mark.parametrize(
    "proj",
    [
        S2GridProjector(lmax=3, dtype=F64, grid_method="lebedev"),
        S2GridProjector(lmax=3, dtype=F64, grid_method="e3nn", grid_resolution_list=[12, 12]),
        SO3GridProjector(lmax=2, kmax=2, dtype=F64),
    ],
)
def test_roundtrip_is_identity(proj) -> None:
    """``from(to(x)) = x`` for full-degree projectors (frames with |k| > l carry nothing)."""
    x = torch.randn(2, proj.coeff_dim // proj.n_frames, 1, proj.n_frames * 3, dtype=F64)
    if proj.n_frames > 1:  # zero the frame slots that do not exist for a degree
        k = torch.tensor(proj.frame_set).abs()
        degree = torch.tensor(SphericalLayout.of(proj.lmax).degrees)
        mask = (k[None, :] <= degree[:, None]).to(F64)  # (J, K)
        x = (x.view(2, -1, 1, proj.n_frames, 3) * mask[None, :, None, :, None]).view_as(x)
    assert_close(proj.from_grid(proj.to_grid(x)), x, 1e-12)


# ---------------------------------------------------------------- equivariance


def random_rotation(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(n, 4, dtype=F64)
    return q / q.norm(dim=-1, keepdim=True), q


def z_rotation(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]], dtype=F64)


def rotate(x: torch.Tensor, wigner: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rotate ``(N, J, F, C)`` coefficients whose rows are the packed rows ``rows``."""
    block = wigner[0][rows][:, rows]  # (J, J), valid when ``rows`` is rotation-closed
    return torch.einsum("ij,njfc->nifc", block, x)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    return module


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(s2_activation=True, lebedev_quadrature=True, grid_branch=2),
        dict(s2_activation=True, lebedev_quadrature=False, grid_mlp=True),
        dict(ffn_so3_grid=True, kmax=2, grid_mlp=True),
        dict(ffn_so3_grid=True, kmax=1, grid_branch=2),
        dict(glu_activation=True),
        dict(glu_activation=False),
    ],
)
def test_ffn_equivariance(kwargs) -> None:
    torch.manual_seed(0)
    lmax = 3
    ffn = perturbed(equivariant_ffn(lmax=lmax, channels=4, hidden_channels=5, **kwargs))
    x = torch.randn(3, (lmax + 1) ** 2, 1, 4, dtype=F64)
    wigner = WignerD(lmax, dtype=F64)(random_rotation()[0])
    rows = torch.arange((lmax + 1) ** 2)
    assert_close(ffn(rotate(x, wigner, rows)), rotate(ffn(x), wigner, rows), 1e-12)


@pytest.mark.parametrize("cls", [S2GridNet, SO3GridNet])
def test_cross_grid_net_equivariance(cls) -> None:
    """Message-node products (packed, full): equivariant under any rotation."""
    torch.manual_seed(1)
    lmax, f, c = 3, 2, 3
    extra = dict(kmax=2) if cls is SO3GridNet else dict(grid_method="lebedev")
    net = perturbed(
        cls(
            lmax=lmax,
            channels=c,
            n_focus=f,
            mode="cross",
            op_type="branch",
            grid_branches=2,
            dtype=F64,
            residual_scale_init=1e-3,
            **extra,
        )
    )
    q, ctx = (torch.randn(2, (lmax + 1) ** 2, f, c, dtype=F64) for _ in range(2))
    wigner = WignerD(lmax, dtype=F64)(random_rotation()[0])
    rows = torch.arange((lmax + 1) ** 2)
    got = net(rotate(q, wigner, rows), rotate(ctx, wigner, rows))
    assert_close(got, rotate(net(q, ctx), wigner, rows), 1e-12)


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (S2GridNet, dict(grid_method="lebedev")),
        (S2GridNet, dict(grid_method="e3nn")),
        (SO3GridNet, dict(kmax=1)),
    ],
)
@pytest.mark.parametrize("layout", ["m_major", "packed"])
def test_truncated_grid_net_z_equivariance(cls, extra, layout) -> None:
    """m-truncated inputs (edge frame) are closed under rolls about z: z-equivariant."""
    torch.manual_seed(2)
    lmax, mmax, f, c = 3, 1, 2, 3
    net = perturbed(
        cls(
            lmax=lmax,
            mmax=mmax,
            channels=c,
            n_focus=f,
            mode="cross",
            op_type="mlp",
            dtype=F64,
            coefficient_layout=layout,
            residual_scale_init=1e-3,
            **extra,
        )
    )
    shape = SphericalLayout.of(lmax, mmax)
    rows = torch.tensor(shape.reduced_rows if layout == "m_major" else shape.truncated_rows)
    q, ctx = (torch.randn(2, len(rows), f, c, dtype=F64) for _ in range(2))
    wigner = WignerD(lmax, dtype=F64)(z_rotation(0.7))
    got = net(rotate(q, wigner, rows), rotate(ctx, wigner, rows))
    assert_close(got, rotate(net(q, ctx), wigner, rows), 1e-12)


@pytest.mark.parametrize("mmax", [None, 1])
def test_gated_activation_equivariance(mmax) -> None:
    torch.manual_seed(3)
    lmax = 3
    act = perturbed(GatedActivation(lmax=lmax, mmax=mmax, channels=4, n_focus=2, dtype=F64))
    rows = torch.arange((lmax + 1) ** 2)
    if mmax is not None:
        rows = torch.tensor(SphericalLayout.of(lmax, mmax).reduced_rows)
    x, gate = (torch.randn(3, len(rows), 2, 4, dtype=F64) for _ in range(2))
    quat = random_rotation()[0] if mmax is None else z_rotation(1.3)
    wigner = WignerD(lmax, dtype=F64)(quat)
    got = act(rotate(x, wigner, rows), gate=rotate(gate, wigner, rows))
    assert_close(got, rotate(act(x, gate=gate), wigner, rows), 1e-12)


def test_equivariance_check_catches_a_broken_module() -> None:
    """An S2 product on a rule that is too coarse (precision 3 for lmax 3) is not equivariant."""
    torch.manual_seed(4)
    lmax = 3
    net = perturbed(
        S2GridNet(
            lmax=lmax,
            channels=3,
            mode="self",
            op_type="glu",
            dtype=F64,
            grid_method="lebedev",
            grid_resolution_list=[3, 6],
        )
    )
    x = torch.randn(2, (lmax + 1) ** 2, 1, 6, dtype=F64)
    wigner = WignerD(lmax, dtype=F64)(random_rotation()[0])
    rows = torch.arange((lmax + 1) ** 2)
    with pytest.raises(AssertionError):
        assert_close(net(rotate(x, wigner, rows)), rotate(net(x), wigner, rows), 1e-6)
