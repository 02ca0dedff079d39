"""What does a QLAB step cost, trial forwards included? Time per training step against SGD and Adam.

QLAB's default probes one step in ``PROBE_EVERY`` (8), or in twice as many after a probe that
confirms the step: that step adds a no-grad trial forward of the same batch, and the others are one
fused AdamW-kernel step. This script times, per model, in a
plain PyTorch loop:

* ``sgd``: zero_grad, forward, backward, ``torch.optim.SGD.step`` (torch's default kernel);
* ``adam``: the same with ``torch.optim.Adam`` (what a tuned baseline or a peer built on Adam costs);
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``, torch's fastest step that keeps Adam's two
  moments: what any optimizer with Adam's state costs at least, QLAB's default direction included;
* ``qlab``: the default ``QLAB()`` with :class:`lightning_qlab.TrialForward` recording every
  training forward and replaying it on the steps that probe, and ``qlab_avg``, the same plus the
  update of the polynomial-decay average of the weights that ``QLABMixin`` evaluates by default;
* ``paper``: ``QLAB(direction="sgd", mode="paper")``, QLABGrad as published, which probes every step.

Each variant trains its own copy of the model on the same batch. The runs are interleaved (sgd,
adam, qlab, ..., sgd, adam, qlab, ...) so that drifts of the machine hit all variants alike; each
timing covers a block of ``--block`` steps after warm-up, a multiple of the longest probing
interval (16 by default) so that every block holds about the same share of probing steps (the
cost averaged over a run), and the table reports medians per step and how many of QLAB's timed
steps probed (between 8 and 16: some fits disagree with the held step and bring the next probe
sooner). The target: the default QLAB within 1.10x an SGD step.
``--max-probe-interval 64 --block 64 --warmup 128`` times QLAB with a longer probe schedule.

On the CPU the ratio also depends on where each variant's copy of the model happens to lie in
memory: rebuilt copies of the same variants, timed the same way in one process, gave QLAB / SGD
from 1.26 to 1.38 on the MLP. ``--rounds R`` builds every variant afresh R times and reports the
median over rounds, with the range.

Run (on an otherwise idle machine):

    python benchmarks/step_cost.py --threads 1 --rounds 3
    python benchmarks/step_cost.py --threads 1 --repeats 50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import contenders
from lightning_qlab import TrialForward
from lightning_qlab.averaged_model import HostCountedAverage
from lightning_qlab.averaging import polynomial_decay_multi_avg_fn
from lightning_qlab.models import CausalTransformer, SmallCNN
from lightning_qlab.optimizer import PROBE_EVERY, PROBE_INTERVAL_GROWTH


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10)
    )


def panel_cnn() -> nn.Module:
    """The CIFAR-10 panel's model (configs/cifar10_cnn.yaml): 3 conv blocks with batch norm."""
    return SmallCNN(in_channels=3, image_size=32, channels=[32, 64, 128], hidden_size=256, num_classes=10)


def panel_transformer() -> nn.Module:
    """The language-model panel's model (configs/text_transformer.yaml)."""
    return CausalTransformer(vocab_size=256, block_size=64, n_layer=4, n_head=4, d_model=128, dropout=0.1)


# Each variant cycles through a pool of batches rather than one: on a single batch the MLP drives
# its loss to 0.0 within 20 steps, and every step after that times an optimizer on zero gradients
# (on a GPU QLAB's probes were then skipped and came every step). The classes' centres lie about
# two noise deviations apart, so the MLP's loss is still near 0.5 after 200 steps.
POOL = 64


def classes(shape: tuple[int, ...]) -> Callable[[torch.device], list[tuple[Tensor, Tensor]]]:
    """Batches of 10 classes that overlap (centres plus noise): learnable, never learnt exactly."""
    def make(device: torch.device) -> list[tuple[Tensor, Tensor]]:
        centres = 0.05 * torch.randn((10, *shape[1:]), device=device)
        labels = [torch.randint(0, 10, (shape[0],), device=device) for _ in range(POOL)]
        return [(centres[y] + torch.randn(shape, device=device), y) for y in labels]
    return make


def text(batch: int, length: int) -> Callable[[torch.device], list[tuple[Tensor, Tensor]]]:
    def make(device: torch.device) -> list[tuple[Tensor, Tensor]]:
        tokens = [torch.randint(0, 256, (batch, length + 1), device=device) for _ in range(POOL)]
        return [(t[:, :-1], t[:, 1:]) for t in tokens]
    return make


def cross_entropy(scores: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1))


MODELS = {
    "MLP 784-1000-1000-10, batch 128": (mlp, classes((128, 1, 28, 28))),
    "SmallCNN of the CIFAR-10 panel, batch 128": (panel_cnn, classes((128, 3, 32, 32))),
    "transformer of the language-model panel, batch 32 x 64": (panel_transformer, text(32, 64)),
}


def make_steppers(model: nn.Module, batches: list[tuple[Tensor, Tensor]], max_probe_interval: Optional[int] = None,
                  probes: Optional[list[int]] = None) -> dict[str, Callable[[], None]]:
    """One training-step function per variant, each with its own copy of the model and the batches
    in the same order; the steps of the ``qlab`` variant that probe are appended to ``probes`` (its
    step numbers)."""

    def torch_stepper(make_optimizer: Callable) -> Callable[[], None]:
        own_model = copy.deepcopy(model)
        optimizer = make_optimizer(own_model.parameters())
        batch = itertools.cycle(batches)

        def step() -> None:
            x, y = next(batch)
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(own_model(x), y).backward()
            optimizer.step()

        return step

    def qlab_stepper(contender: contenders.Contender, averaged: bool = False, record: bool = False
                     ) -> Callable[[], None]:
        own_model = copy.deepcopy(model)
        optimizer = contender.build(own_model.parameters())
        average = HostCountedAverage(own_model, multi_avg_fn=polynomial_decay_multi_avg_fn(), use_buffers=True)
        batch = itertools.cycle(batches)

        def compute_loss(inputs: Tensor, targets: Tensor) -> Tensor:
            return cross_entropy(own_model(inputs), targets)

        def step() -> None:
            x, y = next(batch)
            optimizer.zero_grad(set_to_none=True)
            trial = TrialForward(own_model)
            loss = trial.record(compute_loss, x, y)
            loss.backward()
            optimizer.step(loss, trial.replay)
            if averaged:
                average.update_parameters(own_model)
            if record and math.isfinite(optimizer.last_step.loss):  # a host float: no device read
                probes.append(optimizer.steps)

        return step

    return {
        "sgd": torch_stepper(contenders.sgd(0.01).build),
        "adam": torch_stepper(contenders.adam(1e-3).build),
        "adamw_fused": torch_stepper(lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True)),
        "qlab": qlab_stepper(contenders.qlab(max_probe_interval=max_probe_interval), record=probes is not None),
        "qlab_avg": qlab_stepper(contenders.qlab(max_probe_interval=max_probe_interval), averaged=True),
        "paper": qlab_stepper(contenders.qlab("sgd", "paper")),
    }


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
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=4 * PROBE_EVERY, help="steps per variant before timing")
    parser.add_argument("--repeats", type=int, default=8, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=PROBE_INTERVAL_GROWTH * PROBE_EVERY,
                        help="steps per timed block (a multiple of the longest probing interval, by default "
                             f"{PROBE_INTERVAL_GROWTH * PROBE_EVERY})")
    parser.add_argument("--max-probe-interval", type=int,
                        help="QLAB's max_probe_interval (default: None, QLAB's default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times to build every variant afresh (new model copies, new optimizers) and time it "
                             "again; the table gives the median over rounds and the range of QLAB / SGD")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names or prefixes of MODELS")
    args = parser.parse_args()
    longest = args.max_probe_interval or PROBE_INTERVAL_GROWTH * PROBE_EVERY
    if args.block % longest:
        parser.error(f"--block must be a multiple of the longest probing interval ({longest}), so that every "
                     "block holds as many probes")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} blocks of {args.block} steps per variant after {args.warmup} warm-up steps; "
          f"QLAB with max_probe_interval={args.max_probe_interval}; "
          "medians per step\n")
    wanted = [name.strip() for name in args.models.split(",")]
    print("| model | params | SGD ms | Adam ms | fused AdamW ms | QLAB default ms | QLAB default + averaging ms "
          "| QLABGrad (paper) ms | QLAB default / SGD | its range over rounds | fused AdamW / SGD "
          "| QLAB default + averaging / SGD | QLAB default / Adam | QLAB default / fused AdamW "
          "| QLABGrad (paper) / SGD | QLAB: timed steps per probe |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (build, make_batches) in MODELS.items():
        if not any(name.startswith(prefix) for prefix in wanted):
            continue
        rounds = []  # each round: the median seconds per step of every variant, from fresh copies
        timed_probes = 0
        for _ in range(args.rounds):
            torch.manual_seed(0)
            model = build().to(device)
            probes: list[int] = []
            steppers = make_steppers(model, make_batches(device), args.max_probe_interval, probes)
            times = time_variants(steppers, device, args.warmup, args.repeats, args.block)
            rounds.append({k: statistics.median(v) for k, v in times.items()})
            timed_probes += sum(step > args.warmup for step in probes)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        spread = [r["qlab"] / r["sgd"] for r in rounds]
        n_params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n_params / 1e6:.2f} M | {1e3 * med['sgd']:.2f} | {1e3 * med['adam']:.2f} | "
              f"{1e3 * med['adamw_fused']:.2f} | "
              f"{1e3 * med['qlab']:.2f} | {1e3 * med['qlab_avg']:.2f} | {1e3 * med['paper']:.2f} | "
              f"{med['qlab'] / med['sgd']:.3f} | {min(spread):.3f}-{max(spread):.3f} | "
              f"{med['adamw_fused'] / med['sgd']:.3f} | {med['qlab_avg'] / med['sgd']:.3f} | "
              f"{med['qlab'] / med['adam']:.3f} | {med['qlab'] / med['adamw_fused']:.3f} | "
              f"{med['paper'] / med['sgd']:.3f} | "
              f"{args.rounds * args.repeats * args.block / max(timed_probes, 1):.0f} |", flush=True)


if __name__ == "__main__":
    main()
