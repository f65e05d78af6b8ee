"""A training step's gradients come out bit for bit the same on every run on several CPU threads.

``table[index]`` differentiates into an accumulating ``index_put``, which on the CPU adds the rows
that share a target in whatever order the threads reach them: a DPA4-Mini run on two threads
drifted apart from its own repeat after ~150 steps. The model takes rows with ``index_select``
or ``table_rows`` (``tests/kernels/test_gather_scatter.py``), whose gradients sum in index
order; here no model option, force loss included, accumulates by ``index_put`` (spin models:
``tests/model/test_spin.py``).
"""

from __future__ import annotations

import pytest
from model_zoo import COMBOS, model_of
from physics import accumulating_index_puts, graph_of, random_crystal


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_no_accumulating_index_put_in_a_training_step(combo: str) -> None:
    model = model_of(combo)
    graph = graph_of(model, [random_crystal(6, 2, seed=3)])
    assert accumulating_index_puts(model, graph) == []
