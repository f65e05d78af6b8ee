"""Edge-frame rotations: both strategies equal the dense projected Wigner-D products."""

import pytest
import torch

from sezm.geometry.edge_frame import edge_quaternion
from sezm.geometry.layout import degree_of_rows, m_major_rows, truncation_gain
from sezm.geometry.rotate import EdgeRotation
from sezm.geometry.wigner import WignerD

F64 = torch.float64


@pytest.mark.parametrize("lmax,mmax", [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_rotation_matches_dense_wigner(lmax: int, mmax: int) -> None:
    gen = torch.Generator().manual_seed(lmax * 10 + mmax)
    q = edge_quaternion(torch.randn(40, 3, dtype=F64, generator=gen), 1e-7)
    wigner = WignerD(4, dtype=F64)  # larger than needed, as in a degree pyramid
    dense = wigner(q)[:, : (lmax + 1) ** 2, : (lmax + 1) ** 2]
    local = dense.index_select(1, m_major_rows(lmax, mmax))
    gain = truncation_gain(degree_of_rows(lmax), mmax).to(F64).view(1, -1, 1)
    plan = EdgeRotation(lmax, mmax)
    ops = plan.matrices(wigner.blocks(q))
    x = torch.randn(40, (lmax + 1) ** 2, 6, dtype=F64, generator=gen)
    y = plan.to_local(ops, x)
    torch.testing.assert_close(y, local @ x, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        plan.to_global(ops, y), gain * (local.transpose(1, 2) @ y), rtol=0, atol=1e-13
    )
