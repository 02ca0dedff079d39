"""What every image-classification DataModule of the package shares.

Argument checks with messages that say what to change, the seeded split of a training set into
training and validation images, and the dataloaders. The dataset-specific modules only say where
the images come from and how they are transformed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_qlab._checks import is_integer
from lightning_qlab.data.order import ResumableLoader

__all__ = [
    "DataMismatchError",
    "DataNotFoundError",
    "ImageClassificationDataModule",
    "check_class_folders",
    "check_int",
    "make_loader",
]


class DataNotFoundError(FileNotFoundError):
    """The data set is not on disk and could not be fetched; the message says what to put where.

    Raised from ``prepare_data``/``setup``. The ``lightning`` command prints the message as one
    error line and exits with status 1.
    """


class DataMismatchError(ValueError):
    """The data on disk does not fit the configuration (its classes, or too few images for the
    validation split); the message says what to change. Raised from ``prepare_data``/``setup``,
    reported by the ``lightning`` command like :class:`DataNotFoundError`.
    """


class ImageClassificationDataModule(LightningDataModule):
    """Base class: seeded validation split, dataloaders and checked arguments.

    Subclasses set :attr:`num_classes` and fill ``train_set``/``val_set``/``test_set`` in
    :meth:`setup`, using :meth:`split_train` to hold out validation images.

    Args:
        data_dir: the folder the data set lives in (or is downloaded to).
        batch_size: images per batch *per process*; under DDP the global batch is
            ``batch_size * world_size``, as everywhere in Lightning.
        num_workers: dataloader worker processes per dataloader (0 loads in the main process).
        val_size: training images held out for validation (0: no validation loop).
        split_seed: seed of the permutation that picks the held-out images, so the split is the
            same on every rank and in every run, whatever ``seed_everything`` says.
    """

    num_classes: int
    # Images in the full training set when the data set fixes it (checked against val_size in
    # __init__); folder layouts are counted in setup().
    train_size: Optional[int] = None

    def __init__(
        self,
        data_dir: Union[str, Path],
        batch_size: int,
        num_workers: int,
        val_size: int,
        split_seed: int,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise ValueError(f"{name}: data_dir must be a folder path, got {data_dir!r}")
        check_int(name, "batch_size", batch_size, minimum=1)
        check_int(name, "num_workers", num_workers, minimum=0)
        check_int(name, "val_size", val_size, minimum=0)
        check_int(name, "split_seed", split_seed, minimum=0)
        if self.train_size is not None:
            self.check_val_size(val_size, self.train_size)
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def check_val_size(self, val_size: int, train_size: int) -> None:
        """Raise ``ValueError`` when ``val_size`` leaves no training images."""
        if val_size >= train_size:
            raise ValueError(
                f"{type(self).__name__}: val_size={val_size} holds out every one of the "
                f"{train_size} training images; choose a val_size below {train_size}."
            )

    def split_train(self, augmented: Dataset, plain: Dataset) -> tuple[Dataset, Dataset]:
        """Split one training set into (training images, validation images).

        ``augmented`` and ``plain`` are the same images with the training and the evaluation
        transforms; validation images come from ``plain`` so that they are never augmented.
        """
        total = len(augmented)  # type: ignore[arg-type]
        if self.val_size >= total:
            raise DataMismatchError(
                f"{type(self).__name__}: val_size={self.val_size} holds out every one of the "
                f"{total} training images; choose a val_size below {total}."
            )
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        return Subset(augmented, order[self.val_size :]), Subset(plain, order[: self.val_size])

    def _loader(self, dataset: Optional[Dataset], shuffle: bool, stage: str) -> DataLoader:
        return make_loader(self, dataset, self.batch_size, shuffle, self.num_workers, stage)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, stage="fit")

    @override
    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_size == 0:
            return []  # no validation images held out: Lightning skips the validation loop
        return self._loader(self.val_set, shuffle=False, stage="validate")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, stage="test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test images, in order (labels included; predictions come back per batch)."""
        return self._loader(self.test_set, shuffle=False, stage="predict")


def make_loader(owner: object, dataset: Optional[Dataset], batch_size: int, shuffle: bool, num_workers: int,
                stage: str) -> DataLoader:
    """The DataLoader of one split of ``owner`` (a DataModule), or an error saying to set it up.

    Shuffled (training) data comes in the order of :class:`~lightning_qlab.data.order.ResumableLoader`:
    a function of the run's seed and the epoch, which Lightning checkpoints and resumes mid-epoch.
    """
    if dataset is None:
        raise RuntimeError(
            f"{type(owner).__name__}: the {stage} data is not set up; call "
            f"setup({stage!r}) first (the Trainer does this before it asks for a dataloader)."
        )
    options = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    if shuffle:
        return ResumableLoader(dataset, batch_size=batch_size, **options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)


def check_class_folders(
    root: Path, split: str, what: str, expected: Optional[list[str]] = None, hint: str = ""
) -> list[str]:
    """The class folder names under ``root/split`` (sorted, as ImageFolder orders them).

    Raises :class:`DataNotFoundError` saying what to put where when the folder is missing or
    empty, and :class:`DataMismatchError` when its class folders are not the ``expected`` ones.
    """
    folder = root / split
    layout = f"{root}/{split}/<class>/<image files>"
    hint = f" ({hint})" if hint else ""
    if not folder.is_dir():
        raise DataNotFoundError(f"{what}: {folder} does not exist; expected images at {layout}.")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataNotFoundError(
            f"{what}: {folder} has no class folders; expected images at {layout}{hint}."
        )
    if expected is not None and classes != expected:
        missing = sorted(set(expected) - set(classes))
        extra = sorted(set(classes) - set(expected))
        raise DataMismatchError(
            f"{what}: the class folders in {folder} are not the expected {len(expected)} classes "
            f"(missing: {_few(missing)}; unexpected: {_few(extra)}){hint}."
        )
    return classes


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if not is_integer(value) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value!r}")


def _few(names: list[str], shown: int = 5) -> str:
    """At most ``shown`` names, so a message about 1000 class folders stays one readable line."""
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
