"""Finding and checking checkpoints before a run starts, so that a bad one is one clear line.

``--ckpt_path last`` in Lightning looks only in the new run's own folder, which is empty, and
starts over from step 0. :func:`find_last_checkpoint` looks where the earlier runs of the same
root wrote theirs. :func:`check_checkpoint` reads a checkpoint's metadata (its tensors stay on
disk) and compares it with the model before any run folder exists, so that a missing, empty,
damaged or mismatched file is reported as :class:`CheckpointError` instead of a traceback from
deep inside ``fit``. A distributed checkpoint (a folder of shards, written under FSDP2) is read
the same way: its ``meta.pt`` holds what is not sharded, and its index lists the sharded tensors
with their shapes.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parameter import UninitializedParameter

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_folders",
    "find_last_checkpoint",
    "is_distributed_checkpoint",
    "read_checkpoint",
]

# Differences listed by name in a mismatch message; the rest are counted.
_SHOWN = 3

# What Lightning's ModelParallelStrategy writes beside the shards: everything that is not sharded.
_DISTRIBUTED_META = "meta.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the run asked for; the message says why and what to do."""


def checkpoint_folders(trainer: Trainer) -> list[str]:
    """Where the runs of this Trainer's root write checkpoints, as glob patterns: the ``dirpath`` of
    its ``ModelCheckpoint`` callbacks where set, and ``<logger root>/*/checkpoints`` (every
    version's folder; ``<default_root_dir>/checkpoints`` without a logger), where ``ModelCheckpoint``
    and :class:`~lightning_qlab.preemption.Preemption` write by default."""
    folders = [glob.escape(str(c.dirpath)) for c in trainer.checkpoint_callbacks
               if isinstance(c, ModelCheckpoint) and c.dirpath is not None]
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = os.path.join(str(logger.save_dir or trainer.default_root_dir), str(logger.name or ""))
        folders.append(os.path.join(glob.escape(root), "*", "checkpoints"))
    else:
        folders.append(os.path.join(glob.escape(str(trainer.default_root_dir)), "checkpoints"))
    return folders


def find_last_checkpoint(trainer: Trainer) -> Optional[Path]:
    """The most recently written ``last*.ckpt`` (a file, or a distributed checkpoint's folder) in
    :func:`checkpoint_folders`, or ``None``."""
    name = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
    candidates = [Path(path) for folder in checkpoint_folders(trainer)
                  for path in glob.glob(os.path.join(folder, name))
                  if os.path.isfile(path) or is_distributed_checkpoint(Path(path))]
    if not candidates:
        return None
    return max(candidates, key=lambda path: (path.stat().st_mtime, str(path)))


def read_checkpoint(path: Any, weights_only: Optional[bool] = None) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` with its tensors left on disk (memory-mapped), or
    :class:`CheckpointError` saying why it cannot be used. ``None`` for what is not a local file
    path (URLs, registry names), which is left to Lightning."""
    if not isinstance(path, (str, os.PathLike)) or "://" in str(path):
        return None
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"the checkpoint {path} does not exist; check the path (`--ckpt_path last` "
                              "finds the newest last.ckpt of the runs under the same root).")
    if is_distributed_checkpoint(path):
        return _read_distributed(path, weights_only)
    if path.is_dir():
        raise CheckpointError(f"the checkpoint {path} is a folder; give one .ckpt file inside it.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"the checkpoint {path} is empty (0 bytes): its saving was interrupted. "
                              "Use an earlier checkpoint of the run.")
    checkpoint = _read(path, weights_only)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict); "
                              "give a .ckpt file written by Lightning.")
    return checkpoint


def is_distributed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a distributed checkpoint's folder (``torch.distributed.checkpoint``'s index
    and Lightning's ``meta.pt`` inside)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / _DISTRIBUTED_META).is_file()


def _read_distributed(path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    """The checkpoint folder's ``meta.pt``, with the sharded entries as stand-ins that have their
    shapes: ``state_dict`` (the average nested training weights left out), and the optimizer
    states in the shape :func:`saved_record` reads (``"qlab"`` marks QLAB's record)."""
    from torch.distributed.checkpoint import FileSystemReader

    from lightning_qlab.sharded_average import TRAINING_WEIGHTS

    checkpoint = _read(path / _DISTRIBUTED_META, weights_only)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is a folder of shards, but its {_DISTRIBUTED_META} is not a Lightning checkpoint.")
    try:
        entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - a damaged index makes the folder unusable, whatever the reason
        raise CheckpointError(f"{path} is a folder of shards whose index (.metadata) cannot be read "
                              f"({type(error).__name__}); use another checkpoint of the run.") from None
    weights = {key[len("state_dict."):]: _Shape(entry.size) for key, entry in entries.items()
               if key.startswith("state_dict.") and hasattr(entry, "size")
               and not key.startswith(f"state_dict.{TRAINING_WEIGHTS}.")}
    optimizers = sorted({key.split(".")[0] for key in entries if key.startswith("optimizer_")})
    checkpoint["state_dict"] = weights
    checkpoint["optimizer_states"] = [
        {"param_groups": [{"qlab": "{}"}]} if f"{name}.param_groups.0.qlab" in entries else {}
        for name in optimizers
    ]
    return checkpoint


class _Shape:
    """A sharded tensor of a distributed checkpoint, known by its shape only."""

    def __init__(self, shape: Any) -> None:
        self.shape = torch.Size(shape)


def check_checkpoint(path: Any, model: LightningModule, resuming: bool, weights_only: Optional[bool] = None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a Lightning checkpoint that ``model`` can load
    (and, when ``resuming`` a fit, continue training from). Only local files are checked."""
    checkpoint = read_checkpoint(path, weights_only)
    if checkpoint is None:
        return
    path = Path(path).expanduser()
    _check_weights(path, checkpoint["state_dict"], model)
    if resuming:
        _check_training_state(path, checkpoint, model)


def _read(path: Path, weights_only: Optional[bool]) -> Any:
    try:
        # mmap: the tensors stay on disk; only the structure and the shapes are read.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only is not False)
    except Exception as error:  # noqa: BLE001 - whatever torch.load says, the file is unusable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint: it is damaged (a copy or save that did not finish?) or "
            f"not a checkpoint at all ({type(error).__name__}: {reason[:200]}). Use another checkpoint of the run."
        ) from None


def _check_weights(path: Path, saved: dict[str, Any], model: LightningModule) -> None:
    if _builds_layers_later(model) or any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        return  # the model's tensors do not exist yet: Lightning checks when it loads them
    expected = model.state_dict()
    mismatched = [f"{name} is {tuple(saved[name].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
                  for name, tensor in expected.items()
                  if name in saved and hasattr(saved[name], "shape") and saved[name].shape != tensor.shape]
    problems = mismatched
    if model.strict_loading:
        missing = [name for name in expected if name not in saved]
        unexpected = [name for name in saved if name not in expected]
        if missing:
            problems = problems + [f"missing from the checkpoint: {_few(missing)}"]
        if unexpected:
            problems = problems + [f"not in the model: {_few(unexpected)}"]
    if problems:
        more = len(problems) - _SHOWN
        shown = "; ".join(problems[:_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointError(
            f"{path} holds another model than {type(model).__name__} as configured ({shown}). Run with the "
            "configuration the checkpoint was trained with: the config.yaml in its run folder."
        )


def _check_training_state(path: Path, checkpoint: dict[str, Any], model: LightningModule) -> None:
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(
            f"{path} holds the weights only (saved with save_weights_only), not the optimizer and loop "
            "state that resuming needs. Evaluate it with validate/test/predict, or start a new fit."
        )
    from lightning_qlab.mixin import QLABMixin  # the mixin imports nothing from here
    from lightning_qlab.optimizer import saved_record

    states = checkpoint["optimizer_states"]
    if isinstance(model, QLABMixin) and states:
        trained_with_qlab = isinstance(states[0], dict) and saved_record(states[0]) is not None
        training_with_qlab = not model.automatic_optimization
        if trained_with_qlab != training_with_qlab:
            qlab, baseline = "QLABGrad", "a baseline optimizer"
            was, now = (qlab, baseline) if trained_with_qlab else (baseline, qlab)
            raise CheckpointError(
                f"{path} was trained with {was}, but this run trains with {now}; resuming needs the same "
                "optimizer. Run with the configuration the checkpoint was trained with (its run folder's config.yaml)."
            )


def _builds_layers_later(model: LightningModule) -> bool:
    """Whether ``model``'s ``configure_model`` may create layers (the package's models only shard
    the ones they have)."""
    from lightning_qlab.models.base import QLABModel  # the models import this module's callers

    if not is_overridden("configure_model", model):
        return False
    return type(model).configure_model is not QLABModel.configure_model


def _few(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
