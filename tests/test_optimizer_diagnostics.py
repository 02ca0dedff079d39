"""What QLAB reports: param_group["lr"], last_step, the event counters, reduce_losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_qlab.optimizer import EVENTS, PROBE_EVERY, QLAB, saved_record


def regression_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(256, 5, generator=gen), torch.randn(256, 2, generator=gen)
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


@pytest.mark.parametrize("mode", ["safeguarded", "paper"])
@pytest.mark.parametrize("direction", ["sgd", "rmsprop", "momentum", "adam"])
def test_lr_and_last_step_tell_the_truth(direction: str, mode: str) -> None:
    """After every step: param_group["lr"] is the step taken, last_step's fields are the
    quantities of the rule (NaN where a step did not probe and nothing was measured), and the
    event counters add up to the per-step events."""
    model, batches = regression_problem()
    opt = QLAB(
        [{"params": model[0].parameters(), "weight_decay": 0.01}, {"params": model[2].parameters()}],
        initial_step=1e-2,
        direction=direction,
        mode=mode,
        probe_every=3 if mode == "safeguarded" else None,
    )
    tally = {name: 0 for name in EVENTS}
    previous_step_size = None
    for step, (x, y) in enumerate(batches * 3, start=1):
        trial_values = []

        def trial_loss_fn() -> torch.Tensor:
            value = nn.functional.mse_loss(model(x), y)
            trial_values.append(value.item())
            return value

        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grad_sq = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
        held = opt.trial_distance
        returned = opt.step(loss, trial_loss_fn)
        last = opt.last_step

        assert returned.item() == loss.item() and not returned.requires_grad
        assert [group["lr"] for group in opt.param_groups] == [last.step_size] * 2
        assert isinstance(opt.param_groups[0]["lr"], float)
        assert last.step == step == opt.steps
        probing = mode == "paper" or step % 3 == 1
        if not probing:  # the held step, and no trial forward
            assert last.probes == 0 and trial_values == [] and last.step_size == previous_step_size
            assert all(math.isnan(v) for v in (last.loss, last.trial_loss, last.slope, last.curvature))
        elif last.event == "not_descent":
            assert last.step_size == 0.0 and last.slope >= 0
        else:
            assert last.loss == pytest.approx(loss.item(), rel=1e-7)
            assert last.trial_loss == trial_values[-1]
            assert last.probes == len(trial_values)
            beta = last.trial_distance
            expected_curvature = (last.trial_loss - last.loss - last.slope * beta) / beta**2
            assert last.curvature == pytest.approx(expected_curvature, rel=1e-9)
            if direction == "sgd":
                assert last.slope == pytest.approx(-grad_sq, rel=1e-5)  # b = -|g|^2
            if previous_step_size is not None and last.probes == 1:
                # paper mode probes at the previous step size; safeguarded mode at the held step
                # (the step taken leans from it towards the relative update)
                assert beta == (previous_step_size if mode == "paper" else held)
        tally["warm_start_probes"] += max(last.probes - 1, 0)
        if last.event is not None:
            tally[last.event] += 1
        if last.step_size > 0:
            previous_step_size = last.step_size
        assert opt.events == tally
        # checkpoints keep it (compared as JSON: the fit's fields are NaN on a step that did not probe)
        assert json.dumps(saved_record(opt.state_dict())["last_step"]) == json.dumps(last.as_dict())


@pytest.mark.parametrize("probe_every", [1, 8])
def test_event_counters_count_each_kind_of_skip(probe_every: int) -> None:
    """Probing every step, every kind of skip is seen. Probing one step in 8, the steps between
    probes read nothing: a non-finite gradient is skipped on the device and counted at the next
    read; a non-finite loss or a zero gradient (which the step does not use) is not looked at."""
    model, batches = regression_problem()
    opt = QLAB(model.parameters(), probe_every=probe_every)
    x, y = batches[0]

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    def step(break_it=None) -> None:
        opt.zero_grad()
        loss = loss_fn()
        if break_it == "loss":
            loss = loss + torch.tensor(math.inf)
        loss.backward()
        if break_it == "gradient":
            model[0].bias.grad[0] = math.nan
        if break_it == "zero":
            for p in model.parameters():
                p.grad.zero_()
        opt.step(loss, loss_fn)

    for kind in [None, "gradient", "loss", "gradient", "zero", None, "loss"]:
        step(kind)
    skip_events = ("nonfinite_gradient", "nonfinite_loss", "zero_gradient")
    saved = saved_record(opt.state_dict())["events"]
    skips = {k: v for k, v in opt.events.items() if k in skip_events}
    if probe_every == 1:
        assert skips == {"nonfinite_gradient": 2, "nonfinite_loss": 2, "zero_gradient": 1}
    else:
        assert skips == {"nonfinite_gradient": 2, "nonfinite_loss": 0, "zero_gradient": 0}
    assert opt.steps == 7
    assert saved == opt.events


def test_reduce_losses_receives_both_losses_and_its_result_is_used() -> None:
    """reduce_losses gets the 1-D tensor [L(w), L(trial)]; returning it unchanged changes
    nothing, and what it returns is what the rule uses (here: another rank's NaN)."""
    results = []
    for reduce in (None, "identity"):
        model, batches = regression_problem()
        opt = QLAB(model.parameters(), probe_every=1)
        seen = []

        def identity(losses: torch.Tensor) -> torch.Tensor:
            seen.append(losses.clone())
            return losses

        for x, y in batches:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss, lambda: nn.functional.mse_loss(model(x), y),
                     reduce_losses=identity if reduce else None)
            if reduce:
                assert seen[-1].shape == (2,)
                assert seen[-1][0].item() == loss.item()
                assert seen[-1][1].item() == opt.last_step.trial_loss
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))

    # Another rank's loss was not finite: every rank skips after the trial forward and moves
    # back from the trial point.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss, lambda: nn.functional.mse_loss(model(x), y),
             reduce_losses=lambda losses: losses + torch.tensor([math.nan, 0.0]))
    assert opt.last_step.event == "nonfinite_loss" and opt.events["nonfinite_loss"] == 1
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


def test_steps_between_probes_call_neither_the_trial_nor_reduce_losses() -> None:
    """Only the steps that probe (the first, PROBE_EVERY later, then on the schedule) need the losses."""
    model, batches = regression_problem()
    opt = QLAB(model.parameters())
    trials, reductions, measured = [], [], []
    for step in range(1, 41):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss, lambda: trials.append(step) or nn.functional.mse_loss(model(x), y),
                 reduce_losses=lambda losses: reductions.append(step) or losses)
        if math.isfinite(opt.last_step.loss):  # the diagnostics of a step that probed
            measured.append(step)
    assert measured[:2] == [1, 1 + PROBE_EVERY] and 3 <= len(measured) < 40
    assert sorted(set(trials)) == sorted(set(reductions)) == measured
    assert all(trials.count(step) == 1 for step in measured[1:])


def test_closure_is_called_first_with_gradients_enabled() -> None:
    """Lightning's optimizer plumbing passes its hook closure as closure=; it runs first."""
    model, batches = regression_problem()
    opt = QLAB(model.parameters())
    x, y = batches[0]
    calls = []
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss, lambda: nn.functional.mse_loss(model(x), y),
             closure=lambda: calls.append(torch.is_grad_enabled()))
    assert calls == [True]
    assert opt.last_step.step_size > 0
