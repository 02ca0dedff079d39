"""QLABMonitor in a real Trainer with a real CSVLogger: what it logs, when it warns, what it plots."""

from __future__ import annotations

import csv
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_helpers import RegressionNet, quiet_trainer, regression_data
from lightning_qlab.callback import QLABMonitor
from lightning_qlab.mixin import QLABConfig
from lightning_qlab.optimizer import EVENTS, PROBE_EVERY


def _metrics(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """metrics.csv as {metric: {step: value}}."""
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "epoch") and value:
                table.setdefault(key, {})[int(row["step"])] = float(value)
    return table


@pytest.mark.parametrize(
    "accumulate, step_batches, expected_steps",
    [(1, list(range(9)), [2, 5, 8]), (2, [1, 3, 5, 7, 8], [5, 8])],
)
def test_logs_each_step_once_on_the_steps_lightning_logs(tmp_path, accumulate, step_batches, expected_steps):
    """log_every_n_steps=3 over 9 batches: Lightning logs after batches 2, 5 and 8. With two
    micro-batches per step, optimizer steps end on batches 1, 3, 5, 7 and 8 (the epoch's last
    window holds one micro-batch): batches 5 and 8 are both."""
    logger = CSVLogger(tmp_path, name="run")
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(max_epochs=1, logger=logger, log_every_n_steps=3, callbacks=[monitor])
    model = RegressionNet(QLABConfig(accumulate_batches=accumulate))
    trainer.fit(model, DataLoader(regression_data(72), batch_size=8))
    table = _metrics(logger)

    assert sorted(table["qlab/step_size"]) == expected_steps
    assert {"qlab/step_size", "qlab/probes"} | {f"qlab/events/{name}" for name in EVENTS} <= set(table)
    # The history holds every step; the fit (and the loss) exists on the steps that probe only:
    # the first, then one in PROBE_EVERY.
    assert len(monitor.steps) == trainer.global_step == len(step_batches)
    probing = [i for i, loss in enumerate(monitor.losses) if math.isfinite(loss)]
    assert probing == list(range(0, len(step_batches), PROBE_EVERY))
    # The logged values are the recorded steps' values, the fit's only where it exists.
    by_batch = {batch: i for i, batch in enumerate(step_batches)}
    for step in expected_steps:
        index = by_batch[step]
        assert table["qlab/step_size"][step] == monitor.step_sizes[index]
        for key in ("qlab/loss", "qlab/trial_loss", "qlab/trial_distance", "qlab/curvature"):
            assert (step in table.get(key, {})) == (index in probing), (key, step)
        if index in probing:
            assert table["qlab/loss"][step] == monitor.losses[index]
            if accumulate == 1:  # QLAB's training loss is the loss the module logged for the same batch
                assert table["qlab/loss"][step] == table["train_loss"][step]
    probes = trainer.optimizers[0].events["warm_start_probes"]
    assert table["qlab/events/warm_start_probes"][expected_steps[-1]] == probes


class _LinearLoss(RegressionNet):
    """A loss linear in the parameters: its curvature along any direction is exactly zero, so
    every step ends with the safeguard for non-positive curvature."""

    def qlab_loss(self, batch):
        x, _ = batch
        return self.net[0](x).mean()


def test_warns_once_when_safeguards_fire_persistently(tmp_path):
    monitor = QLABMonitor(plot=False, safeguard_window=5, safeguard_share=0.6)
    # The safeguards act on the steps that probe: the first, then one in PROBE_EVERY.
    trainer = quiet_trainer(max_steps=4 * PROBE_EVERY + 1, callbacks=[monitor], default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_LinearLoss(), DataLoader(regression_data(96), batch_size=8))
    persistent = [w for w in caught if "safeguards fired" in str(w.message)]
    assert len(persistent) == 1
    # Rounding leaves the fitted curvature of a linear loss at +-tiny: non-positive, or positive
    # with a minimiser far beyond the cap. Either way a safeguard decides every step.
    assert "fired on 5 of the last 5 probing steps (" in str(persistent[0].message)
    events = trainer.optimizers[0].events
    assert events["negative_curvature"] + events["extrapolation_capped"] == 5


def test_stays_quiet_below_the_share():
    monitor = QLABMonitor(plot=False, safeguard_window=5, safeguard_share=1.0)
    for event in [None] + ["negative_curvature"] * 4:
        monitor._recent_events.append(event)
    monitor._warn_if_safeguards_persist()
    assert not monitor._safeguard_warned
    monitor._recent_events.append("extrapolation_capped")  # now 5 of the last 5
    with pytest.warns(RuntimeWarning, match="fired on 5 of the last 5 probing steps"):
        monitor._warn_if_safeguards_persist()


def test_the_persistent_warning_explains_every_event_that_fired():
    monitor = QLABMonitor(plot=False, safeguard_window=4, safeguard_share=0.5)
    for event in ["zero_gradient", "zero_gradient", "not_descent", None]:
        monitor._recent_events.append(event)
    with pytest.warns(RuntimeWarning) as caught:
        monitor._warn_if_safeguards_persist()
    message = str(caught[0].message)
    assert "(zero_gradient: 2, not_descent: 1)" in message
    assert f"'zero_gradient': {EVENTS['zero_gradient']}" in message and "backward()" in message
    assert f"'not_descent': {EVENTS['not_descent']}" in message


class _NoBackward(LightningModule):
    """A hand-written QLAB training step that forgets the backward pass."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Linear(5, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.optimizers().step(loss=loss, trial_loss_fn=lambda: torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        from lightning_qlab.optimizer import QLAB

        return QLAB(self.parameters())


def test_a_step_without_gradient_is_reported_at_once(tmp_path):
    monitor = QLABMonitor(plot=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[monitor], default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_NoBackward(), DataLoader(regression_data(48), batch_size=8))
    stalls = [w for w in caught if "gradient was zero or missing" in str(w.message)]
    assert len(stalls) == 1 and "skipped step 1 " in str(stalls[0].message)
    assert trainer.optimizers[0].events["zero_gradient"] == 6


class _PlainModule(LightningModule):
    """An ordinary module with its own optimizer: nothing for the monitor to watch."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(5, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Baseline(RegressionNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = True

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    "model, message",
    [
        (_PlainModule, r"_PlainModule is not a QLABMixin module.*no QLAB optimizer either"),
        (_Baseline, r"the optimizers of _Baseline are \[Adam\], not QLAB"),
    ],
)
def test_warns_when_there_is_no_qlab_to_monitor(tmp_path, model, message):
    monitor = QLABMonitor()
    trainer = quiet_trainer(max_steps=2, callbacks=[monitor], default_root_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match=message):
        trainer.fit(model(), DataLoader(regression_data(32), batch_size=8))
    assert len(monitor.steps) == 0 and monitor.plot_path is None


def test_writes_a_png_of_step_size_and_loss_into_the_log_folder(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    logger = CSVLogger(tmp_path, name="run")
    monitor = QLABMonitor(plot_filename="steps.png")
    trainer = quiet_trainer(max_steps=10, logger=logger, callbacks=[monitor])
    trainer.fit(RegressionNet(), DataLoader(regression_data(80), batch_size=8))
    expected = Path(logger.log_dir) / "steps.png"
    assert monitor.plot_path == str(expected)
    image = imread(expected)
    assert image.shape[:2] == (600, 800)  # figsize (8, 6) at 100 dpi
    assert image.std() > 0  # something was drawn


def test_without_a_logger_the_png_goes_to_the_default_root_dir(tmp_path):
    pytest.importorskip("matplotlib")
    monitor = QLABMonitor()
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.fit(RegressionNet(), DataLoader(regression_data(24), batch_size=8))
    assert monitor.plot_path == str(tmp_path / "qlab.png")
    assert (tmp_path / "qlab.png").read_bytes().startswith(b"\x89PNG")


def test_without_matplotlib_one_warning_and_no_crash(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` finds when it is not installed
    monitor = QLABMonitor()
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor], default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(RegressionNet(), DataLoader(regression_data(24), batch_size=8))
        trainer.fit(RegressionNet(), DataLoader(regression_data(24), batch_size=8))  # a second fit: no repeat
    messages = [str(w.message) for w in caught if "matplotlib" in str(w.message)]
    assert len(messages) == 1 and "`pip install matplotlib`" in messages[0]
    assert monitor.plot_path is None and not (tmp_path / "qlab.png").exists()


def test_state_dict_round_trip():
    monitor = QLABMonitor(plot=False, safeguard_window=3)
    # Three probes at least (1, 1 + PROBE_EVERY, then 8 or 16 steps later) fill the window of 3.
    trainer = quiet_trainer(max_steps=4 * PROBE_EVERY + 2, callbacks=[monitor])
    trainer.fit(RegressionNet(), DataLoader(regression_data(32), batch_size=8))
    restored = QLABMonitor(plot=False, safeguard_window=3)
    restored.load_state_dict(monitor.state_dict())
    assert list(restored.steps) == list(monitor.steps) == list(range(1, 4 * PROBE_EVERY + 3))
    assert list(restored.step_sizes) == list(monitor.step_sizes)
    # The loss is read on the steps that probe (1, 1 + PROBE_EVERY, then on the schedule), NaN elsewhere.
    assert [i for i, loss in enumerate(monitor.losses) if math.isfinite(loss)][:2] == [0, PROBE_EVERY]
    assert not any(math.isfinite(loss) for loss in monitor.losses[1:PROBE_EVERY])
    torch.testing.assert_close(torch.tensor(restored.losses), torch.tensor(monitor.losses), rtol=0, atol=0,
                               equal_nan=True)
    assert list(restored.event_codes) == list(monitor.event_codes)
    assert list(restored._recent_events) == list(monitor._recent_events) and len(restored._recent_events) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(plot="yes"), "plot must be True or False"),
        (dict(plot_filename="plots/qlab.png"), "a file name ending in .png"),
        (dict(plot_filename="qlab.svg"), "a file name ending in .png"),
        (dict(safeguard_window=0), "safeguard_window must be an integer >= 1"),
        (dict(safeguard_share=0.0), r"safeguard_share must be in \(0, 1\]"),
        (dict(safeguard_share=1.5), r"safeguard_share must be in \(0, 1\]"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        QLABMonitor(**kwargs)
