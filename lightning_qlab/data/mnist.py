"""MNIST through torchvision: 60,000 training and 10,000 test digits, 28x28 grey."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2
from typing_extensions import override

from lightning_qlab.data.base import DataMismatchError, DataNotFoundError, ImageClassificationDataModule

__all__ = ["MNISTDataModule"]

# Mean and standard deviation of the MNIST training pixels (scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST digits, normalised, with a seeded validation split of the training set.

    ``prepare_data`` (on one process per node) downloads the data into
    ``<data_dir>/MNIST/raw`` when it is not there yet. Offline, put the four original archives
    (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) in that folder: with
    ``download=True`` they are checksummed and unpacked there, and nothing is fetched.

    Args:
        data_dir: the folder holding ``MNIST/raw``.
        batch_size: images per batch per process.
        num_workers: dataloader worker processes.
        val_size: training images held out for validation (of 60,000).
        split_seed: seed of the validation split.
        download: fetch (or unpack) the data when missing. With ``False`` a missing data set is
            an error at once.

    Example:
        >>> dm = MNISTDataModule(data_dir="data", batch_size=64, val_size=5000)
        >>> dm.num_classes, dm.image_shape
        (10, (1, 28, 28))
    """

    num_classes = 10
    image_shape = (1, 28, 28)
    train_size = 60_000

    def __init__(
        self,
        data_dir: Union[str, Path] = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 5000,
        split_seed: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_size, split_seed)
        self.download = download
        self.save_hyperparameters()
        self.transform = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MNIST_MEAN, MNIST_STD)]
        )

    @override
    def prepare_data(self) -> None:
        self._dataset(train=True, download=self.download)
        self._dataset(train=False, download=self.download)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._dataset(train=True, download=False)
            # No augmentation for MNIST: both halves of the split use the same transform.
            self.train_set, self.val_set = self.split_train(full, full)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(train=False, download=False)

    def _dataset(self, train: bool, download: bool) -> datasets.MNIST:
        raw = self.data_dir / "MNIST" / "raw"
        try:
            return datasets.MNIST(str(self.data_dir), train=train, download=download, transform=self.transform)
        except (RuntimeError, OSError, ValueError) as error:  # torchvision's "not found" / download / read errors
            damaged = _damaged_files(raw)
            if damaged:
                raise DataMismatchError(damaged) from error
            how = "could not be downloaded" if download else "download is off"
            raise DataNotFoundError(
                f"MNIST was not found in {raw} and {how} ({error}). Put the four archives "
                "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
                f"and t10k-labels-idx1-ubyte.gz in {raw}/ (a writable folder) and run with "
                "download: true, which checks and unpacks them there without going online; or "
                "run once with internet access."
            ) from error


def _damaged_files(raw: Path) -> Optional[str]:
    """Why the MNIST files in ``raw`` cannot be read, when they are there but damaged; else None.

    torchvision reports an archive whose checksum fails as a failed download, and a damaged
    unpacked file as a failed read; both are files to replace, not data to fetch.
    """
    archives = [(raw / name, md5) for name, md5 in datasets.MNIST.resources]
    bad = [path.name for path, md5 in archives if path.is_file() and not check_integrity(str(path), md5)]
    if bad:
        return (
            f"MNIST: the archive(s) {', '.join(bad)} in {raw} are damaged (their MD5 checksum does not match: "
            "a download or copy that did not finish?). Replace them with complete copies, or delete them "
            "to download them again."
        )
    unpacked = [raw / name[: -len(".gz")] for name, _ in datasets.MNIST.resources]
    if all(path.is_file() for path in unpacked):
        return (
            f"MNIST: the unpacked files in {raw} cannot be read (damaged or cut short). Delete "
            f"{', '.join(path.name for path in unpacked)} (the files without .gz) so that they are "
            "unpacked again from the archives."
        )
    return None
