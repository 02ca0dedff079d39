"""Preemption in one process: where the checkpoint is taken when SIGTERM arrives inside an
accumulation window, inside validation or before training, and that resuming from it continues
exactly (training weights, average, optimizer state). The real `lightning fit` command, killed from
outside, is tested in tests/test_resume_cli.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_helpers import BatchNormNet, SigtermAtBatch, classification_data, preemption_of, quiet_trainer
from lightning_qlab.data.order import ResumableLoader
from lightning_qlab.mixin import QLABConfig
from lightning_qlab.optimizer import saved_record
from lightning_qlab.preemption import Preemption
from lightning_qlab.seeding import StepSeeding

BATCHES = 6  # per epoch
EPOCHS = 3


class ValidatedNet(BatchNormNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


@pytest.fixture(autouse=True)
def run_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")


def fit(root: Path, callbacks: list[Any] = (), ckpt_path: Optional[Path] = None, accumulate: int = 1,
        **trainer_options: Any) -> Any:
    """BatchNorm and dropout, shuffled data, the averaging: what resuming has to get exactly right."""
    data = classification_data(BATCHES * 8, seed=4)
    model = ValidatedNet(QLABConfig(accumulate_batches=accumulate), dropout=0.3, seed=1)
    options = dict(max_epochs=EPOCHS, val_check_interval=3, limit_val_batches=2)
    options.update(trainer_options)
    # The SIGTERM-sending callbacks come first: Preemption sees their signal in the same hook.
    trainer = quiet_trainer(callbacks=[*callbacks, Preemption(), StepSeeding()], default_root_dir=root, **options)
    trainer.fit(model, ResumableLoader(data, batch_size=8), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
    return trainer


def final_state(trainer: Any, path: Path) -> dict[str, Any]:
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


def assert_same_training_state(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert one["global_step"] == other["global_step"]
    for key in ("state_dict", "current_model_state", "averaging_state"):  # average, iterate, average's count
        assert one[key].keys() == other[key].keys()
        for name in one[key]:
            assert torch.equal(one[key][name], other[key][name]), (key, name)
    mine, theirs = one["optimizer_states"][0], other["optimizer_states"][0]
    # json: the last step's fit is NaN on a step that did not probe, and NaN != NaN
    assert json.dumps(saved_record(mine), sort_keys=True) == json.dumps(saved_record(theirs), sort_keys=True)
    for index, state in mine["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][index][name])), (index, name)


def preempted(root: Path, **options: Any) -> tuple[int, dict[str, Any]]:
    """Fit until the SIGTERM callback fires; the exit status and the checkpoint left behind."""
    with pytest.raises(SystemExit) as stopped:
        fit(root, **options)
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return stopped.value.code, torch.load(path, weights_only=True)


def test_inside_an_accumulation_window_the_checkpoint_waits_for_the_step(tmp_path):
    straight = final_state(fit(tmp_path / "straight", accumulate=3), tmp_path / "straight.ckpt")
    # Batch 4 is the middle of the window 3..5 (the second optimizer step).
    status, checkpoint = preempted(tmp_path / "run", accumulate=3, callbacks=[SigtermAtBatch(4)])
    assert status == 143
    assert checkpoint["global_step"] == 2  # after the window closed, not after batch 4
    resumed = fit(tmp_path / "run", accumulate=3, ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_same_training_state(final_state(resumed, tmp_path / "resumed.ckpt"), straight)


@pytest.mark.parametrize("in_validation", [False, True], ids=["before", "during"])
def test_inside_validation_the_checkpoint_waits_for_its_end(tmp_path, in_validation):
    straight = final_state(fit(tmp_path / "straight"), tmp_path / "straight.ckpt")
    # Validation runs after every third batch; SIGTERM arrives at the end of the ninth batch, just
    # before its validation, or during it.
    status, checkpoint = preempted(tmp_path / "run", callbacks=[SigtermAtBatch(8, in_validation=in_validation)])
    assert status == 143 and checkpoint["global_step"] == 9
    loops = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["current"]
    assert loops["completed"] == 2  # that validation ran to its end before the checkpoint
    resumed = fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_same_training_state(final_state(resumed, tmp_path / "resumed.ckpt"), straight)


def test_at_the_end_of_an_epoch_the_next_one_starts_afresh(tmp_path):
    straight = final_state(fit(tmp_path / "straight"), tmp_path / "straight.ckpt")
    status, checkpoint = preempted(tmp_path / "run", callbacks=[SigtermAtBatch(BATCHES - 1)])
    assert status == 143 and checkpoint["global_step"] == BATCHES
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1  # the epoch is done
    resumed = fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_same_training_state(final_state(resumed, tmp_path / "resumed.ckpt"), straight)


def test_before_training_starts_nothing_is_saved(tmp_path):
    class SigtermInSanityCheck(SigtermAtBatch):
        def on_validation_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if trainer.sanity_checking:
                # Lightning's handler, installed when fit starts (never the default: it would end pytest).
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, callbacks=[SigtermInSanityCheck(-1)], num_sanity_val_steps=2)
    assert stopped.value.code == 143
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_link_is_replaced_not_written_through(tmp_path):
    """ModelCheckpoint(save_last="link") makes last.ckpt a link to another checkpoint."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    target = folder / "epoch=0.ckpt"
    target.write_bytes(b"another checkpoint")
    (folder / "last.ckpt").symlink_to(target.name)
    status, checkpoint = preempted(tmp_path / "run", callbacks=[SigtermAtBatch(1)])
    assert checkpoint["global_step"] == 2
    assert target.read_bytes() == b"another checkpoint" and not (folder / "last.ckpt").is_symlink()


def test_the_filename_is_a_name():
    with pytest.raises(ValueError, match="file name without a folder"):
        Preemption(filename="a/b")


def test_slurms_requeue_signal_saves_requeues_and_exits(tmp_path, monkeypatch):
    """Under SLURM (its variables set; a stand-in `scontrol` on the PATH) the requeue signal USR1
    saves like SIGTERM, then requeues the job."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "qlab-test"}.items():
        monkeypatch.setenv(name, value)
    bin_folder, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    bin_folder.mkdir()
    (bin_folder / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_folder / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")

    class RequeueSignalAtBatch(SigtermAtBatch):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if self.batches_seen == self.batch:
                assert signal.getsignal(signal.SIGUSR1) == preemption_of(trainer)._on_signal
                os.kill(os.getpid(), signal.SIGUSR1)
            self.batches_seen += 1

    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path / "run", callbacks=[RequeueSignalAtBatch(3)])
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert calls.read_text().split() == ["requeue", "4242"]
