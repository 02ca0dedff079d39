"""QLABMixin under Lightning's ModelParallelStrategy (FSDP2): 2 gloo processes on CPU.

tests/fsdp2_helpers.py is the worker (Lightning's launcher re-runs it for rank 1). It trains a
float64 MLP whose last layer's shard is empty on rank 1, with the default QLAB and the default
polynomial averaging, saving distributed checkpoints, then resumes from the first of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.utils.data import DataLoader

import fsdp2_helpers as helpers
from lightning_helpers import RegressionNet, quiet_trainer, run_worker
from lightning_qlab.callback import QLABMonitor

WORKER = Path(helpers.__file__).resolve()
REPO = WORKER.parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("fsdp2")
    run_worker(WORKER, out_dir)
    return out_dir


def _ranks(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}_rank{rank}.pt") for rank in range(helpers.RANKS)]


def test_ranks_take_identical_steps_and_hold_identical_averages(out):
    rank0, rank1 = _ranks(out, "straight")
    assert rank1["local_shapes"][-2:] == [(0, 16), (0,)]  # rank 1 holds none of the last layer
    assert rank0["global_step"] == rank1["global_step"] == helpers.STEPS
    assert rank0["step_sizes"] == rank1["step_sizes"]
    for key in ("average", "training_weights"):
        for name, value in rank0[key].items():
            assert torch.equal(value, rank1[key][name]), (key, name)


def test_sharded_run_equals_one_process_on_the_global_batches(out):
    """The same model on one process, each step on both ranks' batches (RankStrideSampler makes
    them contiguous blocks). float64, rtol 1e-9: the sums are added in another order, and the fitted
    step magnifies the last bits (see tests/sharded_helpers.py)."""
    model, data = RegressionNet(dtype=torch.float64), helpers.data()
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(max_steps=helpers.STEPS, callbacks=[monitor])
    trainer.fit(model, DataLoader(data, batch_size=helpers.RANKS * helpers.BATCH, shuffle=False))
    rank0 = _ranks(out, "straight")[0]
    torch.testing.assert_close(torch.tensor(rank0["step_sizes"]), torch.tensor(list(monitor.step_sizes)),
                               rtol=1e-9, atol=0)
    for name, value in model.named_parameters():  # after fit: the average, on both sides
        torch.testing.assert_close(rank0["average"][name], value.detach(), rtol=1e-9, atol=1e-12, msg=name)


def test_accumulation_and_clipping_equal_one_process(out):
    """Two micro-batches per step (each backward reduce-scatters under FSDP2) and a clip by the norm
    of the whole gradient, against one process with the same micro-batches."""
    model, data = RegressionNet(helpers.ACCUMULATED_CONFIG, dtype=torch.float64), helpers.data()
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(max_steps=helpers.STEPS // 2, callbacks=[monitor])
    trainer.fit(model, DataLoader(data, batch_size=helpers.RANKS * helpers.BATCH, shuffle=False))
    rank0, rank1 = _ranks(out, "accumulated")
    assert rank0["global_step"] == trainer.global_step == helpers.STEPS // 2
    assert rank0["step_sizes"] == rank1["step_sizes"]
    torch.testing.assert_close(torch.tensor(rank0["step_sizes"]), torch.tensor(list(monitor.step_sizes)),
                               rtol=1e-9, atol=0)
    for name, value in model.named_parameters():
        torch.testing.assert_close(rank0["average"][name], value.detach(), rtol=1e-9, atol=1e-12, msg=name)


def test_resume_from_a_distributed_checkpoint_equals_the_uninterrupted_run(out):
    """Resumed at step 10 (between probes): the training weights, the average, QLAB's held step and
    moments all come back from the shards; the remaining 10 steps are bitwise the same."""
    for straight, resumed in zip(_ranks(out, "straight"), _ranks(out, "resumed")):
        assert resumed["global_step"] == helpers.STEPS
        assert resumed["step_sizes"][helpers.CHECKPOINT_EVERY:] == straight["step_sizes"][helpers.CHECKPOINT_EVERY:]
        for key in ("average", "training_weights"):
            for name, value in straight[key].items():
                assert torch.equal(resumed[key][name], value), (key, name)


def test_distributed_checkpoint_holds_the_average_with_the_training_weights_nested(out, tmp_path):
    """What evaluation loads (state_dict) is the average; the last iterate rides along inside it."""
    dcp_to_torch_save(out / "checkpoints" / f"step={helpers.STEPS}.ckpt", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)["state_dict"]
    rank0 = _ranks(out, "straight")[0]
    for name, value in rank0["training_weights"].items():
        assert torch.equal(whole["current_model_state"][name], value), name
        assert torch.equal(whole[name], rank0["average"][name]), name
        assert not torch.equal(whole[name], value), name  # averaged, so not the last iterate


def test_two_nodes_through_torchrun_run_the_real_cli_to_identical_replicas(mnist_root, tmp_path):
    """`torchrun --nnodes 2` (one process per "node", rendezvous on localhost) running `lightning fit`
    with the FSDP2 preset: each process reads its half of every batch, holds half of each tensor,
    and both end with the same model, the same QLAB record and the same step sizes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli = ["-m", "lightning_qlab.cli", "fit", "--config", REPO / "configs" / "mnist_mlp.yaml",
           "--config", REPO / "configs" / "trainer" / "fsdp.yaml", "--trainer.accelerator", "cpu",
           "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.precision", "32-true",
           "--data.init_args.data_dir", mnist_root, "--data.init_args.num_workers", "0",
           "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", "20", "--trainer.limit_val_batches", "4",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.callbacks+=fsdp2_helpers.SaveReplica"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               *map(str, cli)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    rank0, rank1 = [torch.load(tmp_path / f"replica_rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert (rank0["node_rank"], rank1["node_rank"]) == (0, 1) and rank0["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 20
    assert rank0["step_sizes"] == rank1["step_sizes"] and len(rank0["step_sizes"]) == 20
    assert json.dumps(rank0["record"], sort_keys=True) == json.dumps(rank1["record"], sort_keys=True)
    for name, value in rank0["parameters"].items():
        assert torch.equal(value, rank1["parameters"][name]), name
