"""Bad input gets a clear error (exact type, message saying what to do), never a silent fallback;
and the step is skipped without a trace when the loss or the gradient is not finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_qlab.optimizer import QLAB


def tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    return model, loss_fn


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(model: nn.Module, before: list[torch.Tensor]) -> None:
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def take_steps(model, opt, loss_fn, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss, loss_fn)


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize("value", [0, 0.0, -1e-3, -math.inf])
def test_non_positive_initial_step(value) -> None:
    with pytest.raises(ValueError, match=r"initial_step must be positive and finite.*1e-6 \.\.\. 10"):
        QLAB(nn.Linear(2, 1).parameters(), initial_step=value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_initial_step(value) -> None:
    with pytest.raises(ValueError, match="initial_step must be positive and finite"):
        QLAB(nn.Linear(2, 1).parameters(), initial_step=value)


@pytest.mark.parametrize("value", ["0.1", None, True, torch.tensor(0.1), [0.1]])
def test_initial_step_that_is_not_a_number(value) -> None:
    with pytest.raises(TypeError, match="initial_step must be a positive number"):
        QLAB(nn.Linear(2, 1).parameters(), initial_step=value)


def test_unknown_direction() -> None:
    expected = r"unknown direction 'lbfgs'; choose one of \('adam', 'rmsprop', 'sgd', 'momentum'\)"
    with pytest.raises(ValueError, match=expected):
        QLAB(nn.Linear(2, 1).parameters(), direction="lbfgs")


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"unknown mode 'fast'; choose one of \('safeguarded', 'paper'\)"):
        QLAB(nn.Linear(2, 1).parameters(), mode="fast")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
        (dict(betas=(0.9,)), r"betas must be two numbers in \[0, 1\)"),
        (dict(eps=0.0), "eps must be positive"),
        (dict(weight_decay=-0.01), "weight_decay must be non-negative"),
        (dict(weight_decay=math.nan), "weight_decay must be non-negative"),
        (dict(relative_update=0.0), r"relative_update must be None \(the fitted step alone\), a positive number"),
        (dict(relative_update=math.inf), "relative_update must be None .*got inf"),
        (dict(relative_update="5e-3"), "relative_update must be None .*got '5e-3'"),
        (dict(relative_update=(8e-3, 4e-3)), r"a pair of them, low <= high \(a band\), got \(0.008, 0.004\)"),
        (dict(relative_update=(4e-3,)), r"relative_update must be None .*got \(0.004,\)"),
        (dict(relative_update=(0.0, 8e-3)), r"relative_update must be None .*got \(0.0, 0.008\)"),
        (dict(relative_update=(4e-3, "8e-3")), r"relative_update must be None .*got \(0.004, '8e-3'\)"),
        (dict(max_probe_interval=4), r"max_probe_interval must be None .* >= probe_every \(8\), got 4"),
        (dict(probe_every=16, max_probe_interval=8), r">= probe_every \(16\), got 8"),
        (dict(max_probe_interval=64.0), "max_probe_interval must be None .*got 64.0"),
        (dict(mode="paper", max_probe_interval=0), r">= probe_every \(1 in paper mode\), got 0"),
        (dict(mode="paper", max_probe_interval=64), "max_probe_interval=64 needs mode='safeguarded'"),
    ],
)
def test_bad_numeric_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        QLAB(nn.Linear(2, 1).parameters(), **kwargs)


# ------------------------------------------------------------------ step arguments
def test_loss_none() -> None:
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters())
    loss_fn().backward()
    with pytest.raises(TypeError, match="loss must be a torch.Tensor holding the training loss.*got NoneType"):
        opt.step(None, loss_fn)


def test_non_scalar_loss() -> None:
    model, _ = tiny_problem()
    opt = QLAB(model.parameters())
    per_sample = (model(torch.randn(5, 4)) ** 2).squeeze(1)
    per_sample.sum().backward()
    with pytest.raises(ValueError, match=r"loss must be a scalar.*got shape \(5,\).*\.mean\(\) or \.sum\(\)"):
        opt.step(per_sample, lambda: per_sample.sum())


@pytest.mark.parametrize("trial", [None, "not callable"])
def test_missing_trial_function(trial) -> None:
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters())
    loss = loss_fn()
    loss.backward()
    with pytest.raises(TypeError, match="QLAB.step needs trial_loss_fn: a no-argument callable"):
        opt.step(loss, trial)


@pytest.mark.parametrize(
    "returned, error, message",
    [
        (0.5, TypeError, r"trial_loss_fn\(\) must be a torch.Tensor.*got float"),
        (None, TypeError, r"trial_loss_fn\(\) must be a torch.Tensor.*got NoneType"),
        (torch.ones(3), ValueError, r"trial_loss_fn\(\) must be a scalar.*got shape \(3,\)"),
    ],
)
def test_trial_function_returning_a_non_scalar_or_non_tensor(returned, error, message) -> None:
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters())
    before = snapshot(model)
    loss = loss_fn()
    loss.backward()
    with pytest.raises(error, match=message):
        opt.step(loss, lambda: returned)
    # The parameters were moved back from the trial point (to within rounding).
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("same", [lambda loss: loss, lambda loss: loss.detach()])
def test_trial_function_returning_the_training_loss_itself(same) -> None:
    """A common slip, opt.step(loss, lambda: loss): the 'trial loss' would never change."""
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters())
    before = snapshot(model)
    loss = loss_fn()
    loss.backward()
    with pytest.raises(ValueError, match=r"returned the training loss itself.*must run the forward pass"):
        opt.step(loss, lambda: same(loss))
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


def test_trial_function_that_raises() -> None:
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters(), initial_step=0.5)
    before = snapshot(model)
    loss = loss_fn()
    loss.backward()

    def broken() -> torch.Tensor:
        raise KeyError("batch")

    expected = r"trial_loss_fn raised at the trial point w - 0.5 d.*moved back to w"
    with pytest.raises(RuntimeError, match=expected) as info:
        opt.step(loss, broken)
    assert isinstance(info.value.__cause__, KeyError)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ skipped steps
def test_nan_training_loss_skips_the_step_and_changes_nothing() -> None:
    """On a step that probes (here every step) a non-finite loss is seen and the step skipped;
    the trial forward runs once, at w itself, since nothing is known before the one read."""
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters(), direction="momentum", probe_every=1)
    take_steps(model, opt, loss_fn, 3)
    before = snapshot(model)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    trial_distance = opt.trial_distance
    calls = []

    opt.zero_grad()
    loss = loss_fn() + torch.tensor(math.nan)  # NaN loss, finite gradient
    loss.backward()
    returned = opt.step(loss, lambda: calls.append(1) or loss_fn())

    assert math.isnan(returned.item())
    assert_bitwise_equal(model, before)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))
    assert calls == [1]
    assert opt.events["nonfinite_loss"] == 1
    assert opt.last_step.event == "nonfinite_loss" and opt.last_step.step_size == 0.0
    assert opt.param_groups[0]["lr"] == 0.0
    assert opt.trial_distance == trial_distance
    take_steps(model, opt, loss_fn, 1)  # and training simply continues
    assert opt.last_step.event in (None, "extrapolation_capped", "stability_edge") and opt.last_step.step_size > 0


@pytest.mark.parametrize("probe_every", [1, 8], ids=["probing", "fused"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("direction", ["sgd", "rmsprop", "momentum", "adam"])
def test_nonfinite_gradient_skips_the_step_and_changes_nothing(bad: float, direction: str, probe_every: int) -> None:
    """On a step that probes the skip is decided after the one read; on one that does not, on
    the device, and counted at the next read. Either way the parameters and the moments are
    left bitwise as they were; the moments' step count advances (it counts every step)."""
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters(), direction=direction, probe_every=probe_every)
    take_steps(model, opt, loss_fn, 2)
    before = snapshot(model)
    moments = {k: v.clone() for k, v in opt.state[model[0].weight].items() if k != "step"}
    updates = opt.direction_updates

    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    model[0].weight.grad[0, 0] = bad
    opt.step(loss, loss_fn)

    assert_bitwise_equal(model, before)
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in moments.items())
    assert opt.direction_updates == updates + 1 == int(opt.state[model[0].weight]["step"])
    if probe_every == 1:
        assert opt.last_step.event == "nonfinite_gradient" and opt.last_step.step_size == 0.0
    else:  # nothing was read: the record shows the held step, the count comes with the next read
        assert opt.last_step.event is None and opt.events["nonfinite_gradient"] == 0
        opt.state_dict()
    assert opt.events["nonfinite_gradient"] == 1


def test_zero_gradient_is_counted_and_changes_nothing() -> None:
    model, loss_fn = tiny_problem()
    opt = QLAB(model.parameters())
    before = snapshot(model)
    opt.zero_grad(set_to_none=False)  # gradients exist and are exactly zero
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(loss_fn(), loss_fn)
    assert_bitwise_equal(model, before)
    assert opt.events["zero_gradient"] == 1


def test_sparse_gradients_are_refused() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = QLAB(embedding.parameters())
    tokens = torch.tensor([1, 2, 3])

    def loss_fn() -> torch.Tensor:
        return embedding(tokens).pow(2).sum()

    loss = loss_fn()
    loss.backward()
    expected = r"does not support sparse gradients.*nn.Embedding\(sparse=True\).*dense"
    with pytest.raises(RuntimeError, match=expected):
        opt.step(loss, loss_fn)


def test_parameters_without_gradients_are_ignored_and_untouched() -> None:
    torch.manual_seed(0)
    used, frozen, unused = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
    frozen.requires_grad_(False)
    opt = QLAB(
        [{"params": list(used.parameters()) + list(unused.parameters()), "weight_decay": 0.1},
         {"params": list(frozen.parameters()), "weight_decay": 0.1}],
        direction="adam",
    )
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def loss_fn() -> torch.Tensor:
        return nn.functional.mse_loss(used(x) + frozen(x), y)

    untouched = [p.detach().clone() for p in [*frozen.parameters(), *unused.parameters()]]
    used_before = [p.detach().clone() for p in used.parameters()]
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss, loss_fn)
    assert all(torch.equal(p, q) for p, q in zip([*frozen.parameters(), *unused.parameters()], untouched))
    assert all(len(opt.state[p]) == 0 for p in frozen.parameters())  # buffers only for what may train
    for p in unused.parameters():  # created with the optimizer, never advanced
        assert opt.state[p]["step"].item() == 0
        assert all(not value.any() for value in opt.state[p].values())
    assert not any(torch.equal(p, q) for p, q in zip(used.parameters(), used_before))


# ------------------------------------------------------------------ state dicts
def test_loading_another_optimizers_state_dict() -> None:
    model, loss_fn = tiny_problem()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn().backward()
    sgd.step()  # so that its state dict has a momentum buffer too
    opt = QLAB(model.parameters())
    with pytest.raises(ValueError, match=r"holds no QLAB record .*; it was not saved by QLAB.state_dict\(\)"):
        opt.load_state_dict(sgd.state_dict())


def test_loading_a_checkpoint_of_another_direction() -> None:
    model, loss_fn = tiny_problem()
    adam_qlab = QLAB(model.parameters(), direction="adam")
    take_steps(model, adam_qlab, loss_fn, 1)
    opt = QLAB(model.parameters(), direction="momentum")
    expected = r"direction='adam' but this optimizer uses direction='momentum'.*same direction"
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(adam_qlab.state_dict())


def test_loading_a_checkpoint_of_another_relative_update() -> None:
    model, loss_fn = tiny_problem()
    default = QLAB(model.parameters())
    take_steps(model, default, loss_fn, 9)
    opt = QLAB(model.parameters(), relative_update=None)
    expected = r"relative_update=\(0.004, 0.008\) but this optimizer uses relative_update=None.*same relative_update"
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(default.state_dict())


def test_a_checkpoint_of_one_relative_update_target_resumes_with_that_target() -> None:
    """Checkpoints saved before the band record the target as one number: the optimizer built
    with that number resumes them; the default band says which setting differs."""
    model, loss_fn = tiny_problem()
    target = QLAB(model.parameters(), relative_update=5e-3)
    take_steps(model, target, loss_fn, 9)
    state = target.state_dict()
    record = json.loads(state["param_groups"][0]["qlab"])
    record["relative_update"] = 0.005  # as versions before the band saved it
    state["param_groups"][0]["qlab"] = json.dumps(record)
    resumed = QLAB(model.parameters(), relative_update=5e-3)
    resumed.load_state_dict(state)
    assert resumed.relative_update == (0.005, 0.005) and resumed.steps == 9
    expected = r"relative_update=\(0.005, 0.005\) but this optimizer uses relative_update=\(0.004, 0.008\)"
    with pytest.raises(ValueError, match=expected):
        QLAB(model.parameters()).load_state_dict(state)


def test_collapsed_trial_distance_is_a_clear_error() -> None:
    """A trial function that evaluates a different function (here: the loss plus fresh noise
    that always makes the trial look worse) drives beta to zero; QLAB says why, instead of
    dividing by zero."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = QLAB([w], initial_step=1.0, mode="paper")
    with pytest.raises(RuntimeError, match="trial distance collapsed.*same function"):
        for _ in range(200):
            opt.zero_grad()
            loss = (w * w).sum()
            loss.backward()
            opt.step(loss, lambda: (w * w).sum() + 1.0 + torch.rand((), dtype=torch.float64))
    assert torch.isfinite(w).all()
