"""QLABMixin: train any LightningModule with QLABGrad by writing one method, ``qlab_loss(batch)``.

QLAB needs, every step, the loss of the *same* mini-batch at a second point, the trial point
``w - beta d``. Lightning's automatic optimization has no place for that forward pass, so the mixin
switches the module to manual optimization and runs the whole step itself::

    forward + backward on each of k micro-batches   (k = qlab_config.accumulate_batches)
    optimizer step: QLAB moves to the trial point and calls the trial forward on the same
                    micro-batches, fits the parabola and takes the step

The trial forward evaluates exactly the function whose gradient was taken: the module stays in
train mode, dropout draws the same masks (the random number generator is replayed from its state
before each training forward and put back afterwards), BatchNorm normalises with the statistics of
the batch and its running statistics are restored afterwards, and no autograd graph is built.

Lightning's precision and strategy plumbing stays in charge: the step goes through
``self.optimizers().step(...)``, so mixed precision (autocast, GradScaler unscaling and inf/NaN
skipping) and DDP work as for any manual-optimization module. Under DDP the two loss values are
averaged over the ranks before the step size is solved, so every rank takes the identical step.

Lightning refuses ``Trainer(accumulate_grad_batches=...)`` and ``Trainer(gradient_clip_val=...)``
under manual optimization, so the mixin offers both itself: see :class:`QLABConfig`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from lightning_qlab.averaging import PolynomialAveraging
from lightning_qlab.optimizer import DIRECTIONS, MODES, QLAB

__all__ = ["QLABConfig", "QLABMixin"]


@dataclass(frozen=True)
class QLABConfig:
    """How a :class:`QLABMixin` module trains: the optimizer's settings and the mixin's own
    accumulation and clipping.

    Every field can be set from YAML through the module's ``__init__`` (for example
    ``model.init_args.qlab_config.accumulate_batches: 4`` with LightningCLI).

    Args:
        direction: descent direction, passed to :class:`~lightning_qlab.optimizer.QLAB`:
            ``"rmsprop"`` (default), ``"sgd"`` (QLABGrad as published), ``"momentum"`` or ``"adam"``.
        mode: ``"safeguarded"`` (default) or ``"paper"``, passed to QLAB.
        initial_step: the first trial distance, passed to QLAB.
        weight_decay: decoupled weight decay, passed to QLAB.
        momentum: heavy-ball coefficient of the momentum direction, passed to QLAB.
        betas: moment decay rates of the adam direction (rmsprop uses ``betas[1]``), passed to QLAB.
        eps: the denominator term of the adam and rmsprop directions, passed to QLAB.
        accumulate_batches: ``k``, the number of micro-batches (training batches) per optimizer
            step. The step uses the mean loss and mean gradient over the k micro-batches and the
            trial forward evaluates the same k micro-batches, so they are kept (by reference)
            until the step. Use this instead of ``Trainer(accumulate_grad_batches=k)``, which
            Lightning does not allow here.
        gradient_clip_norm: clip the gradient to this total 2-norm before the step (``None``: off).
        gradient_clip_value: clip every gradient element to ``[-v, v]`` before the step
            (``None``: off; only with ``direction="sgd"``, see :class:`QLABMixin`).
        weight_averaging: evaluate the polynomial-decay average of the iterates (default
            ``True``): the mixin adds a :class:`~lightning_qlab.averaging.PolynomialAveraging`
            callback, so validation, checkpoints' ``state_dict`` and the module after ``fit`` hold
            the average, while training continues from the last iterate. ``False``: the last
            iterate, as QLABGrad is published. If the Trainer already has a
            :class:`~lightning.pytorch.callbacks.WeightAveraging` callback of yours, the mixin
            adds none and yours applies.

    Example:
        >>> QLABConfig(direction="adam", accumulate_batches=4).optimizer_kwargs()["direction"]
        'adam'
    """

    direction: str = "rmsprop"
    mode: str = "safeguarded"
    initial_step: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    accumulate_batches: int = 1
    gradient_clip_norm: Optional[float] = None
    gradient_clip_value: Optional[float] = None
    weight_averaging: bool = True

    def __post_init__(self) -> None:
        # YAML and jsonargparse hand over lists; the field is a tuple so that the config stays hashable.
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.direction not in DIRECTIONS:
            raise ValueError(f"QLABConfig: unknown direction {self.direction!r}; choose one of {DIRECTIONS}.")
        if self.mode not in MODES:
            raise ValueError(f"QLABConfig: unknown mode {self.mode!r}; choose one of {MODES}.")
        if not _is_number(self.initial_step) or not math.isfinite(self.initial_step) or self.initial_step <= 0:
            raise ValueError(f"QLABConfig: initial_step must be a positive number, got {self.initial_step!r}.")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ValueError(f"QLABConfig: weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"QLABConfig: momentum must be in [0, 1), got {self.momentum!r}.")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"QLABConfig: betas must be two numbers in [0, 1), got {self.betas!r}.")
        if not _is_number(self.eps) or not self.eps > 0:
            raise ValueError(f"QLABConfig: eps must be positive, got {self.eps!r}.")
        if isinstance(self.accumulate_batches, bool) or not isinstance(self.accumulate_batches, int) \
                or self.accumulate_batches < 1:
            raise ValueError(
                f"QLABConfig: accumulate_batches must be an integer >= 1, got {self.accumulate_batches!r}."
            )
        for name in ("gradient_clip_norm", "gradient_clip_value"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"QLABConfig: {name} must be None (off) or a positive number, got {value!r}.")
        if not isinstance(self.weight_averaging, bool):
            raise ValueError(f"QLABConfig: weight_averaging must be True or False, got {self.weight_averaging!r}.")
        if self.gradient_clip_value is not None and self.direction != "sgd":
            raise ValueError(_CLIP_VALUE_DIRECTION.format(direction=self.direction))

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~lightning_qlab.optimizer.QLAB` held by this config."""
        return dict(
            initial_step=self.initial_step,
            direction=self.direction,
            mode=self.mode,
            momentum=self.momentum,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )


_CLIP_VALUE_DIRECTION = (
    "QLABConfig: gradient_clip_value works with direction='sgd' only, got direction={direction!r}. "
    "Clipping by value changes the direction element by element, and QLAB's slope along a "
    "momentum or Adam direction would then need the unclipped gradient. Use gradient_clip_norm instead."
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# The pieces of the trial forward: the random number generator and the BatchNorm statistics.
# ---------------------------------------------------------------------------------------------
class _RNGState:
    """The global random number generator state of the CPU and of one accelerator device.

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
            f"QLABMixin cannot save and replay the random number generator of {device.type!r} devices, "
            "so the trial forward could not reuse the training forward's dropout masks. Supported: "
            "cpu, cuda, and devices whose torch module has get_rng_state/set_rng_state (mps, xpu)."
        )
    return module


@contextmanager
def _running_stats_restored(module: torch.nn.Module) -> Iterator[None]:
    """Run the body, then put back every running statistic that normalisation layers updated.

    Covers BatchNorm of any dimension, SyncBatchNorm and InstanceNorm with
    ``track_running_stats=True`` (all subclasses of ``_NormBase``). In train mode these layers
    normalise with the batch's own statistics, so the running ones never influence the loss
    and restoring them afterwards is exact.
    """
    buffers = [
        buffer
        for layer in module.modules()
        if isinstance(layer, _NormBase) and layer.training and layer.track_running_stats
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
class _PendingStep:
    """The micro-batches of the optimizer step being assembled, with what their replay needs."""

    size: int  # micro-batches this step will average (k, or fewer at the end of an epoch)
    window_start: int = 0  # batch_idx of the window's first batch
    batches: list[Any] = field(default_factory=list)
    rng_states: list[_RNGState] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)  # detached, float32 or wider


def _mean(losses: list[Tensor]) -> Tensor:
    # A single loss is returned as it is, so that k = 1 adds no rounding at all.
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------
class QLABMixin:
    """Adds QLABGrad training to a LightningModule: write ``qlab_loss(batch)``, nothing else.

    List the mixin *before* ``LightningModule``. The mixin provides ``training_step`` (forward,
    backward, trial forward, step; logs ``train_loss``) and ``configure_optimizers`` (a
    :class:`~lightning_qlab.optimizer.QLAB` built from ``self.qlab_config``).

    Example:
        >>> import torch
        >>> from lightning.pytorch import LightningModule
        >>> class Regression(QLABMixin, LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.qlab_config = QLABConfig(accumulate_batches=2)
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def qlab_loss(self, batch):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self.net(x), y)
        >>> Regression().automatic_optimization
        False

    ``qlab_loss`` is also called for the trial forward (under ``torch.no_grad``, on the same
    batch), so apart from the loss it may only log: ``self.log``/``self.log_dict`` calls made
    during the trial forward are dropped, so what it logs comes from the training forward. Update
    stateful metrics (torchmetrics) in ``on_train_batch_end`` instead: the trial forward would
    update them a second time.

    What the mixin sets aside, and says so at the first training step: the ``training_step`` and
    ``configure_optimizers`` of the class it is mixed into (their logging and their optimizer), a
    learning-rate scheduler returned by ``configure_optimizers`` (QLAB chooses its own step sizes,
    and manual optimization would not step it), and a step whose gradient is zero or missing
    (QLAB skips it: a loss that does not depend on the trainable parameters stalls training).

    Overriding hooks:
        * ``configure_optimizers`` may return your own ``QLAB`` instance (for parameter groups).
          To train a baseline with a plain torch optimizer, set ``self.automatic_optimization =
          True`` in ``__init__`` and return that optimizer: ``training_step`` then returns
          ``qlab_loss(batch)`` and Lightning's automatic optimization does the rest.
        * ``on_before_optimizer_step`` clips the gradient (``qlab_config.gradient_clip_norm`` /
          ``gradient_clip_value``); an override must call ``super().on_before_optimizer_step(optimizer)``
          (forgetting it is reported as an error when clipping is configured).
        * ``on_validation_model_zero_grad`` keeps the gradient of an unfinished accumulation
          window; an override should call ``super().on_validation_model_zero_grad()``.
        * ``configure_callbacks`` adds the :class:`~lightning_qlab.averaging.PolynomialAveraging`
          that ``qlab_config.weight_averaging`` asks for; an override should return
          ``super().configure_callbacks()`` together with its own callbacks.

    What is evaluated: by default the polynomial-decay average of the iterates, not the last
    iterate (see :mod:`lightning_qlab.averaging`). Validation during ``fit`` swaps the average in
    and back out, checkpoints store it as their ``state_dict`` (the training weights ride along
    for resuming), and after ``fit`` the module holds it. ``QLABConfig(weight_averaging=False)``
    evaluates the last iterate, as QLABGrad is published.

    Clipping and the fitted parabola: QLAB fits ``phi(a) = L(w - a d)`` with slope ``-(g . d)``
    and reads ``g`` from ``.grad``. After clipping, ``.grad`` holds the clipped gradient while the
    loss is still the real one, so the slope would be wrong (too shallow), the fitted curvature
    too small and the step too long. The mixin therefore hands QLAB the losses multiplied by
    ``s = (g_clipped . d) / (g . d)``: the step is fitted to ``s L``, whose slope along ``d`` is
    exactly what QLAB computes, and whose minimiser along ``d`` is that of ``L``. For clipping by
    norm ``s`` is the clip coefficient (any direction); for clipping by value ``d`` is the clipped
    gradient itself, which is why value clipping needs ``direction="sgd"``. The diagnostics in
    ``QLAB.last_step`` are divided by ``s`` again, so they describe ``L``.

    Accumulation over k micro-batches: each micro-batch is one training batch; the optimizer
    steps after every k-th batch of an epoch (windows start at the epoch's first batch). When
    the number of batches in an epoch is not a multiple of k, the last step of the epoch uses
    the remaining micro-batches (their mean loss and gradient). When the epoch's length is
    unknown (an iterable dataset without ``__len__``) an incomplete last window cannot be seen
    coming: it is dropped at the start of the next window, with a warning.
    """

    qlab_config: QLABConfig = QLABConfig()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if LightningModule in mro and mro.index(LightningModule) < mro.index(QLABMixin):
            raise TypeError(
                f"{cls.__name__}: list QLABMixin before LightningModule, as in "
                f"`class {cls.__name__}(QLABMixin, LightningModule)`; otherwise LightningModule's "
                "own training_step and configure_optimizers hide the mixin's."
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # QLAB needs a second forward pass inside the step: only manual optimization has room for it.
        self.automatic_optimization = False
        self._qlab_pending: Optional[_PendingStep] = None
        self._qlab_clip_scale: Optional[Tensor] = None
        self._qlab_clipped = False
        self._qlab_checked_setup = False
        self._qlab_in_trial = False  # inside the trial forward: its log calls are dropped
        self._qlab_stall_warned = False

    # ------------------------------------------------------------------ the user's method
    def qlab_loss(self, batch: Any) -> Tensor:
        """The scalar loss of one mini-batch. Override this; it is the only method you write.

        It is called for the training forward (with gradients) and again for the trial forward
        (under ``torch.no_grad``, same batch), so it must have no side effects beyond logging
        (``self.log`` calls of the trial forward are dropped): no metric updates, no state changes
        beyond what the layers themselves do.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses QLABMixin but does not define qlab_loss(self, batch). "
            "Define it to return the mini-batch loss as a scalar tensor, e.g. "
            "`return F.cross_entropy(self(x), y)`; the mixin provides training_step."
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def configure_optimizers(self) -> QLAB:
        """A :class:`~lightning_qlab.optimizer.QLAB` over all parameters, configured by ``qlab_config``."""
        return QLAB(self.parameters(), **self._qlab_checked_config().optimizer_kwargs())

    @override
    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Your callbacks (``super().configure_callbacks()``) plus, when ``qlab_config.weight_averaging``
        is on and the module trains with QLAB, a :class:`~lightning_qlab.averaging.PolynomialAveraging`.

        Later calls with the same Trainer leave that instance in place, so the average survives
        ``trainer.test`` after ``fit``. An override must return ``super().configure_callbacks()``
        among its own callbacks, or the averaging is off.
        """
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        if self.automatic_optimization or not self._qlab_checked_config().weight_averaging:
            return callbacks
        present = [c for c in [*self.trainer.callbacks, *callbacks] if isinstance(c, WeightAveraging)]
        yours = [c for c in present if not getattr(c, "_added_by_qlab_mixin", False)]
        if yours:
            rank_zero_info(
                f"QLABMixin: the Trainer already averages weights with {type(yours[0]).__name__}; "
                "the default PolynomialAveraging is not added."
            )
        if present:  # yours, or ours from an earlier fit/test with this Trainer (it holds the average)
            return callbacks
        averaging = PolynomialAveraging()
        averaging._added_by_qlab_mixin = True  # type: ignore[attr-defined]
        return [*callbacks, averaging]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One micro-batch: forward and backward; after the last micro-batch of a step, the QLAB step.

        Returns the micro-batch's loss (detached) and logs it as ``train_loss``.
        """
        if self.automatic_optimization:
            loss = self._qlab_checked_loss(self.qlab_loss(batch), "training")
            self.log("train_loss", loss.detach(), prog_bar=True)
            return loss
        if not self._qlab_checked_setup:
            self._qlab_check_setup()
        optimizer = self._qlab_optimizer()
        accumulate = self.qlab_config.accumulate_batches
        window_start = batch_idx - batch_idx % accumulate
        window_end = window_start + accumulate  # exclusive; windows start at the epoch's first batch
        epoch_length = self.trainer.num_training_batches
        if math.isfinite(epoch_length):
            window_end = min(window_end, int(epoch_length))  # the epoch's last, shorter window

        pending = self._qlab_pending
        if pending is None or pending.window_start != window_start or batch_idx == window_start:
            if pending is not None and pending.losses:
                rank_zero_warn(
                    f"QLABMixin: dropped {len(pending.losses)} micro-batch(es) of an unfinished "
                    f"accumulation window of {pending.size}: the epoch ended without telling its "
                    "length in advance (no __len__), so the window could not be closed in time."
                )
            if batch_idx != window_start:
                rank_zero_warn(
                    f"QLABMixin: training resumed inside an accumulation window (batch {batch_idx} of "
                    f"the window {window_start}..{window_end - 1}); this step averages the "
                    f"{window_end - batch_idx} micro-batch(es) from here to the window's end."
                )
            optimizer.zero_grad(set_to_none=True)
            pending = _PendingStep(size=window_end - batch_idx, window_start=window_start)
            self._qlab_pending = pending

        size = pending.size
        is_last = batch_idx == window_end - 1
        # Only the last micro-batch's backward all-reduces under DDP: the others accumulate locally.
        strategy = self.trainer.strategy
        local_only = not is_last and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if local_only else nullcontext():
            loss = self.qlab_forward(batch)
            self.manual_backward(loss / size if size > 1 else loss)
        if is_last:
            self._qlab_step(optimizer)
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss.detach()

    @override
    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except during the trial forward, whose values are dropped: the
        step's metrics come from its training forward (so ``qlab_loss`` may log)."""
        if not self._qlab_in_trial:
            super().log(*args, **kwargs)  # type: ignore[misc]

    @override
    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict``, except during the trial forward (see :meth:`log`)."""
        if not self._qlab_in_trial:
            super().log_dict(*args, **kwargs)  # type: ignore[misc]

    @override
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clips the gradient as ``qlab_config`` asks. Lightning calls this hook after mixed
        precision's GradScaler has unscaled the gradients, so the clip sees true values."""
        if self.automatic_optimization:
            return  # Lightning's own clipping (Trainer(gradient_clip_val=...)) applies then
        self._qlab_clipped = True
        self._qlab_clip_scale = self._qlab_clip_gradients(optimizer)

    @override
    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before a validation run; inside an accumulation window
        (``val_check_interval`` can fall there) they are the window's partial sum and must stay."""
        pending = self._qlab_pending
        if pending is not None and pending.losses:
            return
        super().on_validation_model_zero_grad()

    @property
    def qlab_step_pending(self) -> bool:
        """Whether micro-batches have been accumulated for an optimizer step not taken yet (inside
        an accumulation window, where a checkpoint could not hold the partial gradient)."""
        pending = self._qlab_pending
        return pending is not None and bool(pending.losses)

    # ------------------------------------------------------------------ the two forwards
    def qlab_forward(self, batch: Any) -> Tensor:
        """The training forward of one micro-batch, as :meth:`training_step` runs it.

        Records the batch and the random number generator state it started from, so that
        :meth:`qlab_trial_loss` can evaluate the same function later. Returns the loss (with its
        graph).
        """
        if self._qlab_pending is None:
            self._qlab_pending = _PendingStep(size=1)
        rng_state = _RNGState(self.device)
        loss = self._qlab_checked_loss(self.qlab_loss(batch), "training")
        pending = self._qlab_pending
        pending.batches.append(batch)
        pending.rng_states.append(rng_state)
        pending.losses.append(_widened(loss.detach()))
        return loss

    @torch.no_grad()
    def qlab_trial_loss(self) -> Tensor:
        """The mean loss of the recorded micro-batches at the parameters as they are now.

        This is the trial forward QLAB calls at ``w - beta d``. Each micro-batch is evaluated
        with the random number generator state its training forward started from (the same
        dropout masks), in the current (train) mode, with normalisation running statistics
        restored afterwards and the generator put back where training left it: the call leaves no
        trace. At ``beta = 0`` it returns the training loss exactly.
        """
        pending = self._qlab_pending
        if pending is None or not pending.batches:
            raise RuntimeError(
                "QLABMixin.qlab_trial_loss: no micro-batch has been recorded; call "
                "qlab_forward(batch) first (training_step does this)."
            )
        rng_after_training = _RNGState(self.device)
        losses = []
        self._qlab_in_trial = True
        try:
            with _running_stats_restored(self):
                for batch, rng_state in zip(pending.batches, pending.rng_states, strict=True):
                    rng_state.restore()
                    losses.append(_widened(self._qlab_checked_loss(self.qlab_loss(batch), "trial")))
        finally:
            self._qlab_in_trial = False
            rng_after_training.restore()
        return _mean(losses)

    # ------------------------------------------------------------------ the step
    def _qlab_step(self, optimizer: LightningOptimizer) -> None:
        pending = self._qlab_pending
        assert pending is not None
        qlab: QLAB = optimizer.optimizer
        self._qlab_clipped = False
        self._qlab_clip_scale = None
        steps_before = qlab.steps
        optimizer.step(
            loss=_mean(pending.losses), trial_loss_fn=self.qlab_trial_loss, reduce_losses=self._qlab_reduce_losses
        )
        self._qlab_pending = None
        config = self.qlab_config
        clipping = config.gradient_clip_norm is not None or config.gradient_clip_value is not None
        if clipping and not self._qlab_clipped:
            raise RuntimeError(
                f"{type(self).__name__}.on_before_optimizer_step overrides QLABMixin's without "
                "calling super().on_before_optimizer_step(optimizer), so the gradient clipping asked "
                "for in qlab_config did not run. Add that call to your override."
            )
        if qlab.steps == steps_before:
            # The GradScaler of 16-mixed found inf/NaN gradients and skipped QLAB.step: no step
            # was taken, and "lr" (read by LearningRateMonitor) says so.
            for group in qlab.param_groups:
                group["lr"] = 0.0
        elif self._qlab_clip_scale is not None and qlab.last_step is not None:
            self._qlab_unscale_diagnostics(qlab)
        if qlab.last_step is not None and qlab.last_step.event == "zero_gradient" and not self._qlab_stall_warned:
            self._qlab_warn_stall(qlab)

    def _qlab_warn_stall(self, qlab: QLAB) -> None:
        # Said at once: every step is skipped while it lasts, and nothing else looks wrong.
        self._qlab_stall_warned = True
        trainable = [p for group in qlab.param_groups for p in group["params"] if p.requires_grad]
        what = ("the gradient is exactly zero" if any(p.grad is not None for p in trainable)
                else "no trainable parameter received a gradient")
        rank_zero_warn(
            f"QLABMixin: QLAB skipped step {qlab.steps} because {what}, and it skips every step while "
            f"that lasts. {type(self).__name__}.qlab_loss returned a loss that does not depend on the "
            "trainable parameters: a constant, or computed from detached tensors, under torch.no_grad, "
            "or through frozen parameters only. Make the loss depend on the parameters being trained.",
            category=RuntimeWarning,
        )

    def _qlab_reduce_losses(self, losses: Tensor) -> Tensor:
        """[L(w), L(trial)] -> their mean over ranks (DDP), times the clip factor ``s`` if clipping."""
        if self._trainer is not None and self.trainer.world_size > 1:
            losses = self.trainer.strategy.reduce(losses, reduce_op="mean")
        if self._qlab_clip_scale is not None:
            losses = losses * self._qlab_clip_scale.to(losses)
        return losses

    def _qlab_clip_gradients(self, optimizer: Any) -> Optional[Tensor]:
        """Clip the gradient in place; return ``s = (g_clipped . d) / (g . d)`` (a device scalar),
        or None when nothing was asked for or the gradient is not finite."""
        config = self.qlab_config
        if config.gradient_clip_norm is None and config.gradient_clip_value is None:
            return None
        qlab = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        grads = [p.grad for group in qlab.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        # A non-finite gradient is left untouched so that QLAB (or the GradScaler) skips the step;
        # clipping by value would otherwise turn inf into a finite number and hide it.
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        if not math.isfinite(total.item()):
            return None
        scale: Optional[Tensor] = None
        if config.gradient_clip_value is not None:
            if getattr(qlab, "direction", "sgd") != "sgd":
                raise ValueError(_CLIP_VALUE_DIRECTION.format(direction=qlab.direction))
            bound = config.gradient_clip_value
            dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
            clipped_sq = torch.zeros((), dtype=dtype, device=grads[0].device)
            cross = torch.zeros((), dtype=dtype, device=grads[0].device)
            for grad in grads:  # one temporary the size of a single tensor at a time
                magnitude = grad.detach().abs().to(dtype).flatten()
                clipped = magnitude.clamp(max=bound)
                clipped_sq += torch.dot(clipped, clipped).to(cross.device)
                cross += torch.dot(magnitude, clipped).to(cross.device)
                grad.clamp_(-bound, bound)
            # d = g_clipped: s = |g_c|^2 / (g . g_c); 1 when nothing was clipped (or g = 0).
            scale = torch.where(cross > 0, clipped_sq / cross, torch.ones_like(cross))
        if config.gradient_clip_norm is not None:
            if scale is not None:  # the norm after clipping by value
                total = torch.nn.utils.get_total_norm(grads, foreach=True)
            coefficient = torch.clamp(config.gradient_clip_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
            scale = coefficient if scale is None else scale * coefficient.to(scale)
        return scale

    def _qlab_unscale_diagnostics(self, qlab: QLAB) -> None:
        # QLAB saw s * L; report the quantities of L itself (step sizes are unaffected).
        assert self._qlab_clip_scale is not None and qlab.last_step is not None
        scale = float(self._qlab_clip_scale)
        if scale > 0 and math.isfinite(scale) and scale != 1.0:
            last = qlab.last_step
            qlab.last_step = replace(
                last,
                loss=last.loss / scale,
                trial_loss=last.trial_loss / scale,
                slope=last.slope / scale,
                curvature=last.curvature / scale,
            )

    # ------------------------------------------------------------------ checks
    @property
    def trainer(self) -> Any:  # type: ignore[override]
        return LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        self._qlab_pending = None  # a new Trainer (or none): nothing carries over from a previous fit
        self._qlab_checked_setup = False
        self._qlab_stall_warned = False
        # Lightning validates Trainer(accumulate_grad_batches / gradient_clip_val) against manual
        # optimization before any module hook runs; attaching the trainer happens just before that,
        # so this is the one place to point at the mixin's own options instead.
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not self.automatic_optimization:
            _check_trainer_options(trainer)

    def _qlab_checked_config(self) -> QLABConfig:
        if not isinstance(self.qlab_config, QLABConfig):
            raise TypeError(
                f"{type(self).__name__}.qlab_config must be a QLABConfig, got "
                f"{type(self.qlab_config).__name__}; e.g. self.qlab_config = QLABConfig(direction='adam')."
            )
        return self.qlab_config

    def _qlab_check_setup(self) -> None:
        self._qlab_checked_config()
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            raise NotImplementedError(
                f"QLABMixin supports single-device and DDP strategies, got {type(strategy).__name__}. "
                "Sharded strategies (FSDP, DeepSpeed) split the parameters, so the gradient norm and "
                "g . d that QLAB computes would cover one shard only. Use strategy='ddp'."
            )
        self._qlab_checked_setup = True
        self._qlab_name_what_is_set_aside()

    def _qlab_name_what_is_set_aside(self) -> None:
        """Warn about what the module defines but QLAB training does not use (see the class docstring)."""
        replaced = [
            f"{cls.__name__}.{name}"
            for cls in type(self).__mro__[type(self).__mro__.index(QLABMixin) + 1 :]
            if not cls.__module__.startswith(("lightning.", "pytorch_lightning.")) and cls is not object
            for name in ("training_step", "configure_optimizers")
            if name in vars(cls)
        ]
        if replaced:
            rank_zero_warn(
                f"QLABMixin: {type(self).__name__} trains with QLABGrad, so {' and '.join(replaced)} "
                "are not used: the mixin's training_step calls qlab_loss and steps QLAB. What they "
                "logged is not logged: log from qlab_loss (the trial forward's self.log calls are "
                "dropped) or in on_train_batch_end; their optimizer and scheduler are not used.",
                category=RuntimeWarning,
            )
        schedulers = [type(config.scheduler).__name__ for config in self.trainer.lr_scheduler_configs]
        if schedulers:
            rank_zero_warn(
                f"QLABMixin: {type(self).__name__}.configure_optimizers returned the learning-rate "
                f"scheduler(s) {', '.join(schedulers)}, which are not used: QLABGrad chooses each step "
                "size itself (and writes it into param_group['lr'], where a scheduler would write). "
                "Remove them; to train with a schedule, use a baseline optimizer.",
                category=RuntimeWarning,
            )

    def _qlab_optimizer(self) -> LightningOptimizer:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise MisconfigurationException(
                f"QLABMixin trains with exactly one optimizer, but {type(self).__name__}."
                f"configure_optimizers returned {len(optimizer)}. Return one QLAB instance."
            )
        if not isinstance(optimizer.optimizer, QLAB):
            raise MisconfigurationException(
                f"{type(self).__name__}.configure_optimizers returned "
                f"{type(optimizer.optimizer).__name__}, but QLABMixin's manual optimization steps a "
                "QLAB optimizer (it passes the trial forward to step()). Return "
                "lightning_qlab.QLAB(self.parameters(), ...) or drop the override; to train a "
                "baseline with another optimizer set self.automatic_optimization = True in __init__."
            )
        return optimizer

    def _qlab_checked_loss(self, value: Any, which: str) -> Tensor:
        where = f"{type(self).__name__}.qlab_loss"
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{where} must return the mini-batch loss as a scalar torch.Tensor, got "
                f"{type(value).__name__} (during the {which} forward). Return the tensor itself, "
                "not loss.item() or a dict."
            )
        if value.numel() != 1:
            raise ValueError(
                f"{where} must return a scalar loss, got a tensor of shape {tuple(value.shape)} "
                f"(during the {which} forward); reduce it with .mean() or .sum()."
            )
        if not value.is_floating_point():
            raise TypeError(f"{where} must return a floating-point loss, got dtype {value.dtype}.")
        if which == "training" and torch.is_grad_enabled() and not value.requires_grad:
            raise RuntimeError(
                f"{where} returned a loss that does not require grad: the training forward must "
                "keep its autograd graph (no .detach(), no torch.no_grad() inside qlab_loss)."
            )
        return value.reshape(())


def _widened(loss: Tensor) -> Tensor:
    """A loss in float32 or wider: loss differences are small, half precision loses them."""
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def _check_trainer_options(trainer: Any) -> None:
    if trainer.accumulate_grad_batches != 1:
        raise MisconfigurationException(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not work with "
            "QLABMixin (Lightning only accumulates under automatic optimization). Remove it from the "
            "Trainer and set it on the module: qlab_config=QLABConfig(accumulate_batches="
            f"{trainer.accumulate_grad_batches}) (YAML: model.init_args.qlab_config.accumulate_batches)."
        )
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        field_name = "gradient_clip_value" if trainer.gradient_clip_algorithm == "value" else "gradient_clip_norm"
        raise MisconfigurationException(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) does not work with QLABMixin "
            "(Lightning only clips under automatic optimization). Remove it from the Trainer and set "
            f"it on the module: qlab_config=QLABConfig({field_name}={trainer.gradient_clip_val}) "
            f"(YAML: model.init_args.qlab_config.{field_name}); QLABConfig also has gradient_clip_value."
        )
