"""Polynomial-decay iterate averaging: evaluate the average of the recent iterates, not the last one.

Each QLAB step minimises the parabola of *one* mini-batch, so the iterates keep jumping around
the region the full loss would settle in; the jumps are mini-batch noise, and averaging the
iterates cancels most of it. Polynomial-decay averaging (Shamir & Zhang, "Stochastic Gradient
Descent for Non-smooth Optimization: Convergence Results and Optimal Averaging Schemes", ICML 2013)
keeps, for iterates ``w_1, w_2, ...``::

    avg_1 = w_1,    avg_t = (1 - c_t) avg_{t-1} + c_t w_t,    c_t = (eta + 1) / (t + eta)

Unrolled, ``avg_t`` weighs iterate ``s`` in proportion to ``s (s+1) ... (s+eta-1)``, roughly
``s ** eta``: the first iterates fade out by themselves, the average needs no start step and no
window length, and its centre of mass sits at ``(eta + 1) / (eta + 2)`` of the steps taken so far.
``eta = 0`` is the plain mean of all iterates.

The average is used for evaluation only: training continues from the last iterate, untouched.
Buffers are averaged with the same weights, so a BatchNorm layer's running statistics match the
averaged weights they normalise for.

Example (plain PyTorch, with :class:`torch.optim.swa_utils.AveragedModel`):
    >>> import torch
    >>> from torch.optim.swa_utils import AveragedModel
    >>> net = torch.nn.Linear(1, 1, bias=False)
    >>> average = AveragedModel(net, multi_avg_fn=polynomial_decay_multi_avg_fn(eta=0.0))
    >>> for value in (1.0, 2.0, 6.0):
    ...     _ = net.weight.data.fill_(value)
    ...     average.update_parameters(net)
    >>> average.module.weight.item()  # eta = 0: the mean of 1, 2 and 6
    3.0
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_qlab._checks import is_number, wide_dtype
from lightning_qlab._compat import (
    average_device,
    average_model,
    foreach_copy_,
    foreach_lerp_,
    set_average_model,
    swap_average,
)
from lightning_qlab.averaged_model import HostCountedAverage
from lightning_qlab.sharded_average import load_sharded_layout, save_sharded_layout, sharded_average
from lightning_qlab.sharding import local

__all__ = ["DEFAULT_ETA", "PolynomialAveraging", "polynomial_decay_multi_avg_fn"]

#: The ``eta`` that :class:`~lightning_qlab.mixin.QLABMixin` uses: see :class:`PolynomialAveraging`.
DEFAULT_ETA = 8.0


def polynomial_decay_multi_avg_fn(eta: float = DEFAULT_ETA) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """The ``multi_avg_fn`` of :class:`torch.optim.swa_utils.AveragedModel` for polynomial-decay
    averaging: ``avg <- avg + c_t (w - avg)`` with ``c_t = (eta + 1) / (t + eta)``.

    ``AveragedModel`` copies the first iterate itself and then calls this with the number of
    iterates averaged so far (``t - 1``): a tensor (torch's ``AveragedModel``; the weight is then
    computed on the parameters' device) or an int
    (:class:`~lightning_qlab.averaged_model.HostCountedAverage`). Integer buffers (BatchNorm's
    ``num_batches_tracked``) are counters, not estimates: they take the current value.

    Example:
        >>> import torch
        >>> average, current = [torch.zeros(2)], [torch.ones(2)]
        >>> polynomial_decay_multi_avg_fn(eta=3.0)(average, current, torch.tensor(1))  # t = 2
        >>> average[0]  # c_2 = 4 / 5
        tensor([0.8000, 0.8000])
    """
    if not is_number(eta) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"polynomial-decay averaging needs a finite eta >= 0, got {eta!r}.")

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Union[Tensor, int]) -> None:
        # Sharded (DTensor) parameters: average each process's shards, as plain tensors.
        averaged, current = [local(a) for a in averaged], [local(c) for c in current]
        first = averaged[0]
        if not (first.is_floating_point() or first.is_complex()):
            foreach_copy_(averaged, current)
            return
        if any(c.dtype != a.dtype for a, c in zip(averaged, current)):
            # A module trained in half precision ("bf16-true") keeps a float32 average: in bf16 the
            # small late weights c_t would round the updates away.
            current = [c.to(a.dtype) for a, c in zip(averaged, current)]
        dtype = first.real.dtype if first.is_complex() else first.dtype
        if isinstance(num_averaged, Tensor):
            # The weight in float32 or wider, then in the parameters' dtype, as lerp wants it.
            t = num_averaged.to(device=first.device, dtype=wide_dtype(dtype)) + 1  # the added iterate's index
            weight: Union[Tensor, float] = ((eta + 1) / (t + eta)).to(dtype)
        else:
            weight = (eta + 1) / (num_averaged + 1 + eta)
        foreach_lerp_(averaged, current, weight)

    return update


class PolynomialAveraging(WeightAveraging):
    """Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` with polynomial-decay
    weights: validation, checkpoints and the model left after ``fit`` use the average of the
    iterates (see the module docstring for the formula).

    :class:`~lightning_qlab.mixin.QLABMixin` adds one with ``eta = 8`` by itself (turn it off with
    ``QLABConfig(weight_averaging=False)``); add it to a Trainer yourself to average any other
    optimizer's iterates the same way.

    What Lightning's callback does with it: it updates the average after every optimizer step;
    swaps the average into the module for each validation run and back afterwards; saves
    checkpoints whose ``state_dict`` is the average (ready for inference) with the training
    weights under ``current_model_state``, and resumes from them; and puts the average into the
    module when ``fit`` ends, so ``trainer.test`` and ``trainer.predict`` after ``fit`` evaluate it.
    This subclass keeps the training weights at that point too (a checkpoint saved after ``fit``
    still resumes exactly), keeps the average on the module's device, and stays out of
    ``validate``/``test``/``predict`` calls, which evaluate what the module or checkpoint holds.
    The average costs one extra copy of the parameters and buffers in memory, and one fused
    ``lerp`` over them per step. Under FSDP2 (``ModelParallelStrategy``) the copy is of each
    process's shards, and checkpoints nest the training weights inside ``state_dict`` (see
    :mod:`lightning_qlab.sharded_average`); under FSDP1 the callback refuses to run.

    Why ``eta = 8``: ``eta`` sets how fast early iterates are forgotten; the centre of mass of
    the average sits at ``(eta + 1) / (eta + 2)`` of the run (0.9 for eta = 8). Too small keeps
    early, worse iterates (``eta = 0``, the plain mean); too large leaves the noise in. The
    measurements behind the choice are in the README ("Averaging: which eta").

    Args:
        eta: the decay exponent, ``>= 0``.
        device: where to keep the average; ``None`` (default) keeps it beside the module's
            parameters, also after the Trainer moves the module to its accelerator.
        use_buffers: average the buffers too (default ``True``); ``False`` copies them from the
            module instead (then recompute BatchNorm statistics for the average yourself with
            :func:`torch.optim.swa_utils.update_bn`).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PolynomialAveraging()], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        eta: float = DEFAULT_ETA,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
    ) -> None:
        average_fn = polynomial_decay_multi_avg_fn(eta)
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=average_fn)
        self.eta = float(eta)
        self.use_buffers = use_buffers
        self._average_fn = average_fn
        self._fit_ended = False
        self._sharded = False  # under ModelParallelStrategy: the average is sharded like the module

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if stage == "fit" and self._fit_ended:
            # A further fit on the same Trainer: continue from the training weights, and keep
            # the average so far (Lightning's callback would restart it from the module, which
            # holds the average at this point).
            assert average_model(self) is not None
            swap_average(self, pl_module)
            self._fit_ended = False
            return
        if stage == "fit" and isinstance(trainer.strategy, FSDPStrategy):
            raise MisconfigurationException(
                "PolynomialAveraging does not run under FSDPStrategy (FSDP1): its flat parameters cannot be "
                "averaged alongside. Use ModelParallelStrategy (FSDP2; configs/trainer/fsdp.yaml), whose "
                "sharded average this callback supports, or QLABConfig(weight_averaging=False)."
            )
        if stage == "fit" and self._sharded:
            return  # built in on_fit_start, once configure_model has sharded the module
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            HostCountedAverage.adopt(average_model(self))  # updates that never read the device

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ``setup`` builds the average before the strategy moves the module to its device; keep
        # the average beside the parameters, or every update would copy them across devices.
        if self._sharded and average_model(self) is None:
            set_average_model(self, sharded_average(pl_module, self.use_buffers, self._average_fn))
        average = average_model(self)
        if average_device(self) is None and average is not None:
            average.to(pl_module.device)

    # Lightning's callback swaps and restores whenever it holds an average, also in a
    # validate/test/predict call that follows fit on the same Trainer. There the module holds
    # what the user asked to evaluate (a checkpoint's state_dict is already the average), so the
    # callback stays out of the way outside fit.
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self._sharded:
            load_sharded_layout(average_model(self), pl_module, checkpoint, trainer.ckpt_path)
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning copies the average over the training weights here, so a checkpoint saved
        # after fit could not resume from where training stopped. Swapping keeps them: the
        # module holds the average, the averaged model the last iterate.
        assert average_model(self) is not None
        swap_average(self, pl_module)
        self._fit_ended = True

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._sharded:
            save_sharded_layout(average_model(self), checkpoint, self._fit_ended)
            return
        if not self._fit_ended:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # After fit the roles are swapped (see on_train_end); write the layout Lightning's
        # callback reads back: the average as state_dict, the training weights beside it.
        average = average_model(self)
        assert average is not None
        held = average.state_dict()
        checkpoint["current_model_state"] = {name[7:]: value for name, value in held.items() if name.startswith("module.")}
        checkpoint["averaging_state"] = {name: value for name, value in held.items() if not name.startswith("module.")}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "eta": self.eta}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_eta = state_dict.get("eta", self.eta)
        if saved_eta != self.eta:
            raise ValueError(
                f"PolynomialAveraging: the checkpoint's average was built with eta={saved_eta:g}, this "
                f"callback has eta={self.eta:g}; resuming would mix two different averages. Resume "
                f"with PolynomialAveraging(eta={saved_eta:g})."
            )
        super().load_state_dict(state_dict)
