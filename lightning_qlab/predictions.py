"""PredictionWriter: what ``predict`` returns, written to a file in the run folder as it comes.

``lightning predict`` adds one by itself, so predictions are never computed only to be dropped.
Text (a list of strings per batch, as :class:`~lightning_qlab.models.LanguageModel` returns)
goes to ``predictions.txt``, one sample after another under a header line; tensors (one row
per sample, as :class:`~lightning_qlab.models.ImageClassifier`'s predicted classes) go to
``predictions.csv``, one line per sample with the sample's index first.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Writes every predicted batch to ``<run folder>/predictions.{txt,csv}``.

    The run folder is ``trainer.log_dir`` (the logger's ``version_N``), or ``output_dir`` when
    given. Under several processes each rank writes its own file (``predictions-rank<r>...``);
    the sample indices say where each row belongs.

    Args:
        output_dir: the folder to write into instead of the run folder.
        filename: the file's name without its extension.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PredictionWriter()], logger=False)  # doctest: +SKIP
    """

    def __init__(self, output_dir: Optional[str] = None, filename: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"PredictionWriter: filename must be a file name without a folder, got {filename!r}")
        self.output_dir = output_dir
        self.filename = filename
        self.path: Optional[Path] = None  # the file written by the last predict run

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.path = None

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        texts = isinstance(prediction, (list, tuple)) and all(isinstance(p, str) for p in prediction)
        if self.path is None:
            self.path = self._file(trainer, ".txt" if texts else ".csv")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        indices = list(batch_indices) if batch_indices is not None else [None] * len(prediction)
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            if texts:
                for index, text in zip(indices, prediction):
                    handle.write(f"=== sample {index if index is not None else batch_idx} ===\n{text}\n")
            elif isinstance(prediction, Tensor):
                rows = prediction.detach().cpu().reshape(len(prediction), -1).tolist()
                writer = csv.writer(handle)
                for index, row in zip(indices, rows):
                    writer.writerow([index, *row])
            else:
                raise TypeError(
                    f"PredictionWriter: predict_step returned {type(prediction).__name__}; it writes a "
                    "tensor (one row per sample) or a list of strings. Add your own BasePredictionWriter "
                    "callback for other outputs."
                )

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.path is not None:
            rank_zero_info(f"Predictions written to {self.path}")

    def _file(self, trainer: Trainer, suffix: str) -> Path:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        rank = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return folder / f"{self.filename}{rank}{suffix}"
