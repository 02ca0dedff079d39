"""The FSDP2 worker of tests/test_fsdp2.py: QLABMixin under FSDP2Strategy (Lightning's
ModelParallelStrategy over every process), 2 gloo processes on CPU, Lightning's own launcher (it re-runs this file for rank 1)::

    python tests/fsdp2_helpers.py OUT_DIR

Three fits, each saving what the test compares to ``OUT_DIR/{name}_rank{r}.pt``: ``straight``
(STEPS steps, distributed checkpoints every CHECKPOINT_EVERY steps), ``resumed`` (from the first
of those checkpoints to STEPS) and ``accumulated`` (ACCUMULATED_CONFIG: two micro-batches per
step and clipping by norm).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_helpers as helpers
from lightning_qlab._compat import average_model
from lightning_qlab.callback import QLABMonitor
from lightning_qlab.cli import leave_process_group
from lightning_qlab.mixin import QLABConfig
from lightning_qlab.optimizer import saved_record
from lightning_qlab.sharding import data_parallel_mesh, local, shard_blocks
from lightning_qlab.strategies import FSDP2Strategy

RANKS = 2
BATCH = 8  # per rank
STEPS = 20
CHECKPOINT_EVERY = 10  # one epoch; between two probes (probe_every = 8): the held step must come back


class ShardedRegression(helpers.RegressionNet):
    """RegressionNet sharded layer by layer; its last layer has one output row, so rank 1's shard
    of it is empty."""

    def configure_model(self) -> None:
        shard_blocks(self.net, data_parallel_mesh(self.device_mesh, type(self).__name__))


# Two micro-batches per step (FSDP2 reduce-scatters after each) and a clip that is active.
ACCUMULATED_CONFIG = QLABConfig(accumulate_batches=2, gradient_clip_norm=0.05)


def make_model(config: QLABConfig = QLABConfig()) -> ShardedRegression:
    return ShardedRegression(config, dtype=torch.float64)


def data() -> Any:
    return helpers.regression_data(RANKS * BATCH * CHECKPOINT_EVERY, dtype=torch.float64, seed=1)


def full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in module.named_parameters()}


def _fit(out: Path, name: str, ckpt_path: Any = None, config: QLABConfig = QLABConfig(),
         **trainer_settings: Any) -> None:
    model, dataset = make_model(config), data()
    monitor = QLABMonitor(plot=False)
    trainer = helpers.quiet_trainer(
        devices=RANKS, strategy=FSDP2Strategy(),
        max_steps=trainer_settings.pop("max_steps", STEPS), callbacks=[monitor, *trainer_settings.pop("callbacks", [])],
        use_distributed_sampler=False, default_root_dir=out, **trainer_settings,
    )
    loader = DataLoader(dataset, batch_size=BATCH, sampler=helpers.RankStrideSampler(dataset))
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    averaging = [c for c in trainer.callbacks if type(c).__name__ == "PolynomialAveraging"]
    training_weights = full(average_model(averaging[0]).module)  # swapped out at the end of fit
    torch.save({"average": full(model), "training_weights": training_weights,
                "step_sizes": list(monitor.step_sizes), "global_step": trainer.global_step,
                "local_shapes": [tuple(local(p).shape) for p in model.parameters()]},
               out / f"{name}_rank{trainer.global_rank}.pt")


class SaveReplica(Callback):
    """For the torchrun test (``--trainer.callbacks+=fsdp2_helpers.SaveReplica``): after ``fit``
    each process saves the gathered module (the average), QLAB's record and the step sizes to
    ``<default_root_dir>/replica_rank{r}.pt``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, QLABMonitor))
        record = saved_record(trainer.optimizers[0].state_dict())
        torch.save({"parameters": full(pl_module), "record": record, "step_sizes": list(monitor.step_sizes),
                    "node_rank": trainer.node_rank, "world_size": trainer.world_size,
                    "global_step": trainer.global_step},
                   Path(trainer.default_root_dir) / f"replica_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="{step}", save_top_k=-1,
                                  save_on_train_epoch_end=True)  # at the end of each epoch of CHECKPOINT_EVERY steps
    _fit(out, "straight", callbacks=[checkpoints], enable_checkpointing=True)
    _fit(out, "resumed", ckpt_path=out / "checkpoints" / f"step={CHECKPOINT_EVERY}.ckpt")
    _fit(out, "accumulated", config=ACCUMULATED_CONFIG, max_steps=STEPS // 2)
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
