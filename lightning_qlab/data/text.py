"""Any UTF-8 text as fixed-length windows of bytes, for causal language modelling."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_qlab._checks import is_number
from lightning_qlab.data.base import DataMismatchError, DataNotFoundError, check_int, make_loader

__all__ = ["TextDataModule", "read_text_bytes"]

_GZIP_MAGIC = b"\x1f\x8b"


class ByteWindows(Dataset):
    """Windows of ``block_size + 1`` bytes: inputs are the first ``block_size``, targets the last."""

    def __init__(self, data: Tensor, starts: Tensor, block_size: int) -> None:
        self.data = data
        self.starts = starts
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = int(self.starts[index])
        window = self.data[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]


class _Prompts(Dataset):
    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = [torch.tensor(list(p.encode("utf-8")), dtype=torch.long) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Tensor:
        return self.prompts[index]


class TextDataModule(LightningDataModule):
    """Causal language modelling on a UTF-8 text file, or on every file of a folder.

    The text is read as bytes (``.gz`` files are decompressed), cut into non-overlapping windows of
    ``block_size + 1`` bytes, and each window is assigned to training, validation or test by a
    permutation seeded with ``split_seed``: the split is the same in every run and on every
    process, and no byte belongs to two splits. A window gives the model ``block_size`` bytes and
    asks for the next byte at every position. The windows are drawn from the whole text, not
    from its end, so that a file whose parts differ (chapters, sorted collections) is split
    evenly.

    ``predict`` yields the ``prompts``, one at a time, for
    :class:`~lightning_qlab.models.LanguageModel` to continue.

    Args:
        path: a UTF-8 text file (optionally gzip-compressed), or a folder: all its files, in the
            order of their sorted relative paths, joined by line breaks.
        block_size: bytes of context per training example.
        batch_size: windows per batch per process.
        num_workers: dataloader worker processes.
        val_fraction: share of the windows held out for validation.
        test_fraction: share of the windows held out for testing.
        split_seed: seed of the permutation that assigns windows to the splits.
        prompts: texts that ``lightning predict`` continues.

    Example:
        >>> dm = TextDataModule("corpus.txt", block_size=64)
        >>> dm.vocab_size
        256
    """

    vocab_size = 256

    def __init__(
        self,
        path: Union[str, Path] = "data/input.txt",
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        prompts: Sequence[str] = ("The ",),
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"{name}: path must be a text file or folder, got {path!r}")
        check_int(name, "block_size", block_size, minimum=1)
        check_int(name, "batch_size", batch_size, minimum=1)
        check_int(name, "num_workers", num_workers, minimum=0)
        check_int(name, "split_seed", split_seed, minimum=0)
        for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not is_number(value) or not 0 <= value < 1:
                raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"{name}: val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no "
                "windows for training; keep their sum below 1."
            )
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{name}: prompts must be a list of strings, got {prompts!r}")
        self.save_hyperparameters()
        self.path = Path(path).expanduser()
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = split_seed
        self.prompts = list(prompts)
        self.train_set: Optional[ByteWindows] = None
        self.val_set: Optional[ByteWindows] = None
        self.test_set: Optional[ByteWindows] = None

    @override
    def prepare_data(self) -> None:
        read_text_bytes(self.path)  # fail before training starts, with the reason

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None or stage == "predict":
            return
        data = torch.frombuffer(bytearray(read_text_bytes(self.path)), dtype=torch.uint8)
        self.train_set, self.val_set, self.test_set = self.split(data)

    def split(self, data: Tensor) -> tuple[ByteWindows, ByteWindows, ByteWindows]:
        """Training, validation and test windows of ``data`` (a uint8 tensor)."""
        span = self.block_size + 1
        count = len(data) // span
        n_val, n_test = round(count * self.val_fraction), round(count * self.test_fraction)
        wanted = 1 + (self.val_fraction > 0) + (self.test_fraction > 0)
        if count - n_val - n_test < 1 or (self.val_fraction > 0 and n_val == 0) \
                or (self.test_fraction > 0 and n_test == 0):
            raise DataMismatchError(
                f"{type(self).__name__}: {self.path} holds {len(data)} bytes, {count} window(s) of "
                f"block_size + 1 = {span} bytes, too few for {wanted} non-empty split(s); use more "
                "text or a smaller block_size."
            )
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.split_seed))
        starts = order * span
        val, test, train = starts[:n_val], starts[n_val : n_val + n_test], starts[n_val + n_test :]
        # Sorted, so that an unshuffled loader reads each split in text order.
        return tuple(ByteWindows(data, s.sort().values, self.block_size) for s in (train, val, test))

    def _loader(self, dataset: Optional[Dataset], shuffle: bool, stage: str) -> DataLoader:
        return make_loader(self, dataset, self.batch_size, shuffle, self.num_workers, stage)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, stage="fit")

    @override
    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_fraction == 0:
            return []  # nothing held out: Lightning skips the validation loop
        return self._loader(self.val_set, shuffle=False, stage="validate")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, stage="test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The ``prompts`` as byte tensors, one per batch (prompts differ in length)."""
        return DataLoader(_Prompts(self.prompts), batch_size=1)


def read_text_bytes(path: Union[str, Path]) -> bytes:
    """The UTF-8 bytes of a text file (gzip-compressed or not) or of every file of a folder.

    Raises :class:`~lightning_qlab.data.DataNotFoundError` when nothing is there and
    :class:`~lightning_qlab.data.DataMismatchError` when it is empty or not UTF-8 text.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise DataNotFoundError(f"TextDataModule: the folder {path} holds no files; put UTF-8 text files in it.")
        data = b"\n".join(_read_one(p) for p in files)
    elif path.is_file():
        data = _read_one(path)
    else:
        raise DataNotFoundError(
            f"TextDataModule: {path} does not exist; point path (--data.init_args.path) at a UTF-8 "
            "text file, a .gz of one, or a folder of them."
        )
    if not data.strip():
        raise DataMismatchError(f"TextDataModule: {path} holds no text (it is empty or only whitespace).")
    return data


def _read_one(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataMismatchError(f"TextDataModule: {path} is a damaged gzip file ({error}).") from None
    # NUL never occurs in text but in nearly every binary format, which can still decode as UTF-8.
    binary_at = raw.find(b"\x00")
    if binary_at >= 0:
        raise DataMismatchError(
            f"TextDataModule: {path} is not a text file (a NUL byte at offset {binary_at}); "
            "TextDataModule reads UTF-8 text."
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataMismatchError(
            f"TextDataModule: {path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset "
            f"{error.start}); convert it first, e.g. iconv -f latin1 -t utf-8."
        ) from None
    return raw
