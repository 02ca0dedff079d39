"""QLAB side by side with tuned and learning-rate-free optimizers, one command per panel.

Every run goes through what users run: the package's CLI (``QLABLightningCLI``) on a config from
``configs/``, with the optimizer switched by the same one-line override a user would write. All
runs of a panel share the model, data, seed, batch size and epoch budget.

    python benchmarks/compare.py mnist-mlp   --shared-data ../shared/data
    python benchmarks/compare.py cifar10-cnn --shared-data ../shared/data
    python benchmarks/compare.py sweep       --shared-data ../shared/data

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
from typing_extensions import override

from lightning_qlab.cli import QLABLightningCLI
from lightning_qlab.optimizer import QLAB

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """One optimizer setting: how it is selected in the config, and the family it belongs to."""

    name: str
    family: str  # "QLAB", "SGD grid", "Momentum grid", "Adam", "LR-free", "floor"
    overrides: tuple[str, ...]  # CLI arguments that select it
    requires: Optional[str] = None  # the module a peer needs
    extra_forward: bool = False  # the floor: an SGD step plus one no-grad forward


def qlab_contender(direction: str, mode: str, initial_step: Optional[float] = None) -> Contender:
    settings: dict[str, Any] = {"direction": direction, "mode": mode}
    if mode == "paper":  # the rule as published evaluates its last iterate
        settings["weight_averaging"] = False
    if initial_step is not None:
        settings["initial_step"] = initial_step
    suffix = "" if initial_step is None else f" beta0={initial_step:g}"
    return Contender(f"QLAB {direction} {mode}{suffix}", "QLAB",
                     ("--model.init_args.qlab_config", json.dumps(settings)))


def torch_contender(name: str, family: str, class_path: str, requires: Optional[str] = None,
                    **init_args: Any) -> Contender:
    spec = {"class_path": class_path, "init_args": init_args}
    return Contender(name, family, ("--model.init_args.optimizer", json.dumps(spec)), requires)


def contenders(panel: str) -> list[Contender]:
    if panel == "sweep":  # the default direction, the published one, and the published rule
        return [qlab_contender(direction, mode, beta0)
                for direction, mode in (("rmsprop", "safeguarded"), ("sgd", "safeguarded"), ("sgd", "paper"))
                for beta0 in (1e-6, 1e-3, 0.1, 1.0, 10.0)]
    runs = [qlab_contender(direction, mode) for direction in ("rmsprop", "sgd", "momentum", "adam")
            for mode in ("safeguarded", "paper")]
    runs += [torch_contender(f"SGD lr={lr:g}", "SGD grid", "torch.optim.SGD", lr=lr) for lr in (0.03, 0.1, 0.3)]
    runs += [torch_contender(f"SGD momentum 0.9 lr={lr:g}", "Momentum grid", "torch.optim.SGD", lr=lr, momentum=0.9)
             for lr in (0.01, 0.03, 0.1)]
    runs += [torch_contender("Adam lr=1e-3", "Adam", "torch.optim.Adam", lr=1e-3)]
    runs += [
        torch_contender("D-Adaptation SGD", "LR-free", "dadaptation.DAdaptSGD", "dadaptation", lr=1.0),
        torch_contender("Prodigy", "LR-free", "prodigyopt.Prodigy", "prodigyopt", lr=1.0),
        torch_contender("Schedule-Free AdamW", "LR-free", "schedulefree.AdamWScheduleFree", "schedulefree", lr=0.0025),
        torch_contender("DoG", "LR-free", "dog.DoG", "dog", lr=1.0),
    ]
    floor = torch_contender("floor: SGD + 1 no-grad forward", "floor", "torch.optim.SGD", lr=0.1)
    runs.append(Contender(floor.name, floor.family, floor.overrides, extra_forward=True))
    return runs


@dataclass(frozen=True)
class Panel:
    config: str
    epochs: int
    target_accuracy: float  # validation accuracy (%) for the time-to-target column
    data_args: tuple[str, ...] = ()


PANELS = {
    "mnist-mlp": Panel("configs/mnist_mlp.yaml", 3, 97.0),
    "cifar10-cnn": Panel("configs/cifar10_cnn.yaml", 5, 60.0, ("--data.init_args.layout", "image_folder")),
    "sweep": Panel("configs/mnist_mlp.yaml", 3, 97.0),
    # The GPU panel (benchmarks/gpu.sh): ResNet-18 on CIFAR-10, a budget that fits 8 minutes on one H200.
    "cifar10-resnet18": Panel("configs/cifar10_resnet18.yaml", 2, 50.0, ("--data.init_args.layout", "image_folder")),
}


# --------------------------------------------------------------------------- measuring
class RunRecorder(Callback):
    """Training loss and time per step, validation accuracy against steps and training time.

    Training time counts every batch (data loading included) and leaves validation out, so
    "time to target" compares optimizers, not evaluation.
    """

    def __init__(self) -> None:
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
        accuracy = trainer.callback_metrics.get("val_acc")
        if accuracy is not None:
            self.val.append({"step": trainer.global_step, "time": self._clock, "acc": 100 * float(accuracy)})
        self._last = time.perf_counter()  # validation time is not training time


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


@dataclass
class RunResult:
    contender: Contender
    status: str = "ok"
    test_acc: float = math.nan
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
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.num_workers", str(args.num_workers),
        "--trainer.max_epochs", str(args.epochs or panel.epochs),
        "--trainer.default_root_dir", str(workdir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", str(args.val_check_interval),
        *panel.data_args,
        *contender.overrides,
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
    if contender.requires and not _importable(contender.requires):
        result.status = f"not installed (pip install {contender.requires})"
        return result
    recorder = RunRecorder()
    callbacks: list[Callback] = [recorder, ScheduleFreeModes()]
    if contender.extra_forward:
        # Before the recorder, whose on_train_batch_end stops the step's clock.
        callbacks.insert(0, ExtraForward())
    cli = build_cli(contender, panel, args, data_dir, workdir, callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    tested = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    result.test_acc = 100 * float(tested[0]["test_acc"])
    tail = recorder.train_loss[-50:]
    result.final_train_loss = sum(tail) / len(tail) if tail else math.nan
    result.status = training_status(recorder.train_loss)
    reached = [v["time"] for v in recorder.val if v["acc"] >= panel.target_accuracy]
    result.time_to_target = reached[0] if reached else math.nan
    # The first steps include warm-up (allocations, QLAB's first-step probes): leave out 10%.
    timed = recorder.step_seconds[len(recorder.step_seconds) // 10:]
    result.seconds_per_step = statistics.median(timed) if timed else math.nan
    result.train_seconds = recorder.train_time[-1] if recorder.train_time else math.nan
    result.curves = {"step": recorder.steps, "time": recorder.train_time, "train_loss": recorder.train_loss,
                     "step_size": recorder.step_size, "val": recorder.val}
    return result


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
        contender = by_name.get(row["name"]) or Contender(row["name"], row["family"], ())
        result = RunResult(contender, row["status"], row["test_acc"], row["final_train_loss"],
                           row["time_to_target"], row["seconds_per_step"], row["train_seconds"], row["curves"])
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


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- data
def prepare_data(panel: str, args: argparse.Namespace) -> Path:
    """The data folder for the panel: --data-dir as given, or laid out from --shared-data."""
    if args.data_dir:
        return Path(args.data_dir)
    if not args.shared_data:
        sys.exit("compare.py: give --data-dir (the data set's folder) or --shared-data (the offline copy)")
    shared = Path(args.shared_data)
    cache = Path(args.cache_dir)
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
    qlab = next((r for r in results if r.contender.family == "QLAB" and r.status == "ok"), None)
    floor = next((r for r in results if r.contender.family == "floor" and r.status == "ok"), None)
    spec = PANELS[panel]
    lines = [
        f"# {panel}: {args.epochs or spec.epochs} epochs, config {spec.config}, seed {args.seed}",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"- command: `{command or 'python ' + ' '.join(sys.argv)}`",
        f"- time to target: training time until validation accuracy >= {spec.target_accuracy}% "
        "(validation time excluded); ratios are to the first QLAB row"
        + ("; step-time ratios also to the floor (SGD step + one no-grad forward)" if floor else ""),
        "",
        "| optimizer | family | test acc % | final train loss | time to target s | s/step | "
        "acc - QLAB | time-to-target / QLAB | s/step / QLAB | s/step / floor | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.contender.name} | {r.contender.family} | {_fmt(r.test_acc)} | {_fmt(r.final_train_loss, 4)} | "
            f"{_fmt(r.time_to_target, 1)} | {_fmt(r.seconds_per_step, 4)} | "
            f"{_fmt(r.test_acc - qlab.test_acc) if qlab else '—'} | "
            f"{_ratio(r.time_to_target, qlab.time_to_target) if qlab else '—'} | "
            f"{_ratio(r.seconds_per_step, qlab.seconds_per_step) if qlab else '—'} | "
            f"{_ratio(r.seconds_per_step, floor.seconds_per_step) if floor else '—'} | {r.status} |"
        )
    for family in ("SGD grid", "Momentum grid"):
        members = [r for r in results if r.contender.family == family and math.isfinite(r.test_acc)]
        if members:
            accs = [r.test_acc for r in members]
            best = max(members, key=lambda r: r.test_acc)
            lines.append(f"\n{family}: best {best.contender.name} at {best.test_acc:.2f}%, "
                         f"spread {min(accs):.2f} ... {max(accs):.2f}")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        [{"name": r.contender.name, "family": r.contender.family, "status": r.status, "test_acc": r.test_acc,
          "final_train_loss": r.final_train_loss, "time_to_target": r.time_to_target,
          "seconds_per_step": r.seconds_per_step, "train_seconds": r.train_seconds, "curves": r.curves}
         for r in results], indent=1))
    plot(results, out)
    return text


def plot(results: list[RunResult], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare.py: matplotlib is not installed, no plots (pip install matplotlib)", file=sys.stderr)
        return
    ran = [r for r in results if r.curves]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for r in ran:
        c = r.curves
        style = "-" if r.contender.family == "QLAB" else "--"
        axes[0, 0].plot(c["step"], _smooth(c["train_loss"]), style, label=r.contender.name, lw=1)
        axes[0, 1].plot(c["time"], _smooth(c["train_loss"]), style, lw=1)
        axes[1, 0].plot([v["step"] for v in c["val"]], [v["acc"] for v in c["val"]], style + "o", ms=3, lw=1)
        axes[1, 1].plot([v["time"] for v in c["val"]], [v["acc"] for v in c["val"]], style + "o", ms=3, lw=1)
    for ax, (x, y) in zip(axes.flat, [("step", "training loss (smoothed)"), ("training time s", "training loss (smoothed)"),
                                      ("step", "validation accuracy %"), ("training time s", "validation accuracy %")]):
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
    parser.add_argument("--data-dir", help="the data set's folder (MNIST root or the CIFAR-10 ImageFolder root)")
    parser.add_argument("--shared-data", help="the offline copy (MNIST/raw, cifar10-jpeg.zip) to lay out in --cache-dir")
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
        print(f"   {result.status}: test acc {_fmt(result.test_acc)}%, {_fmt(result.seconds_per_step, 4)} s/step", flush=True)
        results.append(result)
        report(args.panel, results, args, out)  # after every run, so a long panel leaves partial tables
    print((out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
