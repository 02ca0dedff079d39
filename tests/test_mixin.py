"""QLABMixin inside a real Trainer: the trial forward, accumulation, clipping, resume, misuse."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_helpers import (
    BatchNormNet,
    RegressionNet,
    classification_data,
    parameter_vector,
    quiet_trainer,
    regression_data,
)
from lightning_qlab.callback import QLABMonitor
from lightning_qlab.mixin import QLABConfig, QLABMixin
from lightning_qlab.optimizer import QLAB


def _float16_with_grad_scaler() -> MixedPrecision:
    """16-mixed on the CPU: Trainer(precision="16-mixed") would switch to bf16 there, so the
    plugin is built explicitly, with the GradScaler that 16-mixed uses on GPUs."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.named_buffers()}


# ------------------------------------------------------------------------------ the trial forward
@pytest.mark.parametrize("sync_batch_norm", [False, True], ids=["BatchNorm", "SyncBatchNorm"])
def test_trial_forward_at_the_same_point_reproduces_the_training_loss_exactly(sync_batch_norm):
    model = BatchNormNet(dropout=0.5)
    if sync_batch_norm:  # single process: SyncBatchNorm normalises like BatchNorm, same buffers
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    x, y = classification_data(64).tensors
    torch.manual_seed(123)
    loss = model.qlab_forward((x, y))
    rng_after_training = torch.get_rng_state()
    buffers_after_training = _buffers(model)

    trial = model.qlab_trial_loss()  # beta = 0: the parameters have not moved

    assert torch.equal(trial, loss.detach())  # bitwise: same dropout masks, same batch statistics
    assert not trial.requires_grad
    assert torch.equal(torch.get_rng_state(), rng_after_training)  # the training stream continues
    for name, value in _buffers(model).items():
        assert torch.equal(value, buffers_after_training[name]), name
    assert int(buffers_after_training["net.1.num_batches_tracked"]) == 1
    # The replay is what makes them equal: without it, dropout draws other masks.
    assert not torch.equal(model.qlab_loss((x, y)).detach(), loss.detach())


class _SeedEachBatch(Callback):
    """Seeds the generator right before each training step and keeps the state after it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(7)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rng_state_after_step = torch.get_rng_state()


def test_a_full_step_leaves_batch_norm_statistics_as_the_training_forward_left_them():
    model = BatchNormNet(dropout=0.3)
    reference = copy.deepcopy(model)
    data = classification_data(32)
    seeding = _SeedEachBatch()
    trainer = quiet_trainer(max_steps=1, callbacks=[seeding])
    trainer.fit(model, DataLoader(data, batch_size=32))

    reference.train()
    torch.manual_seed(7)
    reference.qlab_loss(data.tensors)  # the training forward alone, with the same dropout masks
    qlab = trainer.optimizers[0]
    assert qlab.last_step.step_size > 0 and qlab.last_step.probes >= 2  # the trial ran, several times
    assert not torch.equal(parameter_vector(model), parameter_vector(reference))
    for name, value in _buffers(reference).items():
        assert torch.equal(model.get_buffer(name), value), name
    assert torch.equal(seeding.rng_state_after_step, torch.get_rng_state())


# ------------------------------------------------------------------------------ accumulation
class _BlockSampler(torch.utils.data.Sampler):
    """Batches of consecutive indices with the given sizes."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __iter__(self):
        start = 0
        for size in self.sizes:
            yield list(range(start, start + size))
            start += size

    def __len__(self) -> int:
        return len(self.sizes)


@pytest.mark.parametrize("direction", ["sgd", "adam"])
@pytest.mark.parametrize("micro_batches", [12, 13], ids=["multiple-of-k", "remainder-1"])
def test_k_micro_batches_step_like_one_batch_of_k_times_the_size(direction, micro_batches):
    k, n = 3, 4
    data = regression_data(micro_batches * n, dtype=torch.float64)
    accumulated = RegressionNet(QLABConfig(accumulate_batches=k, direction=direction), dtype=torch.float64)
    whole = RegressionNet(QLABConfig(direction=direction), dtype=torch.float64)
    monitors = [QLABMonitor(plot=False), QLABMonitor(plot=False)]
    quiet_trainer(max_epochs=2, callbacks=[monitors[0]]).fit(accumulated, DataLoader(data, batch_size=n))
    # The same samples as batches of k * n, the epoch's last batch holding the remainder.
    sizes = [k * n] * (micro_batches // k) + ([n * (micro_batches % k)] if micro_batches % k else [])
    blocks = DataLoader(data, batch_sampler=_BlockSampler(sizes))
    quiet_trainer(max_epochs=2, callbacks=[monitors[1]]).fit(whole, blocks)

    assert len(monitors[0].steps) == len(monitors[1].steps) == 2 * len(sizes)
    torch.testing.assert_close(
        torch.tensor(monitors[0].step_sizes), torch.tensor(monitors[1].step_sizes), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(parameter_vector(accumulated), parameter_vector(whole), rtol=1e-10, atol=1e-12)


class _Validated(RegressionNet):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.qlab_loss(batch))


def test_validation_inside_an_accumulation_window_keeps_the_accumulated_gradient():
    """val_check_interval=3 with k=2: validation runs after batch 2, between the two micro-batches
    of the window [2, 3]. Lightning zeroes gradients before validation; not those of a window."""
    data = regression_data(48, dtype=torch.float64)
    runs = []
    for validate in (False, True):
        model = _Validated(QLABConfig(accumulate_batches=2), dtype=torch.float64)
        settings = dict(val_check_interval=3, limit_val_batches=1) if validate else dict(limit_val_batches=0)
        trainer = quiet_trainer(max_epochs=1, **settings)
        trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        runs.append(parameter_vector(model))
        if validate:
            assert "val_loss" in trainer.callback_metrics
    assert torch.equal(runs[0], runs[1])


class _UnsizedBatches(IterableDataset):
    """An iterable data set without __len__: the epoch's end cannot be seen coming."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        for start in range(0, len(self.data), self.batch_size):
            yield self.data[start : start + self.batch_size]


def test_an_unfinished_window_of_an_epoch_of_unknown_length_is_dropped_with_a_warning():
    data = regression_data(20)  # 5 batches of 4 per epoch; k = 3 leaves 2 micro-batches over
    model = RegressionNet(QLABConfig(accumulate_batches=3))
    trainer = quiet_trainer(max_epochs=2)
    with pytest.warns(UserWarning, match=r"dropped 2 micro-batch\(es\) of an unfinished accumulation window of 3"):
        trainer.fit(model, DataLoader(_UnsizedBatches(data, 4), batch_size=None))
    assert trainer.global_step == 2  # one full window per epoch


# ------------------------------------------------------------------------------ clipping
class _RecordsClippedGradients(RegressionNet):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad for p in self.parameters()]
        self.clipped_norms.append(float(torch.nn.utils.get_total_norm(grads)))
        self.directions.append(torch.cat([g.reshape(-1) for g in grads]).clone())


def _linear_regression(config: QLABConfig) -> _RecordsClippedGradients:
    """A linear model with MSE: the loss is exactly quadratic in the parameters."""
    model = _RecordsClippedGradients(config, dtype=torch.float64)
    model.net = torch.nn.Linear(5, 1).double()
    model.clipped_norms, model.directions = [], []
    return model


def test_clipping_by_norm_keeps_the_fitted_parabola_exact():
    """On a quadratic the paper rule is exact line search along d. Clipping by norm only rescales
    d, so the clipped run must land on the same points, with step sizes 1/s times larger."""
    data = regression_data(64, dtype=torch.float64)
    runs = {}
    for clip in (None, 1e-3):
        model = _linear_regression(QLABConfig(direction="sgd", mode="paper", initial_step=0.05,
                                                gradient_clip_norm=clip))
        monitor = QLABMonitor(plot=False)
        quiet_trainer(max_steps=6, callbacks=[monitor]).fit(model, DataLoader(data, batch_size=64))
        runs[clip] = model, monitor
    (plain, plain_monitor), (clipped, clipped_monitor) = runs[None], runs[1e-3]
    assert all(norm == pytest.approx(1e-3, rel=1e-4) for norm in clipped.clipped_norms)  # clipping was active
    torch.testing.assert_close(parameter_vector(clipped), parameter_vector(plain), rtol=1e-4, atol=1e-7)
    # The diagnostics describe the real loss, not the scaled one QLAB was handed: the same losses
    # as the unclipped run at the same points, falling at every step of the exact line search.
    losses = list(clipped_monitor.losses)
    assert losses == pytest.approx(list(plain_monitor.losses), rel=1e-6)
    assert all(after < before for before, after in zip(losses, losses[1:]))
    assert clipped.trainer.optimizers[0].last_step.loss == losses[-1]


def test_clipping_by_value_steps_to_the_minimum_along_the_clipped_direction():
    data = regression_data(64, dtype=torch.float64)
    model = _linear_regression(QLABConfig(direction="sgd", mode="paper", initial_step=0.05,
                                                gradient_clip_value=0.01))
    quiet_trainer(max_steps=1, callbacks=[]).fit(model, DataLoader(data, batch_size=64))
    direction = model.directions[0]
    assert direction.abs().max() == pytest.approx(0.01)  # clipping was active
    model.zero_grad()
    F.mse_loss(model(data.tensors[0]), data.tensors[1]).backward()
    new_gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # Exact line search along d: the new gradient is orthogonal to d.
    cosine = torch.dot(new_gradient, direction) / (new_gradient.norm() * direction.norm())
    assert abs(float(cosine)) < 1e-4


class _ForgetsSuper(RegressionNet):
    def on_before_optimizer_step(self, optimizer):
        pass


def test_an_override_that_skips_the_clipping_hook_is_an_error():
    model = _ForgetsSuper(QLABConfig(gradient_clip_norm=1.0))
    with pytest.raises(RuntimeError, match=r"call super\(\).on_before_optimizer_step\(optimizer\)|calling super"):
        quiet_trainer(max_steps=1).fit(model, DataLoader(regression_data(8), batch_size=8))


def test_under_16_mixed_the_clip_sees_unscaled_gradients():
    """The GradScaler multiplies the loss by 2**16 before backward. Had the clip run before
    Lightning unscaled the gradients, their norm afterwards would be 2**16 times too small."""
    model = _RecordsClippedGradients(QLABConfig(gradient_clip_norm=1e-3))
    model.clipped_norms, model.directions = [], []
    trainer = quiet_trainer(max_steps=3, plugins=[_float16_with_grad_scaler()])
    trainer.fit(model, DataLoader(regression_data(96), batch_size=32))
    scaler = trainer.precision_plugin.scaler
    assert scaler is not None and scaler.get_scale() > 1
    assert model.clipped_norms and all(norm == pytest.approx(1e-3, rel=1e-3) for norm in model.clipped_norms)
    assert trainer.optimizers[0].last_step.step_size > 0


# ------------------------------------------------------------------------------ precision
class _HugeLoss(RegressionNet):
    """A loss so large that its float16 backward overflows on the first step."""

    def qlab_loss(self, batch):
        return super().qlab_loss(batch) * 1e6


def test_a_step_skipped_by_the_grad_scaler_is_reported_as_step_size_zero():
    model = _HugeLoss()
    before = parameter_vector(model).clone()
    trainer = quiet_trainer(max_steps=1, plugins=[_float16_with_grad_scaler()])
    trainer.fit(model, DataLoader(regression_data(32), batch_size=32))
    qlab = trainer.optimizers[0]
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # the scaler backed off: it skipped
    assert qlab.steps == 0 and qlab.last_step is None
    assert torch.equal(parameter_vector(model), before)
    assert qlab.param_groups[0]["lr"] == 0.0


# ------------------------------------------------------------------------------ monitors and resume
def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_learning_rate_monitor_shows_the_step_taken_one_step_late(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(
        max_steps=8, logger=logger, log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step"), monitor],
    )
    trainer.fit(RegressionNet(), DataLoader(regression_data(64), batch_size=8))
    rows = _csv_rows(Path(logger.log_dir) / "metrics.csv")
    lr = {int(row["step"]): float(row["lr-QLAB"]) for row in rows if row.get("lr-QLAB")}
    step_size = {int(row["step"]): float(row["qlab/step_size"]) for row in rows if row.get("qlab/step_size")}
    assert sorted(step_size) == list(range(8))
    assert list(step_size.values()) == list(monitor.step_sizes)  # what QLAB recorded as taken
    # LearningRateMonitor reads param_group["lr"] before each batch: the step of the batch before.
    assert lr[0] == 0.0
    for step in range(1, 8):
        assert lr[step] == step_size[step - 1] > 0


def _resume_model(seed: int = 5) -> BatchNormNet:
    return BatchNormNet(QLABConfig(direction="momentum", accumulate_batches=2), dropout=0.0, seed=seed)


def test_resuming_from_a_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    data = classification_data(7 * 16, seed=4)  # 7 batches: accumulation windows of 2, 2, 2, 1

    def loader():
        return DataLoader(data, batch_size=16, shuffle=False)

    straight, straight_monitor = _resume_model(), QLABMonitor(plot=False)
    quiet_trainer(max_epochs=2, callbacks=[straight_monitor]).fit(straight, loader())

    first, first_monitor = _resume_model(), QLABMonitor(plot=False)
    first_trainer = quiet_trainer(max_epochs=1, callbacks=[first_monitor])
    first_trainer.fit(first, loader())
    checkpoint = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(checkpoint)

    resumed, resumed_monitor = _resume_model(seed=9), QLABMonitor(plot=False)  # weights come from the checkpoint
    resumed_trainer = quiet_trainer(max_epochs=2, callbacks=[resumed_monitor])
    resumed_trainer.fit(resumed, loader(), ckpt_path=checkpoint)

    assert resumed_trainer.global_step == 8
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    qlab_straight, qlab_resumed = straight.trainer.optimizers[0], resumed_trainer.optimizers[0]
    assert qlab_resumed.trial_distance == qlab_straight.trial_distance
    assert qlab_resumed.last_step == qlab_straight.last_step
    assert qlab_resumed.events == qlab_straight.events
    expected, got = straight_monitor.state_dict(), resumed_monitor.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            # rtol = atol = 0: bitwise; the losses of the steps that did not probe are NaN
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert got[key] == expected[key], key
    assert len(resumed_monitor.steps) == 8


# ------------------------------------------------------------------------------ misuse
def _fit_one_step(model: LightningModule, **trainer_kwargs) -> None:
    quiet_trainer(max_steps=1, **trainer_kwargs).fit(model, DataLoader(regression_data(8), batch_size=8))


@pytest.mark.parametrize(
    "trainer_kwargs, message",
    [
        (dict(accumulate_grad_batches=2), r"qlab_config=QLABConfig\(accumulate_batches=2\)"),
        (dict(gradient_clip_val=0.5), r"qlab_config=QLABConfig\(gradient_clip_norm=0.5\)"),
        (dict(gradient_clip_val=0.5, gradient_clip_algorithm="value"), r"QLABConfig\(gradient_clip_value=0.5\)"),
    ],
)
def test_trainer_accumulation_and_clipping_point_to_the_mixin_options(trainer_kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        _fit_one_step(RegressionNet(), **trainer_kwargs)


class _NoLoss(QLABMixin, LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 1)


class _VectorLoss(RegressionNet):
    def qlab_loss(self, batch):
        x, y = batch
        return (self(x) - y) ** 2


class _FloatLoss(RegressionNet):
    def qlab_loss(self, batch):
        return super().qlab_loss(batch).item()


class _DetachedLoss(RegressionNet):
    def qlab_loss(self, batch):
        return super().qlab_loss(batch).detach()


class _AdamInManualMode(RegressionNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


@pytest.mark.parametrize(
    "model_class, error, message",
    [
        (_NoLoss, NotImplementedError, r"_NoLoss uses QLABMixin but does not define qlab_loss\(self, batch\)"),
        (_VectorLoss, ValueError, r"must return a scalar loss, got a tensor of shape \(8, 1\).*\.mean\(\)"),
        (_FloatLoss, TypeError, r"scalar torch.Tensor, got float"),
        (_DetachedLoss, RuntimeError, r"does not require grad"),
        (_AdamInManualMode, MisconfigurationException, r"returned Adam, but QLABMixin's manual optimization"),
    ],
)
def test_misuse_gets_a_clear_error(model_class, error, message):
    with pytest.raises(error, match=message):
        _fit_one_step(model_class())


class _Baseline(RegressionNet):
    """A baseline run: the same module trained by a plain optimizer, automatically."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = True

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_automatic_optimization_trains_a_baseline_on_qlab_loss():
    model = _Baseline()
    before = parameter_vector(model).clone()
    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2, gradient_clip_val=1.0)  # Lightning's own
    trainer.fit(model, DataLoader(regression_data(32), batch_size=8))
    assert trainer.global_step == 2
    assert not torch.equal(parameter_vector(model), before)


def test_the_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match=r"list QLABMixin before LightningModule"):
        type("Wrong", (LightningModule, QLABMixin), {})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(direction="lion"), "unknown direction 'lion'"),
        (dict(mode="fast"), "unknown mode 'fast'"),
        (dict(initial_step=0.0), "initial_step must be positive and finite"),
        (dict(accumulate_batches=0), "accumulate_batches must be an integer >= 1"),
        (dict(accumulate_batches=2.0), "accumulate_batches must be an integer >= 1"),
        (dict(gradient_clip_norm=-1.0), "gradient_clip_norm must be None"),
        (dict(gradient_clip_value=0.1, direction="adam"), "gradient_clip_value works with direction='sgd' only"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
        (dict(relative_update=[8e-3, 4e-3]), r"QLABConfig: relative_update must be .* low <= high"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QLABConfig(**kwargs)


def test_config_builds_the_optimizer_and_accepts_yaml_lists():
    config = QLABConfig(direction="adam", betas=[0.8, 0.99], weight_decay=0.01, relative_update=[3e-3, 6e-3])
    assert (config.betas, config.relative_update) == ((0.8, 0.99), (3e-3, 6e-3))
    hash(config)
    model = RegressionNet(config)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, QLAB) and optimizer.direction == "adam"
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert optimizer.relative_update == (3e-3, 6e-3)


# ------------------------------------------------------------------ what the mixin says at once
def _fit_warnings(model: LightningModule, steps: int = 4) -> tuple[list[str], object]:
    trainer = quiet_trainer(max_steps=steps)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.fit(model, DataLoader(regression_data(8 * steps), batch_size=8))
    return [str(w.message) for w in caught if "QLABMixin" in str(w.message)], trainer


class _ConstantLoss(RegressionNet):
    def qlab_loss(self, batch):
        x, _ = batch
        return 0.0 * self(x).sum() + 1.0  # depends on the parameters only through a zero factor


class _LossOfAnotherNetwork(RegressionNet):
    """The loss comes from a network the optimizer does not train."""

    def __init__(self):
        super().__init__()
        self.other = torch.nn.Linear(5, 1)

    def qlab_loss(self, batch):
        x, y = batch
        return F.mse_loss(self.other(x), y)

    def configure_optimizers(self):
        return QLAB(self.net.parameters())


@pytest.mark.parametrize("model_class, why", [
    (_ConstantLoss, "the gradient is exactly zero"),
    (_LossOfAnotherNetwork, "no trainable parameter received a gradient"),
])
def test_a_stalled_step_is_reported_at_the_first_step(model_class, why):
    messages, trainer = _fit_warnings(model_class())
    stalls = [m for m in messages if "skipped step" in m]
    assert len(stalls) == 1  # once, although every step stalled
    assert f"QLAB skipped step 1 because {why}" in stalls[0] and "does not depend on the trainable" in stalls[0]
    assert trainer.optimizers[0].events["zero_gradient"] == 4


class _OwnModule(LightningModule):
    """An existing module with its own training step (and logging), optimizer and schedule."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(5, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("own_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}


class _ConvertedModule(QLABMixin, _OwnModule):
    def qlab_loss(self, batch):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("loss_in_qlab_loss", loss)  # allowed: the trial forward's call is dropped
        return loss


def test_what_the_mixin_sets_aside_is_named_and_logging_from_qlab_loss_works():
    messages, trainer = _fit_warnings(_ConvertedModule(), steps=1)
    (aside,) = [m for m in messages if "are not used" in m]
    assert "_OwnModule.training_step and _OwnModule.configure_optimizers are not used" in aside
    assert "log from qlab_loss" in aside
    qlab = trainer.optimizers[0]
    # The value logged is the training forward's loss, not the trial forward's.
    logged = trainer.callback_metrics["loss_in_qlab_loss"].item()
    assert logged == pytest.approx(qlab.last_step.loss, rel=1e-6) and logged != qlab.last_step.trial_loss
    assert "own_loss" not in trainer.callback_metrics


class _WithScheduler(RegressionNet):
    def configure_optimizers(self):
        optimizer = QLAB(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5)}


def test_a_scheduler_next_to_qlab_is_named():
    messages, _ = _fit_warnings(_WithScheduler())
    (scheduler,) = [m for m in messages if "scheduler" in m]
    assert "returned the learning-rate scheduler(s) ExponentialLR, which are not used" in scheduler
    assert not [m for m in messages if "are not used: the mixin" in m]  # RegressionNet defines neither hook
