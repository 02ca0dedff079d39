"""StepSeeding: a training step's random draws depend on the run's seed and the step's place, not on
what ran before it; the seed travels with the checkpoint."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from lightning_helpers import quiet_trainer, regression_data
from lightning_qlab.seeding import StepSeeding, derive_seed


class DrawingModule(LightningModule):
    """Records a draw of torch's generator in every training step; validation draws too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(5, 1)
        self.draws: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.draws.append(torch.rand(()).item())
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        torch.rand(17)  # what a validation run (or anything between steps) may draw

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def draws(seeding: bool, validate_every: int) -> list[float]:
    data = regression_data(6 * 4, seed=1)
    module = DrawingModule()
    trainer = quiet_trainer(max_epochs=2, callbacks=[StepSeeding()] if seeding else [],
                            val_check_interval=validate_every, limit_val_batches=1)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    return module.draws


def test_a_steps_draws_do_not_depend_on_what_ran_before_it(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    seeded_often, seeded_rarely = draws(True, validate_every=1), draws(True, validate_every=6)
    assert len(seeded_often) == 12 and seeded_often == seeded_rarely
    assert len(set(seeded_often)) == 12  # a fresh draw every step, not one seed reused
    # Without it, the extra validation runs shift every draw after them.
    assert draws(False, validate_every=1) != draws(False, validate_every=6)


def test_the_seed_comes_back_from_the_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    data = regression_data(8, seed=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[StepSeeding()])
    trainer.fit(DrawingModule(), DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "seed1.ckpt")

    monkeypatch.setenv("PL_GLOBAL_SEED", "2")  # resumed with another seed on the command line
    seeding = StepSeeding()
    quiet_trainer(max_epochs=2, callbacks=[seeding]).fit(DrawingModule(), DataLoader(data, batch_size=4),
                                                           ckpt_path=tmp_path / "seed1.ckpt")
    assert seeding.seed == 1 and os.environ["PL_GLOBAL_SEED"] == "1"


def test_an_unseeded_run_draws_its_seed_once(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seeding = StepSeeding()
    quiet_trainer(max_epochs=1, callbacks=[seeding]).fit(DrawingModule(), DataLoader(regression_data(4), batch_size=4))
    assert seeding.seed is not None and os.environ["PL_GLOBAL_SEED"] == str(seeding.seed)


@pytest.mark.parametrize("parts", [(1, 2, 3), (0,), (2**62, -5)])
def test_derived_seeds_fit_every_generator(parts):
    seed = derive_seed(*parts)
    assert 0 <= seed < 2**63
    torch.manual_seed(seed)
