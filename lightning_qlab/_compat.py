"""Every use of a private torch or Lightning name, each behind one small named function.

The rest of the package calls these and nothing private. When an upgrade moves or renames what
one of them reaches into, ``tests/test_compat.py`` fails on that function by name, and a call at
run time raises :class:`CompatibilityError` naming it, instead of an ``AttributeError`` deep in a
training step. Written against torch 2.14 and lightning 2.6.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

__all__ = [
    "CompatibilityError",
    # torch
    "is_normalization_layer",
    "foreach_copy_",
    "foreach_zero_",
    "foreach_lerp_",
    "foreach_mul_",
    "foreach_add_",
    "foreach_addcdiv_",
    "foreach_div_",
    "foreach_norm",
    "fused_adamw_",
    "fused_sgd_",
    # Lightning: the module and the Trainer
    "attached_trainer",
    "trainer_property",
    "should_update_logs",
    "logging_step",
    "accumulating_gradients",
    "ask_to_stop",
    # Lightning: ModelParallelStrategy
    "set_data_parallel_size",
    # Lightning: WeightAveraging's internals
    "average_model",
    "set_average_model",
    "average_device",
    "swap_average",
]

F = TypeVar("F", bound=Callable[..., Any])


class CompatibilityError(RuntimeError):
    """A private torch or Lightning name this package relies on is not where it was."""


def _private(what: str) -> Callable[[F], F]:
    """Name the function and the private ``what`` when the installed torch/Lightning lacks it."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (AttributeError, ImportError) as error:
                import lightning

                raise CompatibilityError(
                    f"lightning_qlab._compat.{function.__name__}: {what} is not where this version of "
                    f"lightning-qlab expects it (torch {torch.__version__}, lightning {lightning.__version__}; "
                    f"written against torch 2.14 and lightning 2.6): {error}. Install versions it supports, "
                    "or update this function."
                ) from error

        return wrapper  # type: ignore[return-value]

    return decorate


# ------------------------------------------------------------------------------------ torch
@_private("torch.nn.modules.batchnorm._NormBase (BatchNorm and InstanceNorm's base class)")
def is_normalization_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm (any dimension, SyncBatchNorm) or InstanceNorm layer, the
    layers that may keep running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(module, _NormBase)


@_private("torch._foreach_copy_")
def foreach_copy_(destinations: list[Tensor], sources: list[Tensor]) -> None:
    """``d.copy_(s)`` for every pair, in one fused call."""
    torch._foreach_copy_(destinations, sources)


@_private("torch._foreach_zero_")
def foreach_zero_(tensors: list[Tensor]) -> None:
    """``t.zero_()`` for every tensor, in one fused call."""
    torch._foreach_zero_(tensors)


@_private("torch._foreach_lerp_")
def foreach_lerp_(starts: list[Tensor], ends: list[Tensor], weight: Tensor | float) -> None:
    """``s.lerp_(e, weight)`` for every pair, in one fused call."""
    torch._foreach_lerp_(starts, ends, weight)


@_private("torch._foreach_mul_")
def foreach_mul_(tensors: list[Tensor], factor: Tensor | float) -> None:
    """``t.mul_(factor)`` for every tensor, in one fused call."""
    torch._foreach_mul_(tensors, factor)


@_private("torch._foreach_add_")
def foreach_add_(tensors: list[Tensor], others: list[Tensor] | Tensor | float, alpha: float = 1.0) -> None:
    """``t.add_(o, alpha=alpha)`` for every pair (or ``t.add_(o)`` for a scalar ``o``), in one fused call."""
    if isinstance(others, (list, tuple)):
        torch._foreach_add_(tensors, others, alpha=alpha)
    else:
        torch._foreach_add_(tensors, others)


@_private("torch._foreach_addcdiv_")
def foreach_addcdiv_(tensors: list[Tensor], numerators: list[Tensor], denominators: list[Tensor], value: float) -> None:
    """``t.addcdiv_(n, d, value=value)`` for every triple, in one fused call."""
    torch._foreach_addcdiv_(tensors, numerators, denominators, value=value)


@_private("torch._foreach_div_")
def foreach_div_(tensors: list[Tensor], divisor: float) -> None:
    """``t.div_(divisor)`` for every tensor."""
    torch._foreach_div_(tensors, divisor)


@_private("torch._foreach_norm")
def foreach_norm(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The 2-norm of every tensor, computed and returned in ``dtype``."""
    return list(torch._foreach_norm(tensors, 2, dtype=dtype))


@_private("torch._fused_adamw_ (the kernel of torch.optim.AdamW(fused=True))")
def fused_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                 found_inf: Tensor) -> None:
    """One AdamW step over tensors of one device and dtype, skipped on the device when
    ``found_inf`` is 1; ``steps`` (already incremented) give the bias corrections."""
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
                        found_inf=found_inf)


@_private("torch._fused_sgd_ (the kernel of torch.optim.SGD(fused=True))")
def fused_sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], momentum: float,
               lr: float, found_inf: Tensor) -> None:
    """``w <- w - lr m`` with ``m <- momentum m + g`` (or ``m = g`` without buffers), skipped on the
    device when ``found_inf`` is 1."""
    torch._fused_sgd_(params, grads, momentum_buffers, weight_decay=0.0, momentum=momentum, lr=lr,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False, grad_scale=None,
                      found_inf=found_inf)


# ------------------------------------------------------------------- Lightning: module, Trainer
@_private("LightningModule._trainer")
def attached_trainer(module: Any) -> Optional[Any]:
    """The Trainer ``module`` is attached to, or None (``module.trainer`` raises then)."""
    return module._trainer


@_private("LightningModule.trainer (a property with a setter)")
def trainer_property(on_attach: Callable[[Any, Any], None]) -> property:
    """``LightningModule.trainer``, calling ``on_attach(module, trainer)`` after each assignment.

    Lightning assigns ``module.trainer`` at the start of ``fit``, before it checks the Trainer's
    options against the module (manual optimization refuses ``accumulate_grad_batches``): the
    one moment to check them first. Overriding the property relies on that order.
    """
    from lightning.pytorch import LightningModule

    base = LightningModule.trainer
    if base.fset is None:
        raise AttributeError("LightningModule.trainer has no setter")

    def set_trainer(module: Any, trainer: Any) -> None:
        base.fset(module, trainer)
        on_attach(module, trainer)

    return property(base.fget, set_trainer, doc=base.__doc__)


@_private("Trainer._logger_connector.should_update_logs")
def should_update_logs(trainer: Any) -> bool:
    """Whether this batch is one that ``Trainer(log_every_n_steps=...)`` logs (as LearningRateMonitor asks)."""
    return bool(trainer._logger_connector.should_update_logs)


@_private("Trainer.fit_loop.epoch_loop._batches_that_stepped")
def logging_step(trainer: Any) -> int:
    """The step that ``self.log`` values of this batch are logged at (the loggers' x-axis)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


@_private("Trainer.fit_loop._should_accumulate")
def accumulating_gradients(trainer: Any) -> bool:
    """Whether automatic optimization is inside a ``Trainer(accumulate_grad_batches=...)`` window."""
    return bool(trainer.fit_loop._should_accumulate())


@_private("Trainer._signal_connector.received_sigterm")
def ask_to_stop(trainer: Any, stop: bool) -> None:
    """Set (or clear) Lightning's SIGTERM flag: its loops stop at the end of the current batch, or
    of the epoch when the batch was its last, and raise ``SIGTERMException``."""
    connector = trainer._signal_connector
    if not hasattr(connector, "received_sigterm"):
        raise AttributeError("the signal connector has no received_sigterm flag")
    connector.received_sigterm = stop


# ------------------------------------------------------------- Lightning: ModelParallelStrategy
@_private("ModelParallelStrategy._data_parallel_size")
def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Set the data-parallel size a ``ModelParallelStrategy`` builds its device mesh with (read in
    its ``setup_environment``)."""
    if not hasattr(strategy, "_data_parallel_size"):
        raise AttributeError("ModelParallelStrategy has no _data_parallel_size")
    strategy._data_parallel_size = size


# ------------------------------------------------------------- Lightning: WeightAveraging
@_private("WeightAveraging._average_model")
def average_model(callback: Any) -> Optional[Any]:
    """The callback's ``AveragedModel`` (None before fit has set it up)."""
    return callback._average_model


@_private("WeightAveraging._average_model")
def set_average_model(callback: Any, average: Any) -> None:
    """Give the callback the ``AveragedModel`` it updates, swaps in and saves."""
    if not hasattr(callback, "_average_model"):
        raise AttributeError("WeightAveraging has no _average_model")
    callback._average_model = average


@_private("WeightAveraging._device")
def average_device(callback: Any) -> Optional[Any]:
    """The device the callback was asked to keep its average on (None: the module's)."""
    return callback._device


@_private("WeightAveraging._swap_models")
def swap_average(callback: Any, module: Any) -> None:
    """Exchange the module's parameters and buffers with the callback's average, in place."""
    callback._swap_models(module)
