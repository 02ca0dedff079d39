"""LightningDataModules for the standard pairs: images (MNIST, CIFAR-10, ImageNet) and text.

Every module downloads (where the data set allows it) in ``prepare_data``, splits a seeded
validation set off the training data, and raises :class:`DataNotFoundError` saying what to
put where when the data is neither on disk nor downloadable.
"""

from lightning_qlab.data.base import DataMismatchError, DataNotFoundError, ImageClassificationDataModule
from lightning_qlab.data.cifar10 import CIFAR10DataModule
from lightning_qlab.data.imagenet import ImageNetDataModule
from lightning_qlab.data.mnist import MNISTDataModule
from lightning_qlab.data.text import TextDataModule

__all__ = [
    "CIFAR10DataModule",
    "DataMismatchError",
    "DataNotFoundError",
    "ImageClassificationDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "TextDataModule",
]
