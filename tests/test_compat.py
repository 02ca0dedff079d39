"""Every function of lightning_qlab._compat against the installed torch and Lightning.

Each reaches into a private name. An upgrade that moves one fails here, in the test named after
the function, rather than somewhere inside a training run.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from lightning_helpers import quiet_trainer, regression_data
from lightning_qlab import _compat

CHECKS: dict[str, Callable[[], None]] = {}


def check(function: Callable[..., Any]) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(test: Callable[[], None]) -> Callable[[], None]:
        CHECKS[function.__name__] = test
        return test

    return register


class _Plain(LightningModule):
    """Automatic optimization, SGD: the smallest module a Trainer fits."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Probe(Callback):
    """Calls the Trainer-level functions at the end of every training batch; stops after batch 3."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int, bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((
            _compat.accumulating_gradients(trainer),
            _compat.logging_step(trainer),
            _compat.should_update_logs(trainer),
            _compat.attached_trainer(pl_module) is trainer,
        ))
        if batch_idx == 3:
            _compat.ask_to_stop(trainer, True)


@pytest.fixture(scope="module")
def probed_fit() -> tuple[_Probe, Any]:
    """4 batches with accumulate_grad_batches=2 and log_every_n_steps=2; asked to stop after the 4th."""
    probe = _Probe()
    trainer = quiet_trainer(max_epochs=3, accumulate_grad_batches=2, log_every_n_steps=2, callbacks=[probe])
    with pytest.raises(SIGTERMException):
        trainer.fit(_Plain(), DataLoader(regression_data(64), batch_size=8))
    return probe, trainer


# ------------------------------------------------------------------------------ torch
@check(_compat.is_normalization_layer)
def _is_normalization_layer() -> None:
    norms = [torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(3), torch.nn.SyncBatchNorm(3),
             torch.nn.InstanceNorm1d(3, track_running_stats=True), torch.nn.LazyBatchNorm1d()]
    others = [torch.nn.LayerNorm(3), torch.nn.GroupNorm(1, 3), torch.nn.Linear(3, 3)]
    assert all(_compat.is_normalization_layer(m) for m in norms)
    assert not any(_compat.is_normalization_layer(m) for m in others)
    assert all(hasattr(m, name) for m in norms for name in ("running_mean", "running_var", "num_batches_tracked",
                                                            "track_running_stats"))


@check(_compat.foreach_copy_)
def _foreach_copy() -> None:
    destinations = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    _compat.foreach_copy_(destinations, [torch.ones(2), torch.full((3,), 2.0, dtype=torch.float64)])
    assert destinations[0].tolist() == [1.0, 1.0] and destinations[1].tolist() == [2.0, 2.0, 2.0]


@check(_compat.foreach_zero_)
def _foreach_zero() -> None:
    tensors = [torch.full((2,), math.nan), torch.ones(3, dtype=torch.float64)]
    _compat.foreach_zero_(tensors)
    assert tensors[0].tolist() == [0.0, 0.0] and tensors[1].tolist() == [0.0, 0.0, 0.0]


@check(_compat.foreach_lerp_)
def _foreach_lerp() -> None:
    starts = [torch.zeros(2), torch.ones(2)]
    _compat.foreach_lerp_(starts, [torch.full((2,), 4.0), torch.full((2,), 3.0)], torch.tensor(0.25))
    assert starts[0].tolist() == [1.0, 1.0] and starts[1].tolist() == [1.5, 1.5]
    _compat.foreach_lerp_(starts, [torch.zeros(2), torch.zeros(2)], 0.5)
    assert starts[0].tolist() == [0.5, 0.5]


@check(_compat.foreach_mul_)
def _foreach_mul() -> None:
    tensors = [torch.ones(2), torch.full((3,), 2.0)]
    _compat.foreach_mul_(tensors, torch.tensor(0.5))
    assert tensors[0].tolist() == [0.5, 0.5] and tensors[1].tolist() == [1.0, 1.0, 1.0]



@check(_compat.foreach_add_)
def _foreach_add() -> None:
    tensors = [torch.ones(2), torch.zeros(3)]
    _compat.foreach_add_(tensors, [torch.ones(2), torch.ones(3)], alpha=-2.0)
    assert tensors[0].tolist() == [-1.0, -1.0] and tensors[1].tolist() == [-2.0, -2.0, -2.0]
    _compat.foreach_add_(tensors, 1.0)
    assert tensors[0].tolist() == [0.0, 0.0]


@check(_compat.foreach_addcdiv_)
def _foreach_addcdiv() -> None:
    tensors = [torch.ones(2)]
    _compat.foreach_addcdiv_(tensors, [torch.full((2,), 3.0)], [torch.full((2,), 2.0)], value=-2.0)
    assert tensors[0].tolist() == [-2.0, -2.0]


@check(_compat.foreach_div_)
def _foreach_div_() -> None:
    tensors = [torch.full((2,), 3.0)]
    _compat.foreach_div_(tensors, 4.0)
    assert tensors[0].tolist() == [0.75, 0.75]


@check(_compat.foreach_norm)
def _foreach_norm() -> None:
    norms = _compat.foreach_norm([torch.tensor([3.0, 4.0]), torch.tensor([1e30, 1e30])], torch.float64)
    assert norms[0].dtype == torch.float64 and norms[0].item() == 5.0
    assert norms[1].item() == pytest.approx(2**0.5 * 1e30)  # float64 accumulation: no overflow


@check(_compat.fused_adamw_)
def _fused_adamw() -> None:
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    m, v, step = torch.zeros(2), torch.zeros(2), torch.tensor(1.0)
    _compat.fused_adamw_([w], [g], [m], [v], [step], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
                         eps=1e-8, found_inf=torch.zeros(()))
    # The first bias-corrected step moves every coordinate by lr sign(g), up to eps.
    torch.testing.assert_close(w, torch.tensor([0.9, -2.1]))
    torch.testing.assert_close(m, 0.1 * g)
    torch.testing.assert_close(v, 0.01 * g * g)
    _compat.fused_adamw_([w], [g], [m], [v], [step + 1], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
                         eps=1e-8, found_inf=torch.ones(()))
    torch.testing.assert_close(w, torch.tensor([0.9, -2.1]))  # skipped on the device


@check(_compat.fused_sgd_)
def _fused_sgd() -> None:
    w, g, buffer = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25]), torch.tensor([1.0, 1.0])
    _compat.fused_sgd_([w], [g], [buffer], momentum=0.5, lr=0.1, found_inf=torch.zeros(()))
    torch.testing.assert_close(buffer, torch.tensor([1.0, 0.75]))  # 0.5 * 1 + g
    torch.testing.assert_close(w, torch.tensor([0.9, -2.075]))
    _compat.fused_sgd_([w], [g], [], momentum=0.0, lr=0.1, found_inf=torch.zeros(()))
    torch.testing.assert_close(w, torch.tensor([0.85, -2.1]))
    _compat.fused_sgd_([w], [g], [], momentum=0.0, lr=0.1, found_inf=torch.ones(()))
    torch.testing.assert_close(w, torch.tensor([0.85, -2.1]))  # skipped on the device


# ------------------------------------------------------------------------------ Lightning
@check(_compat.attached_trainer)
def _attached_trainer() -> None:
    module = _Plain()
    assert _compat.attached_trainer(module) is None
    with pytest.raises(RuntimeError):
        module.trainer  # noqa: B018  (what the function spares its callers)
    trainer = quiet_trainer()
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer


class _Attached(Exception):
    pass


def _refuse_when_fitting(module: Any, trainer: Any) -> None:
    module.attached.append(trainer)
    if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
        raise _Attached


class _Manual(_Plain):
    trainer = _compat.trainer_property(_refuse_when_fitting)

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.attached: list[Any] = []


@check(_compat.trainer_property)
def _trainer_property() -> None:
    module = _Manual()
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=2)
    # The hook runs when fit attaches the Trainer, before Lightning refuses accumulate_grad_batches
    # under manual optimization (its MisconfigurationException would come first otherwise).
    with pytest.raises(_Attached):
        trainer.fit(module, DataLoader(regression_data(8), batch_size=8))
    assert module.attached[0] is trainer and module.trainer is trainer
    module.trainer = None
    assert module.attached[-1] is None and _compat.attached_trainer(module) is None


@check(_compat.accumulating_gradients)
def _accumulating_gradients(probed_fit) -> None:
    probe, _ = probed_fit
    assert [seen[0] for seen in probe.seen] == [True, False, True, False]


@check(_compat.logging_step)
def _logging_step(probed_fit) -> None:
    probe, _ = probed_fit
    assert [seen[1] for seen in probe.seen] == [0, 0, 1, 1]  # optimizer steps before this batch's


@check(_compat.should_update_logs)
def _should_update_logs(probed_fit) -> None:
    probe, _ = probed_fit
    assert [seen[2] for seen in probe.seen] == [False, False, True, True]  # log_every_n_steps=2
    assert all(seen[3] for seen in probe.seen)  # attached_trainer, during fit


@check(_compat.ask_to_stop)
def _ask_to_stop(probed_fit) -> None:
    probe, trainer = probed_fit
    assert len(probe.seen) == 4  # stopped after the batch that asked (SIGTERMException, above)
    assert trainer.received_sigterm
    _compat.ask_to_stop(trainer, False)
    assert not trainer.received_sigterm


def _averaging_setup() -> tuple[WeightAveraging, _Plain]:
    averaging, module = WeightAveraging(), _Plain()
    assert _compat.average_model(averaging) is None and _compat.average_device(averaging) is None
    averaging.setup(quiet_trainer(), module, "fit")
    return averaging, module


@check(_compat.average_model)
def _average_model() -> None:
    averaging, module = _averaging_setup()
    average = _compat.average_model(averaging)
    assert isinstance(average, AveragedModel)
    assert torch.equal(average.module.layer.weight, module.layer.weight)


@check(_compat.set_data_parallel_size)
def _set_data_parallel_size() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()
    _compat.set_data_parallel_size(strategy, 6)
    # What setup_environment hands to the device mesh (lightning.fabric's _setup_device_mesh).
    assert strategy._data_parallel_size == 6


@check(_compat.set_average_model)
def _set_average_model() -> None:
    averaging, module = _averaging_setup()
    replacement = AveragedModel(module)
    _compat.set_average_model(averaging, replacement)
    assert _compat.average_model(averaging) is replacement


@check(_compat.average_device)
def _average_device() -> None:
    assert _compat.average_device(WeightAveraging()) is None
    assert _compat.average_device(WeightAveraging(device="cpu")) == torch.device("cpu")


@check(_compat.swap_average)
def _swap_average() -> None:
    averaging, module = _averaging_setup()
    initial = module.layer.weight.detach().clone()
    with torch.no_grad():
        module.layer.weight.fill_(7.0)
    _compat.swap_average(averaging, module)
    assert torch.equal(module.layer.weight, initial)
    assert bool((_compat.average_model(averaging).module.layer.weight == 7.0).all())


# ------------------------------------------------------------------------------ the tests
FUNCTIONS = [name for name in _compat.__all__ if name != "CompatibilityError"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_compat_function_works_with_the_installed_versions(name: str, request: pytest.FixtureRequest) -> None:
    test = CHECKS[name]
    fixtures = test.__code__.co_varnames[: test.__code__.co_argcount]
    test(*[request.getfixturevalue(fixture) for fixture in fixtures])


def test_every_compat_function_has_a_check() -> None:
    assert sorted(CHECKS) == sorted(FUNCTIONS)


def test_a_missing_private_name_is_reported_with_the_function_name() -> None:
    with pytest.raises(_compat.CompatibilityError, match=r"lightning_qlab\._compat\.attached_trainer: "
                                                         r"LightningModule\._trainer is not where"):
        _compat.attached_trainer(object())
