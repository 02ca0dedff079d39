"""QLAB reads from the device only where it must: a step that does not probe reads nothing, a
step that probes reads once (one packed transfer of a few scalars).

On an accelerator each read of a device value (``.item()``, ``.tolist()``, ``float(t)``,
``bool(t)``) waits for every kernel queued before it. The reads are counted here by wrapping
those methods of ``torch.Tensor`` during ``QLAB.step``, which catches them on the CPU as well.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_qlab.optimizer import QLAB
from read_helpers import counted_reads, cuda_synchronisations


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, lambda: nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("direction", ["adam", "rmsprop", "sgd", "momentum"])
def test_steps_between_probes_read_nothing_and_probes_read_once(direction: str, monkeypatch) -> None:
    model, loss_fn = problem()
    opt = QLAB([{"params": model[0].parameters(), "weight_decay": 0.01}, {"params": model[2].parameters()}],
               direction=direction, probe_every=4)
    per_step = []
    for step in range(1, 14):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 7:  # a non-finite gradient between probes is skipped on the device: still no read
            model[2].bias.grad[0] = math.nan
        with counted_reads(monkeypatch) as reads:
            opt.step(loss, loss_fn)
        per_step.append(len(reads))
    warm_start = per_step[0]  # the first step searches for the scale: one read per probe
    assert warm_start == opt.events["warm_start_probes"] + 1
    assert per_step[1:] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert opt.events["nonfinite_gradient"] == 1  # counted by the read of the next probe


def test_a_probe_with_reduce_losses_still_reads_once(monkeypatch) -> None:
    model, loss_fn = problem()
    opt = QLAB(model.parameters(), probe_every=1)
    reductions = []
    for step in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        with counted_reads(monkeypatch) as reads:
            opt.step(loss, loss_fn, reduce_losses=lambda losses: reductions.append(1) or losses * 1.0)
        if step > 0:
            assert len(reads) == 1
    assert len(reductions) >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations: needs a GPU")
@pytest.mark.parametrize("direction", ["adam", "rmsprop"])
def test_on_cuda_steps_between_probes_do_not_synchronise(direction: str) -> None:
    """The device's own count, which also catches implicit synchronisations (a boolean mask,
    a host copy inside a torch op) that wrapping the Tensor methods cannot see."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).cuda()
    x, y = torch.randn(64, 6, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    opt = QLAB(model.parameters(), direction=direction, probe_every=4)
    per_step = []
    for step in range(1, 14):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 7:
            model[2].bias.grad[0] = math.nan
        torch.cuda.synchronize()
        with cuda_synchronisations() as synchronisations:
            opt.step(loss, loss_fn)
        per_step.append(len(synchronisations))
    assert per_step[1:] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert opt.events["nonfinite_gradient"] == 1
