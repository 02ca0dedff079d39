"""LightningModules and networks for the QLABGrad paper's model/data pairs.

:class:`ImageClassifier` is built on :class:`~lightning_qlab.mixin.QLABMixin`; the backbones are
plain ``nn.Module`` s: :class:`MultiLayerPerceptron` (MNIST), :class:`SmallCNN` (CIFAR-10),
:class:`ResNet18CIFAR` (CIFAR-10) and :class:`ResNet50` (ImageNet).
"""

from lightning_qlab.models.backbones import MultiLayerPerceptron, ResNet18CIFAR, ResNet50, SmallCNN
from lightning_qlab.models.classifier import ImageClassifier

__all__ = ["ImageClassifier", "MultiLayerPerceptron", "ResNet18CIFAR", "ResNet50", "SmallCNN"]
