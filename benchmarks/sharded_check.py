"""QLAB under each strategy on the GPUs of this machine: the same model, data and steps, bf16-mixed.

    python benchmarks/sharded_check.py --strategy fsdp2     # one of: single, ddp, fsdp2
    python benchmarks/sharded_check.py --strategy fsdp2 --cpu --steps 60   # 2 CPU processes, float32

Trains an MLP classifier (784-1024-1024-10, the package's ImageClassifier with the default QLAB
and averaging) for --steps steps on generated data (no download: class centres plus noise), on
every GPU (one GPU for ``single``), and prints one JSON line: the strategy, the processes, the
mean training loss of the last 50 steps, the milliseconds per step after the first 20, QLAB's
held step and its events. benchmarks/gpu_sharded.sh runs all three and compares them.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_qlab.models import ImageClassifier, MultiLayerPerceptron
from lightning_qlab.strategies import FSDP2Strategy

# FSDP1 (strategy="fsdp") is refused by QLABMixin: Lightning cannot run its manual backward there.
STRATEGIES = {"single": lambda: "auto", "ddp": lambda: "ddp", "fsdp2": FSDP2Strategy}


def data(samples: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centres = 0.2 * torch.randn(10, 784, generator=generator)  # classes overlap: the loss stays well above 0
    labels = torch.randint(0, 10, (samples,), generator=generator)
    return TensorDataset(centres[labels] + 2.0 * torch.randn(samples, 784, generator=generator), labels)


class Record(Callback):
    """Training losses and step times, kept on every process."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256, help="per process (single: times the processes)")
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes in float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ImageClassifier(MultiLayerPerceptron(784, (1024, 1024), 10), num_classes=10)
    record = Record()
    devices = 1 if args.strategy == "single" else 2 if args.cpu else -1
    trainer = Trainer(accelerator="cpu" if args.cpu else "gpu", devices=devices, strategy=STRATEGIES[args.strategy](),
                      precision="32-true" if args.cpu else "bf16-mixed", max_steps=args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[record], limit_val_batches=0)
    processes = 2 if args.cpu else torch.cuda.device_count()
    # The same global batch for every strategy: one process reads all of it.
    per_process = args.batch_size * processes if args.strategy == "single" else args.batch_size
    # Every strategy reads the same samples per step: Lightning gives the parallel strategies a
    # DistributedSampler that shuffles (seed 0), and one over a single replica, given to the single
    # device, draws the same permutation, so its batch k is the union of the processes' batches k.
    samples = data(args.batch_size * processes * args.steps)
    sampler = None  # the parallel strategies: Lightning's
    if args.strategy == "single":
        sampler = DistributedSampler(samples, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer.fit(model, DataLoader(samples, batch_size=per_process, sampler=sampler))
    optimizer = trainer.optimizers[0]
    step_ms = 1000 * (record.times[-1] - record.times[19]) / (len(record.times) - 20)
    result = {"strategy": args.strategy, "processes": trainer.world_size, "steps": trainer.global_step,
              "loss_last_50": sum(record.losses[-50:]) / 50, "step_ms": round(step_ms, 2),
              "held_step": optimizer.trial_distance,
              "events": {name: count for name, count in optimizer.events.items() if count}}
    if trainer.global_rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
