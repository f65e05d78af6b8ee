"""Edge-frame rotations: both strategies equal the dense projected Wigner-D products."""

import pytest
import torch

from sezm.geometry.edge_frame import edge_quaternion
from sezm.geometry.layout import SphericalLayout
from sezm.geometry.rotate import EdgeRotation
from sezm.geometry.wigner import WignerD

F64 = torch.float64


@pytest.mark.parametrize("lmax,mmax", [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_rotation_matches_dense_wigner(lmax: int, mmax: int) -> None:
    gen = torch.Generator().manual_seed(lmax * 10 + mmax)
    q = edge_quaternion(torch.randn(40, 3, dtype=F64, generator=gen), 1e-7)
    wigner = WignerD(4, dtype=F64)  # larger than needed, as in a degree pyramid
    dense = wigner(q)[:, : (lmax + 1) ** 2, : (lmax + 1) ** 2]
    layout = SphericalLayout.of(lmax, mmax)
    local = dense[:, list(layout.reduced_rows)]
    gain = torch.tensor(layout.gains, dtype=F64).view(1, -1, 1)
    plan = EdgeRotation(lmax, mmax)
    ops = plan.matrices(wigner.blocks(q))
    x = torch.randn(40, (lmax + 1) ** 2, 6, dtype=F64, generator=gen)
    y = plan.to_local(ops, x)
    torch.testing.assert_close(y, local @ x, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        plan.to_global(ops, y), gain * (local.transpose(1, 2) @ y), rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("lmax,mmax", [(1, 1), (2, 1), (3, 2)])
def test_rotation_gradients(lmax: int, mmax: int) -> None:
    """Both directions differentiate correctly in the block values (forces flow through them),
    the features and the edge weight."""
    gen = torch.Generator().manual_seed(7 + lmax)
    q = edge_quaternion(torch.randn(5, 3, dtype=F64, generator=gen), 1e-7)
    blocks = WignerD(lmax, dtype=F64).blocks(q).requires_grad_()
    x = torch.randn(5, (lmax + 1) ** 2, 3, dtype=F64, generator=gen, requires_grad=True)
    weight = torch.rand(5, 1, dtype=F64, generator=gen, requires_grad=True)
    plan = EdgeRotation(lmax, mmax)

    def round_trip(blocks, x, weight):
        ops = plan.matrices(blocks)
        return plan.to_global(ops, torch.tanh(plan.to_local(ops, x)), weight)

    assert torch.autograd.gradcheck(round_trip, (blocks, x, weight))
