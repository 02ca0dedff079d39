"""Image classification with QLABGrad (or, for comparison, any torch optimizer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_qlab._checks import is_integer
from lightning_qlab._compat import attached_trainer
from lightning_qlab.mixin import QLABConfig
from lightning_qlab.models.base import QLABModel

__all__ = ["ImageClassifier"]

Batch = tuple[Tensor, Tensor]


class ImageClassifier(QLABModel):
    """A classifier around any backbone network, trained with QLABGrad by default.

    The backbone maps images to one score per class; training minimises the cross-entropy, and
    validation/test report the loss and the top-k accuracies (``val_acc``, ``val_acc_top5``, ...).

    By default the step sizes come from QLABGrad, configured by ``qlab_config``. For a side-by-side
    baseline, pass ``optimizer`` (any torch optimizer, e.g. ``torch.optim.SGD`` with its learning
    rate) and optionally ``lr_scheduler``: the same module then trains with Lightning's automatic
    optimization, and nothing else changes.

    Args:
        backbone: the network, images to class scores (see :mod:`lightning_qlab.models.backbones`).
        num_classes: the number of classes; the backbone must output this many scores.
        top_k: accuracies to report, e.g. ``(1, 5)`` for ImageNet's top-1 and top-5.
        qlab_config: QLABGrad's settings (direction, mode, initial step, accumulation,
            clipping; see :class:`~lightning_qlab.mixin.QLABConfig`); its step-size settings do
            not apply when ``optimizer`` is given.
        optimizer: a baseline optimizer instead of QLABGrad: a callable taking the parameters,
            e.g. ``functools.partial(torch.optim.SGD, lr=0.1)`` or, in YAML,
            ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}``. ``None`` trains with QLABGrad.
        lr_scheduler: a learning-rate schedule for the baseline optimizer (stepped per epoch;
            ``ReduceLROnPlateau`` watches ``val_loss``). QLABGrad picks its own step sizes, so a
            schedule without ``optimizer`` is an error.
        label_smoothing: label smoothing of the cross-entropy (0 disables it).

    Example:
        >>> from lightning_qlab.models import ImageClassifier, MultiLayerPerceptron
        >>> model = ImageClassifier(MultiLayerPerceptron(784, (128,), 10), num_classes=10)
        >>> model.automatic_optimization
        False
        >>> import functools, torch
        >>> sgd = ImageClassifier(MultiLayerPerceptron(784, (128,), 10), num_classes=10,
        ...                       optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        >>> sgd.automatic_optimization
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        top_k: Sequence[int] = (1,),
        qlab_config: Union[QLABConfig, Mapping[str, Any]] = QLABConfig(),
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(qlab_config, optimizer, lr_scheduler)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"ImageClassifier: backbone must be a torch.nn.Module, got {type(backbone).__name__}; "
                "in YAML give it as {class_path: lightning_qlab.models.ResNet18CIFAR, init_args: {...}}."
            )
        if not is_integer(num_classes) or num_classes < 2:
            raise ValueError(f"ImageClassifier: num_classes must be an integer >= 2, got {num_classes!r}")
        top_k = tuple(top_k)
        if not top_k or any(not is_integer(k) or not 1 <= k <= num_classes for k in top_k):
            raise ValueError(
                f"ImageClassifier: top_k must list integers between 1 and num_classes={num_classes}, "
                f"got {list(top_k)!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ImageClassifier: label_smoothing must be in [0, 1), got {label_smoothing!r}")

        self.backbone = backbone
        self.num_classes = num_classes
        self.top_k = top_k
        self.label_smoothing = float(label_smoothing)
        # The backbone's weights are in the state dict and the optimizer/scheduler callables are
        # code, so neither is a hyperparameter; the CLI saves the full config as config.yaml.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.plain_hyperparameters()

        self.val_accuracy = self._accuracies()
        self.test_accuracy = self._accuracies()

    def _accuracies(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            ("acc" if k == 1 else f"acc_top{k}"): MulticlassAccuracy(self.num_classes, top_k=k, average="micro")
            for k in self.top_k
        })

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Class scores (logits), shape ``(batch, num_classes)``."""
        logits = self.backbone(images)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"ImageClassifier: the backbone {type(self.backbone).__name__} returned shape "
                f"{tuple(logits.shape)}, expected (batch, {self.num_classes}); set the backbone's "
                f"num_classes to {self.num_classes} (or num_classes to what the backbone outputs)."
            )
        return logits

    @override
    def qlab_loss(self, batch: Batch) -> Tensor:
        """The mini-batch cross-entropy (also the trial loss: no side effects here)."""
        images, labels = batch
        return F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"ImageClassifier: the data has {data_classes} classes ({type(datamodule).__name__}) "
                f"but the model was built for num_classes={self.num_classes}; set model num_classes "
                f"and the backbone's num_classes to {data_classes}."
            )

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_accuracy)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_accuracy)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The predicted class index of every image in the batch."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=1)

    def _evaluate(self, batch: Batch, stage: str, accuracies: nn.ModuleDict) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        for name, accuracy in accuracies.items():
            accuracy(logits, labels)
            self.log(f"{stage}_{name}", accuracy, prog_bar=name == "acc")
        return loss
