"""QLAB side by side with tuned and learning-rate-free optimizers, one command per panel.

Every run goes through what users run: the package's CLI (``QLABLightningCLI``) on a config from
``configs/``, with the optimizer switched by the same one-line override a user would write. All
runs of a panel share the model, data, seed, batch size and epoch budget.

    python benchmarks/compare.py mnist-mlp        --shared-data ../shared/data
    python benchmarks/compare.py cifar10-cnn      --shared-data ../shared/data
    python benchmarks/compare.py cifar10-mlp      --shared-data ../shared/data
    python benchmarks/compare.py text-transformer --shared-data ../shared/data
    python benchmarks/compare.py sweep            --shared-data ../shared/data

Every run is tested three ways: as its users run it (the default QLAB evaluates the average of its
iterates, every other optimizer its last iterate, Schedule-Free its own averaged point), at its
last iterate, and at the same polynomial-decay average of its iterates that the default QLAB
uses, so that what averaging buys is credited to no optimizer alone.

Each panel writes ``results.md`` (tables), ``results.json`` (every curve) and PNG plots to
``benchmarks/results/<panel>/`` (``--out`` to change), stamped with the date, the machine and the
command. The learning-rate-free peers come from their PyPI packages (``pip install -e .[bench]``);
a peer that is not installed is listed as such in the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shutil
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import Contender, adam, adamw, floor, installed, peers, qlab, sgd
from lightning_qlab.averaging import polynomial_decay_multi_avg_fn
from lightning_qlab.cli import QLABLightningCLI
from lightning_qlab.optimizer import QLAB

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- contenders
def contenders(panel: str) -> list[Contender]:
    if panel == "sweep":  # the default, and the published rule
        return [qlab(direction, mode, beta0)
                for direction, mode in (("adam", "safeguarded"), ("sgd", "paper"))
                for beta0 in (1e-6, 1e-3, 0.1, 1.0, 10.0)]
    # The default, the other safeguarded directions, and QLABGrad as published.
    runs = [qlab("adam"), qlab("rmsprop"), qlab("sgd"), qlab("sgd", "paper")]
    runs += [sgd(lr) for lr in (0.03, 0.1, 0.3)]
    runs += [sgd(lr, momentum=0.9) for lr in (0.01, 0.03, 0.1)]
    # Adam's default 1e-3 and a factor of about 3 either way: where QLAB's step lands against it.
    runs += [adam(lr) for lr in (3e-4, 1e-3, 3e-3)]
    if PANELS[panel].metric == "loss":
        runs += [adamw(lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]  # 3e-4: the grid brackets its best, 1e-3
    return runs + peers() + [floor()]


@dataclass(frozen=True)
class Panel:
    config: str
    epochs: int
    metric: str  # "acc": accuracy %, higher is better; "loss": cross-entropy in nats, lower is better
    target: float  # the validation metric for the time-to-target column
    data_args: tuple[str, ...] = ()
    data_key: str = "data_dir"  # the datamodule argument that says where the data is

    @property
    def better(self) -> int:
        """+1 when a higher metric is better, -1 when lower is."""
        return 1 if self.metric == "acc" else -1

    def reached(self, value: float) -> bool:
        return value >= self.target if self.metric == "acc" else value <= self.target


PANELS = {
    "mnist-mlp": Panel("configs/mnist_mlp.yaml", 3, "acc", 97.0),
    "cifar10-cnn": Panel("configs/cifar10_cnn.yaml", 5, "acc", 60.0, ("--data.init_args.layout", "image_folder")),
    "cifar10-mlp": Panel("configs/cifar10_mlp.yaml", 5, "acc", 40.0, ("--data.init_args.layout", "image_folder")),
    "text-transformer": Panel("configs/text_transformer.yaml", 2, "loss", 2.0, data_key="path"),
    "sweep": Panel("configs/mnist_mlp.yaml", 3, "acc", 97.0),
    # The GPU panel (benchmarks/gpu.sh): ResNet-18 on CIFAR-10, a budget that fits 8 minutes on one H200.
    "cifar10-resnet18": Panel("configs/cifar10_resnet18.yaml", 2, "acc", 50.0, ("--data.init_args.layout", "image_folder")),
}


# --------------------------------------------------------------------------- measuring
class RunRecorder(Callback):
    """Training loss and time per step, validation accuracy against steps and training time.

    Training time counts every batch (data loading included) and leaves validation out, and what
    follows it up to the next batch (the checkpoint it triggers, swapping averaged weights back),
    so "time to target" compares optimizers, not evaluation.
    """

    def __init__(self, metric: str = "acc") -> None:
        self.metric = metric
        self.steps: list[int] = []
        self.train_time: list[float] = []
        self.train_loss: list[float] = []
        self.step_size: list[float] = []
        self.step_seconds: list[float] = []
        self.val: list[dict[str, float]] = []
        self._clock = 0.0
        self._last: Optional[float] = None
        self._batch_start = 0.0

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._batch_start)
        self._clock += now - (self._last if self._last is not None else self._batch_start)
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(trainer.global_step)
        self.train_time.append(self._clock)
        self.train_loss.append(float(loss))
        if not math.isfinite(self.train_loss[-1]):
            # Nothing trains after a non-finite loss: stop, and the status column says why.
            trainer.should_stop = True
        optimizer = trainer.optimizers[0]
        self.step_size.append(float(optimizer.param_groups[0]["lr"]) if isinstance(optimizer, QLAB) else math.nan)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(f"val_{self.metric}")
        if value is not None:
            value = 100 * float(value) if self.metric == "acc" else float(value)
            self.val.append({"step": trainer.global_step, "time": self._clock, self.metric: value})
        # Callbacks after this one save checkpoints and swap weights on validation end: the clock
        # restarts with the next batch, which drops that batch's loading alike for every optimizer.
        self._last = None


class ScheduleFreeModes(Callback):
    """Schedule-Free optimizers evaluate at a different point than they train at: they must be
    switched with ``optimizer.train()`` / ``optimizer.eval()`` around training and evaluation."""

    def _switch(self, trainer: Trainer, mode: str) -> None:
        for optimizer in trainer.optimizers:
            if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
                getattr(optimizer, mode)()

    # Switching to a mode it is already in is a no-op for these optimizers, so the training
    # mode is asserted before every batch: validation can interrupt an epoch anywhere.
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._switch(trainer, "train")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch(trainer, "eval")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch(trainer, "eval")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch(trainer, "eval")


class ExtraForward(Callback):
    """The floor's extra cost: one no-grad forward of the training batch after each SGD step."""

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        with torch.no_grad():
            pl_module.qlab_loss(batch)


class IterateAverage(Callback):
    """The polynomial-decay average of the iterates that the default QLAB evaluates, kept beside
    any optimizer's run without touching it, and the last iterate when training ends."""

    def __init__(self) -> None:
        self.average: Optional[AveragedModel] = None
        self.last: Optional[dict[str, Tensor]] = None
        self._steps = 0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.average = AveragedModel(pl_module, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > self._steps:  # once per optimizer step, as the mixin's average
            self._steps = trainer.global_step
            self.average.update_parameters(pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before the mixin's own averaging callback swaps its average in (model callbacks
        # come after the Trainer's), so this is the last iterate.
        self.last = {name: value.clone() for name, value in pl_module.state_dict().items()}


@dataclass
class RunResult:
    contender: Contender
    status: str = "ok"
    test: float = math.nan  # the panel's metric, as the contender's users run it
    test_last: float = math.nan  # at the last iterate
    test_average: float = math.nan  # at the polynomial-decay average of the iterates
    final_train_loss: float = math.nan
    time_to_target: float = math.nan
    seconds_per_step: float = math.nan
    train_seconds: float = math.nan
    curves: dict[str, Any] = field(default_factory=dict)


def build_cli(contender: Contender, panel: Panel, args: argparse.Namespace, data_dir: Path, workdir: Path,
              callbacks: list[Callback]) -> QLABLightningCLI:
    """The package's CLI on the panel's config with the contender's override, built but not run.

    ``args`` holds this script's options (seed, num_workers, epochs, val_check_interval,
    limit_train_batches) and ``cli_args``, the arguments after ``--``."""
    cli_args = [
        "--config", str(REPO / panel.config),
        "--seed_everything", str(args.seed),
        f"--data.init_args.{panel.data_key}", str(data_dir),
        "--data.init_args.num_workers", str(args.num_workers),
        "--trainer.max_epochs", str(args.epochs or panel.epochs),
        "--trainer.default_root_dir", str(workdir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", str(args.val_check_interval),
        *panel.data_args,
        *contender.cli_overrides(),
        *args.cli_args,
    ]
    if args.limit_train_batches is not None:
        cli_args += ["--trainer.limit_train_batches", str(args.limit_train_batches),
                     "--trainer.limit_val_batches", str(args.limit_train_batches),
                     "--trainer.limit_test_batches", str(args.limit_train_batches)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # this script's own flags are not the CLI's
    try:
        cli = QLABLightningCLI(args=cli_args, run=False, trainer_defaults={"callbacks": callbacks})
    finally:
        sys.argv = argv
    return cli


def run_one(contender: Contender, panel: Panel, args: argparse.Namespace, data_dir: Path, workdir: Path) -> RunResult:
    result = RunResult(contender)
    if not installed(contender):
        result.status = f"not installed (pip install {contender.requires})"
        return result
    recorder = RunRecorder(panel.metric)
    iterates = IterateAverage()
    callbacks: list[Callback] = [recorder, iterates, ScheduleFreeModes()]
    if contender.extra_forward:
        # Before the recorder, whose on_train_batch_end stops the step's clock.
        callbacks.insert(0, ExtraForward())
    cli = build_cli(contender, panel, args, data_dir, workdir, callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    result.test = test_metric(cli, panel)
    schedule_free = any(hasattr(o, "train") and hasattr(o, "eval") for o in cli.trainer.optimizers)
    if not schedule_free:  # Schedule-Free evaluates a point of its own, neither of these
        held = {name: value.clone() for name, value in cli.model.state_dict().items()}
        for weights, field_name in ((iterates.last, "test_last"), (iterates.average.module.state_dict(), "test_average")):
            cli.model.load_state_dict(weights)
            setattr(result, field_name, test_metric(cli, panel))
        cli.model.load_state_dict(held)
    tail = recorder.train_loss[-50:]
    result.final_train_loss = sum(tail) / len(tail) if tail else math.nan
    result.status = training_status(recorder.train_loss)
    reached = [v["time"] for v in recorder.val if panel.reached(v[panel.metric])]
    result.time_to_target = reached[0] if reached else math.nan
    # The first steps include warm-up (allocations, QLAB's first-step probes): leave out 10%.
    timed = recorder.step_seconds[len(recorder.step_seconds) // 10:]
    result.seconds_per_step = statistics.median(timed) if timed else math.nan
    result.train_seconds = recorder.train_time[-1] if recorder.train_time else math.nan
    result.curves = {"step": recorder.steps, "time": recorder.train_time, "train_loss": recorder.train_loss,
                     "step_size": recorder.step_size, "val": recorder.val}
    return result


def test_metric(cli: QLABLightningCLI, panel: Panel) -> float:
    """The test metric of what the module holds now (accuracy in %, or loss in nats)."""
    value = float(cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0][f"test_{panel.metric}"])
    return 100 * value if panel.metric == "acc" else value


def training_status(train_loss: list[float]) -> str:
    """"ok", or why the run cannot count as training: a non-finite loss, or a final loss (mean of
    the last 50 steps) no lower than that of the first 50 steps."""
    if not all(math.isfinite(x) for x in train_loss):
        return "non-finite loss"
    head, tail = train_loss[:50], train_loss[-50:]
    if len(train_loss) > 100 and sum(tail) / len(tail) >= sum(head) / len(head):
        return "diverged: final loss above the first steps'"
    return "ok"


def load_results(out: Path, panel: str) -> list[RunResult]:
    """The results of an earlier run of the panel, from its results.json, statuses re-derived."""
    by_name = {c.name: c for c in contenders(panel)}
    results = []
    for row in json.loads((out / "results.json").read_text()):
        # A contender the panel no longer lists (an older results.json) is still reported.
        contender = by_name.get(row["name"]) or Contender(row["name"], row["family"])
        # Tables written before the last/averaged columns existed hold "test_acc" only.
        result = RunResult(contender, row["status"], row.get("test", row.get("test_acc", math.nan)),
                           row.get("test_last", math.nan), row.get("test_average", math.nan),
                           row["final_train_loss"], row["time_to_target"], row["seconds_per_step"],
                           row["train_seconds"], row["curves"])
        if row["curves"]:
            result.status = training_status(row["curves"]["train_loss"])
        results.append(result)
    return results


def merge_results(folders: list[Path], panel: str) -> list[RunResult]:
    """The results of a panel run in parts, one per contender, in the panel's order.

    A contender found in two folders is an error: which run to report is the caller's decision.
    """
    found: dict[str, RunResult] = {}
    for folder in folders:
        if not (folder / "results.json").is_file():
            raise SystemExit(f"compare.py: {folder} has no results.json (is that run still going?)")
        for result in load_results(folder, panel):
            name = result.contender.name
            if name in found:
                raise SystemExit(f"compare.py: {name!r} is in more than one --merge folder; keep one")
            found[name] = result
    order = {c.name: i for i, c in enumerate(contenders(panel))}
    return sorted(found.values(), key=lambda r: order.get(r.contender.name, len(order)))


# --------------------------------------------------------------------------- data
def prepare_data(panel: str, args: argparse.Namespace) -> Path:
    """The data folder (or text file) for the panel: --data-dir as given, or laid out from
    --shared-data."""
    if args.data_dir:
        return Path(args.data_dir)
    if not args.shared_data:
        sys.exit("compare.py: give --data-dir (the data set's folder) or --shared-data (the offline copy)")
    shared = Path(args.shared_data)
    cache = Path(args.cache_dir)
    if PANELS[panel].data_key == "path":
        return shared / "text" / "fortunes.txt.gz"  # read in place
    if "mnist" in PANELS[panel].config:
        target = cache / "mnist"
        if not (target / "MNIST" / "raw").is_dir():
            shutil.copytree(shared / "MNIST" / "raw", target / "MNIST" / "raw")
        return target
    target = cache / "cifar10-jpeg"
    if not (target / "train").is_dir():
        with zipfile.ZipFile(shared / "cifar10-jpeg.zip") as archive:
            archive.extractall(cache)
    return target


# --------------------------------------------------------------------------- reporting
def _fmt(value: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(value) else f"{value:.{digits}f}"


def _ratio(value: float, reference: float) -> str:
    return "—" if not (math.isfinite(value) and math.isfinite(reference) and reference) else f"{value / reference:.2f}"


def report(panel: str, results: list[RunResult], args: argparse.Namespace, out: Path,
           command: Optional[str] = None) -> str:
    qlab_row = next((r for r in results if r.contender.family == "QLAB" and r.status == "ok"), None)
    floor_row = next((r for r in results if r.contender.family == "floor" and r.status == "ok"), None)
    spec = PANELS[panel]
    name = "acc %" if spec.metric == "acc" else "loss (nats)"
    digits = 2 if spec.metric == "acc" else 4
    reached = f">= {spec.target}%" if spec.metric == "acc" else f"<= {spec.target} nats"
    lines = [
        f"# {panel}: {args.epochs or spec.epochs} epochs, config {spec.config}, seed {args.seed}",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"- command: `{command or 'python ' + ' '.join(sys.argv)}`",
        "- test: as the optimizer's users run it (QLAB with averaging: the average of its iterates; "
        "Schedule-Free: its own averaged point; every other optimizer: its last iterate); last and "
        "averaged: the same run at its last iterate and at the polynomial-decay average (eta = 8) "
        "of its iterates",
        f"- time to target: training time until the validation {spec.metric} first is {reached} "
        "(validation time excluded); differences and ratios are to the first QLAB row"
        + ("; step-time ratios also to the floor (SGD step + one no-grad forward)" if floor_row else ""),
        "",
        f"| optimizer | family | test {name} | last | averaged | final train loss | time to target s | s/step | "
        f"test - QLAB | time-to-target / QLAB | s/step / QLAB | s/step / floor | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.contender.name} | {r.contender.family} | {_fmt(r.test, digits)} | {_fmt(r.test_last, digits)} | "
            f"{_fmt(r.test_average, digits)} | {_fmt(r.final_train_loss, 4)} | "
            f"{_fmt(r.time_to_target, 1)} | {_fmt(r.seconds_per_step, 4)} | "
            f"{_fmt(r.test - qlab_row.test, digits) if qlab_row else '—'} | "
            f"{_ratio(r.time_to_target, qlab_row.time_to_target) if qlab_row else '—'} | "
            f"{_ratio(r.seconds_per_step, qlab_row.seconds_per_step) if qlab_row else '—'} | "
            f"{_ratio(r.seconds_per_step, floor_row.seconds_per_step) if floor_row else '—'} | {r.status} |"
        )
    for family in ("SGD grid", "Momentum grid", "AdamW grid"):
        members = [r for r in results if r.contender.family == family and math.isfinite(r.test)]
        if members:
            values = [r.test for r in members]
            best = max(members, key=lambda r: spec.better * r.test)
            lines.append(f"\n{family}: best {best.contender.name} at {best.test:.{digits}f}, "
                         f"spread {min(values):.{digits}f} ... {max(values):.{digits}f}")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        [{"name": r.contender.name, "family": r.contender.family, "status": r.status, "test": r.test,
          "test_last": r.test_last, "test_average": r.test_average,
          "final_train_loss": r.final_train_loss, "time_to_target": r.time_to_target,
          "seconds_per_step": r.seconds_per_step, "train_seconds": r.train_seconds, "curves": r.curves}
         for r in results], indent=1))
    plot(results, out, spec.metric)
    return text


def plot(results: list[RunResult], out: Path, metric: str = "acc") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare.py: matplotlib is not installed, no plots (pip install matplotlib)", file=sys.stderr)
        return
    ran = [r for r in results if r.curves]
    label = "accuracy %" if metric == "acc" else "loss (nats)"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for r in ran:
        c = r.curves
        style = "-" if r.contender.family == "QLAB" else "--"
        axes[0, 0].plot(c["step"], _smooth(c["train_loss"]), style, label=r.contender.name, lw=1)
        axes[0, 1].plot(c["time"], _smooth(c["train_loss"]), style, lw=1)
        axes[1, 0].plot([v["step"] for v in c["val"]], [v[metric] for v in c["val"]], style + "o", ms=3, lw=1)
        axes[1, 1].plot([v["time"] for v in c["val"]], [v[metric] for v in c["val"]], style + "o", ms=3, lw=1)
    for ax, (x, y) in zip(axes.flat, [("step", "training loss (smoothed)"), ("training time s", "training loss (smoothed)"),
                                      ("step", f"validation {label}"), ("training time s", f"validation {label}")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    # Diverged runs would stretch the axis to 1e20 and flatten every other curve: cap it at a few
    # times the largest starting loss (those runs are marked in the table's status column).
    starts = [r.curves["train_loss"][0] for r in ran if r.curves["train_loss"] and math.isfinite(r.curves["train_loss"][0])]
    for ax in (axes[0, 0], axes[0, 1]):
        ax.set_yscale("log")
        if starts:
            ax.set_ylim(top=3 * max(starts))
    fig.legend(loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in ran:
        if r.contender.family == "QLAB":
            ax.plot(r.curves["step"], r.curves["step_size"], lw=0.8, label=r.contender.name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("QLAB step size (param_group lr)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "step_size.png", dpi=90)
    plt.close(fig)


def _smooth(values: list[float], window: int = 25) -> list[float]:
    smoothed, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        smoothed.append(total / min(i + 1, window))
    return smoothed


# --------------------------------------------------------------------------- main
def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options that build_cli and prepare_data read: where the data is, the budget, the seed."""
    parser.add_argument("--data-dir", help="the data set's folder (MNIST root or the CIFAR-10 ImageFolder root), "
                                           "or the text file of the text panel")
    parser.add_argument("--shared-data", help="the offline copy (MNIST/raw, cifar10-jpeg.zip, text/) to lay out "
                                              "in --cache-dir")
    parser.add_argument("--cache-dir", default="/tmp/lightning-qlab-data")
    parser.add_argument("--epochs", type=int, help="override the panel's epoch budget")
    parser.add_argument("--limit-train-batches", type=int, help="smoke runs: batches per epoch (and val/test)")
    parser.add_argument("--val-check-interval", type=float, default=0.25, help="fraction of an epoch between validations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    parser.add_argument("--num-workers", type=int, default=0)


def main(argv: Optional[list[str]] = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("panel", choices=sorted(PANELS))
    parser.add_argument("--out", help="output folder (default benchmarks/results/<panel>)")
    parser.add_argument("--only", help="comma-separated substrings: run only contenders whose name contains one")
    add_run_options(parser)
    parser.add_argument("--report-only", metavar="COMMAND",
                        help="rebuild the tables and plots from --out's results.json; COMMAND is the "
                             "command that produced it, for the report")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=[],
                        help="with --report-only: build --out's report from these folders' results.json "
                             "(a panel run in parts, e.g. with --only), in the panel's contender order")
    parser.epilog = "Arguments after -- go to the CLI unchanged, e.g. -- --trainer.accelerator gpu"
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.cli_args = argv[split + 1:]
    torch.set_num_threads(args.threads)
    if args.report_only:
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / args.panel
        if args.merge:
            out.mkdir(parents=True, exist_ok=True)
            results = merge_results([Path(d) for d in args.merge], args.panel)
        else:
            results = load_results(out, args.panel)
        print(report(args.panel, results, args, out, command=args.report_only))
        return results

    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / args.panel
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.panel, args)
    selected = contenders(args.panel)
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        selected = [c for c in selected if any(k in c.name.lower() for k in keys)]
        if not selected:
            parser.error(f"--only {args.only!r} matches no contender")
    results = []
    for contender in selected:
        print(f"== {args.panel}: {contender.name}", flush=True)
        result = run_one(contender, PANELS[args.panel], args, data_dir, out / "raw" / contender.name.replace(" ", "_"))
        print(f"   {result.status}: test {PANELS[args.panel].metric} {_fmt(result.test, 4)} (last "
              f"{_fmt(result.test_last, 4)}, averaged {_fmt(result.test_average, 4)}), "
              f"{_fmt(result.seconds_per_step, 4)} s/step", flush=True)
        results.append(result)
        report(args.panel, results, args, out)  # after every run, so a long panel leaves partial tables
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
