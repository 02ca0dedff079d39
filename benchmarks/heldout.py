"""Held-out check of QLAB's default: tasks its defaults were not chosen on, none of them images.

The default (direction, constants) was chosen on the MNIST and CIFAR-10 panels of ``compare.py``.
This script asks whether it carries over to problems of another kind, with the same contenders
as those panels, the same seeds, data and budget for all, in a plain PyTorch loop (QLAB needs no
Lightning: ``opt.step(loss, trial_loss_fn)``):

* ``teacher-regression``: tabular regression. Inputs ``x ~ N(0, I_32)``, targets from a fixed
  random "teacher" network (32-64-64-1, tanh) plus noise of standard deviation 0.1; the student
  is a 32-128-128-1 ReLU MLP trained on the mean squared error.
* ``adding-problem``: a recurrent sequence task (Hochreiter & Schmidhuber, 1997). Each sequence
  has 30 steps of (value ~ U(0, 1), marker); two steps are marked and the target is the sum of
  their values. A GRU with 64 units reads the sequence and a linear layer predicts the sum.
  Predicting the mean gives an MSE of about 0.167; solving the task takes it towards 0.

Both data sets are generated from a fixed seed (20,000 training and 5,000 test examples). The
table reports, after the budget, the test MSE (lower is better) of the last iterate and of the
polynomial-decay average of the iterates (``DEFAULT_ETA``, what ``QLABMixin`` evaluates by default; the
same average for every optimizer but Schedule-Free, which averages by design), both as ratios to
the default QLAB (adam, averaged), and the median time per step. Run:

    python benchmarks/heldout.py --threads 1

It writes ``benchmarks/results/heldout/results.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import Contender, adam, peers, qlab, sgd  # noqa: E402
from lightning_qlab.averaging import DEFAULT_ETA, polynomial_decay_multi_avg_fn  # noqa: E402
from lightning_qlab.optimizer import QLAB  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "QLAB adam safeguarded"  # QLAB() with no arguments; its average is the default's figure


# --------------------------------------------------------------------------- tasks
class Task:
    """Generated training and test data, and the model to train on them."""

    name = ""
    epochs = 5
    batch_size = 64

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_train, self.y_train = self.generate(20_000, gen)
        self.x_test, self.y_test = self.generate(5_000, gen)

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError


class TeacherRegression(Task):
    name = "teacher-regression"

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "teacher"):
            self.teacher = [torch.randn(32, 64, generator=gen) / 32**0.5, torch.randn(64, 64, generator=gen) / 8,
                            torch.randn(64, 1, generator=gen) / 8]
        x = torch.randn(n, 32, generator=gen)
        h = torch.tanh(torch.tanh(x @ self.teacher[0]) @ self.teacher[1])
        y = 3.0 * h @ self.teacher[2] + 0.1 * torch.randn(n, 1, generator=gen)
        return x, y

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))


class _GRURegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 64, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class AddingProblem(Task):
    name = "adding-problem"
    length = 30

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        values = torch.rand(n, self.length, generator=gen)
        first = torch.randint(0, self.length // 2, (n,), generator=gen)
        second = torch.randint(self.length // 2, self.length, (n,), generator=gen)
        markers = torch.zeros(n, self.length)
        markers[torch.arange(n), first] = 1.0
        markers[torch.arange(n), second] = 1.0
        y = (values * markers).sum(1, keepdim=True)
        return torch.stack([values, markers], dim=2), y

    def model(self) -> nn.Module:
        return _GRURegressor()


TASKS = {task.name: task for task in (TeacherRegression, AddingProblem)}


# --------------------------------------------------------------------------- contenders
def contenders() -> list[Contender]:
    return [qlab("adam"), qlab("rmsprop"), qlab("sgd"), qlab("sgd", "paper"), sgd(0.01), sgd(0.1), sgd(0.01, momentum=0.9),
            adam(1e-3), *peers()]


# --------------------------------------------------------------------------- training
def train(task: Task, contender: Contender, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = task.model()
    optimizer = contender.build(model.parameters())
    if optimizer is None:
        return {"status": "not installed"}
    mse = nn.MSELoss()
    schedule_free = hasattr(optimizer, "train") and hasattr(optimizer, "eval")
    average = None if schedule_free else AveragedModel(model, multi_avg_fn=polynomial_decay_multi_avg_fn())
    order = torch.Generator().manual_seed(seed)
    step_seconds: list[float] = []
    status = "ok"
    for _ in range(task.epochs):
        if schedule_free:
            optimizer.train()
        model.train()
        perm = torch.randperm(len(task.x_train), generator=order)
        for start in range(0, len(perm) - task.batch_size + 1, task.batch_size):
            idx = perm[start:start + task.batch_size]
            x, y = task.x_train[idx], task.y_train[idx]
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = mse(model(x), y)
            loss.backward()
            if isinstance(optimizer, QLAB):
                optimizer.step(loss, lambda: mse(model(x), y))
            else:
                optimizer.step()
            step_seconds.append(time.perf_counter() - began)
            if average is not None:  # outside the timed step: the same cost for every optimizer
                average.update_parameters(model)
            if not math.isfinite(loss.item()):
                status = "non-finite loss"
                break
        if status != "ok":
            break
    if schedule_free:
        optimizer.eval()
    model.eval()
    with torch.no_grad():
        test_mse = mse(model(task.x_test), task.y_test).item()
        average_mse = mse(average.module(task.x_test), task.y_test).item() if average is not None else math.nan
    timed = step_seconds[len(step_seconds) // 10:]
    return {"status": status, "test_mse": test_mse, "average_mse": average_mse,
            "s_per_step": statistics.median(timed)}


def _mse(value: float) -> str:
    """Four significant digits: the adding problem's solved runs end near 1e-4."""
    return f"{value:.4g}" if math.isfinite(value) else "—"


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from: " + ", ".join(TASKS))
    parser.add_argument("--only", help="comma-separated substrings of contender names")
    parser.add_argument("--epochs", type=int, help="override each task's epoch budget (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heldout"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    chosen = contenders()
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        chosen = [c for c in chosen if any(k in c.name.lower() for k in keys)]
    lines = [
        "# Held-out tasks: the default QLAB beside the other optimizers",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; seed {args.seed}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}`",
        "- test MSE after the budget (lower is better), of the last iterate and of the polynomial-decay "
        f"average (eta = {DEFAULT_ETA:g}); ratios are to the average of "
        f"{DEFAULT}, which is what the default QLAB (QLABMixin) evaluates",
    ]
    for name in names:
        task = TASKS[name](args.seed)
        if args.epochs:
            task.epochs = args.epochs
        lines += ["", f"## {name}: {task.epochs} epochs, batch {task.batch_size}", "",
                  "| optimizer | test MSE, last iterate | test MSE, average | last / default QLAB "
                  "| average / default QLAB | s/step | status |",
                  "|---|---|---|---|---|---|---|"]
        reference = None
        for contender in chosen:
            label = contender.name
            print(f"== {name}: {label}", flush=True)
            result = train(task, contender, args.seed)
            last, averaged = result.get("test_mse", math.nan), result.get("average_mse", math.nan)
            if reference is None and label == DEFAULT:
                reference = averaged
            ratios = [f"{value / reference:.2f}" if reference and math.isfinite(value) else "—"
                      for value in (last, averaged)]
            seconds = result.get("s_per_step", math.nan)
            lines.append(f"| {label} | {_mse(last)} | {_mse(averaged)} | {ratios[0]} | {ratios[1]} | "
                         f"{seconds * 1e3:.2f} ms | {result['status']} |")
            print("   " + lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
