"""The ``dens`` model (``loss.type = "dens"``): direct forces and denoising (DeNS) on DPA4.

Next to the energy model's heads the model carries ``dens_fitting_net``:

* ``energy_head``: a ``dpa4_ener`` head on the descriptor, in normalised units:
  ``E_i = E~_i s_{t_i} + b_{t_i}`` (``b``/``s`` = ``out_bias``/``out_std``, masked atoms 0);
* ``direct_force_head`` / ``denoising_head``: ``SO3Linear`` (C -> 1) on the final equivariant
  latent, its ``l = 1`` rows read as a Cartesian vector ``sqrt(4 pi / 3) (-y3, -y1, y2)``:
  the clean force ``F~`` (physical ``F = F~ rmsd``, ``rmsd`` = ``dens_force_rmsd``) and the
  noise ``eps / sigma`` of a corrupted atom;
* ``force_embedding``: for a corrupted atom the input force ``F`` enters the initial node
  state as ``SO3Linear(1 -> C, l=0 bias)`` of ``Y_lm(F / |F|) |F| / sqrt(3)``, with the real
  harmonics ``Y`` of DeePMD-kit's DeNS code (``l = 1`` rows ``~ (-y, z, -x)``, which is not the
  backbone's ``(-y, -z, x)`` basis; reproduced as is), zero for the other atoms.

Neighbours: the ``sum(sel)`` nearest within ``rcut`` per atom (a hard cap, DeePMD-kit's
extended neighbour-list path). The model predicts forces directly, so it has no virials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config.descriptor_options import neighbour_cap
from ..config.fitting_options import fitting_options
from ..nn.common import child_seed
from ..nn.linear import SO3Linear
from .energy import EnergyModel
from .fitting import EnergyFitting, EnergyFittingOptions, atom_keep_mask
from .graph import Graph
from .spin import _capped_edges


def _sh_norm(lmax: int) -> torch.Tensor:
    """``N_lm = sqrt((2l+1)/(4 pi) (l-m)!/(l+m)!)`` ``(lmax+1, lmax+1)`` float64 (0 for m > l)."""
    norm = torch.zeros(lmax + 1, lmax + 1, dtype=torch.float64)
    for l in range(lmax + 1):
        for m in range(l + 1):
            ratio = math.exp(math.lgamma(l - m + 1) - math.lgamma(l + m + 1))
            norm[l, m] = math.sqrt((2 * l + 1) / (4.0 * math.pi) * ratio)
    return norm


def _legendre(lmax: int, z: torch.Tensor) -> list[list[torch.Tensor | None]]:
    """Associated Legendre ``P_l^m(z)`` with the Condon-Shortley phase, ``p[l][m]`` ``(N,)``."""
    p: list[list[torch.Tensor | None]] = [[None] * (lmax + 1) for _ in range(lmax + 1)]
    p[0][0] = torch.ones_like(z)
    sin = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    for m in range(1, lmax + 1):
        p[m][m] = -(2 * m - 1) * sin * p[m - 1][m - 1]
    for m in range(lmax):
        p[m + 1][m] = (2 * m + 1) * z * p[m][m]
    for m in range(lmax + 1):
        for l in range(m + 2, lmax + 1):
            p[l][m] = ((2 * l - 1) * z * p[l - 1][m] - (l + m - 1) * p[l - 2][m]) / float(l - m)
    return p


def real_harmonics(unit: torch.Tensor, lmax: int, norm: torch.Tensor, sqrt_2: torch.Tensor):
    """Packed real harmonics ``(N, (lmax+1)^2)`` of unit vectors ``(N, 3)``: row ``l^2 + l`` is
    ``N_l0 P_l^0``, rows ``l^2 + l -+ m`` are ``sqrt(2) N_lm P_l^m sin(m phi)`` / ``cos(m phi)``."""
    z = unit[:, 2].clamp(-1.0, 1.0)
    phi = torch.atan2(unit[:, 1], unit[:, 0])
    p = _legendre(lmax, z)
    rows: list[torch.Tensor | None] = [None] * (lmax + 1) ** 2
    for l in range(lmax + 1):
        centre = l * l + l
        rows[centre] = p[l][0] * norm[l, 0]
        for m in range(1, l + 1):
            base = p[l][m] * norm[l, m]
            rows[centre - m] = sqrt_2 * base * torch.sin(float(m) * phi)
            rows[centre + m] = sqrt_2 * base * torch.cos(float(m) * phi)
    return torch.stack(rows, dim=-1)


class ForceEmbedding(nn.Module):
    """Input forces ``(N, 3)`` of the corrupted atoms (``mask (N,)``) -> ``(N, D, 1, C)``."""

    def __init__(self, lmax: int, channels: int, *, dtype: torch.dtype, seed=None) -> None:
        super().__init__()
        self.lmax, self.dtype, self.eps = lmax, dtype, 1e-7
        self.register_buffer("sqrt_inv_3", torch.tensor(1.0 / math.sqrt(3.0), dtype=dtype))
        self.register_buffer("sqrt_2", torch.tensor(math.sqrt(2.0), dtype=dtype))
        self.register_buffer("sh_norm", _sh_norm(lmax).to(dtype))
        self.proj = SO3Linear(lmax, 1, channels, dtype=dtype, mlp_bias=True, seed=seed)

    def forward(self, force: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        force = force.to(self.dtype)
        size = torch.linalg.vector_norm(force, dim=-1)  # (N,)
        unit = force / size.clamp_min(self.eps).unsqueeze(-1)
        sh = real_harmonics(unit, self.lmax, self.sh_norm, self.sqrt_2)
        sh = sh * (size * self.sqrt_inv_3).unsqueeze(-1)  # (N, D)
        out = self.proj(sh.view(force.shape[0], -1, 1, 1))  # (N, D, 1, C)
        return out * mask.view(-1, 1, 1, 1).to(out.dtype)


class VectorHead(nn.Module):
    """Cartesian vector ``(N, 3)`` from the ``l = 1`` rows of a latent ``(N, D, 1, C)``."""

    def __init__(self, lmax: int, channels: int, *, dtype: torch.dtype, seed=None) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer(
            "cartesian_scale", torch.tensor(math.sqrt(4 * math.pi / 3), dtype=dtype)
        )
        self.proj = SO3Linear(lmax, channels, 1, dtype=dtype, seed=seed)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        l1 = self.proj(latent.to(self.dtype))[:, 1:4, 0, 0]  # packed (-y, z, -x) order
        return self.cartesian_scale * torch.stack([-l1[:, 2], -l1[:, 0], l1[:, 1]], dim=-1)


class DensFitting(nn.Module):
    """``dens_fitting_net``: energy head, force embedding, direct-force and denoising heads.

    ``fitting`` are the :class:`EnergyFitting` options (the ``fitting_net`` section);
    ``condition_lmax`` / ``latent_lmax`` the degrees of the initial and final node states.
    """

    def __init__(
        self,
        *,
        ntypes: int,
        channels: int,
        condition_lmax: int,
        latent_lmax: int,
        fitting: EnergyFittingOptions,
    ) -> None:
        super().__init__()
        seed, trainable, dtype = fitting.seed, fitting.trainable, fitting.dtype
        self.energy_head = EnergyFitting(
            ntypes, channels, dataclasses.replace(fitting, seed=child_seed(seed, 0))
        )
        self.force_embedding = ForceEmbedding(
            condition_lmax, channels, dtype=dtype, seed=child_seed(seed, 1)
        )
        head = functools.partial(VectorHead, latent_lmax, channels, dtype=dtype)
        self.direct_force_head = head(seed=child_seed(seed, 2))
        self.denoising_head = head(seed=child_seed(seed, 3))
        trainable = all(trainable) if isinstance(trainable, Sequence) else bool(trainable)
        for head in (self.force_embedding, self.direct_force_head, self.denoising_head):
            head.requires_grad_(trainable)

    def forward(self, descriptor, latent, atype, fparam=None, aparam=None):
        """``(E~ (nf, nloc, 1) float64, F~ clean, eps/sigma)``, the vectors ``(nf, nloc, 3)``.

        The two vector heads are views of one ``(nf, nloc, 6)`` tensor: a loss that reads only
        one of them (a clean batch has no denoising term) still gives the other head a zero
        gradient, not none, so that the optimizer advances its moments every step, as in
        DeePMD-kit (whose heads share one output tensor)."""
        nf, nloc = atype.shape
        energy = self.energy_head(descriptor, atype, fparam, aparam)
        vectors = torch.cat([self.direct_force_head(latent), self.denoising_head(latent)], -1)
        clean, noise = vectors.view(nf, nloc, 6).split(3, dim=-1)
        return energy, clean, noise


class DensModel(EnergyModel):
    """A DPA4 model trained with the ``dens`` loss; see the module docstring.

    Inputs on the graph: ``force_input (nf, nloc, 3)`` and ``noise_mask (nf, nloc)`` (both
    optional: no corrupted atom). Outputs: ``atom_energy (nf, nloc)``, ``energy (nf,)``,
    ``force (nf, nloc, 3)`` (the physical direct force of the clean head) and, in normalised
    units for the loss, ``energy_norm (nf,)``, ``atom_energy_norm``, ``clean_force_norm``,
    ``denoising_force_norm`` and ``force_norm`` (denoising rows on corrupted atoms).
    """

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        degrees = self.descriptor.opts.degrees
        if self.inter_potential is not None:
            raise ValueError("the dens model does not support bridging_method (ZBL)")
        if min(degrees.node_init_lmax, degrees.node_readout_lmax) < 1:
            raise ValueError("the dens model reads and writes l = 1 features: it needs lmax >= 1")
        self.nsel = neighbour_cap(params)
        self.dens_fitting_net = DensFitting(
            ntypes=len(self.type_map),
            channels=self.descriptor.dim_out,
            condition_lmax=degrees.node_init_lmax,
            latent_lmax=degrees.node_readout_lmax,
            fitting=fitting_options(params),
        )

    def atomic_energy(self, *args, **kwargs):
        raise NotImplementedError(
            "a dens model predicts forces directly; it has no conservative energy path"
        )

    def energy_bias(self, atype: torch.Tensor) -> torch.Tensor:
        """``sum_i out_bias[t_i]`` over the kept atoms, ``(nf,)``."""
        keep = atom_keep_mask(atype, self.atom_exclude_types)
        return (self.out_bias[0, atype.clamp(min=0), 0] * keep).sum(-1)

    def forward(
        self,
        graph: Graph,
        *,
        virial: bool = True,
        atomic_virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Predictions of a batch; ``virial``/``atomic_virial``/``create_graph`` are accepted
        for the energy-model interface and unused (no virials, no coordinate gradient)."""
        atype = graph.atype
        safe = atype.clamp(min=0)
        src, dst, vec = _capped_edges(graph, self.nsel)
        noise = graph.noise_mask
        if noise is None:
            noise = torch.zeros_like(atype, dtype=torch.bool)
        # zero for clean atoms, but built in every batch: its weights then get a zero gradient
        # in a clean batch and the optimizer steps them as DeePMD-kit's does
        force = graph.force_input
        force = torch.zeros(*atype.shape, 3, device=atype.device) if force is None else force
        embedding = self.dens_fitting_net.force_embedding(force.reshape(-1, 3), noise.reshape(-1))
        desc, latent = self.descriptor(
            atype, src, dst, vec, None, graph.charge_spin, force_embedding=embedding
        )
        heads = self.dens_fitting_net(desc, latent, safe, graph.fparam, graph.aparam)
        return self._dens_outputs(
            safe, atom_keep_mask(atype, self.atom_exclude_types), noise, *heads
        )

    def _dens_outputs(self, atype, keep, noise, energy, clean, denoise) -> dict[str, torch.Tensor]:
        """Masking, output statistics and physical units (DeePMD-kit's ``apply_out_stat_dens``)."""
        mask = keep.unsqueeze(-1)  # (nf, nloc, 1)
        e_norm = energy * mask  # (nf, nloc, 1) float64
        atom_energy = e_norm * (self.out_std[0][atype] * mask) + self.out_bias[0][atype] * mask
        clean = clean * mask.to(clean.dtype)
        denoise = denoise * mask.to(denoise.dtype)
        mixed = torch.where(noise.unsqueeze(-1), denoise, clean)
        force = clean * self.dens_force_rmsd.to(clean.dtype)
        return {
            "atom_energy": atom_energy.squeeze(-1),
            "energy": atom_energy.sum((1, 2)),
            "force": force.double(),
            "energy_norm": e_norm.sum((1, 2)),
            "atom_energy_norm": e_norm.squeeze(-1),
            "force_norm": mixed.double(),
            "clean_force_norm": clean.double(),
            "denoising_force_norm": denoise.double(),
        }
