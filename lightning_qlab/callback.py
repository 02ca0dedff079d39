r"""QLABMonitor: QLAB's per-step diagnostics in your loggers, warnings, and a plot at the end of fit.

QLAB picks its step size from a parabola fitted to two losses on the steps that probe. When training goes
wrong, the first questions are what step size it chose, what distance it probed, what curvature
it fitted, and whether its safeguards had to step in. This callback answers them:

* every optimizer step it records the step size and the safeguard event counts, and on the steps
  that probe the trial distance, the fitted curvature and the training and trial losses, and sends them to every logger of the
  Trainer under ``qlab/...`` (on the steps allowed by ``Trainer(log_every_n_steps=...)``);
* it warns once when the safeguards fire persistently, and when there is no QLAB to monitor;
* at the end of fit it writes a PNG of the step size and the loss over training into the log folder;
* its history travels with checkpoints, so a resumed run plots the whole run.
"""

from __future__ import annotations

import math
import os
from array import array
from collections import Counter, deque
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_qlab._checks import is_integer, is_number
from lightning_qlab._compat import logging_step, should_update_logs
from lightning_qlab.optimizer import EVENTS, QLAB, QLABStep

__all__ = ["QLABMonitor"]

# What to do about each event, after the optimizer's own description of it (EVENTS).
_ADVICE = {
    "negative_curvature": " (very noisy mini-batches: try larger batches or accumulate_batches)",
    "extrapolation_capped": " (the loss is nearly linear there; the step grows by the cap each step)",
    "nonfinite_trial": " (check the data and the precision)",
    "nonfinite_gradient": " (check the data and the precision)",
    "nonfinite_loss": " (check the data and the precision)",
    "zero_gradient": (" (the loss does not depend on the trainable parameters: a constant loss, "
                      "detached tensors, frozen parameters, or backward() not called before step())"),
    "not_descent": (" (mode='paper' fits along the momentum or adam direction itself, which can point "
                    "uphill; mode='safeguarded' always fits along a descent direction)"),
}

# The events a step can end with; warm-start probes are a count of forwards, not a step's outcome.
STEP_EVENTS = tuple(name for name in EVENTS if name != "warm_start_probes")
_NO_EVENT = 0  # event codes in the history: 0 = plain rule, i + 1 = STEP_EVENTS[i]


class QLABMonitor(Callback):
    r"""Logs QLAB's step size, trial distance, curvature, losses and safeguard events every step.

    Args:
        plot: write a PNG of the step size and the training loss at the end of fit (needs
            matplotlib; without it there is one warning and no plot).
        plot_filename: name of that PNG, written into ``trainer.log_dir`` (the first logger's
            folder) or ``trainer.default_root_dir`` when there is no logger.
        safeguard_window: the number of recent probing steps (where the safeguards act) the
            safeguard warning looks at.
        safeguard_share: the safeguards fire "persistently" when at least this share of the last
            ``safeguard_window`` probing steps ended with a safeguard event (an extrapolation cap, a
            non-positive curvature, a non-finite loss or gradient, a skipped step). One warning
            per fit, naming the events.

    Raises:
        MisconfigurationException: on an argument outside its range.

    Logged metrics (one value per optimizer step, on the steps where Lightning logs):
        ``qlab/step_size`` (also in ``param_group["lr"]``; ``LearningRateMonitor`` reads that before
        each batch, so its value at step ``t`` is the step size of step ``t - 1``),
        ``qlab/trial_distance``, ``qlab/curvature``, ``qlab/loss``, ``qlab/trial_loss``,
        ``qlab/probes`` and ``qlab/events/<name>``, the running count of each event. The fit
        (``trial_distance``, ``curvature``, ``loss``, ``trial_loss``) exists on the steps that
        probe (the first, then one in ``probe_every`` or in twice as many): QLAB reads nothing
        from the device on the others. Values that are not finite (those, or the curvature of a
        skipped step) are left out; the event counts say why.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_qlab.callback import QLABMonitor
        >>> monitor = QLABMonitor(safeguard_window=100)
        >>> trainer = Trainer(callbacks=[monitor], log_every_n_steps=10)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> monitor.plot_path  # doctest: +SKIP
        'lightning_logs/version_0/qlab.png'
    """

    def __init__(
        self,
        plot: bool = True,
        plot_filename: str = "qlab.png",
        safeguard_window: int = 50,
        safeguard_share: float = 0.5,
    ) -> None:
        if not isinstance(plot, bool):
            raise MisconfigurationException(f"QLABMonitor: plot must be True or False, got {plot!r}.")
        if not isinstance(plot_filename, str) or not plot_filename.endswith(".png") \
                or os.path.basename(plot_filename) != plot_filename:
            raise MisconfigurationException(
                f"QLABMonitor: plot_filename must be a file name ending in .png (no folder), got {plot_filename!r}."
            )
        if not is_integer(safeguard_window) or safeguard_window < 1:
            raise MisconfigurationException(
                f"QLABMonitor: safeguard_window must be an integer >= 1, got {safeguard_window!r}."
            )
        if not is_number(safeguard_share) or not 0 < safeguard_share <= 1:
            raise MisconfigurationException(
                f"QLABMonitor: safeguard_share must be in (0, 1], got {safeguard_share!r}."
            )
        self.plot = plot
        self.plot_filename = plot_filename
        self.safeguard_window = safeguard_window
        self.safeguard_share = float(safeguard_share)
        self.plot_path: Optional[str] = None  # where the last plot was written

        # History of every recorded step (what the plot shows; kept compact for long runs).
        self.steps = array("q")  # QLAB's step number
        self.step_sizes = array("d")
        self.losses = array("d")
        self.event_codes = array("b")
        self._recent_events: deque[Optional[str]] = deque(maxlen=safeguard_window)
        self._safeguard_warned = False
        self._optimizer: Optional[QLAB] = None
        self._matplotlib_warned = False
        self._mixin_trains = False
        self._stall_warned = False

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_qlab.mixin import QLABMixin  # the mixin imports nothing from here

        qlab_optimizers = [opt for opt in trainer.optimizers if isinstance(opt, QLAB)]
        self._optimizer = qlab_optimizers[0] if qlab_optimizers else None
        self._mixin_trains = isinstance(pl_module, QLABMixin)  # it warns about stalls itself
        self._stall_warned = False
        if not isinstance(pl_module, QLABMixin):
            rank_zero_warn(
                f"QLABMonitor: {type(pl_module).__name__} is not a QLABMixin module. QLAB needs a trial "
                "forward on the same batch every step; without the mixin your training_step must "
                "provide it (see lightning_qlab.QLABMixin)."
                + ("" if self._optimizer else " There is no QLAB optimizer either: the monitor stays idle."),
                category=RuntimeWarning,
            )
        elif self._optimizer is None:
            names = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            rank_zero_warn(
                f"QLABMonitor: the optimizers of {type(pl_module).__name__} are [{names}], not QLAB "
                "(a baseline run?), so there is nothing to monitor: the monitor stays idle.",
                category=RuntimeWarning,
            )
        if len(qlab_optimizers) > 1:
            rank_zero_info("QLABMonitor: several QLAB optimizers found; monitoring the first one.")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizer = self._optimizer
        if optimizer is None or optimizer.last_step is None:
            return
        last = optimizer.last_step
        if self.steps and self.steps[-1] == last.step:
            return  # no step this batch (accumulating micro-batches, or GradScaler skipped it)
        self._record(last)
        if last.event == "zero_gradient" and not self._mixin_trains:
            self._warn_stall_once(last)
        self._warn_if_safeguards_persist()
        # `should_update_logs` is how Lightning applies log_every_n_steps (LearningRateMonitor uses it too).
        if trainer.is_global_zero and trainer.loggers and should_update_logs(trainer):
            metrics = self._metrics(last, optimizer.events)
            step = logging_step(trainer)  # the x-axis of self.log values
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.plot or len(self.steps) == 0:  # the same on every rank: all ranks saw the same steps
            return
        # trainer.log_dir broadcasts rank 0's folder, a collective: every rank has to ask.
        folder = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            self.plot_path = self._write_plot(os.path.join(folder, self.plot_filename))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._optimizer = None  # do not keep the optimizer (and its state) alive after fit

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": torch.tensor(self.steps.tolist(), dtype=torch.int64),
            "step_sizes": torch.tensor(self.step_sizes.tolist(), dtype=torch.float64),
            "losses": torch.tensor(self.losses.tolist(), dtype=torch.float64),
            "event_codes": torch.tensor(self.event_codes.tolist(), dtype=torch.int8),
            "recent_events": list(self._recent_events),
            "safeguard_warned": self._safeguard_warned,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = array("q", state_dict["steps"].tolist())
        self.step_sizes = array("d", state_dict["step_sizes"].tolist())
        self.losses = array("d", state_dict["losses"].tolist())
        self.event_codes = array("b", state_dict["event_codes"].tolist())
        self._recent_events = deque(state_dict["recent_events"], maxlen=self.safeguard_window)
        self._safeguard_warned = bool(state_dict["safeguard_warned"])

    # ------------------------------------------------------------------ internals
    def _record(self, last: QLABStep) -> None:
        self.steps.append(last.step)
        self.step_sizes.append(last.step_size)
        self.losses.append(last.loss)
        self.event_codes.append(_NO_EVENT if last.event is None else STEP_EVENTS.index(last.event) + 1)
        if last.probes > 0 or last.event is not None:  # the safeguards act where QLAB probes (or skips)
            self._recent_events.append(last.event)

    def _warn_stall_once(self, last: QLABStep) -> None:
        # At once: every step is skipped while the gradient stays zero, and the loss does not move.
        if self._stall_warned:
            return
        self._stall_warned = True
        rank_zero_warn(
            f"QLABMonitor: QLAB skipped step {last.step} because the gradient was zero or missing, and "
            "skips every step while that lasts. Call loss.backward() (manual_backward) before "
            "optimizer.step(loss, trial_loss_fn), and make the loss depend on the trainable parameters.",
            category=RuntimeWarning,
        )

    def _warn_if_safeguards_persist(self) -> None:
        recent = self._recent_events
        if self._safeguard_warned or len(recent) < self.safeguard_window:
            return
        fired = Counter(event for event in recent if event is not None)
        total = sum(fired.values())
        if total < self.safeguard_share * len(recent):
            return
        self._safeguard_warned = True
        which = ", ".join(f"{name}: {count}" for name, count in fired.most_common())
        # Every event that fired, with the optimizer's own account of it (EVENTS), and what to do.
        meanings = " ".join(f"'{name}': {EVENTS[name]}{_ADVICE.get(name, '')}." for name, _ in fired.most_common())
        rank_zero_warn(
            f"QLABMonitor: QLAB's safeguards fired on {total} of the last {len(recent)} probing steps ({which}). "
            f"{meanings} The step sizes are in the logs under qlab/step_size.",
            category=RuntimeWarning,
        )

    @staticmethod
    def _metrics(last: QLABStep, events: dict[str, int]) -> dict[str, float]:
        values = {
            "qlab/step_size": last.step_size,
            "qlab/trial_distance": last.trial_distance,
            "qlab/curvature": last.curvature,
            "qlab/loss": last.loss,
            "qlab/trial_loss": last.trial_loss,
            "qlab/probes": float(last.probes),
        }
        metrics = {name: float(value) for name, value in values.items() if math.isfinite(value)}
        metrics.update({f"qlab/events/{name}": float(count) for name, count in events.items()})
        return metrics

    def _write_plot(self, path: str) -> Optional[str]:
        try:
            # The Agg canvas directly, not pyplot: no global backend switch in the user's process.
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if not self._matplotlib_warned:
                self._matplotlib_warned = True
                rank_zero_warn(
                    "QLABMonitor: matplotlib is not installed, so the step-size plot was not written. "
                    "`pip install matplotlib` to get it (or QLABMonitor(plot=False) to silence this).",
                    category=RuntimeWarning,
                )
            return None
        steps, step_sizes, losses = list(self.steps), list(self.step_sizes), list(self.losses)
        figure = Figure(figsize=(8, 6), constrained_layout=True)
        FigureCanvasAgg(figure)
        top, bottom = figure.subplots(2, 1, sharex=True)
        top.plot(steps, step_sizes, linewidth=1, label="step size")
        flagged = [i for i, code in enumerate(self.event_codes) if code != _NO_EVENT]
        if flagged:
            top.scatter([steps[i] for i in flagged], [step_sizes[i] for i in flagged], s=8, color="tab:red",
                        label="safeguard event", zorder=3)
        if any(value > 0 for value in step_sizes):
            top.set_yscale("log")
        top.set_ylabel("step size")
        top.legend(loc="best")
        # The loss is read on the steps that probe only (reading it on the others would stall a GPU).
        probed = [(step, loss) for step, loss in zip(steps, losses) if math.isfinite(loss)]
        bottom.plot([step for step, _ in probed], [loss for _, loss in probed], linewidth=1, color="tab:green")
        if all(loss > 0 for _, loss in probed):
            bottom.set_yscale("log")
        bottom.set_ylabel("training loss (mini-batch)")
        bottom.set_xlabel("optimizer step")
        figure.suptitle("QLAB step size and loss")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path, dpi=100)
        return path
