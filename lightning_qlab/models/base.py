"""What every model of the package shares: QLABGrad by default, any torch optimizer as a baseline.

:class:`QLABModel` is a LightningModule on :class:`~lightning_qlab.mixin.QLABMixin` that takes
``qlab_config``, ``optimizer`` and ``lr_scheduler``. Without ``optimizer`` it trains with QLABGrad
(manual optimization, the mixin's step and averaging); with one, Lightning's automatic
optimization steps that optimizer, so a side-by-side baseline differs by one line of config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lightning_qlab.mixin import QLABConfig, QLABMixin
from lightning_qlab.optimizer import QLAB
from lightning_qlab.sharding import data_parallel_mesh, shard_blocks

__all__ = ["QLABModel"]


class QLABModel(QLABMixin, LightningModule):
    """Base class of the package's models: QLABGrad by default, or a baseline optimizer.

    Subclasses call ``super().__init__(qlab_config, optimizer, lr_scheduler)``, then
    ``self.save_hyperparameters(ignore=[...])`` and :meth:`plain_hyperparameters`, and write
    ``qlab_loss``.

    Args:
        qlab_config: QLABGrad's settings (see :class:`~lightning_qlab.mixin.QLABConfig`); a
            mapping (as stored in a checkpoint's hyperparameters) is accepted. Its step-size
            settings do not apply when ``optimizer`` is given.
        optimizer: a baseline optimizer instead of QLABGrad: a callable taking the parameters,
            e.g. ``functools.partial(torch.optim.SGD, lr=0.1)`` or, in YAML,
            ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``. ``None`` trains with QLABGrad.
        lr_scheduler: a learning-rate schedule for the baseline optimizer (stepped per epoch;
            ``ReduceLROnPlateau`` watches ``val_loss``). QLABGrad picks its own step sizes, so a
            schedule without ``optimizer`` is an error.
    """

    def __init__(
        self,
        qlab_config: Union[QLABConfig, Mapping[str, Any]] = QLABConfig(),
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(qlab_config, Mapping):
            qlab_config = QLABConfig(**qlab_config)
        if not isinstance(qlab_config, QLABConfig):
            raise TypeError(f"{name}: qlab_config must be a QLABConfig, got {type(qlab_config).__name__}")
        if lr_scheduler is not None and optimizer is None:
            raise ValueError(
                f"{name}: lr_scheduler is set but optimizer is not. QLABGrad chooses its own "
                "step sizes; a schedule only applies to a baseline optimizer (set optimizer too, or "
                "remove lr_scheduler)."
            )
        if optimizer is not None and _builds_qlab(optimizer):
            raise ValueError(
                f"{name}: optimizer is QLAB, which needs the mixin's manual optimization. Leave "
                "optimizer unset (QLABGrad is the default) and configure it under qlab_config "
                "(YAML: model.init_args.qlab_config)."
            )
        if optimizer is not None and (
            qlab_config.accumulate_batches != 1
            or qlab_config.gradient_clip_norm is not None
            or qlab_config.gradient_clip_value is not None
        ):
            raise ValueError(
                f"{name}: qlab_config.accumulate_batches / gradient_clip_* apply to QLABGrad "
                "only; with a baseline optimizer use trainer.accumulate_grad_batches and "
                "trainer.gradient_clip_val instead."
            )
        self.qlab_config = qlab_config
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # A baseline optimizer is stepped by Lightning; QLABGrad by the mixin (manual optimization).
        self.automatic_optimization = optimizer is not None

    def plain_hyperparameters(self) -> None:
        """Store ``qlab_config`` as plain values, so that checkpoints load with
        ``torch.load(weights_only=True)``. Call after ``save_hyperparameters``."""
        if isinstance(self.hparams.get("qlab_config"), QLABConfig):
            self.hparams["qlab_config"] = asdict(self.hparams["qlab_config"])

    @override
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: shard ``self.backbone`` with FSDP2 over the
        data-parallel processes (see :func:`~lightning_qlab.sharding.shard_blocks`). Nothing under
        any other strategy."""
        if self.device_mesh is None:
            return
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"{type(self).__name__} has no backbone module to shard; override configure_model and "
                "apply torch.distributed.fsdp.fully_shard to its layers, as Lightning's ModelParallelStrategy asks."
            )
        shard_blocks(backbone, data_parallel_mesh(self.device_mesh, type(self).__name__))

    @override
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            return super().configure_optimizers()  # QLABGrad, from self.qlab_config
        optimizer = self.optimizer_factory(self.parameters())
        if isinstance(optimizer, QLAB):
            raise ValueError(
                f"{type(self).__name__}: optimizer is QLAB, which needs the mixin's manual optimization. "
                "Leave optimizer unset (QLABGrad is the default) and configure it under qlab_config."
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        schedule: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            schedule["monitor"] = "val_loss"
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def _builds_qlab(factory: Any) -> bool:
    """Whether an optimizer factory makes a QLAB: the class itself, or a ``functools.partial`` of it
    (as jsonargparse builds from ``class_path: lightning_qlab.QLAB``), so that it is refused at once."""
    while isinstance(factory, functools.partial):
        if any(isinstance(part, type) and issubclass(part, QLAB) for part in factory.args):
            return True
        factory = factory.func
    return isinstance(factory, type) and issubclass(factory, QLAB)
