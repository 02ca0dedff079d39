"""The trial forward: the loss of the same micro-batches again, at the point QLAB probes.

QLAB fits its parabola to two losses of one mini-batch: ``L(w)`` from the training forward and
``L(w - beta d)`` from a second forward at the trial point. The second must evaluate the same
function as the first, or the fitted curvature measures the difference between two functions:

* the same data, in the same train/eval mode;
* the same random draws: dropout masks come from the random generator, so it is replayed from
  the state the training forward started from, and put back afterwards;
* no trace: BatchNorm and InstanceNorm running statistics are restored (in train mode they
  normalise with the batch's own statistics, so restoring them is exact), and no autograd graph.

:class:`TrialForward` records each micro-batch's training forward and replays them on demand,
in plain PyTorch. :class:`~lightning_qlab.mixin.QLABMixin` uses it inside Lightning.

Example (dropout and BatchNorm: at the same parameters the replay is the training loss, bitwise):
    >>> import torch
    >>> from torch.nn import functional as F
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
    ...                             torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> trial = TrialForward(model)
    >>> loss = trial.record(lambda x, y: F.mse_loss(model(x), y), x, y)
    >>> statistics = model[1].running_mean.clone()
    >>> torch.equal(trial.replay(), loss.detach()), torch.equal(model[1].running_mean, statistics)
    (True, True)
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from lightning_qlab._checks import check_loss, widened
from lightning_qlab._compat import is_normalization_layer

__all__ = ["TrialForward", "running_stats_restored"]


class TrialForward:
    """Records the training forward of one optimizer step's micro-batches, to replay it at the
    trial point.

    Use one per optimizer step (or :meth:`clear` it after the step). Pass the micro-batch as
    arguments of ``loss_fn`` rather than through a closure over a loop variable: the replay calls
    ``loss_fn`` again with what was recorded.

    Args:
        module: the model; its device's random generator is recorded and its normalisation
            layers' running statistics are restored after a replay.

    Example (plain PyTorch; accumulating two micro-batches into one step)::

        trial = TrialForward(model)
        for x, y in micro_batches:
            (trial.record(compute_loss, x, y) / len(micro_batches)).backward()
        optimizer.step(trial.recorded_loss(), trial.replay)
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._records: list[_Record] = []

    def record(self, loss_fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """Run ``loss_fn(*args, **kwargs)`` as the training forward of one micro-batch and record
        it (the call, the random generator state it starts from, the module's mode).

        Returns:
            the loss, with its autograd graph: call ``backward()`` on it.
        """
        where = _name(loss_fn)
        rng_state = _RNGState(_device_of(self.module))
        loss = check_loss(loss_fn(*args, **kwargs), where, "training")
        self._records.append(_Record(loss_fn, args, kwargs, rng_state, widened(loss.detach()), self.module.training))
        return loss

    def recorded_loss(self) -> Tensor:
        """The mean training loss of the recorded micro-batches, detached, in float32 or wider.

        One micro-batch's loss is returned as recorded (no rounding added).
        """
        self._check_recorded("recorded_loss")
        return _mean([record.loss for record in self._records])

    @torch.no_grad()
    def replay(self) -> Tensor:
        """The mean loss of the recorded micro-batches at the parameters as they are now: QLAB's
        ``trial_loss_fn``.

        Each micro-batch is evaluated with the random generator state its training forward started
        from, with normalisation running statistics restored and the generator put back where it
        was afterwards: the call leaves no trace. At unchanged parameters it returns
        :meth:`recorded_loss` exactly. The loss is in float32 or wider.
        """
        self._check_recorded("replay")
        if any(record.training != self.module.training for record in self._records):
            raise RuntimeError(
                "TrialForward.replay: the module was switched between train() and eval() since its "
                "training forward; the trial forward must evaluate the same function. Replay in the "
                "mode the micro-batches were recorded in."
            )
        device = _device_of(self.module)
        rng_after_training = _RNGState(device)
        losses = []
        try:
            with running_stats_restored(self.module):
                for record in self._records:
                    record.rng_state.restore()
                    value = record.loss_fn(*record.args, **record.kwargs)
                    losses.append(widened(check_loss(value, _name(record.loss_fn), "trial")))
        finally:
            rng_after_training.restore()
        return _mean(losses)

    def clear(self) -> None:
        """Forget the recorded micro-batches (and the references to their data)."""
        self._records.clear()

    def __len__(self) -> int:
        """The number of micro-batches recorded."""
        return len(self._records)

    def _check_recorded(self, method: str) -> None:
        if not self._records:
            raise RuntimeError(
                f"TrialForward.{method}: no micro-batch has been recorded; run the training forward "
                "through record(loss_fn, *batch) first."
            )


@contextmanager
def running_stats_restored(module: torch.nn.Module) -> Iterator[None]:
    """Run the body, then put back every running statistic that normalisation layers in train mode
    updated (BatchNorm of any dimension, SyncBatchNorm, InstanceNorm with ``track_running_stats``).

    In train mode these layers normalise with the batch's own statistics, so the running ones
    never influence the loss and restoring them afterwards is exact.
    """
    buffers = [
        buffer
        for layer in module.modules()
        if is_normalization_layer(layer) and layer.training and layer.track_running_stats
        for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)


@dataclass
class _Record:
    """One micro-batch's training forward: what to call again, and the state to call it in."""

    loss_fn: Callable[..., Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_state: _RNGState
    loss: Tensor  # detached, float32 or wider
    training: bool


class _RNGState:
    """The global random generator state of the CPU and of one accelerator device.

    Dropout draws its masks from the generator of the device its input lives on, so the state
    of the module's device (and of the CPU, for CPU modules and CPU-side randomness) is what a
    replay needs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator: Optional[Tensor] = None
        if device.type != "cpu":
            self.accelerator = _device_module(device).get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            _device_module(self.device).set_rng_state(self.accelerator, self.device)


def _device_module(device: torch.device) -> Any:
    try:
        module = torch.get_device_module(device.type)
    except (RuntimeError, AttributeError):
        module = None
    if module is None or not hasattr(module, "get_rng_state") or not hasattr(module, "set_rng_state"):
        raise RuntimeError(
            f"TrialForward cannot save and replay the random number generator of {device.type!r} devices, "
            "so the trial forward could not reuse the training forward's dropout masks. Supported: "
            "cpu, cuda, and devices whose torch module has get_rng_state/set_rng_state (mps, xpu)."
        )
    return module


def _device_of(module: torch.nn.Module) -> torch.device:
    """The device of the module's tensors: a LightningModule's ``device``, else its first
    parameter's or buffer's, else the CPU."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _name(loss_fn: Callable[..., Any]) -> str:
    """How error messages call ``loss_fn``: ``Model.qlab_loss`` for a bound method."""
    owner = getattr(loss_fn, "__self__", None)
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return f"{type(owner).__name__}.{name}" if owner is not None else name


def _mean(losses: list[Tensor]) -> Tensor:
    # A single loss is returned as it is, so that one micro-batch adds no rounding at all.
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
