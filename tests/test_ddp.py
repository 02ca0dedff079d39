"""QLABMixin under real multi-process DDP (2 ranks, gloo, CPU, Lightning's own launcher).

The worker is tests/lightning_helpers.py run as a script; Lightning's DDP launcher starts the
second rank by re-running it. Each rank saves its final parameters, which are compared here with
each other and with one process that trains on the concatenated batches. The saved parameters
are the polynomial-decay averages of the iterates that QLABMixin evaluates by default, so the
comparison covers the steps and the averaging together.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import lightning_helpers as helpers
from lightning_helpers import quiet_trainer
from lightning_qlab.callback import QLABMonitor

HELPERS = Path(helpers.__file__).resolve()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    helpers.run_worker(HELPERS, out_dir)
    if importlib.util.find_spec("matplotlib") is not None:  # QLABMonitor's plot, by rank 0 only
        assert sorted(path.name for path in out_dir.glob("*.png")) == ["batch_norm.png", "plain.png"]
    return {
        name: [torch.load(out_dir / f"{name}_rank{rank}.pt") for rank in range(helpers.DDP_RANKS)]
        for name in ("plain", "batch_norm")
    }


@pytest.mark.parametrize("name", ["plain", "batch_norm"])
def test_ranks_take_identical_steps(ddp_results, name):
    rank0, rank1 = ddp_results[name]
    assert rank0["global_step"] == rank1["global_step"] > 0
    assert rank0["averaging"] == rank1["averaging"] == ["PolynomialAveraging"]  # the parameters are averages
    assert len(rank0["step_sizes"]) == rank0["global_step"]
    assert rank0["step_sizes"] == rank1["step_sizes"]
    assert rank0["parameters"].keys() == rank1["parameters"].keys()
    for key in rank0["parameters"]:
        assert torch.equal(rank0["parameters"][key], rank1["parameters"][key]), key


def test_two_ranks_equal_one_process_on_the_concatenated_batches(ddp_results):
    """float64, 2 micro-batches per step, momentum direction, 20 steps.

    Rank r reads the samples r, r + R, r + 2R, ... (RankStrideSampler), so batch j of all ranks
    together is the contiguous block j of R * batch samples.
    """
    model, data, fit_settings = helpers.ddp_plain_run()
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(callbacks=[monitor], **fit_settings)
    trainer.fit(model, DataLoader(data, batch_size=helpers.DDP_RANKS * helpers.DDP_BATCH, shuffle=False))
    rank0 = ddp_results["plain"][0]
    assert rank0["global_step"] == trainer.global_step == helpers.DDP_STEPS
    torch.testing.assert_close(
        torch.tensor(rank0["step_sizes"]), torch.tensor(list(monitor.step_sizes)), rtol=1e-9, atol=0
    )
    for key, value in model.named_parameters():
        torch.testing.assert_close(rank0["parameters"][key], value.detach(), rtol=1e-9, atol=1e-12, msg=key)
