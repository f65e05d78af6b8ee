"""Reference data for grid projectors, grid nets, gated activations and FFNs.

Run with the DeePMD-kit venv: ``/tmp/oracle/bin/python tests/module_fixtures/make_grid_ffn.py``.
Each upstream module is built in float64, every parameter is perturbed by ``0.1 * randn``, and
the state dict, random inputs, outputs and input gradients of ``sum(out * cotangent)`` go to
``tests/data/modules/{grid_proj,grid_s2,grid_so3,act_gated,ffn_equivariant}.npz`` under the
keys ``"<case>/config"`` (JSON of the constructor kwargs), ``"<case>/state/<name>"``,
``"<case>/in/<name>"``, ``"<case>/out"``, ``"<case>/cot"`` and ``"<case>/grad/<name>"``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.descriptor.sezm_nn.activation import GatedActivation
from deepmd.pt.model.descriptor.sezm_nn.ffn import EquivariantFFN
from deepmd.pt.model.descriptor.sezm_nn.grid_net import S2GridNet, SO3GridNet
from deepmd.pt.model.descriptor.sezm_nn.indexing import build_m_major_index

OUT = Path(__file__).resolve().parents[1] / "data" / "modules"
F64 = torch.float64
N_NODES = 2


def square(lmax: int) -> list[int]:
    """The square e3nn grid upstream's FFN and message-node products use."""
    n = 3 * lmax + 2
    n += n % 2
    return [max(2 * lmax + 4, n)] * 2


def s2_cases() -> list[dict]:
    cases = []
    for lmax in range(4):  # FFN-style: packed, full
        for method in ("lebedev", "e3nn"):
            for op in ("glu", "mlp", "branch"):
                cases.append(
                    dict(
                        lmax=lmax,
                        channels=4,
                        mode="self",
                        op_type=op,
                        layout="ndfc",
                        grid_method=method,
                        grid_branches=2 if op == "branch" else 1,
                        grid_resolution_list=square(lmax) if method == "e3nn" else None,
                    )
                )
    for lmax in range(1, 4):  # SO(2) mixing activation: m-major, focus-major
        for mmax in range(lmax + 1):
            for method in ("lebedev", "e3nn"):
                cases.append(
                    dict(
                        lmax=lmax,
                        mmax=mmax,
                        channels=4,
                        n_focus=2,
                        mode="self",
                        op_type="glu",
                        layout="fndc",
                        coefficient_layout="m_major",
                        grid_method=method,
                        mlp_bias=mmax == 1,
                    )
                )
    for lmax, mmax in ((2, 1), (3, 2), (3, 0)):  # packed truncated, nfdc
        cases.append(
            dict(
                lmax=lmax,
                mmax=mmax,
                channels=3,
                n_focus=2,
                mode="self",
                op_type="mlp",
                layout="nfdc",
                coefficient_layout="packed",
                grid_method="lebedev",
            )
        )
    for lmax, mmax in ((1, 1), (2, 1), (3, 2), (3, 1)):  # node-wise cross products
        for op in ("glu", "mlp", "branch"):
            for method in ("lebedev", "e3nn"):
                cases.append(
                    dict(
                        lmax=lmax,
                        mmax=mmax,
                        channels=4,
                        n_focus=2,
                        mode="cross",
                        op_type=op,
                        layout="flat",
                        coefficient_layout="m_major",
                        grid_method=method,
                        grid_branches=3 if op == "branch" else 1,
                        residual_scale_init=1e-3,
                        mlp_bias=op == "glu",
                    )
                )
    for lmax in (1, 2, 3):  # message-node cross products: packed, full
        for method in ("lebedev", "e3nn"):
            cases.append(
                dict(
                    lmax=lmax,
                    mmax=lmax,
                    channels=4,
                    n_focus=2,
                    mode="cross",
                    op_type="branch" if lmax == 2 else "mlp",
                    layout="flat",
                    coefficient_layout="packed",
                    grid_method=method,
                    grid_branches=2,
                    residual_scale_init=1e-3,
                    grid_resolution_list=square(lmax) if method == "e3nn" else None,
                )
            )
    return cases


def so3_cases() -> list[dict]:
    cases = []
    for lmax in range(4):  # FFN-style
        for kmax in range(3):
            for op in ("glu", "mlp", "branch"):
                if kmax == 2 and op == "mlp" and lmax < 3:
                    continue
                cases.append(
                    dict(
                        lmax=lmax,
                        kmax=kmax,
                        channels=3,
                        mode="self",
                        op_type=op,
                        layout="ndfc",
                        grid_branches=2 if op == "branch" else 1,
                        mlp_bias=op == "mlp",
                    )
                )
    for lmax, mmax, kmax in ((1, 1, 1), (2, 1, 1), (2, 1, 2), (3, 2, 1), (3, 0, 2)):  # node-wise
        for op in ("glu", "mlp", "branch"):
            cases.append(
                dict(
                    lmax=lmax,
                    mmax=mmax,
                    kmax=kmax,
                    channels=3,
                    n_focus=2,
                    mode="cross",
                    op_type=op,
                    layout="flat",
                    coefficient_layout="m_major",
                    grid_branches=2,
                    residual_scale_init=1e-3,
                )
            )
    for lmax, kmax in ((1, 1), (2, 2), (3, 1)):  # message-node
        cases.append(
            dict(
                lmax=lmax,
                kmax=kmax,
                channels=3,
                n_focus=2,
                mode="cross",
                op_type="glu",
                layout="flat",
                coefficient_layout="packed",
                residual_scale_init=1e-3,
                mlp_bias=True,
            )
        )
    cases.append(
        dict(
            lmax=2,
            kmax=1,
            channels=3,
            mode="self",
            op_type="glu",
            layout="nfdc",
            lebedev_precision=11,
        )
    )
    cases.append(
        dict(
            lmax=2,
            mmax=1,
            kmax=1,
            channels=3,
            n_focus=2,
            mode="self",
            op_type="branch",
            layout="fndc",
            coefficient_layout="m_major",
        )
    )
    return cases


def gated_cases() -> list[dict]:
    cases = []
    for lmax in range(4):
        for mmax in (None, *range(lmax)):
            for layout in ("nfdc", "ndfc", "fndc"):
                cases.append(
                    dict(
                        lmax=lmax,
                        mmax=mmax,
                        channels=4,
                        n_focus=1 + (lmax % 2),
                        layout=layout,
                        glu=layout != "nfdc",
                        mlp_bias=layout == "ndfc",
                        activation_function=("silu", "tanh", "gelu")[lmax % 3],
                    )
                )
    return cases


def ffn_cases() -> list[dict]:
    cases = []
    for lmax in range(4):
        base = dict(lmax=lmax, channels=4, hidden_channels=5)
        cases += [
            dict(base, glu_activation=False, activation_function="tanh"),
            dict(base, glu_activation=True, mlp_bias=True),
            dict(base, s2_activation=True, lebedev_quadrature=True),
            dict(base, s2_activation=True, lebedev_quadrature=False),
            dict(base, s2_activation=True, lebedev_quadrature=True, grid_mlp=True),
            dict(base, s2_activation=True, lebedev_quadrature=True, grid_branch=2),
            dict(base, ffn_so3_grid=True, kmax=min(lmax, 1)),
            dict(base, ffn_so3_grid=True, kmax=min(lmax, 2), grid_mlp=True, mlp_bias=True),
            dict(base, ffn_so3_grid=True, kmax=1, grid_branch=1, s2_activation=True),
        ]
    return cases


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def layout_shape(layout: str, n: int, d: int, f: int, c: int) -> tuple[int, ...]:
    return {
        "ndfc": (n, d, f, c),
        "nfdc": (n, f, d, c),
        "fndc": (f, n, d, c),
        "flat": (n, d, f * c),
    }[layout]


def record(store: dict, name: str, config: dict, module, inputs: dict, kwargs_fn) -> None:
    """Run ``module(**kwargs_fn(inputs))`` and store config, state, inputs, output, gradients."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = module(**kwargs_fn(leaves))
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum(), list(leaves.values()))
    store[f"{name}/config"] = np.array(json.dumps(config))
    for key, value in module.state_dict().items():
        store[f"{name}/state/{key}"] = value.numpy()
    for key, value in inputs.items():
        store[f"{name}/in/{key}"] = value.numpy()
    for key, value in zip(leaves, grads, strict=True):
        store[f"{name}/grad/{key}"] = value.numpy()
    store[f"{name}/out"] = out.detach().numpy()
    store[f"{name}/cot"] = cot.numpy()


def grid_net_inputs(net, config: dict) -> dict:
    k, c, f = net.n_frames, config["channels"], config.get("n_focus", 1)
    j = net.projector.coeff_dim // k
    width = (
        2 * k * c if config["mode"] == "self" else (c if net.frame_expand is not None else k * c)
    )
    shape = layout_shape(config["layout"], N_NODES, j, f, width)
    inputs = {"query": torch.randn(shape, dtype=F64)}
    if config["mode"] == "cross":
        inputs["context"] = torch.randn(shape, dtype=F64)
    return inputs


PROJECTOR_KEYS = (
    "lmax",
    "mmax",
    "kmax",
    "grid_method",
    "grid_resolution_list",
    "coefficient_layout",
    "lebedev_precision",
)


def make_grid_nets(cls, cases: list[dict]) -> tuple[dict, dict]:
    store, proj, seen = {}, {}, set()
    for i, config in enumerate(cases):
        net = cls(**config, dtype=F64, trainable=True, seed=i)
        perturb(net)
        record(store, f"c{i}", config, net, grid_net_inputs(net, config), lambda x: x)
        # the bare projector: from(to(a) * to(b)) and from(to(a)) on (N, J, 1, K*C)
        key = json.dumps([config.get(k) for k in PROJECTOR_KEYS])
        if key in seen:
            continue
        seen.add(key)
        j = net.projector.coeff_dim // net.n_frames
        a, b = (torch.randn(1, j, 1, net.n_frames * 2, dtype=F64) for _ in range(2))
        name = f"{cls.__name__}{i}"
        proj[f"{name}/config"] = np.array(json.dumps({"kind": cls.__name__, **config}))
        proj[f"{name}/in/a"], proj[f"{name}/in/b"] = a.numpy(), b.numpy()
        with torch.no_grad():
            proj[f"{name}/product"] = net._from_grid(net._to_grid(a) * net._to_grid(b)).numpy()
            proj[f"{name}/roundtrip"] = net._from_grid(net._to_grid(a)).numpy()
        if config.get("grid_method") == "e3nn":
            # upstream builds e3nn tables in torch's default dtype (float32); rebuilt in float64
            # they must agree with ours to rounding
            torch.set_default_dtype(F64)
            net = cls(**config, dtype=F64, trainable=True)
            torch.set_default_dtype(torch.float32)
            with torch.no_grad():
                product = net._from_grid(net._to_grid(a) * net._to_grid(b))
            proj[f"{name}/product64"] = product.numpy()
    return store, proj


def make_gated(cases: list[dict]) -> dict:
    store = {}
    for i, config in enumerate(cases):
        cfg = {k: v for k, v in config.items() if k != "glu"}
        act = GatedActivation(**cfg, dtype=F64, trainable=True, seed=i)
        perturb(act)
        lmax, mmax = config["lmax"], config["mmax"]
        d = (lmax + 1) ** 2 if mmax is None else len(build_m_major_index(lmax, mmax, device="cpu"))
        shape = layout_shape(config["layout"], N_NODES, d, config["n_focus"], config["channels"])
        inputs = {"x": torch.randn(shape, dtype=F64)}
        if config["glu"]:
            inputs["gate"] = torch.randn(shape, dtype=F64)
        record(store, f"c{i}", config, act, inputs, lambda x: x)
    return store


def make_ffn(cases: list[dict]) -> dict:
    store = {}
    for i, config in enumerate(cases):
        ffn = EquivariantFFN(**config, dtype=F64, trainable=True, seed=i)
        perturb(ffn)
        d = (config["lmax"] + 1) ** 2
        inputs = {"x": torch.randn(N_NODES, d, 1, config["channels"], dtype=F64)}
        record(store, f"c{i}", config, ffn, inputs, lambda x: x)
    return store


def main() -> None:
    torch.manual_seed(20260501)
    OUT.mkdir(parents=True, exist_ok=True)
    s2, proj_s2 = make_grid_nets(S2GridNet, s2_cases())
    so3, proj_so3 = make_grid_nets(SO3GridNet, so3_cases())
    files = {
        "grid_s2": s2,
        "grid_so3": so3,
        "grid_proj": {**proj_s2, **proj_so3},
        "act_gated": make_gated(gated_cases()),
        "ffn_equivariant": make_ffn(ffn_cases()),
    }
    for name, store in files.items():
        np.savez_compressed(OUT / f"{name}.npz", **store)
        n_cases = sum(key.endswith("/config") for key in store)
        size = (OUT / f"{name}.npz").stat().st_size
        print(f"{name}: {n_cases} cases, {size / 1024:.0f} kB", file=sys.stderr)


if __name__ == "__main__":
    main()
