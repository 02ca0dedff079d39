"""QLABMixin: train any LightningModule with QLABGrad by writing one method, ``qlab_loss(batch)``.

QLAB needs, every step, the loss of the *same* mini-batch at a second point, the trial point
``w - beta d``. Lightning's automatic optimization has no place for that forward pass, so the mixin
switches the module to manual optimization and runs the whole step itself::

    forward + backward on each of k micro-batches   (k = qlab_config.accumulate_batches)
    optimizer step: QLAB moves to the trial point and calls the trial forward on the same
                    micro-batches, fits the parabola and takes the step

The trial forward evaluates exactly the function whose gradient was taken (the same dropout masks,
BatchNorm running statistics restored, no autograd graph): :class:`~lightning_qlab.trial.TrialForward`,
which plain-PyTorch loops use too. Clipping and accumulation live in :mod:`lightning_qlab.clipping`
and :mod:`lightning_qlab.accumulation`; this module is the Lightning glue around them.

Lightning's precision and strategy plumbing stays in charge: the step goes through
``self.optimizers().step(...)``, so mixed precision (autocast, GradScaler unscaling and inf/NaN
skipping) and DDP work as for any manual-optimization module. Under DDP the two loss values are
averaged over the ranks before the step size is solved, so every rank takes the identical step.
Under FSDP2 (``ModelParallelStrategy``, :class:`~lightning_qlab.strategies.FSDP2Strategy`)
QLAB's sums over the parameters are global sums too (:mod:`lightning_qlab.sharding`); FSDP1
(``strategy="fsdp"``) and DeepSpeed are refused with what to use instead.

Lightning refuses ``Trainer(accumulate_grad_batches=...)`` and ``Trainer(gradient_clip_val=...)``
under manual optimization, so the mixin offers both itself: see :class:`QLABConfig`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from weakref import WeakSet

from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_qlab import _compat
from lightning_qlab._checks import check_loss, is_integer, is_number
from lightning_qlab.accumulation import PendingStep, step_window
from lightning_qlab.averaging import PolynomialAveraging
from lightning_qlab.clipping import CLIP_VALUE_NEEDS_SGD, clip_gradients, unscaled
from lightning_qlab.optimizer import QLAB, RELATIVE_UPDATE, RelativeUpdate, check_settings
from lightning_qlab.trial import TrialForward

__all__ = ["QLABConfig", "QLABMixin"]


@dataclass(frozen=True)
class QLABConfig:
    """How a :class:`QLABMixin` module trains: the optimizer's settings and the mixin's own
    accumulation and clipping.

    Every field can be set from YAML through the module's ``__init__`` (for example
    ``model.init_args.qlab_config.accumulate_batches: 4`` with LightningCLI).

    Args:
        direction: what the parameters step along, passed to :class:`~lightning_qlab.optimizer.QLAB`:
            ``"adam"`` (default), ``"rmsprop"``, ``"sgd"`` (QLABGrad as published) or ``"momentum"``.
        mode: ``"safeguarded"`` (default) or ``"paper"``, passed to QLAB.
        probe_every: fit the parabola on one step in this many (``None``: QLAB's default; paper
            mode probes every step), passed to QLAB.
        max_probe_interval: let the interval between probes double, up to this many steps, while
            the fits agree with the held step (``None``: QLAB's default, twice its default
            ``probe_every``, or a fixed interval where ``probe_every`` is set), passed to QLAB.
        initial_step: the first trial distance, passed to QLAB.
        weight_decay: decoupled weight decay, passed to QLAB.
        momentum: heavy-ball coefficient of the momentum direction, passed to QLAB.
        betas: moment decay rates of the adam direction (rmsprop uses ``betas[1]``), passed to QLAB.
        eps: the denominator term of the adam and rmsprop directions, passed to QLAB.
        relative_update: the band ``[low, high]`` of moves per step, relative to the initial
            weights' norm, that the step taken leans into, within a factor 2 of the fitted step (a
            number: one target; ``None``: the fitted step alone), passed to QLAB.
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
        >>> QLABConfig(direction="rmsprop", accumulate_batches=4).optimizer_kwargs()["direction"]
        'rmsprop'
    """

    direction: str = "adam"
    mode: str = "safeguarded"
    probe_every: Optional[int] = None
    max_probe_interval: Optional[int] = None
    initial_step: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    relative_update: RelativeUpdate = RELATIVE_UPDATE
    accumulate_batches: int = 1
    gradient_clip_norm: Optional[float] = None
    gradient_clip_value: Optional[float] = None
    weight_averaging: bool = True

    def __post_init__(self) -> None:
        # YAML and jsonargparse hand over lists; the fields are tuples so that the config stays hashable.
        object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.relative_update, list):
            object.__setattr__(self, "relative_update", tuple(self.relative_update))
        check_settings(owner="QLABConfig", **self.optimizer_kwargs())
        if not is_integer(self.accumulate_batches) or self.accumulate_batches < 1:
            raise ValueError(
                f"QLABConfig: accumulate_batches must be an integer >= 1, got {self.accumulate_batches!r}."
            )
        for name in ("gradient_clip_norm", "gradient_clip_value"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"QLABConfig: {name} must be None (off) or a positive number, got {value!r}.")
        if not isinstance(self.weight_averaging, bool):
            raise ValueError(f"QLABConfig: weight_averaging must be True or False, got {self.weight_averaging!r}.")
        if self.gradient_clip_value is not None and self.direction != "sgd":
            raise ValueError(CLIP_VALUE_NEEDS_SGD.format(direction=self.direction))

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~lightning_qlab.optimizer.QLAB` held by this config."""
        return dict(
            initial_step=self.initial_step,
            direction=self.direction,
            mode=self.mode,
            probe_every=self.probe_every,
            max_probe_interval=self.max_probe_interval,
            momentum=self.momentum,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            relative_update=self.relative_update,
        )


# The PolynomialAveraging callbacks the mixin added itself (not the user's): kept here, so that
# nothing is written onto the callbacks, and without keeping them alive.
_ADDED_AVERAGING: WeakSet[Callback] = WeakSet()


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

    Clipping keeps the fitted parabola exact: the losses handed to QLAB are multiplied by the
    factor ``s`` that clipping changed the slope by, and ``QLAB.last_step`` is divided by it again
    (see :mod:`lightning_qlab.clipping`). Accumulation over k micro-batches: each micro-batch is
    one training batch, and the windows of k start at the epoch's first batch; an epoch's last
    window averages the micro-batches that remain (see :mod:`lightning_qlab.accumulation`).
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
        self._qlab_pending: Optional[PendingStep] = None  # the optimizer step being assembled
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
        if self.automatic_optimization:
            return callbacks
        if self.trainer.state.fn == TrainerFn.FITTING:  # before any callback's setup meets the strategy
            _check_strategy(self.trainer.strategy)
        if not self._qlab_checked_config().weight_averaging:
            return callbacks
        present = [c for c in [*self.trainer.callbacks, *callbacks] if isinstance(c, WeightAveraging)]
        yours = [c for c in present if c not in _ADDED_AVERAGING]
        if yours:
            rank_zero_info(
                f"QLABMixin: the Trainer already averages weights with {type(yours[0]).__name__}; "
                "the default PolynomialAveraging is not added."
            )
        if present:  # yours, or ours from an earlier fit/test with this Trainer (it holds the average)
            return callbacks
        averaging = PolynomialAveraging()
        _ADDED_AVERAGING.add(averaging)
        return [*callbacks, averaging]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One micro-batch: forward and backward; after the last micro-batch of a step, the QLAB step.

        Returns the micro-batch's loss (detached) and logs it as ``train_loss``.
        """
        if self.automatic_optimization:
            loss = check_loss(self.qlab_loss(batch), f"{type(self).__name__}.qlab_loss", "training")
            self.log("train_loss", loss.detach(), prog_bar=True)
            return loss
        if not self._qlab_checked_setup:
            self._qlab_check_setup()
        optimizer = self._qlab_optimizer()
        window = step_window(batch_idx, self.qlab_config.accumulate_batches, self.trainer.num_training_batches)
        pending = self._qlab_pending
        if pending is None or not pending.continues_at(batch_idx, window):
            optimizer.zero_grad(set_to_none=True)
            pending = PendingStep.starting_at(batch_idx, window, TrialForward(self), replacing=pending)
            self._qlab_pending = pending

        size = pending.size
        is_last = batch_idx == window.stop - 1
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
        config = self.qlab_config
        qlab = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        self._qlab_clip_scale = clip_gradients(qlab, config.gradient_clip_norm, config.gradient_clip_value)

    @override
    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before a validation run; inside an accumulation window
        (``val_check_interval`` can fall there) they are the window's partial sum and must stay."""
        if self.qlab_step_pending:
            return
        super().on_validation_model_zero_grad()

    @property
    def qlab_step_pending(self) -> bool:
        """Whether micro-batches have been accumulated for an optimizer step not taken yet (inside
        an accumulation window, where a checkpoint could not hold the partial gradient)."""
        return self._qlab_pending is not None and self._qlab_pending.started

    # ------------------------------------------------------------------ the two forwards
    def qlab_forward(self, batch: Any) -> Tensor:
        """The training forward of one micro-batch, as :meth:`training_step` runs it.

        Records the batch and the random number generator state it started from (a
        :class:`~lightning_qlab.trial.TrialForward`), so that :meth:`qlab_trial_loss` can evaluate
        the same function later. Returns the loss (with its graph).
        """
        if self._qlab_pending is None:
            self._qlab_pending = PendingStep(size=1, trial=TrialForward(self))
        return self._qlab_pending.trial.record(self.qlab_loss, batch)

    def qlab_trial_loss(self) -> Tensor:
        """The mean loss of the recorded micro-batches at the parameters as they are now.

        This is the trial forward QLAB calls at ``w - beta d``: :meth:`TrialForward.replay
        <lightning_qlab.trial.TrialForward.replay>` (the same dropout masks, in the current train
        mode, normalisation running statistics restored, the generator put back: no trace), with
        ``self.log`` calls dropped. At ``beta = 0`` it returns the training loss exactly.
        """
        if self._qlab_pending is None or not self._qlab_pending.started:
            raise RuntimeError(
                "QLABMixin.qlab_trial_loss: no micro-batch has been recorded; call "
                "qlab_forward(batch) first (training_step does this)."
            )
        self._qlab_in_trial = True
        try:
            return self._qlab_pending.trial.replay()
        finally:
            self._qlab_in_trial = False

    # ------------------------------------------------------------------ the step
    def _qlab_step(self, optimizer: LightningOptimizer) -> None:
        pending = self._qlab_pending
        assert pending is not None
        qlab: QLAB = optimizer.optimizer
        self._qlab_clipped = False
        self._qlab_clip_scale = None
        steps_before = qlab.steps
        optimizer.step(loss=pending.trial.recorded_loss(), trial_loss_fn=self.qlab_trial_loss,
                       reduce_losses=self._qlab_reduce_losses)
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
        elif self._qlab_clip_scale is not None:
            qlab.last_step = unscaled(qlab.last_step, self._qlab_clip_scale)
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
        if _compat.attached_trainer(self) is not None and self.trainer.world_size > 1:
            losses = self.trainer.strategy.reduce(losses, reduce_op="mean")
        if self._qlab_clip_scale is not None:
            losses = losses * self._qlab_clip_scale.to(losses)
        return losses

    # ------------------------------------------------------------------ checks
    def _qlab_trainer_attached(self, trainer: Any) -> None:
        self._qlab_pending = None  # a new Trainer (or none): nothing carries over from a previous fit
        self._qlab_checked_setup = False
        self._qlab_stall_warned = False
        # Lightning validates Trainer(accumulate_grad_batches / gradient_clip_val) against manual
        # optimization before any module hook runs; attaching the trainer happens just before that,
        # so this is the one place to point at the mixin's own options instead.
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not self.automatic_optimization:
            _check_trainer_options(trainer)

    trainer = _compat.trainer_property(_qlab_trainer_attached)

    def _qlab_checked_config(self) -> QLABConfig:
        if not isinstance(self.qlab_config, QLABConfig):
            raise TypeError(
                f"{type(self).__name__}.qlab_config must be a QLABConfig, got "
                f"{type(self.qlab_config).__name__}; e.g. self.qlab_config = QLABConfig(direction='adam')."
            )
        return self.qlab_config

    def _qlab_check_setup(self) -> None:
        self._qlab_checked_config()
        _check_strategy(self.trainer.strategy)
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


def _check_strategy(strategy: Any) -> None:
    """Refuse the strategies QLAB's manual optimization cannot run under, saying what to use (the
    command reports a MisconfigurationException in one line)."""
    if isinstance(strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            "QLABMixin does not run under DeepSpeed: DeepSpeed steps the optimizer inside its own "
            "engine, which has no place for QLAB's trial forward, and keeps its own optimizer state. "
            "Shard with ModelParallelStrategy (FSDP2; configs/trainer/fsdp.yaml) instead."
        )
    if isinstance(strategy, FSDPStrategy):
        # Lightning runs training_step inside the FSDP1 root's forward, so the backward of manual
        # optimization finds FSDP's handles still in their forward state and fails an assertion
        # (seen on a GPU; Lightning issue 19685).
        raise MisconfigurationException(
            "QLABMixin does not run under FSDPStrategy (FSDP1): it optimizes manually, and Lightning "
            "cannot run a backward inside an FSDP1 module's training_step. Use FSDP2 instead: "
            "strategy=lightning_qlab.FSDP2Strategy (configs/trainer/fsdp.yaml)."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        raise MisconfigurationException(
            f"QLABMixin supports single-device, DDP and ModelParallelStrategy (FSDP2) training, got "
            f"{type(strategy).__name__}. Use one of those."
        )


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
