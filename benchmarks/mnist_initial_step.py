"""Does the initial step matter? One epoch of MNIST with QLAB from initial steps 1e-6 ... 10.

A 3-layer ReLU MLP (784-1000-1000-10 by default) is trained for one epoch with QLAB at its
default settings, from the same initialisation and the same data order, once per initial step.
The safeguarded rule (bounded extrapolation, warm start) should reach the same test accuracy
every time; the script prints a Markdown table.

Run (full data; MNIST/raw/*.gz under --root, e.g. a copy of ../shared/data):

    python benchmarks/mnist_initial_step.py --root /tmp/mnist --threads 2

tests/test_optimizer_mnist.py runs the same code on a subset.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_qlab.optimizer import QLAB

INITIAL_STEPS = (1e-6, 1e-3, 0.1, 1.0, 10.0)


def load_mnist(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST as normalised flat float32 tensors: (train_x, train_y, test_x, test_y).

    ``root`` must hold MNIST/raw/*.gz; torchvision verifies and extracts them offline.
    """
    from torchvision.datasets import MNIST

    def tensors(train: bool) -> tuple[Tensor, Tensor]:
        ds = MNIST(str(root), train=train, download=True)
        x = ds.data.reshape(len(ds.data), -1).float().div_(255.0).sub_(0.1307).div_(0.3081)
        return x, ds.targets.clone()

    return (*tensors(True), *tensors(False))


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


@dataclass
class EpochResult:
    initial_step: float
    test_accuracy: float  # percent
    final_train_loss: float  # mean over the last 10% of the epoch's steps
    all_losses_finite: bool
    warm_start_probes: int
    first_step_size: float
    median_step_size: float
    events: dict
    seconds: float


def train_one_epoch(
    initial_step: float,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    hidden: int = 1000,
    batch_size: int = 128,
    seed: int = 0,
) -> EpochResult:
    """One epoch of QLAB (default settings but ``initial_step``); same init and order per seed."""
    torch.manual_seed(seed)
    model = mlp(hidden)
    opt = QLAB(model.parameters(), initial_step=initial_step)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()
    losses, step_sizes = [], []
    start = time.perf_counter()
    model.train()
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        x, y = train_x[idx], train_y[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss, lambda: loss_fn(model(x), y))
        losses.append(loss.item())
        step_sizes.append(opt.last_step.step_size)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(test_x[i : i + 1000]).argmax(1) == test_y[i : i + 1000]).sum().item()
            for i in range(0, len(test_x), 1000)
        )
    tail = losses[-max(1, len(losses) // 10) :]
    return EpochResult(
        initial_step=initial_step,
        test_accuracy=100.0 * correct / len(test_x),
        final_train_loss=sum(tail) / len(tail),
        all_losses_finite=all(math.isfinite(v) for v in losses),
        warm_start_probes=opt.events["warm_start_probes"],
        first_step_size=step_sizes[0],
        median_step_size=sorted(step_sizes)[len(step_sizes) // 2],
        events={k: v for k, v in opt.events.items() if v},
        seconds=seconds,
    )


def markdown_table(results: list[EpochResult]) -> str:
    lines = [
        "| initial step | test accuracy (%) | train loss (last 10%) | finite | warm-start probes "
        "| first step | median step | events | s |",
        "|---:|---:|---:|:---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        events = ", ".join(f"{k} {v}" for k, v in r.events.items() if k != "warm_start_probes") or "-"
        lines.append(
            f"| {r.initial_step:g} | {r.test_accuracy:.2f} | {r.final_train_loss:.4f} | "
            f"{'yes' if r.all_losses_finite else 'NO'} | {r.warm_start_probes} | {r.first_step_size:.3g} | "
            f"{r.median_step_size:.3g} | {events} | {r.seconds:.0f} |"
        )
    spread = max(r.test_accuracy for r in results) - min(r.test_accuracy for r in results)
    lines.append("")
    lines.append(f"Spread of test accuracy over initial steps: {spread:.2f} percentage points.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder holding MNIST/raw/*.gz")
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None, help="use the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--initial-steps", type=float, nargs="+", default=list(INITIAL_STEPS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_x, train_y, test_x, test_y = load_mnist(args.root)
    if args.train_size:
        train_x, train_y = train_x[: args.train_size], train_y[: args.train_size]
    print(
        f"MNIST: {len(train_x)} train / {len(test_x)} test, MLP 784-{args.hidden}-{args.hidden}-10, "
        f"batch {args.batch_size}, 1 epoch, QLAB defaults, seed {args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    results = []
    for initial_step in args.initial_steps:
        results.append(
            train_one_epoch(
                initial_step, train_x, train_y, test_x, test_y, args.hidden, args.batch_size, args.seed
            )
        )
        print(f"initial_step={initial_step:g}: {results[-1]}", flush=True)
    print()
    print(markdown_table(results))


if __name__ == "__main__":
    main()
