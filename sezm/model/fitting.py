"""Per-atom fitting heads: the DPA4 GLU energy head and the input assembly it shares.

The fitting input of atom ``i`` is ``x_i = [d_i | f̂ | â_i | c]``: descriptor ``d_i``, normalised
frame parameters ``f̂ = (f - f_avg) · f_inv_std``, normalised atomic parameters
``â_i = (a_i - a_avg) · a_inv_std`` (dropped with ``use_aparam_as_mask``) and the case one-hot
``c`` (dropped with case FiLM). The energy head maps it through GLU layers to

    E_i = net(x_i) [- net(x_i with d_i = 0) if atom_ener] + bias_atom_e[t_i]     (float64)

Model-level steps that are *not* done here (the model owns them, in this order):
``E_i += out_bias[t_i]`` (:func:`energy_out_stat`), ``E_i += E_i^ZBL``, then
``E_i *= m_i`` with ``m_i = atom_keep_mask(...)``. DeePMD-kit also zeroes excluded types inside
the fitting, but the model mask applied after ``out_bias``/ZBL gives the same numbers, so the
exclusion lives only in the model. ``atomic_feature`` (for ``embed``) is never masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from ..nn.common import Dense, activation, child_seed, dtype_of

__all__ = [
    "CaseFiLM",
    "EnergyFitting",
    "EnergyFittingOptions",
    "FittingBase",
    "FittingOptions",
    "GLULayer",
    "GLUNet",
    "atom_keep_mask",
    "auto_neuron",
    "energy_out_stat",
]


def auto_neuron(neuron: Sequence[int] | None, dim_in: int) -> list[int]:
    """Hidden widths with ``0`` replaced by ``32·⌈(8/3)·dim_in/32⌉ = 32·⌈dim_in/12⌉``."""
    widths = [0] if neuron is None else [int(w) for w in neuron]
    if any(w < 0 for w in widths):
        raise ValueError(f"fitting neuron widths must be >= 0, got {widths}")
    auto = 32 * -(-dim_in // 12)
    return [auto if w == 0 else w for w in widths]


def atom_keep_mask(atype: torch.Tensor, exclude_types: Sequence[int] = ()) -> torch.Tensor:
    """``m_i = (t_i >= 0) ∧ t_i ∉ exclude_types``: ``(nf, nloc)`` bool; phantoms have ``t < 0``."""
    keep = atype >= 0
    if len(exclude_types):
        excluded = torch.as_tensor(list(exclude_types), dtype=atype.dtype, device=atype.device)
        keep = keep & ~torch.isin(atype, excluded)
    return keep


def energy_out_stat(
    energy: torch.Tensor, atype: torch.Tensor, out_bias: torch.Tensor
) -> torch.Tensor:
    """``E_i + out_bias[0, t_i]``: energy ``(nf, nloc, 1)``, out_bias ``(1, ntypes, 1)``.

    ``out_std`` is not applied to the energy. ``atype`` must already be lookup-safe (>= 0).
    """
    return energy + out_bias[0][atype]


@dataclass(frozen=True, kw_only=True)
class FittingOptions:
    """What every head reads of a normalised ``fitting_net`` section (field names are the
    schema's keys, and the schema owns the defaults; :mod:`sezm.config.fitting_options`)."""

    neuron: tuple[int, ...]  # hidden widths, 0 = auto (:func:`auto_neuron`)
    numb_fparam: int
    numb_aparam: int
    default_fparam: tuple[float, ...] | None
    dim_case_embd: int
    activation_function: str
    precision: str
    trainable: bool | tuple[bool, ...]  # one flag, or one per type (all must be set)
    seed: int | list[int] | None = None  # optional in a property section: unseeded

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)


@dataclass(frozen=True, kw_only=True)
class EnergyFittingOptions(FittingOptions):
    """The ``dpa4_ener`` head (``resnet_dt`` and ``rcond`` of the section do not shape it)."""

    case_film_embd: bool  # case one-hot as FiLM of the network instead of an input block
    use_aparam_as_mask: bool  # aparam is not an input of the network
    atom_ener: tuple[float | None, ...]  # any non-null entry switches on vacuum removal


class FittingBase(nn.Module):
    """Buffers and input assembly shared by the energy and property heads.

    Buffers (names as in DeePMD-kit): ``bias_atom_e (ntypes, dim_out)`` float64,
    ``fparam_avg/fparam_inv_std (numb_fparam,)``, ``aparam_avg/aparam_inv_std (numb_aparam,)``,
    ``case_embd (dim_case_embd,)``, ``default_fparam_tensor (numb_fparam,)``; each only when
    its feature is configured.
    """

    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        dim_out: int,
        opts: FittingOptions,
        *,
        case_in_input: bool,
        aparam_in_input: bool,
    ) -> None:
        super().__init__()
        nfp, nap, ncase, dtype = opts.numb_fparam, opts.numb_aparam, opts.dim_case_embd, opts.dtype
        self.ntypes, self.dim_descrpt, self.dim_out = ntypes, dim_descrpt, dim_out
        self.numb_fparam, self.numb_aparam, self.dim_case_embd = nfp, nap, ncase
        self.use_aparam_as_mask = not aparam_in_input
        self.case_in_input = case_in_input and ncase > 0
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dim_out, dtype=torch.float64))
        for name, n in (("fparam", nfp), ("aparam", nap)):
            self.register_buffer(f"{name}_avg", torch.zeros(n, dtype=dtype) if n else None)
            self.register_buffer(f"{name}_inv_std", torch.ones(n, dtype=dtype) if n else None)
        self.register_buffer("case_embd", torch.zeros(ncase, dtype=dtype) if ncase else None)
        default = opts.default_fparam
        if default is not None and nfp and len(default) != nfp:
            raise ValueError(f"default_fparam has {len(default)} values, not {nfp}")
        default = None if default is None else torch.tensor(default, dtype=dtype)
        self.register_buffer("default_fparam_tensor", default)
        extras = nfp + (nap if aparam_in_input else 0) + (ncase if self.case_in_input else 0)
        self.dim_in = dim_descrpt + extras
        self.neuron = auto_neuron(opts.neuron, self.dim_in)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (follows ``.to(dtype)``); the network input is cast to it."""
        return next(self.parameters()).dtype

    def set_case(self, index: int, n_cases: int | None = None) -> None:
        """Select multitask case ``index``: ``case_embd = onehot(index, dim_case_embd)``."""
        if self.case_embd is None or (n_cases is not None and n_cases != self.dim_case_embd):
            raise ValueError(f"fitting has dim_case_embd={self.dim_case_embd}, not {n_cases}")
        eye = torch.eye(
            self.dim_case_embd, dtype=self.case_embd.dtype, device=self.case_embd.device
        )
        self.case_embd = eye[index]

    def _extras(
        self, nf: int, nloc: int, fparam: torch.Tensor | None, aparam: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Non-descriptor input blocks, each ``(nf, nloc, k)`` in the fitting dtype."""
        extras = []
        if self.numb_fparam:
            if fparam is None:
                if self.default_fparam_tensor is None:
                    raise ValueError("fparam is required (no default_fparam configured)")
                fparam = self.default_fparam_tensor.expand(nf, -1)
            f = fparam.to(self.dtype).reshape(nf, self.numb_fparam) - self.fparam_avg
            f = f * self.fparam_inv_std
            extras.append(f[:, None, :].expand(nf, nloc, -1))
        if self.numb_aparam and not self.use_aparam_as_mask:
            if aparam is None:
                raise ValueError("aparam is required")
            a = aparam.to(self.dtype).reshape(nf, nloc, self.numb_aparam) - self.aparam_avg
            extras.append(a * self.aparam_inv_std)
        if self.case_in_input:
            extras.append(self.case_embd.expand(nf, nloc, -1))
        return extras

    def net_input(
        self,
        descriptor: torch.Tensor,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        vacuum: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x (nf, nloc, dim_in)`` and, if ``vacuum``, the same with the descriptor zeroed."""
        nf, nloc, nd = descriptor.shape
        if nd != self.dim_descrpt:
            raise ValueError(f"descriptor width {nd} != dim_descrpt {self.dim_descrpt}")
        d = descriptor.to(self.dtype)
        extras = self._extras(nf, nloc, fparam, aparam)
        x = torch.cat([d, *extras], dim=-1)
        x0 = torch.cat([torch.zeros_like(d), *extras], dim=-1) if vacuum else None
        return x, x0

    def set_networks(self, net: nn.Module, trainable: bool | Sequence[bool], alias: bool) -> None:
        """Register the (types mixed, only) network as ``filter_layers.networks.0`` (also under
        ``filter_layers._networks`` with ``alias``, as DeePMD-kit's property head does) and
        apply ``trainable`` (one flag, or one per type: all must be set)."""
        nets = nn.ModuleList([net])
        self.filter_layers = nn.ModuleDict({"networks": nets})
        if alias:
            self.filter_layers["_networks"] = nets
        self.requires_grad_(bool(all(trainable) if isinstance(trainable, Sequence) else trainable))

    @property
    def net(self) -> nn.Module:
        return self.filter_layers.networks[0]

    def forward(
        self,
        descriptor: torch.Tensor,
        atype: torch.Tensor,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """descriptor ``(nf, nloc, C)``, lookup-safe atype ``(nf, nloc)``, fparam ``(nf, nfp)``,
        aparam ``(nf, nloc, nap)`` -> per-atom output ``(nf, nloc, dim_out)`` float64, plus
        ``bias_atom_e`` (no model statistics, unmasked)."""
        x, x0 = self.net_input(descriptor, fparam, aparam, vacuum=self.remove_vacuum)
        y = self.net(x, *self.net_context())
        if x0 is not None:
            y = y - self.net(x0, *self.net_context())
        return (y + self.bias_atom_e[atype].to(y.dtype)).to(torch.float64)

    def atomic_feature(
        self,
        descriptor: torch.Tensor,
        atype: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden activation ``(nf, nloc, neuron[-1])`` in the fitting dtype."""
        x, _ = self.net_input(descriptor, fparam, aparam)
        return self.net.hidden(x, *self.net_context())

    def net_context(self) -> tuple[torch.Tensor, ...]:
        """Extra inputs of the network after ``x`` (the case one-hot of a case-FiLM net)."""
        return ()


class GLULayer(nn.Module):
    """``[v | g] = x W + b``; ``y = v · act(g)``: ``(..., n_in) -> (..., n_out)``."""

    def __init__(self, n_in: int, n_out: int, act: str, dtype: torch.dtype, seed=None) -> None:
        super().__init__()
        self.linear = Dense(n_in, 2 * n_out, dtype=dtype, seed=seed)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * self.act(gate)


class CaseFiLM(nn.Module):
    """Case-conditioned FiLM of the descriptor slice and of every hidden GLU output.

    ``code = W2 act(W1 c)`` (bias-free, ``K -> 32⌈4K/32⌉ -> 4·dim_descrpt``); for target ``t``
    ``[γ | β] = code P_t`` and ``x ← x (1 + e^{s_t} tanh γ) + e^{h_t} tanh β``.
    """

    def __init__(
        self, dim_case: int, dim_descrpt: int, targets: Sequence[int], act: str, dtype, seed=None
    ) -> None:
        super().__init__()
        code, hidden = 4 * dim_descrpt, 32 * -(-4 * dim_case // 32)
        self.dim_case, self.dim_descrpt = dim_case, dim_descrpt
        self.case_layer1 = Dense(
            dim_case, hidden, bias=False, activation_function=act, dtype=dtype,
            seed=child_seed(seed, 0),
        )  # fmt: skip
        self.case_layer2 = Dense(hidden, code, bias=False, dtype=dtype, seed=child_seed(seed, 1))
        self.projectors = nn.ParameterList(
            [nn.Parameter(torch.zeros(code, 2 * t, dtype=dtype)) for t in targets]
        )
        log_init = torch.full((len(targets),), 0.01, dtype=torch.float64).log().to(dtype)
        self.adam_case_film_scale_strength_log = nn.Parameter(log_init.clone())
        self.adam_case_film_shift_strength_log = nn.Parameter(log_init.clone())

    def encode(self, case_embd: torch.Tensor) -> torch.Tensor:
        """Case one-hot ``(K,)`` -> code ``(1, 4·dim_descrpt)``."""
        return self.case_layer2(self.case_layer1(case_embd.reshape(1, self.dim_case)))

    def forward(self, x: torch.Tensor, code: torch.Tensor, target: int) -> torch.Tensor:
        gamma, beta = (code @ self.projectors[target]).chunk(2, dim=-1)  # (1, dim_t) each
        scale = torch.exp(self.adam_case_film_scale_strength_log[target])
        shift = torch.exp(self.adam_case_film_shift_strength_log[target])
        return x * (1.0 + scale * torch.tanh(gamma)) + shift * torch.tanh(beta)


class GLUNet(nn.Module):
    """GLU hidden layers, optional case FiLM, bias-free linear output layer."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        neuron: Sequence[int],
        *,
        act: str,
        dtype: torch.dtype,
        film: tuple[int, int] | None = None,
        seed=None,
    ) -> None:
        """``film = (dim_case_embd, dim_descrpt)`` enables case FiLM."""
        super().__init__()
        widths = [n_in, *neuron]
        self.hidden_layers = nn.ModuleList(
            GLULayer(a, b, act, dtype, child_seed(seed, i))
            for i, (a, b) in enumerate(pairwise(widths))
        )
        self.case_film = None
        if film is not None:
            targets = [film[1], *neuron]
            self.case_film = CaseFiLM(*film, targets, act, dtype, child_seed(seed, len(neuron)))
        out_seed = child_seed(seed, len(neuron) + int(film is not None))
        self.output_layer = Dense(widths[-1], n_out, bias=False, dtype=dtype, seed=out_seed)

    def hidden(self, x: torch.Tensor, case_embd: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden activation ``(..., neuron[-1])``; the input if there is no hidden layer."""
        film = self.case_film
        if film is None:
            for layer in self.hidden_layers:
                x = layer(x)
            return x
        code = film.encode(case_embd)
        c = film.dim_descrpt
        x = torch.cat([film(x[..., :c], code, 0), x[..., c:]], dim=-1)
        for t, layer in enumerate(self.hidden_layers, start=1):
            x = film(layer(x), code, t)
        return x

    def forward(self, x: torch.Tensor, case_embd: torch.Tensor | None = None) -> torch.Tensor:
        return self.output_layer(self.hidden(x, case_embd))


class EnergyFitting(FittingBase):
    """DPA4 ``dpa4_ener`` head: ``(nf, nloc, dim_descrpt) -> E_i (nf, nloc, 1)`` float64."""

    def __init__(self, ntypes: int, dim_descrpt: int, opts: EnergyFittingOptions) -> None:
        film = opts.case_film_embd and opts.dim_case_embd > 0
        aparam_in_input = not opts.use_aparam_as_mask
        super().__init__(
            ntypes, dim_descrpt, 1, opts, case_in_input=not film, aparam_in_input=aparam_in_input
        )
        self.remove_vacuum = any(e is not None for e in opts.atom_ener)
        net = GLUNet(
            self.dim_in,
            1,
            self.neuron,
            act=opts.activation_function,
            dtype=opts.dtype,
            film=(opts.dim_case_embd, dim_descrpt) if film else None,
            seed=child_seed(opts.seed, 0),  # the first (and, types mixed, only) network
        )
        self.set_networks(net, opts.trainable, alias=False)

    def net_context(self) -> tuple[torch.Tensor, ...]:
        return (self.case_embd,)
