"""ImageNet (ILSVRC2012) from folders already on disk, in the standard ImageFolder layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torchvision import datasets
from torchvision.transforms import v2
from typing_extensions import override

from lightning_qlab._checks import is_integer
from lightning_qlab.data.base import DataMismatchError, ImageClassificationDataModule, check_class_folders

__all__ = ["ImageNetDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet with the standard ResNet preprocessing.

    Expects ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG``: the
    ILSVRC2012 training archive unpacked per class, and the 50,000 validation images sorted into
    the same class folders. The data set cannot be downloaded (it needs a licence from
    image-net.org). Its labels for the official test images are not public, so ``val/`` serves
    both the validation loop and ``lightning test``.

    Training images: a random resized crop of ``crop_size`` and a horizontal flip. Evaluation
    images: resized so the short side is ``resize_size``, then the centre ``crop_size`` crop.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        batch_size: images per batch per process.
        num_workers: dataloader worker processes.
        num_classes: the number of class folders expected (1000 for ILSVRC2012).
        crop_size: side of the square crop the network sees.
        resize_size: short side before the evaluation centre crop; default
            ``round(crop_size * 256 / 224)`` (256 for 224).

    Example:
        >>> dm = ImageNetDataModule(data_dir="/datasets/imagenet", batch_size=256, num_workers=8)
        >>> dm.num_classes, dm.crop_size, dm.resize_size
        (1000, 224, 256)
    """

    def __init__(
        self,
        data_dir: Union[str, Path] = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        num_classes: int = 1000,
        crop_size: int = 224,
        resize_size: Optional[int] = None,
    ) -> None:
        # val_size and split_seed do not apply: the validation images are the official val/ set.
        super().__init__(data_dir, batch_size, num_workers, val_size=0, split_seed=0)
        for name, value in (("num_classes", num_classes), ("crop_size", crop_size)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"ImageNetDataModule: {name} must be a positive integer, got {value!r}")
        if resize_size is None:
            resize_size = round(crop_size * 256 / 224)
        if not is_integer(resize_size) or resize_size < crop_size:
            raise ValueError(
                f"ImageNetDataModule: resize_size must be an integer >= crop_size ({crop_size}), "
                f"got {resize_size!r}"
            )
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.save_hyperparameters()
        to_normalised_tensor = [
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        ]
        self.train_transform = v2.Compose(
            [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()] + to_normalised_tensor
        )
        self.eval_transform = v2.Compose(
            [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)] + to_normalised_tensor
        )

    @override
    def prepare_data(self) -> None:
        self._check_folders()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        self._check_folders()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = datasets.ImageFolder(str(self.data_dir / "train"), transform=self.train_transform)
        if self.test_set is None:
            self.test_set = datasets.ImageFolder(str(self.data_dir / "val"), transform=self.eval_transform)
        self.val_set = self.test_set

    @override
    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False, stage="validate")

    def _check_folders(self) -> None:
        what = "ImageNet"
        hint = (
            "ILSVRC2012's validation images come as one flat folder: sort them into the "
            "training set's class folders first"
        )
        train = check_class_folders(self.data_dir, "train", what)
        check_class_folders(self.data_dir, "val", what, expected=train, hint=hint)
        if len(train) != self.num_classes:
            raise DataMismatchError(
                f"ImageNet: {self.data_dir / 'train'} has {len(train)} class folders but "
                f"num_classes is {self.num_classes}; point data_dir at the full data set or set "
                f"num_classes: {len(train)} (and the model's num_classes to match)."
            )
