"""Preemption: on SIGTERM (or SLURM's signal before the time limit) save a checkpoint at the current
step and exit with a non-zero status, so that resuming from it loses nothing.

SLURM, Kubernetes and torchrun send SIGTERM some seconds before they kill a job. Lightning then
stops at the end of the current batch and exits with status 0 without a checkpoint: every step
since the last periodic checkpoint is lost, and the scheduler is told the job succeeded. It also
stops in the middle of a validation run (while a weight average is swapped in) and in the middle
of an accumulation window, where no checkpoint can resume exactly.

This callback holds the request until the optimizer step in progress (with its accumulated
micro-batches) is complete and any validation that follows it has finished, then lets Lightning
stop there, writes ``last.ckpt`` into the run's checkpoint folder and makes the exit status
``128 + signal`` (143 for SIGTERM), as if the signal had ended the process. Under SLURM the
requeue signal (``--signal=USR1@<seconds>``) does the same and requeues the job
(``scontrol requeue``); the requeued job resumes with ``--ckpt_path last``. Under DDP the
processes agree on the step to stop after (one small all-reduce per step).

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(callbacks=[Preemption()], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_qlab._compat import accumulating_gradients, ask_to_stop

__all__ = ["Preemption"]


class Preemption(Callback):
    """Saves ``last.ckpt`` at the step where SIGTERM (or SLURM's requeue signal) arrived, then
    exits with status ``128 + signal``.

    The checkpoint goes into the folder of the Trainer's ``ModelCheckpoint`` (``<run
    folder>/checkpoints`` by default), replacing any ``last.ckpt`` there. ``lightning fit`` adds
    one to the Trainer unless the configuration has one already.

    Args:
        filename: the checkpoint's file name, without ``.ckpt``.
    """

    def __init__(self, filename: str = ModelCheckpoint.CHECKPOINT_NAME_LAST) -> None:
        if not filename or os.path.basename(filename) != filename:
            raise ValueError(f"Preemption: filename must be a file name without a folder, got {filename!r}")
        self.filename = filename
        self.path: Optional[Path] = None  # the checkpoint written on the last preemption
        self._signal: Optional[int] = None  # the signal received, acted on at the next safe point
        self._stopping = False  # the processes agreed to stop after the current step
        self._requeue_signal: Optional[int] = None
        self._launcher: Any = None  # the strategy's launcher of further processes, if any

    @property
    def signal_received(self) -> Optional[int]:
        """The signal received during this fit (``None`` if none): acted on once the step is complete."""
        return self._signal

    # ------------------------------------------------------------------ signals
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning installed its handlers when the fit started; ours replace them until its
        # teardown puts the original ones back. Its SIGTERM handler would stop at once (also
        # inside validation), and its SLURM handler saves from inside the signal handler, at
        # whatever point of the step the signal interrupted.
        self._signal, self._stopping, self.path = None, False, None
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: fit does not run in the main thread, where signals arrive; it is inactive.")
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        if SLURMEnvironment.detect():
            environment = getattr(trainer.strategy, "cluster_environment", None)
            requeue = getattr(environment, "requeue_signal", None) or signal.SIGUSR1
            self._requeue_signal = int(requeue)
            signal.signal(requeue, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only note it: a signal can arrive anywhere inside a step, where nothing can be saved.
        if self._signal is None:
            self._signal = signum
            launcher = self._launcher
            if launcher is not None:  # ranks started by this process (DDP) hear it too
                launcher.kill(signum)

    # ------------------------------------------------------------------ when to stop
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._launcher = trainer.strategy.launcher

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._decide(trainer, pl_module)  # Lightning stops after this batch (and its validation)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning would stop inside validation, with the weight average swapped in: hold it.
        if self._stopping and _fitting(trainer):
            ask_to_stop(trainer, False)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _fitting(trainer):
            return
        if self._stopping:
            ask_to_stop(trainer, True)
        else:
            self._decide(trainer, pl_module)  # a signal that arrived during validation

    def _decide(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At a point where a checkpoint can resume exactly: stop here if a signal has arrived (on
        any rank: all ranks must stop after the same step)."""
        if self._stopping or _inside_accumulation_window(trainer, pl_module):
            return
        requested = self._signal is not None
        if trainer.world_size > 1:
            flag = torch.tensor(float(requested), device=trainer.strategy.root_device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
            if requested and self._signal is None:
                self._signal = signal.SIGTERM  # another rank got it
        if requested:
            self._stopping = True
            ask_to_stop(trainer, True)

    # ------------------------------------------------------------------ saving
    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        signum = self._signal or signal.SIGTERM
        exception.code = 128 + signum  # the status a process ended by that signal reports
        name = signal.Signals(signum).name
        if not self._stopping:
            # Stopped outside training (a sanity check, or test/predict): nothing new to save.
            rank_zero_info(f"Preemption: {name} received while not training; nothing to save "
                           f"(exit status {exception.code}).")
            return
        self.path = self._checkpoint_path(trainer)
        if trainer.is_global_zero and self.path.is_symlink():
            self.path.unlink()  # ModelCheckpoint(save_last="link") points it at another checkpoint
        trainer.save_checkpoint(self.path)
        requeued = self._requeue(trainer) if signum == self._requeue_signal else ""
        rank_zero_info(
            f"Preemption: {name} received; saved the state after step {trainer.global_step} to {self.path}"
            f"{requeued}. Resume with `lightning fit ... --ckpt_path last` (or ckpt_path='{self.path}'). "
            f"Exit status {exception.code}."
        )

    def _checkpoint_path(self, trainer: Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None)
        if folder is None:  # no ModelCheckpoint: where it would have written
            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return Path(folder) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"

    @staticmethod
    def _requeue(trainer: Trainer) -> str:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not trainer.is_global_zero or not job:
            return ""
        try:
            status = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            status = -1
        if status != 0:
            rank_zero_warn(f"Preemption: `scontrol requeue {job}` failed (status {status}); resubmit the job yourself.")
            return ""
        return f"; requeued SLURM job {job}"


def _inside_accumulation_window(trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether micro-batches are accumulated for an optimizer step still to come."""
    if pl_module.automatic_optimization:
        return accumulating_gradients(trainer)  # Trainer(accumulate_grad_batches=...)
    return bool(getattr(pl_module, "qlab_step_pending", False))  # QLABConfig(accumulate_batches=...)


def _fitting(trainer: Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
