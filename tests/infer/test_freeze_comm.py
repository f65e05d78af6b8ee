"""The multi-rank (with-comm) lower of ``sezm freeze``, evaluated eagerly (no compilation).

A periodic frame is split the way a LAMMPS rank sees it: owned atoms, then ghost images that
receive no edges; ``border_op`` (sezm's one-process kernels) copies owner rows into ghost rows.
With the exchange, owned energies and folded forces/virials equal eager evaluation of the
frame; without it they do not. The compiled package and LAMMPS are tested in test_freeze.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_cases import PARITY

from sezm.infer import comm
from sezm.infer import freeze as fz


@pytest.fixture(scope="module", autouse=True)
def border_ops():
    comm.register_border_ops()


def plan_and_features(seed: int = 0):
    """7 owned rows, 6 ghosts in 3 swaps; the last swap forwards a ghost of the first."""
    plan = comm.SwapPlan([np.array([0, 3]), np.array([6, 1, 2]), np.array([7])], 7, 6)
    x = torch.randn(13, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return plan, x


def test_border_op_copies_owner_rows():
    plan, x = plan_and_features()
    y = comm.border_op(plan.tensors, x)
    assert torch.equal(y[:7], x[:7])
    assert torch.equal(y[7:], x[[0, 3, 6, 1, 2, 0]])  # row 12 receives row 7, a copy of row 0


def test_border_op_backward_is_the_transpose():
    plan, x = plan_and_features()
    g = torch.randn_like(x)
    lhs = (comm.border_op(plan.tensors, x) * g).sum()
    back = comm.border_op_backward(plan.tensors, g)
    assert torch.allclose(lhs, (x * back).sum())
    assert torch.equal(back[7:], torch.zeros_like(back[7:]))  # ghost inputs are overwritten


def test_border_op_autograd():
    plan, x = plan_and_features()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: comm.border_op(plan.tensors, v), (x,))
    g = torch.randn_like(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: comm.border_op_backward(plan.tensors, v), (g,))


def test_schemas_are_registered():
    for name, schema in comm.SCHEMAS.items():
        op = getattr(torch.ops.deepmd_export, name).default
        assert str(op._schema) == f"deepmd_export::{schema}"


def test_schemas_match_deepmd_kit_op_library():
    """The compiled package calls the operators by schema; they must be DeePMD-kit's own.
    Set ``SEZM_DEEPMD_OP_LIB`` to a ``libdeepmd_op_pt.so`` to check (skipped otherwise)."""
    path = os.environ.get("SEZM_DEEPMD_OP_LIB")
    if not path:
        pytest.skip("set SEZM_DEEPMD_OP_LIB to DeePMD-kit's libdeepmd_op_pt.so")
    binary = Path(path).read_bytes()
    for schema in comm.SCHEMAS.values():
        assert schema.encode() in binary, schema


def halo_check(case: str, exchange: bool = True):
    model, _ = fz.load_energy_model(PARITY / case / "model.pt")
    model = model.eval().requires_grad_(False)
    frame = fz.halo_test_frame(model, seed=3)
    inputs, halo = fz.halo_inputs(model, frame, seed=3)
    assert len(halo.owner) > 0 and int(inputs[2][0]) == halo.nloc
    if exchange:
        got = fz.GraphLowerWithComm(model, fz.extra_inputs(model)).eval()(*inputs)
    else:
        got = fz.GraphLower(model, fz.extra_inputs(model)).eval()(*inputs[: -len(comm.COMM_INPUTS)])
    got = {k: v.detach() for k, v in fz.owned_outputs(got, halo).items()}
    ref = fz.eager_reference(model, [frame], fz.lower_inputs(model, [frame], seed=3))
    return model, got, ref


@pytest.mark.parametrize(
    "case",
    [
        "tiny",  # one block, environment seed: exchange before block 0
        "no_env_seed",  # block 0 needs no exchange; block attention residuals
        "zbl",  # ZBL bridging: the source gate is completed across ranks
        "fparam1",  # fparam / aparam (ghost aparam rows are zero)
    ],
)
def test_with_comm_lower_matches_eager(case):
    model, got, ref = halo_check(case)
    fz.compare(case, model, got, ref)  # raises FreezeError beyond float rounding


def test_ghost_features_need_the_exchange():
    model, got, ref = halo_check("tiny", exchange=False)
    with pytest.raises(fz.FreezeError):
        fz.compare("tiny", model, got, ref)
