"""Which eta? The last iterate and polynomial-decay averages with several eta, on one training run.

Averaging changes what is evaluated, never the training path, so one run serves every eta: the
panel's config runs through the package CLI exactly as ``compare.py`` runs it (same seed,
validation schedule and data), with the mixin's own averaging off; a callback keeps one average per
eta and tests the last iterate and each average after every epoch. The column of the eta that
the mixin uses (``lightning_qlab.averaging.DEFAULT_ETA``) therefore reproduces the test accuracy
of compare.py's default QLAB row.

    python benchmarks/averaging_eta.py mnist-mlp   --shared-data ../shared/data --threads 1
    python benchmarks/averaging_eta.py cifar10-cnn --shared-data ../shared/data --threads 1 --val-check-interval 0.5
    python benchmarks/averaging_eta.py mnist-mlp   --shared-data ../shared/data --threads 1 --optimizer adam

Writes ``benchmarks/results/averaging-eta/<panel>-<optimizer>.md`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

import compare
from contenders import adam, qlab, sgd
from lightning_qlab.averaging import polynomial_decay_multi_avg_fn

OPTIMIZERS = {
    # The default QLAB with the mixin's own average off: this script keeps the averages.
    "qlab": replace(qlab(weight_averaging=False), name="QLAB default"),
    "adam": adam(1e-3),
    "momentum": sgd(0.03, momentum=0.9),  # the best momentum-SGD grid point of the CIFAR-10 panel
}


class EtaAverages(Callback):
    """One polynomial-decay average per eta, updated after every step; after each epoch the last
    iterate and every average are tested (random number generator state restored afterwards, so
    the tests leave the training run exactly as it would be without them)."""

    def __init__(self, etas: list[float]) -> None:
        self.etas = etas
        self.averages: dict[float, AveragedModel] = {}
        self.rows: list[dict[str, Any]] = []

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.averages = {
            eta: AveragedModel(pl_module, multi_avg_fn=polynomial_decay_multi_avg_fn(eta), use_buffers=True)
            for eta in self.etas
        }

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for average in self.averages.values():
            average.update_parameters(pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rng = torch.get_rng_state()
        datamodule = trainer.datamodule
        datamodule.setup("test")
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
                               "last": test_accuracy(pl_module, datamodule.test_dataloader())}
        for eta, average in self.averages.items():
            row[eta] = test_accuracy(average.module, datamodule.test_dataloader())
        torch.set_rng_state(rng)
        self.rows.append(row)
        print("   epoch {epoch}: last {last:.2f}, ".format(**row)
              + ", ".join(f"eta={eta:g} {row[eta]:.2f}" for eta in self.etas), flush=True)


@torch.no_grad()
def test_accuracy(module: torch.nn.Module, loader: Any) -> float:
    was_training = module.training
    module.eval()
    correct = total = 0
    device = next(module.parameters()).device
    for images, labels in loader:
        predicted = module(images.to(device)).argmax(dim=1)
        correct += int((predicted == labels.to(device)).sum())
        total += len(labels)
    module.train(was_training)
    return 100.0 * correct / total


def report(rows: list[dict[str, Any]], etas: list[float], title: str, command: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"{dt.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Command: `{command}`",
        "",
        "Test accuracy (%) of the last iterate and of the polynomial-decay average with each eta, "
        "after each epoch of one training run.",
        "",
        "| epoch | step | last iterate | " + " | ".join(f"eta={eta:g}" for eta in etas) + " |",
        "|---:|---:|---:|" + "---:|" * len(etas),
    ]
    for row in rows:
        lines.append(f"| {row['epoch']} | {row['step']} | {row['last']:.2f} | "
                     + " | ".join(f"{row[eta]:.2f}" for eta in etas) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("panel", choices=["mnist-mlp", "cifar10-cnn"])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="qlab")
    parser.add_argument("--etas", default="0,1,3,8,20", help="comma-separated eta values")
    parser.add_argument("--out", help="output folder (default benchmarks/results/averaging-eta)")
    compare.add_run_options(parser)  # the same values as compare.py's give the same training run
    args = parser.parse_args(argv)
    args.cli_args = []
    try:
        etas = [float(eta) for eta in args.etas.split(",")]
    except ValueError:
        parser.error(f"--etas {args.etas!r}: give comma-separated numbers, e.g. 0,1,3,8")
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else compare.REPO / "benchmarks" / "results" / "averaging-eta"
    out.mkdir(parents=True, exist_ok=True)
    contender = OPTIMIZERS[args.optimizer]
    panel = compare.PANELS[args.panel]
    averages = EtaAverages(etas)
    callbacks: list[Callback] = [averages]
    cli = compare.build_cli(contender, panel, args, compare.prepare_data(args.panel, args),
                            out / "raw" / f"{args.panel}-{args.optimizer}", callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    command = "python benchmarks/averaging_eta.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(averages.rows, etas, f"Averaging: {args.panel}, {contender.name}", command)
    (out / f"{args.panel}-{args.optimizer}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
