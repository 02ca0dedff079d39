"""Smoke test of the comparison harness: a tiny budget, every kind of contender, real data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402


def test_panels_list_every_family() -> None:
    names = [c.name for c in compare.contenders("mnist-mlp")]
    families = {c.family for c in compare.contenders("mnist-mlp")}
    assert families == {"QLAB", "SGD grid", "Momentum grid", "Adam", "LR-free", "floor"}
    text = compare.contenders("text-transformer")
    assert {c.family for c in text} == families | {"AdamW grid"}
    assert [c.name for c in text if c.family == "AdamW grid"] == [
        "AdamW lr=0.0003", "AdamW lr=0.001", "AdamW lr=0.003", "AdamW lr=0.01"]
    # The default first, the other safeguarded directions, the published rule; the sweep covers
    # 1e-6 ... 10 for the default and the published rule.
    assert [n for n in names if n.startswith("QLAB ")] == [
        "QLAB adam safeguarded", "QLAB rmsprop safeguarded", "QLAB sgd safeguarded", "QLAB sgd paper"]
    sweep = [c.name for c in compare.contenders("sweep")]
    assert "QLAB adam safeguarded beta0=1e-06" in sweep and "QLAB sgd paper beta0=10" in sweep


def test_training_time_leaves_out_validation_and_what_follows_it(monkeypatch) -> None:
    """A batch of 1 s, a validation (3 s) and the checkpoint it triggers (5 s), another batch of
    1 s: two seconds of training. The hooks are called in Lightning's order, on a clock set by hand."""
    now = [0.0]
    monkeypatch.setattr(compare.time, "perf_counter", lambda: now[0])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    trainer = SimpleNamespace(global_step=0, sanity_checking=False, callback_metrics={"val_acc": torch.tensor(0.5)},
                              optimizers=[optimizer], should_stop=False)
    recorder = compare.RunRecorder()
    recorder.on_train_epoch_start(trainer, None)
    for batch, (start, end) in enumerate([(0.0, 1.0), (9.0, 10.0)]):
        now[0] = start
        recorder.on_train_batch_start(trainer, None, None, batch)
        now[0], trainer.global_step = end, batch + 1
        recorder.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, batch)
        if batch == 0:
            now[0] = 4.0
            recorder.on_validation_end(trainer, None)  # then the checkpoint, until 9.0
    assert recorder.train_time == [1.0, 2.0]
    assert recorder.val == [{"step": 1, "time": 1.0, "acc": 50.0}]


def test_harness_runs_and_reports(mnist_root: Path, tmp_path: Path) -> None:
    only = ["QLAB sgd safeguarded", "SGD lr=0.1", "floor"]
    if importlib.util.find_spec("schedulefree"):  # the peer that needs train()/eval() switching
        only.append("Schedule-Free")
    results = compare.main([
        "mnist-mlp", "--data-dir", str(mnist_root), "--out", str(tmp_path), "--epochs", "1",
        "--limit-train-batches", "4", "--threads", "1", "--only", ",".join(only),
    ])
    assert [r.status for r in results] == ["ok"] * len(only)
    assert all(r.seconds_per_step > 0 for r in results)
    qlab = results[0]
    # QLAB evaluates the average of its iterates: the same average the harness keeps for every
    # optimizer, so the two columns agree exactly; SGD is evaluated at its last iterate.
    assert qlab.test == qlab.test_average and qlab.test_last != qlab.test
    assert results[1].test == results[1].test_last
    assert len(qlab.curves["train_loss"]) == 4
    # QLAB's recorded step sizes are the ones it took (param_group["lr"]), all positive here.
    assert all(s > 0 for s in qlab.curves["step_size"])
    table = (tmp_path / "results.md").read_text()
    for name in only:
        assert name in table
    assert "s/step / floor" in table and "command:" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in saved] == [r.contender.name for r in results]
    rebuilt = compare.main(["mnist-mlp", "--out", str(tmp_path), "--report-only", "python compare.py ..."])
    def columns(rows):  # as text, so that the nan of a column Schedule-Free does not have compares equal
        return [(r.contender.name, repr(r.test), repr(r.test_last), repr(r.test_average)) for r in rows]

    assert columns(rebuilt) == columns(results)
    assert "command: `python compare.py ...`" in (tmp_path / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 0
        assert (tmp_path / "step_size.png").stat().st_size > 0

    # A panel run in parts (--only ... --out part) is reported as one, in the panel's order.
    parts = [tmp_path / "part_a", tmp_path / "part_b"]
    for part, rows in zip(parts, (saved[1:], saved[:1])):
        part.mkdir()
        (part / "results.json").write_text(json.dumps(rows))
    merged = compare.main(["mnist-mlp", "--out", str(tmp_path / "merged"), "--report-only", "python compare.py ...",
                           "--merge", *map(str, parts)])
    assert [r.contender.name for r in merged] == [r.contender.name for r in results]
    assert "QLAB sgd safeguarded" in (tmp_path / "merged" / "results.md").read_text()
    with pytest.raises(SystemExit, match="more than one --merge folder"):
        compare.main(["mnist-mlp", "--out", str(tmp_path / "twice"), "--report-only", "x",
                      "--merge", str(parts[0]), str(parts[0])])


def test_text_panel_reports_losses(fortunes_text: Path, tmp_path: Path) -> None:
    (result,) = compare.main([
        "text-transformer", "--data-dir", str(fortunes_text), "--out", str(tmp_path), "--epochs", "1",
        "--limit-train-batches", "3", "--threads", "1", "--only", "AdamW lr=0.003",
    ])
    # Three AdamW steps from a loss of ln(256) = 5.55 nats; the average lags the last iterate.
    assert result.status == "ok" and result.test == result.test_last < result.test_average < 5.6
    assert "| AdamW lr=0.003 | AdamW grid |" in (tmp_path / "results.md").read_text()


def test_unknown_selection_is_an_error(mnist_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        compare.main(["mnist-mlp", "--data-dir", str(mnist_root), "--out", str(tmp_path), "--only", "nope"])
    assert raised.value.code == 2


def test_training_status_flags_divergence_and_nan() -> None:
    assert compare.training_status([2.3] * 50 + [0.5] * 100) == "ok"
    assert compare.training_status([2.3] * 50 + [2.4] * 100).startswith("diverged")
    assert compare.training_status([2.3, float("nan")]) == "non-finite loss"


def test_heldout_tasks_run_and_report(tmp_path: Path) -> None:
    import heldout

    text = heldout.main(["--tasks", "teacher-regression", "--epochs", "1", "--only", "QLAB adam,SGD lr=0.1",
                         "--out", str(tmp_path)])
    rows = [line for line in text.splitlines() if line.startswith("| QLAB") or line.startswith("| SGD")]
    assert [row.split(" | ")[0] for row in rows] == ["| QLAB adam safeguarded", "| SGD lr=0.1"]
    assert rows[0].split(" | ")[4] == "1.00"  # the default's average is the reference of the ratio columns
    assert all(row.endswith("| ok |") for row in rows)
    assert (tmp_path / "results.md").read_text() == text
    with pytest.raises(SystemExit):
        heldout.main(["--tasks", "images", "--out", str(tmp_path)])


def test_averaging_eta_tests_the_last_iterate_and_each_average(mnist_root: Path, tmp_path: Path) -> None:
    import averaging_eta

    text = averaging_eta.main(["mnist-mlp", "--data-dir", str(mnist_root), "--out", str(tmp_path), "--epochs", "2",
                               "--limit-train-batches", "3", "--threads", "1", "--etas", "0,3"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [row[1] for row in rows] == ["3", "6"]  # the optimizer steps taken by the end of each epoch
    accuracies = [[float(value.strip(" |")) for value in row[2:]] for row in rows]
    # After 6 steps every model tested (last iterate, eta 0, eta 3) beats always answering the most
    # common digit (11.35% of the test set), and the averages are other models than the last iterate.
    assert all(accuracy > 11.35 for accuracy in accuracies[1])
    assert all(len(set(row)) > 1 for row in accuracies)
    assert (tmp_path / "mnist-mlp-qlab.md").read_text() == text
    with pytest.raises(SystemExit):
        averaging_eta.main(["mnist-mlp", "--data-dir", str(mnist_root), "--etas", "three"])


def test_step_cost_times_every_variant_and_counts_the_probes() -> None:
    """A tiny timing run through the script's command line: one row per model, every ratio a
    number, and the probes of the timed steps counted (after a warm-up of 2, the timed steps
    3 ... 18 hold the probe of step 9, and that of step 17 unless the fit at 9 confirmed the step)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_cost.py"), "--models", "MLP", "--warmup", "2",
         "--block", "16", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| MLP")]
    assert len(rows) == 1, result.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert all(float(cell) > 0 for cell in cells[2:9] + cells[10:15]), rows[0]  # cells[9]: a range
    assert cells[-1] in ("8", "16"), rows[0]
