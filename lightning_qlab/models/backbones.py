"""Networks for the QLABGrad paper's model/data pairs: plain ``nn.Module`` s, no Lightning.

Each maps a batch of images to one score (logit) per class. :class:`ImageClassifier` wraps any of
them, or any other ``nn.Module`` with the same contract, for training.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from lightning_qlab._checks import is_integer

__all__ = ["MultiLayerPerceptron", "SmallCNN", "ResNet18CIFAR", "ResNet50"]


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not is_integer(value) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _dropout_rate(owner: str, dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


class MultiLayerPerceptron(nn.Module):
    """Flatten the image, then fully connected ReLU layers, then a linear layer to class scores.

    Args:
        in_features: pixels per image (784 for 28x28 MNIST).
        hidden_sizes: widths of the hidden layers, in order.
        num_classes: class scores out.
        dropout: dropout rate after each hidden layer (0 disables it).

    Example:
        >>> import torch
        >>> net = MultiLayerPerceptron(in_features=784, hidden_sizes=(512, 256), num_classes=10)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden_sizes: Sequence[int] = (512, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _positive("MultiLayerPerceptron", in_features=in_features, num_classes=num_classes)
        for width in hidden_sizes:
            _positive("MultiLayerPerceptron", hidden_size=width)
        dropout = _dropout_rate("MultiLayerPerceptron", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in hidden_sizes:
            layers += [nn.Linear(width_in, width), nn.ReLU(inplace=True)]
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class SmallCNN(nn.Module):
    """A small VGG-style convolutional network.

    Stages of two 3x3 convolutions (each followed by batch norm and ReLU) and a 2x2 max-pool,
    then one hidden fully connected layer. Each stage halves the image side, so ``image_size`` must be divisible by
    ``2 ** len(channels)``.

    Args:
        in_channels: colour channels of the input (3 for CIFAR-10, 1 for MNIST).
        image_size: side of the square input images.
        channels: output channels of each stage.
        hidden_size: width of the fully connected hidden layer.
        num_classes: class scores out.
        batch_norm: batch normalisation after every convolution.
        dropout: dropout rate before the last layer (0 disables it).

    Example:
        >>> import torch
        >>> net = SmallCNN(in_channels=3, image_size=32, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden_size: int = 256,
        num_classes: int = 10,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        owner = "SmallCNN"
        _positive(owner, in_channels=in_channels, image_size=image_size, hidden_size=hidden_size,
                  num_classes=num_classes)
        if not channels:
            raise ValueError(f"{owner}: channels must list at least one stage width, got {channels!r}")
        for width in channels:
            _positive(owner, channels=width)
        reduction = 2 ** len(channels)
        if image_size % reduction != 0:
            raise ValueError(
                f"{owner}: {len(channels)} stages halve the image side {len(channels)} times, so "
                f"image_size must be divisible by {reduction}; got {image_size}."
            )
        dropout = _dropout_rate(owner, dropout)
        layers: list[nn.Module] = []
        width_in = in_channels
        for width in channels:
            for conv_in in (width_in, width):
                # A bias before batch normalisation is redundant: BN subtracts the mean.
                layers.append(nn.Conv2d(conv_in, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.MaxPool2d(2))
            width_in = width
        side = image_size // reduction
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width_in * side * side, hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0.0 else nn.Identity(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


class ResNet18CIFAR(ResNet):
    """ResNet-18 for 32x32 images (He et al., 2016, as commonly adapted to CIFAR-10).

    torchvision's ResNet-18 with its ImageNet stem (7x7 stride-2 convolution and a max-pool,
    which shrink 32x32 inputs to 8x8 before the first block) replaced by one 3x3 stride-1
    convolution, so the four stages see 32, 16, 8 and 4 pixels per side.

    Args:
        num_classes: class scores out.

    Example:
        >>> import torch
        >>> net = ResNet18CIFAR(num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        _positive("ResNet18CIFAR", num_classes=num_classes)
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()


class ResNet50(ResNet):
    """torchvision's ResNet-50, randomly initialised.

    The same network as ``torchvision.models.resnet50(weights=None)``, as a class so that
    configs can name it by class path.

    Args:
        num_classes: class scores out (1000 for ImageNet).

    Example:
        >>> import torch
        >>> net = ResNet50(num_classes=1000)
        >>> net(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    def __init__(self, num_classes: int = 1000) -> None:
        _positive("ResNet50", num_classes=num_classes)
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
