"""Accumulation windows: which training batches one optimizer step of :class:`~lightning_qlab.mixin.QLABMixin`
averages (``QLABConfig(accumulate_batches=k)``).

Windows of ``k`` batches start at the epoch's first batch; when the epoch's length is known, its
last window ends with the epoch (fewer micro-batches). A step that starts inside a window (after
a resume from a checkpoint written there) averages the micro-batches from there to the window's
end. An epoch of unknown length can end inside a window: its micro-batches are dropped when the
next window starts.

Example:
    >>> step_window(batch_idx=7, accumulate=3, epoch_length=8)  # windows 0-2, 3-5, 6-7
    range(6, 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_qlab.trial import TrialForward

__all__ = ["PendingStep", "step_window"]


def step_window(batch_idx: int, accumulate: int, epoch_length: float) -> range:
    """The batch indices of the window that ``batch_idx`` belongs to (``epoch_length`` may be inf)."""
    start = batch_idx - batch_idx % accumulate
    end = start + accumulate
    if math.isfinite(epoch_length):
        end = min(end, int(epoch_length))  # the epoch's last, shorter window
    return range(start, end)


@dataclass
class PendingStep:
    """The optimizer step being assembled: its size and its micro-batches so far, recorded for the
    trial forward."""

    size: int  # micro-batches this step will average (k, or fewer at the end of an epoch)
    trial: TrialForward
    window_start: int = 0  # batch_idx of the window's first batch

    @classmethod
    def starting_at(cls, batch_idx: int, window: range, trial: TrialForward,
                    replacing: Optional[PendingStep] = None) -> PendingStep:
        """The step that ``batch_idx`` starts; warns about an unfinished step it replaces and about
        a start inside a window."""
        if replacing is not None and replacing.started:
            rank_zero_warn(
                f"QLABMixin: dropped {len(replacing.trial)} micro-batch(es) of an unfinished "
                f"accumulation window of {replacing.size}: the epoch ended without telling its "
                "length in advance (no __len__), so the window could not be closed in time."
            )
        if batch_idx != window.start:
            rank_zero_warn(
                f"QLABMixin: training resumed inside an accumulation window (batch {batch_idx} of "
                f"the window {window.start}..{window.stop - 1}); this step averages the "
                f"{window.stop - batch_idx} micro-batch(es) from here to the window's end."
            )
        return cls(size=window.stop - batch_idx, trial=trial, window_start=window.start)

    def continues_at(self, batch_idx: int, window: range) -> bool:
        """Whether ``batch_idx`` (in ``window``) adds a micro-batch to this step."""
        return self.window_start == window.start and batch_idx != window.start

    @property
    def started(self) -> bool:
        """Whether micro-batches have been recorded (and their gradients accumulated)."""
        return len(self.trial) > 0
