"""What does a QLAB step cost? Time per training step: QLAB vs SGD vs the "floor".

QLAB needs one extra forward pass per step, so its natural floor is an SGD step plus one
no-grad forward on the same batch. This script times, per model:

* ``sgd``:   zero_grad, forward, backward, ``torch.optim.SGD.step``;
* ``floor``: the same, plus one no-grad forward of the loss on the same batch;
* ``adam``: zero_grad, forward, backward, ``torch.optim.Adam.step`` (for time-to-accuracy
  comparisons with Adam), and ``adam_floor``, the same plus one no-grad forward: the floor of a
  method that scales the gradient per coordinate, as QLAB's default ``rmsprop`` direction does;
* ``qlab``:  zero_grad, forward, backward, ``QLAB.step(loss, trial_loss_fn)`` (the default
  direction), and ``qlab_sgd`` with ``direction="sgd"``;
* ``qlab_avg``: ``qlab`` plus the update of the polynomial-decay average of the weights that
  ``QLABMixin`` evaluates by default (``AveragedModel.update_parameters``).

Each variant trains its own copy of the model on the same data. The runs are interleaved
(sgd, floor, qlab, sgd, floor, qlab, ...) so that drifts of the machine hit all three alike;
each timing covers a block of steps, after warm-up; the table reports medians per step.
The target is QLAB within 1.05x of the floor: everything QLAB adds beyond the trial forward
(reading the gradient norm, moving to the trial point and on to the new point) should be noise.

Run:

    python benchmarks/step_cost.py --threads 2
    python benchmarks/step_cost.py --threads 1 --repeats 50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from torch.optim.swa_utils import AveragedModel

import contenders
from lightning_qlab.averaging import polynomial_decay_multi_avg_fn
from lightning_qlab.models import SmallCNN


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def panel_cnn() -> nn.Module:
    """The CIFAR-10 panel's model (configs/cifar10_cnn.yaml): 3 conv blocks with batch norm."""
    return SmallCNN(in_channels=3, image_size=32, channels=[32, 64, 128], hidden_size=256, num_classes=10)


MODELS = {
    "MLP 784-1000-1000-10, batch 128": (mlp, (128, 1, 28, 28)),
    "CNN 2 conv + 2 fc (CIFAR-sized), batch 64": (small_cnn, (64, 3, 32, 32)),
    "SmallCNN of the CIFAR-10 panel, batch 128": (panel_cnn, (128, 3, 32, 32)),
}


def make_steppers(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], None]]:
    """One training-step function per variant, each with its own copy of the model."""
    loss_fn = nn.CrossEntropyLoss()
    steppers = {}

    def torch_stepper(make_optimizer: Callable, extra_forward: bool) -> Callable[[], None]:
        """A plain optimizer's step on its own copy of the model, optionally followed by one
        no-grad forward of the same batch (the trial forward QLAB adds, and its read of the loss)."""
        own_model = copy.deepcopy(model)
        optimizer = make_optimizer(own_model.parameters())

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(own_model(x), y).backward()
            optimizer.step()
            if extra_forward:
                with torch.no_grad():
                    loss_fn(own_model(x), y).item()

        return step

    def qlab_stepper(direction: str, averaged: bool = False) -> Callable[[], None]:
        qlab_model = copy.deepcopy(model)
        qlab = contenders.qlab(direction, initial_step=0.01).build(qlab_model.parameters())
        average = AveragedModel(qlab_model, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)

        def qlab_step() -> None:
            qlab.zero_grad(set_to_none=True)
            loss = loss_fn(qlab_model(x), y)
            loss.backward()
            qlab.step(loss, lambda: loss_fn(qlab_model(x), y))
            if averaged:
                average.update_parameters(qlab_model)

        return qlab_step

    sgd, adam = contenders.sgd(0.01).build, contenders.adam(1e-3).build
    steppers["sgd"] = torch_stepper(sgd, extra_forward=False)
    steppers["floor"] = torch_stepper(sgd, extra_forward=True)
    steppers["adam"] = torch_stepper(adam, extra_forward=False)
    steppers["adam_floor"] = torch_stepper(adam, extra_forward=True)
    steppers["qlab"], steppers["qlab_sgd"] = qlab_stepper("rmsprop"), qlab_stepper("sgd")
    steppers["qlab_avg"] = qlab_stepper("rmsprop", averaged=True)
    return steppers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(steppers: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                  repeats: int, block: int) -> dict[str, list[float]]:
    """Seconds per step of each block of ``block`` steps, interleaving the variants."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / block)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=10, help="steps per variant before timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} blocks of {args.block} steps per variant after {args.warmup} warm-up steps; "
          "medians per step\n")
    rows = []
    for name, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        model = build().to(device)
        x = torch.randn(shape, device=device)
        y = torch.randint(0, 10, (shape[0],), device=device)
        times = time_variants(make_steppers(model, x, y), device, args.warmup, args.repeats, args.block)
        med = {k: statistics.median(v) for k, v in times.items()}
        n_params = sum(p.numel() for p in model.parameters())
        rows.append((name, n_params, med))
    print("| model | params | SGD ms | floor: SGD + forward, ms | Adam ms | Adam + forward, ms | QLAB default (rmsprop) ms "
          "| QLAB default + averaging ms | QLAB sgd ms | QLAB default / floor | QLAB default + averaging / floor "
          "| QLAB sgd / floor | QLAB default / (Adam + forward) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_params, med in rows:
        print(f"| {name} | {n_params / 1e6:.2f} M | {1e3 * med['sgd']:.2f} | {1e3 * med['floor']:.2f} | "
              f"{1e3 * med['adam']:.2f} | {1e3 * med['adam_floor']:.2f} | {1e3 * med['qlab']:.2f} | {1e3 * med['qlab_avg']:.2f} | "
              f"{1e3 * med['qlab_sgd']:.2f} | {med['qlab'] / med['floor']:.3f} | {med['qlab_avg'] / med['floor']:.3f} | "
              f"{med['qlab_sgd'] / med['floor']:.3f} | {med['qlab'] / med['adam_floor']:.3f} |")

if __name__ == "__main__":
    main()
