"""Cluster-grade runs through the real `lightning fit` command: killed with SIGTERM and resumed
with `--ckpt_path last`, a run ends bitwise where an uninterrupted one ends; bad checkpoints,
archives and YAML files are one error line, with a non-zero exit and no run folder left behind."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlab.checkpoints import find_last_checkpoint
from lightning_qlab.cli import QLABLightningCLI, main
from lightning_qlab.optimizer import saved_record

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
BATCHES, EPOCHS = 12, 3  # per epoch; validation after every 6 batches


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # LightningCLI warns when it is given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["lightning"])


def fit_args(mnist_root: Path, root: Path, *extra: str) -> list[str]:
    """configs/mnist_mlp.yaml with dropout, shortened epochs and validation twice per epoch."""
    return [
        "fit", "--config", str(CONFIGS / "mnist_mlp.yaml"), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--data.init_args.data_dir", str(mnist_root), "--data.init_args.num_workers", "0",
        "--model.init_args.backbone.init_args.dropout", "0.3",
        "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
        "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "0.5",
        "--trainer.default_root_dir", str(root), *QUIET, *extra,
    ]


@pytest.fixture
def processes():
    """The processes a test started; any still running at its end (a failed test) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def start(processes: list[subprocess.Popen], args: list[str], log: Path) -> subprocess.Popen:
    """`lightning fit ...` as its own process (``python -m lightning_qlab.cli``), output to ``log``;
    tests/ on its path for the PauseAtStep callback, one thread so that every run computes alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lightning_qlab.cli", *args], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=REPO, env=env)
    processes.append(process)
    return process


def finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    process.wait(timeout=timeout)
    return log.read_text()


def training_state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_same_training_state(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert one["global_step"] == other["global_step"] == BATCHES * EPOCHS
    # state_dict: the average; current_model_state: the training weights; averaging_state: its count.
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert one[key].keys() == other[key].keys()
        for name in one[key]:
            assert torch.equal(one[key][name], other[key][name]), (key, name)
    (mine,), (theirs,) = one["optimizer_states"], other["optimizer_states"]
    # steps, held step, estimate, event counts, last step (json: its fit is NaN where it did not probe)
    assert json.dumps(saved_record(mine), sort_keys=True) == json.dumps(saved_record(theirs), sort_keys=True)
    assert mine["param_groups"] == theirs["param_groups"]
    for index, state in mine["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][index][name])), (index, name)


def test_killed_with_sigterm_at_random_steps_and_resumed_a_fit_ends_as_if_never_killed(mnist_root, tmp_path, processes):
    """Three SIGTERMs from outside, mid-epoch, at an epoch end and mid-epoch again, each followed by
    `lightning fit ... --ckpt_path last`; the end state equals an uninterrupted run's, bit for bit.

    How the kill is placed: SIGTERM arrives asynchronously, so to know the step it interrupts the
    killed process runs one extra callback (tests/lightning_helpers.PauseAtStep). At the end of
    step k it writes k into a file and waits there until its process has received a signal; the
    test polls for the file and then sends a real SIGTERM to the process with os.kill, as a
    scheduler does. Preemption must then stop after step k (not before, not later), save last.ckpt
    and exit with 143. The steps are drawn at random each run (they are in the failure message);
    epoch ends get one kill of their own, because there the next epoch starts with a new order.
    """
    picker = random.Random()
    mid_epoch = [step for step in range(1, BATCHES * EPOCHS) if step % BATCHES]
    first = picker.choice([step for step in mid_epoch if step < BATCHES])
    epoch_end = picker.choice([BATCHES, 2 * BATCHES])
    last = picker.choice([step for step in mid_epoch if step > epoch_end])
    kills = [first, epoch_end, last]

    straight_root, root = tmp_path / "straight", tmp_path / "preempted"
    straight = start(processes, fit_args(mnist_root, straight_root), tmp_path / "straight.log")
    for number, step in enumerate(kills):
        flag, log = tmp_path / f"at-{step}", tmp_path / f"killed-{number}.log"
        pause = ["--trainer.callbacks+", "lightning_helpers.PauseAtStep",
                 "--trainer.callbacks.step", str(step), "--trainer.callbacks.signal_file", str(flag)]
        resume = ["--ckpt_path", "last"] if number else []
        process = start(processes, fit_args(mnist_root, root, *pause, *resume), log)
        deadline = time.monotonic() + 400
        while not flag.exists():
            assert process.poll() is None, f"kills {kills}: ended before step {step}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"kills {kills}: step {step} not reached"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = finish(process, log)
        assert process.returncode == 143, f"kills {kills}, step {step}:\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]
        checkpoint = find_last_checkpoint(Trainer(default_root_dir=root, logger=True))
        assert checkpoint is not None and f"saved the state after step {step} to {checkpoint}" in output
        assert training_state(checkpoint)["global_step"] == step, f"kills {kills}"

    resumed_log = tmp_path / "resumed.log"
    resumed = start(processes, fit_args(mnist_root, root, "--ckpt_path", "last"), resumed_log)
    output = finish(resumed, resumed_log)
    assert resumed.returncode == 0, output[-3000:]
    assert "--ckpt_path last: resuming" in output
    straight_output = finish(straight, tmp_path / "straight.log")
    assert straight.returncode == 0, straight_output[-3000:]

    # Each run logged into a version folder of its own; the last one holds the final last.ckpt.
    versions = sorted((root / "lightning_logs").iterdir())
    assert len(versions) == len(kills) + 1
    final = versions[-1] / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(Trainer(default_root_dir=root, logger=True)) == final
    (straight_last,) = (straight_root / "lightning_logs").glob("version_*/checkpoints/last.ckpt")
    assert_same_training_state(training_state(final), training_state(straight_last))


# ------------------------------------------------------------------ --ckpt_path last
def test_last_is_the_newest_last_checkpoint_of_the_root(tmp_path):
    for version, age in (("version_0", 100), ("version_1", 10), ("version_2", None)):
        folder = tmp_path / "lightning_logs" / version / "checkpoints"
        folder.mkdir(parents=True)
        if age is not None:
            (folder / "last.ckpt").write_bytes(b"")
            os.utime(folder / "last.ckpt", (time.time() - age, time.time() - age))
    (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=5.ckpt").write_bytes(b"")
    trainer = Trainer(default_root_dir=tmp_path, logger=True)
    assert find_last_checkpoint(trainer) == tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    # A ModelCheckpoint with its own folder is searched too.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "last.ckpt").write_bytes(b"")
    trainer = Trainer(default_root_dir=tmp_path, logger=True, callbacks=[ModelCheckpoint(dirpath=elsewhere)])
    assert find_last_checkpoint(trainer) == elsewhere / "last.ckpt"
    assert find_last_checkpoint(Trainer(default_root_dir=tmp_path / "nothing", logger=True)) is None


def test_test_and_predict_use_the_last_checkpoint_and_predictions_go_to_the_run_folder(mnist_root, tmp_path):
    fit = QLABLightningCLI(fit_args(mnist_root, tmp_path, "--trainer.max_epochs", "1",
                                    "--trainer.limit_train_batches", "3"))
    last = Path(fit.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    assert last.is_file() and training_state(last)["global_step"] == 3  # save_last is on by default
    common = fit_args(mnist_root, tmp_path, "--ckpt_path", "last")[1:]
    test = QLABLightningCLI(["test", *common, "--trainer.limit_test_batches", "2"])
    assert "test_acc" in test.trainer.callback_metrics
    predict = QLABLightningCLI(["predict", *common, "--trainer.limit_predict_batches", "2"])
    rows = (Path(predict.trainer.log_dir) / "predictions.csv").read_text().splitlines()
    assert len(rows) == 64 and rows[0].startswith("0,")


# ------------------------------------------------------------------ one line for every bad input
def one_error_line(capsys, args: list[str], status: int, *fragments: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(args, prog="lightning")
    assert stopped.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def small_fit_checkpoint(mnist_root: Path, root: Path, *extra: str) -> Path:
    fit = QLABLightningCLI(fit_args(mnist_root, root, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                                    *extra))
    return Path(fit.trainer.checkpoint_callback.dirpath) / "last.ckpt"


@pytest.fixture(scope="module")
def good_checkpoint(mnist_root, tmp_path_factory) -> Path:
    return small_fit_checkpoint(mnist_root, tmp_path_factory.mktemp("good"))


def bad_checkpoints(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad checkpoint, with a fragment its error line must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    empty, garbage, cut = folder / "empty.ckpt", folder / "garbage.ckpt", folder / "cut.ckpt"
    empty.write_bytes(b"")
    garbage.write_bytes(bytes(range(256)) * 40)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "missing": (folder / "nowhere.ckpt", "does not exist"),
        "empty": (empty, "is empty (0 bytes)"),
        "garbage": (garbage, "is not a readable checkpoint"),
        "cut short": (cut, "is not a readable checkpoint"),
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "cut short"])
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_bad_checkpoint_is_one_error_line_and_leaves_no_run_folder(capsys, mnist_root, tmp_path, good_checkpoint,
                                                                       kind, subcommand):
    path, fragment = bad_checkpoints(tmp_path / "bad", good_checkpoint)[kind]
    root = tmp_path / "runs"
    args = [subcommand, *fit_args(mnist_root, root, "--ckpt_path", str(path))[1:]]
    one_error_line(capsys, args, 1, f"lightning {subcommand}: error:", str(path), fragment)
    assert not root.exists()


def test_a_checkpoint_of_another_model_names_the_difference(capsys, mnist_root, tmp_path, good_checkpoint):
    root = tmp_path / "runs"
    line = one_error_line(
        capsys, fit_args(mnist_root, root, "--model.init_args.backbone.init_args.hidden_sizes", "[128, 256]",
                         "--ckpt_path", str(good_checkpoint)),
        1, "holds another model than ImageClassifier", "backbone.layers.1.weight is (512, 784) in the checkpoint, "
        "(128, 784) in the model", "config.yaml")
    assert "backbone.layers.4.weight is (256, 512) in the checkpoint, (256, 128) in the model" in line
    assert not root.exists()


def test_resuming_a_baseline_checkpoint_with_qlab_is_refused(capsys, mnist_root, tmp_path):
    baseline = small_fit_checkpoint(mnist_root, tmp_path / "sgd", "--config", str(CONFIGS / "baselines" / "sgd.yaml"))
    one_error_line(capsys, fit_args(mnist_root, tmp_path / "runs", "--ckpt_path", str(baseline)), 1,
                   "was trained with a baseline optimizer, but this run trains with QLABGrad")
    assert not (tmp_path / "runs").exists()


def test_last_without_any_checkpoint_is_one_error_line(capsys, mnist_root, tmp_path):
    one_error_line(capsys, fit_args(mnist_root, tmp_path, "--ckpt_path", "last"), 1,
                   "--ckpt_path last: no last.ckpt", f"{tmp_path}/lightning_logs/*/checkpoints")
    assert not (tmp_path / "lightning_logs").exists()


def test_a_bad_checkpoint_through_the_real_command(tmp_path):
    """The same as a separate process: the status and the one line are what a shell sees."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qlab.cli", "fit", "--config", str(CONFIGS / "mnist_mlp.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "runs"), "--ckpt_path", str(empty)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith(f"lightning fit: error: the checkpoint {empty} is empty")
    assert not (tmp_path / "runs").exists()


def test_a_yaml_syntax_error_names_file_line_and_column(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: 3\n   limit_train_batches: 2\n")  # one space too many
    one_error_line(capsys, ["fit", "--config", str(CONFIGS / "mnist_mlp.yaml"), "--config", str(broken)], 2,
                   "lightning fit: error: invalid configuration:",
                   f"{broken}, line 3, column 23: mapping values are not allowed here")


def test_a_truncated_mnist_archive_is_reported_as_damaged(capsys, mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(archive, raw / archive.name)
    cut = raw / "train-labels-idx1-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:1000])
    one_error_line(capsys, fit_args(mnist_root, tmp_path / "runs", "--data.init_args.data_dir", str(tmp_path)), 1,
                   "train-labels-idx1-ubyte.gz", "damaged", "MD5")
    assert not (tmp_path / "runs").exists()
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as intact:  # the others were left alone
        assert len(intact.read()) == 10_008


def test_qlab_as_a_baseline_optimizer_is_one_error_line(capsys, tmp_path):
    one_error_line(capsys, ["fit", "--config", str(CONFIGS / "mnist_mlp.yaml"), "--model.init_args.optimizer",
                            "lightning_qlab.QLAB", "--trainer.default_root_dir", str(tmp_path)], 2,
                   "optimizer is QLAB", "qlab_config")
    assert not (tmp_path / "lightning_logs").exists()
