"""``trainable: false`` freezes a part of the model in training, as DeePMD-kit does: every
parameter of the descriptor (or of the fitting) gets ``requires_grad = False``, so it receives
no gradient, the optimizer keeps no state for it and it ends the run as it started, while the
rest of the model trains."""

from __future__ import annotations

import pytest
import torch
from tiny_run import tiny_config

from sezm.config import normalize_input
from sezm.train.trainer import Resume, Trainer


def short_run(tmp_path, monkeypatch, frozen: str, optimizer: str):
    """A 3-step run with ``model/<frozen>/trainable`` false: the trainer and the parameters
    before and after."""
    config = tiny_config(steps=3)
    config["model"][frozen]["trainable"] = False
    config["optimizer"] = {"type": optimizer}
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(normalize_input(config), Resume(skip_neighbor_stat=True))
    model = trainer.tasks["Default"].model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.run()
    after = dict(model.named_parameters())
    return trainer, before, after


@pytest.mark.parametrize(
    ("frozen", "optimizer"),
    [("descriptor", "Adam"), ("descriptor", "HybridMuon"), ("fitting_net", "AdamW")],
)
def test_frozen_part_stays_and_the_rest_trains(tmp_path, monkeypatch, frozen, optimizer) -> None:
    trainer, before, after = short_run(tmp_path, monkeypatch, frozen, optimizer)
    prefix = frozen + "."
    frozen_names = [n for n in after if n.startswith(prefix)]
    trained_names = [n for n in after if not n.startswith(prefix)]
    assert frozen_names and trained_names
    for name in frozen_names:
        p = after[name]
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p.detach(), before[name]), f"{name} changed although frozen"
        assert not trainer.setup.optimizer.state.get(p), f"optimizer state for frozen {name}"
    assert all(after[n].requires_grad for n in trained_names)
    changed = [n for n in trained_names if not torch.equal(after[n].detach(), before[n])]
    assert len(changed) > len(trained_names) // 2, f"only {changed} trained"


def test_trainable_model_trains_every_part(tmp_path, monkeypatch) -> None:
    config = tiny_config(steps=1)
    monkeypatch.chdir(tmp_path)
    model = Trainer(normalize_input(config), Resume(skip_neighbor_stat=True)).model
    assert all(p.requires_grad for p in model.parameters())
