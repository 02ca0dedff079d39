"""Polynomial-decay iterate averaging: the formula against a float64 reference, and the callback
that QLABMixin adds (evaluation on the average, training untouched, checkpoints, resume)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from lightning_helpers import BatchNormNet, RegressionNet, classification_data, quiet_trainer, regression_data
from lightning_qlab.averaged_model import HostCountedAverage
from lightning_qlab.averaging import DEFAULT_ETA, PolynomialAveraging, polynomial_decay_multi_avg_fn
from lightning_qlab.mixin import QLABConfig
from read_helpers import counted_reads, cuda_synchronisations


def reference_average(iterates: list[torch.Tensor], eta: float) -> torch.Tensor:
    """Shamir & Zhang's average written out as a weighted sum, in float64: iterate s (1-based) of T
    has weight c_s * prod_{r=s+1..T} (1 - c_r), with c_s = (eta + 1) / (s + eta)."""
    T = len(iterates)
    c = [(eta + 1) / (s + eta) for s in range(1, T + 1)]
    total = torch.zeros_like(iterates[0], dtype=torch.float64)
    for s in range(1, T + 1):
        weight = c[s - 1] * math.prod(1 - c[r - 1] for r in range(s + 1, T + 1))
        total += weight * iterates[s - 1].double()
    return total


@pytest.mark.parametrize("eta", [0.0, 1.0, 2.5, DEFAULT_ETA, 20.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_average_matches_the_unrolled_weighted_sum(eta, dtype):
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(4, 3).to(dtype)
    average = AveragedModel(net, multi_avg_fn=polynomial_decay_multi_avg_fn(eta))
    iterates = []
    for _ in range(60):
        with torch.no_grad():
            net.weight.copy_(torch.randn(3, 4, generator=generator, dtype=torch.float64))
        iterates.append(net.weight.detach().clone())
        average.update_parameters(net)
    expected = reference_average(iterates, eta)
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(average.module.weight.double(), expected, rtol=0, atol=tolerance)


def test_the_weights_grow_like_a_rising_factorial():
    """For integer eta the weight of iterate s is proportional to s (s+1) ... (s+eta-1)."""
    T, eta = 40, 3
    iterates = [torch.eye(T, dtype=torch.float64)[s] for s in range(T)]  # iterate s is the unit vector e_s
    weights = reference_average(iterates, eta)
    rising = torch.tensor([math.prod(range(s, s + eta)) for s in range(1, T + 1)], dtype=torch.float64)
    torch.testing.assert_close(weights, rising / rising.sum(), rtol=1e-12, atol=0)

    average = AveragedModel(torch.nn.Linear(T, 1, bias=False).double(), multi_avg_fn=polynomial_decay_multi_avg_fn(eta))
    for iterate in iterates:
        net = torch.nn.Linear(T, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(iterate)
        average.update_parameters(net)
    torch.testing.assert_close(average.module.weight[0], weights, rtol=0, atol=1e-14)


def test_a_half_precision_module_keeps_a_float32_average():
    """Lightning's "bf16-true" converts the module after the average was copied in float32."""
    generator = torch.Generator().manual_seed(1)
    net = torch.nn.Linear(4, 3)
    average = AveragedModel(net, multi_avg_fn=polynomial_decay_multi_avg_fn())
    net = net.to(torch.bfloat16)
    iterates = []
    for _ in range(30):
        with torch.no_grad():
            net.weight.copy_(torch.randn(3, 4, generator=generator))
        iterates.append(net.weight.detach().double())
        average.update_parameters(net)
    assert average.module.weight.dtype == torch.float32
    torch.testing.assert_close(average.module.weight.double(), reference_average(iterates, DEFAULT_ETA),
                               rtol=0, atol=1e-6)


def test_integer_buffers_take_the_current_value():
    net = torch.nn.BatchNorm1d(3)
    average = AveragedModel(net, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)
    for _ in range(3):
        net(torch.randn(8, 3))
        average.update_parameters(net)
    assert average.module.num_batches_tracked.item() == net.num_batches_tracked.item() == 3
    assert not torch.equal(average.module.running_mean, net.running_mean)  # the float buffers are averaged


def test_the_host_counted_average_equals_torchs_and_reads_the_device_once(monkeypatch):
    """What the callback averages with: torch's AveragedModel, less its two reads of n_averaged per
    update (on a GPU, two synchronisations every step). It reads the count once, at the first
    update and again after a load, and otherwise agrees with torch's (its weight is a Python
    float rather than a float32 tensor)."""

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ours = HostCountedAverage(net, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)
    theirs = AveragedModel(net, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)
    saved = None
    for step in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
            net[1].num_batches_tracked.add_(1)
        theirs.update_parameters(net)
        with counted_reads(monkeypatch) as reads:
            ours.update_parameters(net)
        assert len(reads) == (1 if step in (0, 4) else 0), step
        if step == 2:
            saved = {name: value.clone() for name, value in ours.state_dict().items()}
        if step == 3:  # a resume: the count comes back from the state
            ours.load_state_dict(saved)
            theirs.load_state_dict(saved)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 5
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations: needs a GPU")
def test_on_cuda_the_average_updates_without_synchronising():

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).cuda()
    average = HostCountedAverage(net, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)
    average.update_parameters(net)  # the first update reads the count once
    torch.cuda.synchronize()
    with cuda_synchronisations() as synchronisations:
        for _ in range(3):
            average.update_parameters(net)
    assert synchronisations == []


@pytest.mark.parametrize("eta", [-1.0, math.nan, math.inf, True, "3"])
def test_a_bad_eta_is_refused(eta):
    with pytest.raises(ValueError, match="eta >= 0"):
        polynomial_decay_multi_avg_fn(eta)


# ------------------------------------------------------------------------------------------------
# The callback, as QLABMixin adds it
# ------------------------------------------------------------------------------------------------
class IterateRecorder(Callback):
    """The training weights after every optimizer step (listed before the averaging callback,
    whose update does not change them)."""

    def __init__(self) -> None:
        self.iterates: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.iterates.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))


class ValidatedRegression(RegressionNet):
    """Records the weights each validation run sees."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validated: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(torch.cat([p.detach().reshape(-1).clone() for p in self.parameters()]))


def _vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _fit_with_validation(weight_averaging: bool) -> tuple[ValidatedRegression, IterateRecorder, Any]:
    data = regression_data(12 * 8, seed=2, dtype=torch.float64)
    model = ValidatedRegression(qlab_config=QLABConfig(weight_averaging=weight_averaging), dtype=torch.float64)
    recorder = IterateRecorder()
    trainer = quiet_trainer(max_epochs=2, callbacks=[recorder], val_check_interval=4, limit_val_batches=1)
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return model, recorder, trainer


def test_validation_sees_the_average_and_training_is_untouched():
    averaged, averaged_steps, trainer = _fit_with_validation(weight_averaging=True)
    plain, plain_steps, _ = _fit_with_validation(weight_averaging=False)

    assert [type(c) for c in trainer.callbacks].count(PolynomialAveraging) == 1
    # Swapping the average in and out for 6 validation runs leaves the training path bitwise alone.
    assert len(averaged_steps.iterates) == len(plain_steps.iterates) == 24
    for ours, theirs in zip(averaged_steps.iterates, plain_steps.iterates):
        assert torch.equal(ours, theirs)
    # Validation after step 4k evaluates the average of the first 4k iterates; without
    # averaging, the 4k-th iterate itself.
    assert len(averaged.validated) == len(plain.validated) == 6
    for k, (seen_averaged, seen_plain) in enumerate(zip(averaged.validated, plain.validated), start=1):
        iterates = averaged_steps.iterates[: 4 * k]
        torch.testing.assert_close(seen_averaged.double(), reference_average(iterates, DEFAULT_ETA), rtol=0, atol=1e-12)
        assert torch.equal(seen_plain, iterates[-1])
    # After fit the module holds the average of all 24 iterates.
    torch.testing.assert_close(_vector(averaged), reference_average(averaged_steps.iterates, DEFAULT_ETA),
                               rtol=0, atol=1e-12)
    assert torch.equal(_vector(plain), plain_steps.iterates[-1])


def test_a_checkpoint_holds_the_average_for_inference_and_the_iterate_for_resuming(tmp_path):
    data = classification_data(6 * 16, seed=4)
    model, recorder = BatchNormNet(dropout=0.0, seed=1), IterateRecorder()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(model, DataLoader(data, batch_size=16))
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    checkpoint = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)

    saved_average = torch.cat([checkpoint["state_dict"][name].reshape(-1) for name, _ in model.named_parameters()])
    saved_iterate = torch.cat(
        [checkpoint["current_model_state"][name].reshape(-1) for name, _ in model.named_parameters()]
    )
    torch.testing.assert_close(saved_average.double(), reference_average(recorder.iterates, DEFAULT_ETA),
                               rtol=0, atol=1e-6)
    assert torch.equal(saved_iterate, recorder.iterates[-1])
    assert checkpoint["averaging_state"]["n_averaged"].item() == 6
    # BatchNorm running statistics are averaged with the weights they belong to.
    assert not torch.equal(checkpoint["state_dict"]["net.1.running_mean"],
                           checkpoint["current_model_state"]["net.1.running_mean"])
    # The module itself holds the average: trainer.test after fit evaluates it.
    assert torch.equal(_vector(model), saved_average)


def test_testing_a_checkpoint_after_fit_evaluates_that_checkpoints_average(tmp_path):
    """Lightning's callback, left alone, would load the training weights (current_model_state)
    for trainer.test(ckpt_path=...) on the Trainer that ran fit, and swap its own copy in for
    trainer.validate."""
    class Tested(RegressionNet):
        seen: list[torch.Tensor] = []

        def test_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.seen.append(_vector(self).clone())

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.seen.append(_vector(self).clone())

    data = regression_data(6 * 8, seed=5)
    model = Tested()
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=8))
    checkpoint_path = trainer.checkpoint_callback.best_model_path
    model.seen.clear()
    trainer.test(model, DataLoader(data, batch_size=8), ckpt_path=checkpoint_path, verbose=False)
    trainer.validate(model, DataLoader(data, batch_size=8), ckpt_path=checkpoint_path, verbose=False)
    saved = torch.load(checkpoint_path, weights_only=False)
    average = torch.cat([saved["state_dict"][name].reshape(-1) for name, _ in model.named_parameters()])
    iterate = torch.cat([saved["current_model_state"][name].reshape(-1) for name, _ in model.named_parameters()])
    assert not torch.equal(average, iterate)
    assert len(model.seen) == 2  # the first batch of test and of validation
    assert torch.equal(model.seen[0], average) and torch.equal(model.seen[1], average)


def test_validating_a_checkpoint_in_a_fresh_trainer_gives_no_averaging_warning(tmp_path, recwarn):
    data = regression_data(4 * 8, seed=6)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(RegressionNet(), DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    class Validated(RegressionNet):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    model = Validated(seed=3)
    quiet_trainer().validate(model, DataLoader(data, batch_size=8), ckpt_path=tmp_path / "model.ckpt", verbose=False)
    assert not [w for w in recwarn if "WeightAveraging" in str(w.message)]


def test_resuming_restores_the_average_exactly(tmp_path):
    data = regression_data(5 * 8, seed=7)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=8)

    straight = RegressionNet()
    straight_trainer = quiet_trainer(max_epochs=3)
    straight_trainer.fit(straight, loader())
    straight_trainer.save_checkpoint(tmp_path / "straight.ckpt")

    first_trainer = quiet_trainer(max_epochs=1)
    first_trainer.fit(RegressionNet(), loader())
    first_trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = RegressionNet(seed=9)
    resumed_trainer = quiet_trainer(max_epochs=3)
    resumed_trainer.fit(resumed, loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    resumed_trainer.save_checkpoint(tmp_path / "resumed.ckpt")

    # A checkpoint written during fit (by ModelCheckpoint, at the end of the first epoch) too.
    during = quiet_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path / "during")
    during.fit(RegressionNet(), loader())
    during_checkpoint = during.checkpoint_callback.best_model_path
    resumed_during = RegressionNet(seed=9)
    resumed_during_trainer = quiet_trainer(max_epochs=3)
    resumed_during_trainer.fit(resumed_during, loader(), ckpt_path=during_checkpoint)
    resumed_during_trainer.save_checkpoint(tmp_path / "resumed_during.ckpt")

    assert torch.equal(_vector(resumed), _vector(straight))  # the averages
    assert torch.equal(_vector(resumed_during), _vector(straight))
    one = torch.load(tmp_path / "straight.ckpt", weights_only=False)
    for other_path in ("resumed.ckpt", "resumed_during.ckpt"):
        other = torch.load(tmp_path / other_path, weights_only=False)
        for key in ("state_dict", "current_model_state", "averaging_state"):
            assert one[key].keys() == other[key].keys()
            for name in one[key]:
                assert torch.equal(one[key][name], other[key][name]), (other_path, key, name)


def test_resuming_with_another_eta_is_refused(tmp_path):
    data = regression_data(2 * 8, seed=8)
    trainer = quiet_trainer(max_epochs=1, callbacks=[PolynomialAveraging(eta=2)])
    model = RegressionNet(qlab_config=QLABConfig(weight_averaging=False))
    trainer.fit(model, DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "eta2.ckpt")
    with pytest.raises(ValueError, match=r"eta=2.*PolynomialAveraging\(eta=2\)"):
        quiet_trainer(max_epochs=2).fit(RegressionNet(), DataLoader(data, batch_size=8), ckpt_path=tmp_path / "eta2.ckpt")


def _averaging_callbacks(trainer: Any) -> list[Callback]:
    return [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]


def test_your_own_weight_averaging_replaces_the_default():
    data = regression_data(2 * 8, seed=9)
    ema = EMAWeightAveraging(decay=0.5)
    trainer = quiet_trainer(max_epochs=1, callbacks=[ema])
    trainer.fit(RegressionNet(), DataLoader(data, batch_size=8))
    assert _averaging_callbacks(trainer) == [ema]


def test_no_averaging_when_switched_off_or_for_a_baseline_optimizer():
    data = regression_data(2 * 8, seed=10)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(RegressionNet(qlab_config=QLABConfig(weight_averaging=False)), DataLoader(data, batch_size=8))
    assert _averaging_callbacks(trainer) == []

    class Baseline(RegressionNet):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = True

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Baseline(), DataLoader(data, batch_size=8))
    assert _averaging_callbacks(trainer) == []


def test_further_calls_on_the_same_trainer_keep_the_average_and_the_iterate(caplog):
    class Tested(RegressionNet):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            pass

    data = regression_data(2 * 8, seed=11)
    model, recorder = Tested(), IterateRecorder()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(model, DataLoader(data, batch_size=8))
    first = _averaging_callbacks(trainer)
    trainer.test(model, DataLoader(data, batch_size=8), verbose=False)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert _averaging_callbacks(trainer) == first and len(first) == 1
    assert "override existing callbacks" not in caplog.text  # nothing to tell the user about
    # The second fit continued from the training weights, and the average from where it was.
    assert len(recorder.iterates) == 4
    torch.testing.assert_close(_vector(model).double(), reference_average(recorder.iterates, DEFAULT_ETA),
                               rtol=0, atol=1e-6)


def test_config_rejects_a_non_boolean_switch():
    with pytest.raises(ValueError, match="weight_averaging must be True or False"):
        QLABConfig(weight_averaging="yes")  # type: ignore[arg-type]


def test_fit_in_bf16_true_precision_averages_in_float32():
    data = regression_data(4 * 8, seed=12)
    model, recorder = RegressionNet(), IterateRecorder()
    trainer = quiet_trainer(max_epochs=1, precision="bf16-true", callbacks=[recorder])
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (averaging,) = _averaging_callbacks(trainer)
    held = averaging._average_model.module  # after fit: the last iterate, kept in float32
    assert {p.dtype for p in held.parameters()} == {torch.float32}
    assert torch.equal(_vector(held).to(torch.bfloat16), recorder.iterates[-1])
    expected = reference_average([iterate.double() for iterate in recorder.iterates], DEFAULT_ETA)
    torch.testing.assert_close(_vector(model).double(), expected, rtol=1e-2, atol=1e-2)  # bf16's resolution
