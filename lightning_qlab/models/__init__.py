"""LightningModules and networks for the standard model/data pairs.

Every model is a :class:`QLABModel` (QLABGrad by default, any torch optimizer as a baseline):
:class:`ImageClassifier` around an image backbone (:class:`MultiLayerPerceptron` for MNIST,
:class:`SmallCNN` and :class:`ResNet18CIFAR` for CIFAR-10, :class:`ResNet50` for ImageNet), and
:class:`LanguageModel` around :class:`CausalTransformer` for text. The backbones are plain
``nn.Module`` s.
"""

from lightning_qlab.models.backbones import MultiLayerPerceptron, ResNet18CIFAR, ResNet50, SmallCNN
from lightning_qlab.models.base import QLABModel
from lightning_qlab.models.classifier import ImageClassifier
from lightning_qlab.models.language_model import LanguageModel
from lightning_qlab.models.transformer import CausalTransformer

__all__ = [
    "CausalTransformer",
    "ImageClassifier",
    "LanguageModel",
    "MultiLayerPerceptron",
    "QLABModel",
    "ResNet18CIFAR",
    "ResNet50",
    "SmallCNN",
]
