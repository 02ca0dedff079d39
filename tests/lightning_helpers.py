"""Small QLABMixin modules, data and Trainer settings shared by the Lightning tests.

Run as a script it is the DDP worker of tests/test_ddp.py: Lightning's DDP launcher re-runs this
file once per extra rank, so it has to be a file of its own rather than a pytest process::

    python tests/lightning_helpers.py OUT_DIR
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_qlab.callback import QLABMonitor
from lightning_qlab.cli import leave_process_group
from lightning_qlab.mixin import QLABConfig, QLABMixin
from lightning_qlab.preemption import Preemption


def run_worker(script: Path, out_dir: Path, **env: str) -> None:
    """Run a multi-process test worker (``python SCRIPT OUT_DIR``) in ``out_dir``; fail with its
    output's tail unless it exits cleanly."""
    completed = subprocess.run([sys.executable, str(script), str(out_dir)], cwd=out_dir,
                               env=dict(os.environ, PYTHONWARNINGS="ignore", **env),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU Trainer without progress bar, model summary, logger or checkpoints (unless asked)."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return Trainer(**settings)


def regression_data(
    samples: int, features: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    """y = a smooth nonlinear function of x plus noise; the same tensors for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    y = torch.sin(x @ torch.linspace(-1.0, 1.0, features, dtype=torch.float64)).unsqueeze(1)
    y = y + 0.1 * torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    return TensorDataset(x.to(dtype), y.to(dtype))


def classification_data(samples: int, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around fixed class centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, features, generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    x = centres[labels] + torch.randn(samples, features, generator=generator)
    return TensorDataset(x, labels)


class RegressionNet(QLABMixin, LightningModule):
    """A tanh MLP with an MSE loss: no BatchNorm, no dropout, so every forward is deterministic."""

    def __init__(self, qlab_config: QLABConfig = QLABConfig(), features: int = 5, hidden: int = 16,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        self.qlab_config = qlab_config
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        ).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def qlab_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)


class BatchNormNet(QLABMixin, LightningModule):
    """A classifier with BatchNorm and (optionally) dropout: the trial forward's hard case."""

    def __init__(self, qlab_config: QLABConfig = QLABConfig(), features: int = 8, hidden: int = 32,
                 classes: int = 3, dropout: float = 0.3, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        self.qlab_config = qlab_config
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = [
            torch.nn.Linear(features, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(torch.nn.Dropout(dropout))
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                   torch.nn.Linear(hidden, classes)]
        self.net = torch.nn.Sequential(*layers).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def qlab_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        if y.is_floating_point():
            return F.mse_loss(self(x), y)
        return F.cross_entropy(self(x), y)


def preemption_of(trainer: Trainer) -> Preemption:
    (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]
    return preemption


def send_sigterm_to_myself(trainer: Trainer) -> None:
    """SIGTERM to this process, only while Preemption's handler is installed (otherwise the
    signal would end the test run itself)."""
    preemption = preemption_of(trainer)
    if signal.getsignal(signal.SIGTERM) != preemption._on_signal:
        raise AssertionError("Preemption's SIGTERM handler is not installed: not sending SIGTERM")
    os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtBatch(Callback):
    """Sends SIGTERM to this process at the end of training batch ``batch`` (counted over the
    whole fit, from 0), or inside the validation that follows it when ``in_validation``."""

    def __init__(self, batch: int, in_validation: bool = False) -> None:
        self.batch, self.in_validation = batch, in_validation
        self.batches_seen = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.batches_seen == self.batch and not self.in_validation:
            send_sigterm_to_myself(trainer)
        self.batches_seen += 1

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if self.in_validation and self.batches_seen == self.batch + 1 and not trainer.sanity_checking:
            self.in_validation = False
            send_sigterm_to_myself(trainer)


class PauseAtStep(Callback):
    """For a `lightning fit` process that a test preempts from outside: at the end of optimizer
    step ``step`` it writes the step into ``signal_file`` and waits (up to ``timeout`` seconds)
    until the process has received a signal, so that the test's SIGTERM arrives at a known step."""

    def __init__(self, step: int, signal_file: str, timeout: float = 120.0) -> None:
        self.step, self.signal_file, self.timeout = step, signal_file, timeout

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        preemption = preemption_of(trainer)
        Path(self.signal_file).write_text(f"{self.step}\n")
        deadline = time.monotonic() + self.timeout
        while preemption.signal_received is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PauseAtStep: no signal within {self.timeout} s at step {self.step}")
            time.sleep(0.02)


def parameter_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ------------------------------------------------------------------------------------------------
# DDP worker (tests/test_ddp.py)
# ------------------------------------------------------------------------------------------------
DDP_RANKS = 2
DDP_BATCH = 4  # per rank; the single-process reference uses DDP_RANKS * DDP_BATCH
DDP_STEPS = 20
DDP_ACCUMULATE = 2
BN_STEPS = 10


def ddp_plain_run() -> tuple[RegressionNet, TensorDataset, dict[str, Any]]:
    """float64 MLP without BatchNorm/dropout, 2 micro-batches per step: the model, data, fit settings.
    The probe after step 9 comes at step 17 or 25, as the ranks' reduced fit decides (max_probe_interval)."""
    config = QLABConfig(accumulate_batches=DDP_ACCUMULATE, direction="momentum", max_probe_interval=16)
    model = RegressionNet(config, dtype=torch.float64)
    data = regression_data(DDP_RANKS * DDP_BATCH * DDP_ACCUMULATE * DDP_STEPS, dtype=torch.float64, seed=1)
    return model, data, dict(max_steps=DDP_STEPS)


def ddp_batch_norm_run() -> tuple[BatchNormNet, TensorDataset, dict[str, Any]]:
    """Classifier with BatchNorm and dropout, one micro-batch per step.

    Each rank normalises with its own batch statistics and draws its own dropout masks, so the
    ranks' losses differ: only the averaging of the losses keeps their step sizes identical.
    (SyncBatchNorm needs GPUs: DDP refuses it for CPU modules.)
    """
    model = BatchNormNet(QLABConfig(), dropout=0.2, seed=2)
    return model, classification_data(DDP_RANKS * DDP_BATCH * BN_STEPS, seed=3), dict(max_steps=BN_STEPS)


class RankStrideSampler(Sampler[int]):
    """Rank r of R reads samples r, r + R, r + 2R, ... in order (asked of torch.distributed when
    iterated, i.e. after Lightning has launched the ranks). Batch j of all ranks together is then
    the contiguous block j of the data set. Lightning's own DistributedSampler always shuffles
    training data, which would hide that correspondence."""

    def __init__(self, data: TensorDataset) -> None:
        self.length = len(data)

    def __iter__(self):
        rank, ranks = dist.get_rank(), dist.get_world_size()
        return iter(range(rank, self.length, ranks))

    def __len__(self) -> int:
        return self.length // DDP_RANKS


def _ddp_main(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    for name, make in (("plain", ddp_plain_run), ("batch_norm", ddp_batch_norm_run)):
        model, data, fit_settings = make()
        monitor = QLABMonitor(plot_filename=f"{name}.png")  # written by rank 0 into out_dir
        trainer = quiet_trainer(
            devices=DDP_RANKS, strategy="ddp", callbacks=[monitor], use_distributed_sampler=False,
            default_root_dir=out_dir,
            **fit_settings,
        )
        trainer.fit(model, DataLoader(data, batch_size=DDP_BATCH, sampler=RankStrideSampler(data)))
        # After fit the module holds the polynomial-decay average of the iterates (QLABConfig's default).
        parameters = {key: value.detach().clone() for key, value in model.named_parameters()}
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        torch.save(
            {"parameters": parameters, "step_sizes": list(monitor.step_sizes), "global_step": trainer.global_step,
             "averaging": averaging},
            out_dir / f"{name}_rank{trainer.global_rank}.pt",
        )
    leave_process_group()


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
