"""Workers for tests/test_sharding.py: QLAB on FSDP2-sharded parameters, 2 gloo processes on CPU.

Run as a script: ``python sharded_helpers.py OUT_DIR``; it starts ``RANKS`` processes, each of
which runs every worker in turn and saves what the test compares to ``OUT_DIR/WORKER_rank{r}.pt``;
then it trains the single-process reference (``OUT_DIR/single_process.pt``).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_qlab.clipping import clip_gradients
from lightning_qlab.optimizer import QLAB
from lightning_qlab.sharding import ShardLayout, local

RANKS = 2
STEPS = 40  # three probes at least: steps 1 and 9, then 8 or 16 steps apart
CHECKPOINT_AT = 11  # inside an interval: the held step and the moments must both come back
BATCH = 16  # per rank; the single-process reference takes both ranks' batches at once
# float64: the sharded sums add the same terms in another order (shard by shard, then across
# ranks) and the fitted step divides a loss difference by beta^2, which magnifies the last bits
# about 1e4-fold; in float32 that left the steps 2e-4 apart after 24 steps, in float64 1e-12.
DTYPE = torch.float64


def make_model() -> nn.Module:
    """The last layer has one output row: under Shard(0) over 2 processes, rank 1's shard is empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 1)).to(DTYPE)


def batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batch of each step, and this rank's part of it (all of it for world = 1)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH * RANKS, 6, generator=generator, dtype=DTYPE)
        y = torch.sin(x.sum(1, keepdim=True))
        per_rank = BATCH * RANKS // world
        out.append((x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]))
    return out


def shard(model: nn.Module, world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: nn.Module, optimizer: QLAB, data: list, steps: range) -> list[float]:
    step_sizes = []
    for step in steps:
        x, y = data[step]
        loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        mean = lambda losses: _mean_over_ranks(losses)  # noqa: E731
        optimizer.step(loss, loss_fn, reduce_losses=mean)
        step_sizes.append(optimizer.last_step.step_size)
    return step_sizes


def _mean_over_ranks(losses: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        losses = losses.clone()
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
    return losses


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ workers
def train_sharded(rank: int, world: int, out: Path) -> None:
    model = shard(make_model(), world)
    optimizer = QLAB(model.parameters())
    step_sizes = train(model, optimizer, batches(rank, world), range(STEPS))
    torch.save({"parameters": full_parameters(model), "step_sizes": step_sizes,
                "local_shapes": [tuple(local(p).shape) for p in model.parameters()]}, out / f"train_sharded_rank{rank}.pt")


def resume_sharded(rank: int, world: int, out: Path) -> None:
    """Train to CHECKPOINT_AT, save a distributed checkpoint, load it into fresh objects, go on."""
    data = batches(rank, world)
    model = shard(make_model(), world)
    optimizer = QLAB(model.parameters())
    first = train(model, optimizer, data, range(CHECKPOINT_AT))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(out / "checkpoint"))

    torch.manual_seed(123)  # nothing may depend on the fresh objects' own initialisation
    resumed = shard(make_model(), world)
    with torch.no_grad():
        for p in resumed.parameters():
            local(p).normal_()
    resumed_optimizer = QLAB(resumed.parameters())
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(out / "checkpoint"))
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    second = train(resumed, resumed_optimizer, data, range(CHECKPOINT_AT, STEPS))
    torch.save({"parameters": full_parameters(resumed), "step_sizes": first + second,
                "steps": resumed_optimizer.steps}, out / f"resume_sharded_rank{rank}.pt")


def sums_float64(rank: int, world: int, out: Path) -> None:
    """g . d and |g|^2 over sharded, replicated and plain tensors in float64, against the whole tensors."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(7)  # the same whole tensors on every rank
    whole_g = [torch.randn(5, 3, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64),
               torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    whole_d = [torch.randn_like(g) for g in whole_g]
    placements = [[Shard(0)], [Shard(0)], [Replicate()], None]  # None: a plain tensor (replicated)
    g = [t if p is None else distribute_tensor(t, mesh, p) for t, p in zip(whole_g, placements)]
    d = [t if p is None else distribute_tensor(t, mesh, p) for t, p in zip(whole_d, placements)]
    layout = ShardLayout(g)
    local_g, local_d = [local(t) for t in g], [local(t) for t in d]
    per_param = torch.stack([torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)), a.square().sum()])
                             for a, b in zip(local_g, local_d)])
    sharded = layout.sum(per_param)
    whole = torch.stack([sum(torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(whole_g, whole_d)),
                         sum(a.square().sum() for a in whole_g)])
    # Clipping by norm: the coefficient from the global norm, applied to each shard.
    params = []
    for grad in g:
        param = nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    coefficient = clip_gradients(QLAB(params), max_norm=0.5)
    whole_norm = torch.sqrt(sum(a.square().sum() for a in whole_g))
    torch.save({"sharded": sharded, "whole": whole, "empty_shard": local_g[1].numel() == 0,
                "clip": coefficient, "clip_whole": 0.5 / (whole_norm + 1e-6),
                "clipped": [local(p.grad).clone() for p in params],
                "clipped_whole": [local(grad) * (0.5 / (whole_norm + 1e-6)) for grad in g]},
               out / f"sums_float64_rank{rank}.pt")


WORKERS: dict[str, Callable[[int, int, Path], None]] = {
    "train_sharded": train_sharded,
    "resume_sharded": resume_sharded,
    "sums_float64": sums_float64,
}


def _process(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        for worker in WORKERS.values():
            worker(rank, RANKS, out)
        # No rank tears gloo down while the other is still in a collective: a teardown racing a
        # peer's last operation can abort the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def single_process(out: Path) -> None:
    """The reference: one process, whole parameters, both ranks' batches in each step."""
    model = make_model()
    optimizer = QLAB(model.parameters())
    step_sizes = train(model, optimizer, batches(0, 1), range(STEPS))
    torch.save({"parameters": full_parameters(model), "step_sizes": step_sizes}, out / "single_process.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    mp.spawn(_process, args=(out_dir, _free_port()), nprocs=RANKS)
    single_process(out_dir)
