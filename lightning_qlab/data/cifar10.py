"""CIFAR-10: 50,000 training and 10,000 test colour images, 32x32, ten classes.

Two sources: torchvision's ``CIFAR10`` (the original pickled batches, downloaded when missing),
or a copy of the images in ImageFolder layout (``train/<class>/`` and ``test/<class>/``), such
as a JPEG export of the data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2
from typing_extensions import override

from lightning_qlab.data.base import (
    DataMismatchError,
    DataNotFoundError,
    ImageClassificationDataModule,
    check_class_folders,
)

__all__ = ["CIFAR10DataModule", "CIFAR10_CLASSES"]

# Sorted, so ImageFolder's alphabetical class indices agree with torchvision's CIFAR10 labels.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
# Mean and standard deviation of the CIFAR-10 training pixels per channel (scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 with the standard augmentation and a seeded validation split.

    Training images are randomly cropped (32x32 from the image padded by 4 pixels) and flipped
    horizontally when ``augment`` is on; validation and test images are only normalised.

    Args:
        data_dir: ``layout="torchvision"``: the folder holding ``cifar-10-batches-py`` (downloaded
            there when missing). ``layout="image_folder"``: the folder holding ``train/<class>/``
            and ``test/<class>/`` with the ten class folders ``airplane`` ... ``truck``.
        batch_size: images per batch per process.
        num_workers: dataloader worker processes.
        val_size: training images held out for validation (of 50,000).
        split_seed: seed of the validation split.
        layout: where the images come from, see ``data_dir``.
        download: ``layout="torchvision"`` only: fetch the data when missing.
        augment: random crop and horizontal flip for the training images.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data/cifar10-jpeg", layout="image_folder")
        >>> dm.num_classes, dm.image_shape
        (10, (3, 32, 32))
    """

    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: Union[str, Path] = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        split_seed: int = 0,
        layout: Literal["torchvision", "image_folder"] = "torchvision",
        download: bool = True,
        augment: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, split_seed)
        if layout not in ("torchvision", "image_folder"):
            raise ValueError(
                f"CIFAR10DataModule: layout must be 'torchvision' or 'image_folder', got {layout!r}"
            )
        if layout == "torchvision":
            self.check_val_size(val_size, train_size=50_000)
        self.layout = layout
        self.download = download
        self.augment = augment
        self.save_hyperparameters()
        to_normalised_tensor = [
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)
        ]
        augmentation = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
        self.train_transform = v2.Compose(augmentation + to_normalised_tensor)
        self.eval_transform = v2.Compose(to_normalised_tensor)

    @override
    def prepare_data(self) -> None:
        if self.layout == "torchvision":
            self._torchvision(train=True, transform=None, download=self.download)
            self._torchvision(train=False, transform=None, download=self.download)
        else:
            self._check_folders()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            augmented = self._load("train", self.train_transform)
            plain = self._load("train", self.eval_transform)
            self.train_set, self.val_set = self.split_train(augmented, plain)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load("test", self.eval_transform)

    def _load(self, split: str, transform: v2.Compose) -> Dataset:
        if self.layout == "torchvision":
            return self._torchvision(train=split == "train", transform=transform, download=False)
        self._check_folders()
        return datasets.ImageFolder(str(self.data_dir / split), transform=transform)

    def _check_folders(self) -> None:
        for split in ("train", "test"):
            check_class_folders(self.data_dir, split, "CIFAR-10 (layout: image_folder)", CIFAR10_CLASSES)

    def _torchvision(self, train: bool, transform: Optional[v2.Compose], download: bool) -> datasets.CIFAR10:
        try:
            return datasets.CIFAR10(str(self.data_dir), train=train, transform=transform, download=download)
        except (RuntimeError, OSError) as error:  # torchvision's "not found" / download errors
            archive = self.data_dir / datasets.CIFAR10.filename
            if archive.is_file() and not check_integrity(str(archive), datasets.CIFAR10.tgz_md5):
                # torchvision reports a damaged archive as a failed download.
                raise DataMismatchError(
                    f"CIFAR-10: the archive {archive} is damaged (its MD5 checksum does not match: a "
                    "download or copy that did not finish?). Replace it with a complete copy, or delete "
                    "it to download it again."
                ) from error
            how = "could not be downloaded" if download else "download is off"
            raise DataNotFoundError(
                f"CIFAR-10 was not found in {self.data_dir / 'cifar-10-batches-py'} and {how} "
                f"({error}). Put cifar-10-python.tar.gz (the python version from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) in {self.data_dir}/ and run with "
                "download: true, which checks and unpacks it there; or point data_dir at a copy in ImageFolder layout "
                "(train/<class>/, test/<class>/) with layout: image_folder."
            ) from error
