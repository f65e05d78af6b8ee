"""Reference outputs of DeePMD-kit's Cartesian products and depth attention residuals.

Run with the oracle venv (DeePMD-kit 3.2): ``/tmp/oracle/bin/python <this file>``. Writes
``tests/data/modules/{cart_edge,cart_node,cart_conv,cart_spec,attnres_module,attnres_blocks}.npz``.
Each npz holds ``configs`` (JSON list) and, per config ``name``, ``name/state/<key>``,
``name/in/<key>``, ``name/out/<key>`` and ``name/grad/<key>`` (input gradients of
``sum(out * cot)``, cotangent ``name/in/cot``). Every parameter is perturbed so zero inits hide
nothing.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.descriptor.sezm import DescrptSeZM
from deepmd.pt.model.descriptor.sezm_nn.attn_res import DepthAttnRes
from deepmd.pt.model.descriptor.sezm_nn.block import SeZMInteractionBlock
from deepmd.pt.model.descriptor.sezm_nn.cartesian import (
    EdgeCartesianTensorProduct,
    NodeCartesianTensorProduct,
)
from deepmd.pt.model.descriptor.sezm_nn.so2 import SO2Convolution, _parse_node_cartesian

OUT = Path(__file__).resolve().parents[1] / "data" / "modules"
F64 = torch.float64
torch.manual_seed(1234)
torch.set_num_threads(1)


def rand(*shape, scale=1.0):
    return (scale * torch.randn(*shape, dtype=F64)).requires_grad_(True)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def record(store: dict, name: str, module, inputs: dict, run) -> None:
    """Run ``run(**inputs)`` and store state, inputs, outputs and input gradients."""
    out = run(**inputs)
    outs = out if isinstance(out, dict) else {"y": out}
    cots = {k: torch.randn_like(v) for k, v in outs.items()}
    loss = sum((v * cots[k]).sum() for k, v in outs.items())
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [
        torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)
    ]
    for k, v in module.state_dict().items():
        store[f"{name}/state/{k}"] = v.detach().numpy()
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            store[f"{name}/in/{k}"] = v.detach().numpy()
    for k, v in outs.items():
        store[f"{name}/out/{k}"] = v.detach().numpy()
        store[f"{name}/in/cot_{k}"] = cots[k].numpy()
    for k, g in zip(leaves, grads, strict=True):
        store[f"{name}/grad/{k}"] = g.numpy()


def save(fname: str, store: dict, configs: list) -> None:
    store["configs"] = np.array(json.dumps(configs))
    np.savez_compressed(OUT / fname, **store)


def edge_products() -> None:
    store, configs = {}, []
    for lmax in (1, 2):
        for n_layers in (0, 1, 2):
            for n_focus in (1, 2):
                for bias in (False, True):
                    cfg = dict(lmax=lmax, n_layers=n_layers, n_focus=n_focus, mlp_bias=bias)
                    cfg["name"] = name = "l{lmax}_n{n_layers}_f{n_focus}_b{mlp_bias:d}".format(
                        **cfg
                    )
                    cfg.update(focus_dim=3, activation_function="silu", eps=1e-7)
                    kw = {k: v for k, v in cfg.items() if k != "name"}
                    tp = EdgeCartesianTensorProduct(**kw, dtype=F64, seed=1, trainable=True)
                    perturb(tp)
                    e, d, cw = 5, (lmax + 1) ** 2, n_focus * 3
                    inputs = dict(
                        x=rand(e, d, cw),
                        edge_vec=rand(e, 3, scale=1.5),
                        rad_feat=rand(e, lmax + 1, cw),
                    )
                    record(store, name, tp, inputs, tp)
                    configs.append(cfg)
    save("cart_edge.npz", store, configs)


def node_products() -> None:
    store, configs = {}, []
    for lmax in (1, 2):
        for spec in ("default:1", "parity:2", "3"):
            for n_focus in (1, 2):
                bias = (n_focus == 2) != (lmax == 1)
                _, symmetric, n_layers = _parse_node_cartesian(spec)
                name = f"l{lmax}_{spec.replace(':', '')}_f{n_focus}_b{bias:d}"
                cfg = dict(
                    name=name,
                    lmax=lmax,
                    spec=spec,
                    n_layers=n_layers,
                    symmetric=symmetric,
                    n_focus=n_focus,
                    mlp_bias=bias,
                    focus_dim=3,
                    activation_function="tanh",
                )
                kw = {k: v for k, v in cfg.items() if k not in ("name", "spec")}
                tp = NodeCartesianTensorProduct(**kw, dtype=F64, seed=2, trainable=True)
                perturb(tp)
                n, d, cw = 4, (lmax + 1) ** 2, n_focus * 3
                inputs = dict(message=rand(n, d, cw), node=rand(n, d, cw))
                record(store, name, tp, inputs, tp)
                configs.append(cfg)
    save("cart_node.npz", store, configs)


def conv_forward(conv, x, src, dst, edge_vec, edge_env, inv_sqrt_deg, radial):
    cache = types.SimpleNamespace(
        src=src,
        dst=dst,
        edge_vec=edge_vec,
        edge_env=edge_env,
        inv_sqrt_deg=inv_sqrt_deg,
        edge_src_gate=None,
    )
    return conv(x, cache, radial)


def convolutions() -> None:
    """Whole ``edge_cartesian`` SO(2) convolutions (no attention): wiring of both products."""
    store, configs = {}, []
    grid = [  # lmax, mixing_layers, n_focus, focus_dim, node_cartesian, mlp_bias
        (1, 0, 1, 0, "none", False),
        (2, 1, 2, 3, "parity:2", True),
        (2, 2, 2, 2, "default:1", False),
        (1, 2, 1, 0, "2", True),
        (2, 0, 2, 4, "none", True),
    ]
    channels, n, e = 4, 4, 9
    for lmax, layers, n_focus, focus_dim, node_cart, bias in grid:
        name = f"l{lmax}_n{layers}_f{n_focus}x{focus_dim}_{node_cart.replace(':', '')}_b{bias:d}"
        cfg = dict(
            name=name,
            lmax=lmax,
            mixing_layers=layers,
            n_focus=n_focus,
            focus_dim=focus_dim,
            node_cartesian=node_cart,
            mlp_bias=bias,
            channels=channels,
            activation_function="silu",
            eps=1e-7,
        )
        kw = {k: v for k, v in cfg.items() if k != "name"}
        conv = SO2Convolution(
            **kw, n_atten_head=0, edge_cartesian=True, dtype=F64, seed=3, trainable=True
        )
        perturb(conv)
        d = (lmax + 1) ** 2
        src = torch.randint(0, n, (e,))
        dst = torch.randint(0, n, (e,))
        inputs = dict(
            x=rand(n, d, channels),
            src=src,
            dst=dst,
            edge_vec=rand(e, 3, scale=1.5),
            edge_env=torch.rand(e, 1, dtype=F64),
            inv_sqrt_deg=torch.rand(n, 1, 1, dtype=F64) + 0.5,
            radial=rand(e, lmax + 1, channels),
        )
        record(store, name, conv, inputs, lambda _c=conv, **kw: conv_forward(_c, **kw))
        configs.append(cfg)
    save("cart_conv.npz", store, configs)


def specs() -> None:
    good = [
        "none",
        "",
        "NONE",
        "default:2",
        "parity:1",
        "parity",
        "default",
        "3",
        "0",
        "parity:0",
        " Parity : 2 ",
        ":2",
        4,
    ]
    bad = ["foo", "default:-1", "-1", "parity:x", "default:"]
    parsed = [list(_parse_node_cartesian(s)) for s in good]
    errors = []
    for s in bad:
        try:
            _parse_node_cartesian(s)
            errors.append(False)
        except ValueError:
            errors.append(True)
    assert all(errors)
    save("cart_spec.npz", {}, [dict(good=good, parsed=parsed, bad=bad)])


def so2_l0(v):  # upstream's SO(2) stack keeps the history edge-major, (E, F, D_m, C)
    return v[:, :, 0, :].reshape(v.shape[0], -1)


def packed_l0(v):
    return v[:, 0].reshape(v.shape[0], -1)


def attn_modules() -> None:
    store, configs = {}, []
    for layout in ("packed", "so2"):
        for dependent in (True, False):
            for bias in (True, False):
                for n_src in (1, 3):
                    if not dependent and bias and n_src == 1:
                        continue
                    name = f"{layout}_d{dependent:d}_b{bias:d}_s{n_src}"
                    f, c = (1, 5) if layout == "packed" else (2, 3)
                    cfg = dict(
                        name=name,
                        layout=layout,
                        input_dependent=dependent,
                        bias=bias,
                        channels=f * c,
                        eps=1e-7,
                    )
                    attn = DepthAttnRes(
                        channels=f * c,
                        input_dependent=dependent,
                        eps=1e-7,
                        bias=bias,
                        dtype=F64,
                        trainable=True,
                        seed=4,
                    )
                    perturb(attn, 0.5)
                    # our layouts: packed (N, D, F, C); so2 (F, E, D_m, C)
                    shape = (6, 4, f, c) if layout == "packed" else (f, 6, 4, c)
                    inputs = {f"s{i}": rand(*shape) for i in range(n_src)}
                    inputs["current"] = rand(*shape)

                    def run(current, _layout=layout, _attn=attn, **srcs):
                        if _layout == "packed":
                            return _attn(
                                sources=list(srcs.values()),
                                scalar_extractor=packed_l0,
                                current_x=current,
                            )
                        srcs = [v.transpose(0, 1) for v in srcs.values()]
                        out = _attn(
                            sources=srcs, scalar_extractor=so2_l0, current_x=current.transpose(0, 1)
                        )
                        return out.transpose(0, 1)

                    record(store, name, attn, inputs, run)
                    configs.append(cfg)
    save("attnres_module.npz", store, configs)


def unit_fn(w):
    return lambda x: torch.tanh(x @ w) + 0.1 * x


def upstream_block(mode: str, attns: list, weights: list, channels: int):
    """A SeZMInteractionBlock shell whose units are ``tanh(x W) + 0.1 x``."""
    blk = SeZMInteractionBlock.__new__(SeZMInteractionBlock)
    torch.nn.Module.__init__(blk)
    blk.channels, blk.ffn_blocks = channels, len(weights) - 1
    blk._run_so2_unit = lambda x, edge_cache, radial_feat, comm_dict=None: unit_fn(weights[0])(x)
    blk._run_ffn_unit = lambda x, i: unit_fn(weights[i + 1])(x)
    if mode == "full":
        blk.full_attn_res_so2 = attns[0]
        blk.full_attn_res_ffns = torch.nn.ModuleList(attns[1:])
        blk._forward_impl = blk._forward_with_full_attn_res
    elif mode == "block":
        blk.block_attn_res_so2 = attns[0]
        blk.block_attn_res_ffns = torch.nn.ModuleList(attns[1:])
        blk._forward_impl = blk._forward_with_block_attn_res
    else:
        blk._forward_impl = blk._forward_with_residual_shortcuts
    return blk


def attn_blocks() -> None:
    """``DescrptSeZM._forward_blocks`` over a degree pyramid with stand-in units."""
    store, configs = {}, []
    channels, n = 4, 5
    node_dims, readout_dim = [9, 9, 4], 1
    for mode in ("none", "full", "block"):
        for query in ("dependent", "independent"):
            for ffn_blocks in (2, 0):
                bias = ffn_blocks == 2
                if mode == "none" and (query == "independent" or ffn_blocks == 0):
                    continue
                name = f"{mode}_{query}_ffn{ffn_blocks}_b{bias:d}"
                desc = DescrptSeZM.__new__(DescrptSeZM)
                torch.nn.Module.__init__(desc)

                def make(seed, query=query, bias=bias):
                    return DepthAttnRes(
                        channels=channels,
                        input_dependent=query == "dependent",
                        eps=1e-7,
                        bias=bias,
                        dtype=F64,
                        trainable=True,
                        seed=seed,
                    )

                blocks, weights = [], []
                for _ in node_dims:
                    w = [
                        0.5 * torch.randn(channels, channels, dtype=F64)
                        for _ in range(ffn_blocks + 1)
                    ]
                    attns = [make(i) for i in range(ffn_blocks + 1)] if mode != "none" else []
                    blocks.append(upstream_block(mode, attns, w, channels))
                    weights.append(torch.stack(w))
                desc.blocks = torch.nn.ModuleList(blocks)
                desc.use_full_attn_res, desc.use_block_attn_res = mode == "full", mode == "block"
                if mode != "none":
                    setattr(desc, f"final_{mode}_attn_res", make(99))
                desc.node_ebed_dims, desc.node_readout_dim = node_dims, readout_dim
                desc.channels, desc.dtype, desc.use_env_seed = channels, F64, True
                perturb(desc, 0.5)
                for i, w in enumerate(weights):
                    store[f"{name}/in/units{i}"] = w.numpy()
                inputs = dict(x=rand(n, 9, 1, channels))
                record(
                    store,
                    name,
                    desc,
                    inputs,
                    lambda x, _d=desc: _d._forward_blocks(x, None, [None] * 3),
                )
                configs.append(
                    dict(
                        name=name,
                        mode=mode,
                        query=query,
                        ffn_blocks=ffn_blocks,
                        bias=bias,
                        channels=channels,
                        node_dims=node_dims,
                        readout_dim=readout_dim,
                    )
                )
    save("attnres_blocks.npz", store, configs)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    edge_products()
    node_products()
    convolutions()
    specs()
    attn_modules()
    attn_blocks()
    for f in sorted(OUT.glob("*.npz")):
        if f.name.startswith(("cart_", "attnres_")):
            print(f"{f.name}: {f.stat().st_size / 1024:.1f} kB")
