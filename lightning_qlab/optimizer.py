"""QLABGrad: the quadratic-loss-approximation step-size rule as a ``torch.optim.Optimizer``.

Reference: M. Fu, F.-X. Wu, "QLABGrad: a Hyperparameter-Free and Convergence-Guaranteed Scheme for
Deep Learning", AAAI 2024 (arXiv:2302.00252; v1 "QLAB: Quadratic Loss Approximation-Based Optimal
Learning Rate for Deep Learning" adds the momentum and Adam directions).

On a mini-batch with loss ``c = L(w)``, gradient ``g`` and a direction ``d``, the loss along the
direction is modelled as a parabola in the step size ``a``::

    phi(a) = L(w - a d) ~ c + b a + A a^2,       b = -(g . d)

The curvature ``A`` comes from one extra forward pass at the *trial point* ``w - beta d``::

    A = (L(w - beta d) - c - b beta) / beta^2,    a* = -b / (2 A)

``mode="paper"`` is the published rule: every step probes at ``beta`` = the previous step and steps
to ``a*``. The default ``mode="safeguarded"`` fits the same parabola, but only every
:data:`PROBE_EVERY` steps, or twice as many after a probe that confirms the step (see
:func:`next_probe_interval`), and keeps a *held step* between probes (see :func:`next_held_step`):

* the fitted minimiser of one mini-batch is short: sharpness rises to meet whatever step is taken
  (progressive sharpening), so a rule that always steps to ``a*`` keeps shrinking its own step.
  The held step therefore follows a smoothed ``a*`` up, never down,
* unless it would pass half the stability edge of the update. On a quadratic, gradient descent
  diverges beyond twice ``a*``, and ``a*`` itself keeps that margin of 2; momentum moves the edge
  out by ``(1 + mu) / (1 - mu)`` (Adam's averaged momentum), so the held step may rise to 19
  fitted minimisers with Adam's ``beta1 = 0.9``, and stays at the fitted minimiser without
  momentum.
* The step taken until the next probe leans from the held step into the band
  :data:`RELATIVE_UPDATE` of moves per step relative to the initial weights' norm,
  ``|w_{t+1} - w_t| / |w_0|``, by at most :data:`GROWTH_LIMIT` either way and never past half the
  stability edge (see :func:`step_toward_relative_update`): where one mini-batch's parabola is
  short (a batch-normalised CNN) or long (an MLP on CIFAR-10) for the whole run, the weights' own
  scale says so (their initial scale: the current one grows with the steps and would lengthen
  them without end). Inside the band the held step stands. The probes still fit at the held step.

This module has no Lightning import: it is usable in any PyTorch loop. The maths of the rule lives
in :func:`solve_step_size`, :func:`next_held_step`, :func:`step_toward_relative_update` and
:func:`next_probe_interval`; the directions in :mod:`lightning_qlab.directions`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_qlab import _compat
from lightning_qlab._checks import is_integer, is_number, wide_dtype
from lightning_qlab._workspace import Workspace
from lightning_qlab.directions import DIRECTIONS as _DIRECTION_TABLE
from lightning_qlab.directions import dots, squared_norms
from lightning_qlab.sharding import ShardLayout, local

__all__ = [
    "QLAB",
    "QLABStep",
    "StepSolution",
    "StepEstimate",
    "solve_step_size",
    "edge_bound",
    "next_held_step",
    "next_probe_interval",
    "step_toward_relative_update",
    "relative_update_band",
    "check_settings",
    "saved_record",
    "DIRECTIONS",
    "MODES",
    "EVENTS",
]

DIRECTIONS = tuple(_DIRECTION_TABLE)
MODES = ("safeguarded", "paper")

# Every event the optimizer can report, with the reason it exists. The counts are in ``QLAB.events``.
EVENTS = {
    "negative_curvature": "the fitted parabola opens downwards (A <= 0): no minimiser to jump to",
    "extrapolation_capped": "the fitted minimiser lay beyond GROWTH_LIMIT x the probed distance",
    "nonfinite_trial": "the trial loss was inf/NaN: the step was not taken and the distance halved",
    "nonfinite_gradient": "the gradient had inf/NaN entries: the step was skipped, nothing changed",
    "nonfinite_loss": "the training loss was inf/NaN: the step was skipped",
    "zero_gradient": "the gradient was exactly zero: there is nothing to step along",
    "not_descent": "g . d <= 0: the direction does not descend, the step was skipped",
    "warm_start_probes": "extra trial forwards spent by the first step to find the scale",
    "stability_edge": "the held step was lowered to half the stability edge of the update",
}

# The fitted parabola is trusted up to GROWTH_LIMIT times the probed distance beta. A parabola
# through phi(0), phi'(0) and phi(beta) interpolates on [0, beta]; far beyond beta it
# extrapolates from one noisy mini-batch, which is how the unbounded rule diverges. Classic
# safeguarded line searches bound extrapolation by a fixed multiple of the bracket for the same
# reason (Nocedal & Wright, "Numerical Optimization", 2nd ed., sec. 3.5). With the bound at 2 the
# step size can still grow geometrically (x1000 in 10 probes), so no scale is out of reach, while a
# single bad fit can at most double the step.
GROWTH_LIMIT = 2.0

# The first step probes until the fitted minimiser lies within a factor WARM_START_TOLERANCE of
# the probed distance. From any initial distance between 1e-12 and 1e12 that takes well under
# MAX_WARM_START_PROBES trial forwards (each probe doubles, halves or jumps to the minimiser).
# The first fit sets the step held over the first PROBE_EVERY steps, and the held step never
# falls below what it leads to, so it is fitted to 25% rather than to the factor 2 that one
# probe's extrapolation is trusted to: on MNIST, first steps that differed by 20% (the loss along
# d is not a parabola, so the fitted minimiser depends a little on where it is probed) led to held
# steps 40% apart after an epoch; at 25% the five initial steps of the README's sweep agree.
WARM_START_TOLERANCE = 1.25
MAX_WARM_START_PROBES = 80

# A probe can only measure curvature that stands out of the rounding of the loss values. The
# warm start trusts a fit when its curvature term A beta^2 exceeds this many machine epsilons of
# the loss's dtype, relative to the loss (for a float32 loss of 2.3: 32 * 1.2e-7 * 2.3 ~ 9e-6);
# below that the fitted minimiser is rounding noise, and the probe doubles as if A <= 0. Measured
# on an MNIST MLP with float32 losses, against the same fit in float64: with A beta^2 at 1
# epsilon the fitted minimiser was off by 25%, at 10 epsilons by 5%; at 1e-7 epsilons (a first
# probe at 1e-6) it came out as 1e-6 instead of 5.
RESOLVED_CURVATURE_EPS = 32.0

# Safeguarded mode probes on the first step and then one step in PROBE_EVERY. The trial forward
# costs a third of a training step or more; one probe in 8 brings that to 4-5%, and early in
# training, when the held step is still being found, the second probe must come early: with 32
# the transformer panel's second probe met a 10x shorter fit at step 33 and held it (the README).
PROBE_EVERY = 8

# By default the interval may double once: after a probe whose fit agrees with the held step the
# next comes 2 * PROBE_EVERY steps later, after one that does not PROBE_EVERY steps later
# (next_probe_interval; an interval the user sets stays fixed unless max_probe_interval is set
# too). The probes that only confirm the step are the ones thinned, and on the MLP of
# benchmarks/step_cost.py that takes a step from 1.35x to 1.26x an SGD step. Thinned to 64
# steps they cost 0.4 points on the CIFAR-10 CNN over two seeds: the held step rises through the
# maximum of its noisy estimate, so fewer probes hold it lower. Doubled once, every panel and
# held-out task stayed within its seed spread (the README).
PROBE_INTERVAL_GROWTH = 2

# The held step follows a running mean of log a* over the probes, with this weight on the past:
# one probe's a* scatters by a factor of about 2 around its neighbours, and 0.9 averages over the
# last ~10 probes, as Adam's beta1 = 0.9 averages gradients.
ESTIMATE_MEMORY = 0.9

# The step taken between probes is the held step moved into a band of moves per step relative to
# the initial weights' norm, |w_{t+1} - w_t| / |w_0|, by at most GROWTH_LIMIT either way; inside the
# band the held step stands (step_toward_relative_update). At the start of training, where |w_t| is
# |w_0|, the best tuned Adam learning rate moves the weights by 4e-3 to 8e-3 of their norm per step on
# the four public panels (MNIST 8.1e-3, CIFAR-10 CNN 5.6e-3, CIFAR-10 MLP 5.6e-3, the transformer
# 4.1e-3): that range is the band. The fitted step sits 2.5x below it on the CNN and 2-3x above it on
# the MLP, and the fit alone does not tell a short step from a long one; inside the band there is
# nothing to tell apart, and the fit stays the authority. A single target in the band (5e-3, the
# default until 2026-12-05) also moved the steps inside it: on MNIST it shortened a held step that
# moved the weights by 6e-3 to 7e-3 per step to about 0.75x of it, and the first 500 steps lost 0.4
# to 0.75 points of accuracy (the README). The norm is the initial one because the weights grow with
# the steps taken: a target relative to |w_t| lengthens the very steps that make the weights grow, and
# on MNIST it ran the step to twice the held step and cost 0.14 points over 3 epochs, 0.53 over 10.
# Fromage (Bernstein et al., 2020) and Adafactor's relative step (Shazeer & Stern, 2018) set a
# relative update alone; here the fit keeps the last word within the factor one fit is trusted to
# extrapolate.
RELATIVE_UPDATE = (4e-3, 8e-3)

# Where QLAB.state_dict() keeps its own record (held step, estimate, counters): a JSON string in
# the first parameter group.
RECORD_KEY = "qlab"

# What relative_update accepts: a band (low, high), one target, or None (no lean).
RelativeUpdate = Optional[Union[float, tuple[float, float]]]


def saved_record(state_dict: dict[str, Any]) -> Optional[dict[str, Any]]:
    """QLAB's own record in an optimizer state dict (``None`` when another optimizer saved it).

    Example:
        >>> import torch
        >>> saved_record(QLAB([torch.zeros(1, requires_grad=True)]).state_dict())["steps"]
        0
        >>> saved_record(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict()) is None
        True
    """
    if isinstance(state_dict.get(RECORD_KEY), dict):  # where earlier versions of this package kept it
        return state_dict[RECORD_KEY]
    groups = state_dict.get("param_groups") or [{}]
    record = groups[0].get(RECORD_KEY) if isinstance(groups[0], dict) else None
    return json.loads(record) if isinstance(record, str) else None


@dataclass(frozen=True)
class StepSolution:
    """What the rule decided for one probe: the step to take and why."""

    step_size: float  # a, the step actually taken along -d (0.0 when the step is not taken)
    next_trial_distance: float  # beta for the next step
    curvature: float  # A, the fitted second-order coefficient (nan when it cannot be fitted)
    minimiser: float  # -b / (2A), the fitted parabola's minimiser (nan when A <= 0 or unfitted)
    event: Optional[str] = None  # a key of EVENTS, or None when the plain rule applied


def solve_step_size(
    loss: float, trial_loss: float, slope: float, trial_distance: float, mode: str = "safeguarded"
) -> StepSolution:
    """Fit ``phi(a) = c + b a + A a^2`` and return the step size it prescribes.

    Args:
        loss: ``c = L(w)``, the mini-batch loss at the current parameters.
        trial_loss: ``L(w - beta d)``, the same mini-batch's loss at the trial point.
        slope: ``b = phi'(0) = -(g . d)``; negative for a descent direction.
        trial_distance: ``beta > 0``, the distance probed along ``-d``.
        mode: ``"paper"`` applies the published rule (``A <= 0`` keeps ``beta``);
            ``"safeguarded"`` bounds extrapolation at :data:`GROWTH_LIMIT` ``x beta``.

    Example:
        On ``phi(a) = 1 - 2a + a^2`` (minimum at ``a = 1``), probing at ``beta = 0.5``:

        >>> sol = solve_step_size(loss=1.0, trial_loss=0.25, slope=-2.0, trial_distance=0.5)
        >>> sol.step_size, sol.curvature
        (1.0, 1.0)
    """
    beta = trial_distance
    if not math.isfinite(trial_loss):
        # Nothing is known about phi between 0 and beta except that it blows up at beta.
        return StepSolution(0.0, beta / 2.0, math.nan, math.nan, "nonfinite_trial")
    curvature = (trial_loss - loss - slope * beta) / (beta * beta)
    if curvature <= 0.0:
        # The loss at beta lies on or below its tangent: the minimiser along d is beyond beta.
        step = beta if mode == "paper" else GROWTH_LIMIT * beta
        return StepSolution(step, step, curvature, math.nan, "negative_curvature")
    minimiser = -slope / (2.0 * curvature)
    if mode == "paper":
        # A zero or negative step leaves beta meaningless as a probing distance; keep the old one.
        return StepSolution(minimiser, minimiser if minimiser > 0.0 else beta, curvature, minimiser)
    if minimiser > GROWTH_LIMIT * beta:
        step = GROWTH_LIMIT * beta
        return StepSolution(step, step, curvature, minimiser, "extrapolation_capped")
    return StepSolution(minimiser, minimiser, curvature, minimiser)


def check_settings(
    initial_step: float,
    direction: str,
    mode: str,
    probe_every: Optional[int],
    max_probe_interval: Optional[int],
    momentum: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    relative_update: RelativeUpdate = RELATIVE_UPDATE,
    owner: str = "QLAB",
) -> tuple[int, int]:
    """Raise ``ValueError``/``TypeError`` naming ``owner`` for a setting QLAB cannot use; return
    the probing intervals these settings give, shortest and longest (1 and 1 in paper mode;
    :data:`PROBE_EVERY` and :data:`PROBE_INTERVAL_GROWTH` times it by default; ``probe_every``
    for both, a fixed interval, when only that is set).

    The one place QLAB's arguments are checked: :class:`QLAB` and
    :class:`~lightning_qlab.mixin.QLABConfig` both call it with every argument (the defaults live
    in :class:`QLAB`'s signature only).
    """
    if not is_number(initial_step):
        raise TypeError(f"{owner}: initial_step must be a positive number, got {initial_step!r}")
    if not math.isfinite(initial_step) or initial_step <= 0:
        raise ValueError(
            f"{owner}: initial_step must be positive and finite, got {initial_step!r}; "
            "any value in 1e-6 ... 10 works in 'safeguarded' mode."
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"{owner}: unknown direction {direction!r}; choose one of {DIRECTIONS}.")
    if mode not in MODES:
        raise ValueError(f"{owner}: unknown mode {mode!r}; choose one of {MODES}.")
    if probe_every is not None and (not is_integer(probe_every) or probe_every < 1):
        raise ValueError(f"{owner}: probe_every must be None or an integer >= 1, got {probe_every!r}.")
    if mode == "paper" and probe_every not in (None, 1):
        raise ValueError(
            f"{owner}: mode='paper' probes every step, as QLABGrad is published; probe_every="
            f"{probe_every} needs mode='safeguarded'."
        )
    shortest = 1 if mode == "paper" else PROBE_EVERY if probe_every is None else probe_every
    if max_probe_interval is not None and (not is_integer(max_probe_interval) or max_probe_interval < shortest):
        raise ValueError(
            f"{owner}: max_probe_interval must be None (the default schedule) or an integer >= "
            f"probe_every ({shortest}{' in paper mode' if mode == 'paper' else ''}), got {max_probe_interval!r}."
        )
    if mode == "paper" and max_probe_interval not in (None, 1):
        raise ValueError(
            f"{owner}: mode='paper' probes every step, as QLABGrad is published; max_probe_interval="
            f"{max_probe_interval} needs mode='safeguarded'."
        )
    if not is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum!r}")
    if len(betas) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}")
    if not is_number(eps) or not eps > 0.0:
        raise ValueError(f"{owner}: eps must be positive, got {eps!r}")
    if not is_number(weight_decay) or not weight_decay >= 0.0:
        raise ValueError(f"{owner}: weight_decay must be non-negative, got {weight_decay!r}")
    if relative_update is not None and relative_update_band(relative_update) is None:
        raise ValueError(
            f"{owner}: relative_update must be None (the fitted step alone), a positive number (one "
            f"target) or a pair of them, low <= high (a band), got {relative_update!r}."
        )
    if max_probe_interval is not None:
        return shortest, max_probe_interval
    if mode == "paper" or probe_every is not None:  # an interval set by the user stays as set
        return shortest, shortest
    return shortest, PROBE_INTERVAL_GROWTH * PROBE_EVERY


@dataclass(frozen=True)
class StepEstimate:
    """A running mean of ``log a*`` over the probes (:data:`ESTIMATE_MEMORY` on the past),
    with its bias correction, as Adam keeps its moments."""

    log_sum: float = 0.0
    weight: float = 0.0  # 1 - memory^n after n probes: the bias correction

    def add(self, fitted: float) -> "StepEstimate":
        m = ESTIMATE_MEMORY
        return StepEstimate(m * self.log_sum + (1 - m) * math.log(fitted), m * self.weight + (1 - m))

    @property
    def value(self) -> float:
        return math.exp(self.log_sum / self.weight) if self.weight > 0 else math.nan


def edge_bound(edge: float, estimate: StepEstimate) -> float:
    """Half the stability edge (``edge`` fitted minimisers, at least one), in step size: the
    bound of the held step, and of the step taken (:func:`step_toward_relative_update`)."""
    return max(edge / 2, 1.0) * estimate.value


def next_held_step(held: float, estimate: StepEstimate, solution: StepSolution, edge: float
                   ) -> tuple[float, StepEstimate, Optional[str]]:
    """The step to hold until the next probe, from the probe that gave ``solution``.

    Args:
        held: the step held so far (the probed distance).
        estimate: the running estimate of the fitted minimiser.
        solution: what :func:`solve_step_size` fitted at this probe.
        edge: the stability edge of the update, in fitted minimisers (2 without momentum); the
            held step stays within half of it.

    Returns:
        The new held step, the new estimate, and ``"stability_edge"`` when the bound lowered it.

    Example:
        After a probe that fitted ``a* = 1``, one that fits ``a* = 0.5`` leaves a held step of 1
        in place; it is lowered only where it would pass the stability edge:

        >>> earlier = StepEstimate().add(1.0)
        >>> sol = solve_step_size(loss=1.0, trial_loss=1.0, slope=-1.0, trial_distance=1.0)  # a* = 0.5
        >>> held, estimate, _ = next_held_step(1.0, earlier, sol, edge=4.0)
        >>> held, round(estimate.value, 3)
        (1.0, 0.694)
        >>> round(next_held_step(1.0, earlier, sol, edge=2.4)[0], 3)
        0.833
    """
    if solution.event == "nonfinite_trial":
        # The loss is not even finite at the held step: halve it and estimate afresh.
        return solution.next_trial_distance, StepEstimate(), None
    first = estimate.weight == 0.0
    estimate = estimate.add(solution.step_size)
    smoothed = estimate.value
    bound = edge_bound(edge, estimate)
    if held > bound:
        return bound, estimate, "stability_edge"
    # The first estimate replaces the step held so far (the warm start's, fitted along the first
    # step's sign-like direction, or a halved one); from then on the held step only rises.
    return smoothed if first else max(held, smoothed), estimate, None


def relative_update_band(relative_update: Any) -> Optional[tuple[float, float]]:
    """``relative_update`` as a band ``(low, high)``: a number is a band of one value. ``None``
    for anything else (``None`` itself, or a setting :func:`check_settings` refuses).

    Example:
        >>> relative_update_band(5e-3), relative_update_band([4e-3, 8e-3]), relative_update_band((8e-3, 4e-3))
        ((0.005, 0.005), (0.004, 0.008), None)
    """
    if is_number(relative_update):
        low = high = relative_update
    elif isinstance(relative_update, (tuple, list)) and len(relative_update) == 2 and all(
            map(is_number, relative_update)):
        low, high = relative_update
    else:
        return None
    return (float(low), float(high)) if 0.0 < low <= high < math.inf else None


def step_toward_relative_update(held: float, band: Optional[tuple[float, float]],
                                measured: Optional[tuple[float, float, float]], ceiling: float = math.inf) -> float:
    """The step to take until the next probe: the held step, moved into the step sizes that would
    move the weights by ``band`` of their initial norm, by at most :data:`GROWTH_LIMIT`, and never
    past ``ceiling``; inside the band, the held step.

    Args:
        held: the held step (what the fits give, :func:`next_held_step`).
        band: ``(low, high)``, the relative updates per step aimed at (:func:`relative_update_band`);
            ``None``: the held step alone.
        measured: ``(a, |w_{t+1} - w_t|^2, |w_0|^2)``: an earlier step of size ``a`` (the last
            probing step's), its squared length, and the weights' squared norm when training
            began; or ``None`` when nothing is measured yet.
        ceiling: half the stability edge, in step size (the held step's own bound): a step that
            passes it would not converge on a quadratic. Without momentum it is the fitted
            minimiser, so the relative update may shorten the step but not lengthen it.

    Example:
        A step of 0.1 moved the weights by 1e-3 of their initial norm, so steps of 0.4 to 0.8
        would move them by 4e-3 to 8e-3; the held step 0.2 is lengthened to 0.4:

        >>> step_toward_relative_update(0.2, (4e-3, 8e-3), (0.1, 1e-6, 1.0))
        0.4

        Had it moved them by 2e-3, the band would be 0.2 to 0.4, and the held step stands:

        >>> step_toward_relative_update(0.2, (4e-3, 8e-3), (0.1, 4e-6, 1.0))
        0.2

        A band of one value is a target; the lean never passes ``ceiling`` or a factor 2:

        >>> round(step_toward_relative_update(0.2, (5e-3, 5e-3), (0.1, 4e-6, 1.0)), 12)
        0.25
        >>> step_toward_relative_update(0.2, (5e-3, 5e-3), (0.1, 1e-6, 1.0), ceiling=0.3)
        0.3
        >>> step_toward_relative_update(0.2, (1e-2, 1e-2), (0.1, 1e-6, 1.0))
        0.4
        >>> band = (4e-3, 8e-3)
        >>> step_toward_relative_update(0.2, None, (0.1, 1e-6, 1.0)), step_toward_relative_update(0.2, band, None)
        (0.2, 0.2)
    """
    if band is None or measured is None:
        return held
    step, moved_sq, weights_sq = measured
    if not (step > 0.0 and 0.0 < moved_sq < math.inf and 0.0 < weights_sq < math.inf):
        return held
    unit = step * math.sqrt(weights_sq / moved_sq)  # the step that would move the weights by |w_0|
    low, high = band
    target = min(max(held, low * unit), high * unit)
    return min(max(target, held / GROWTH_LIMIT), GROWTH_LIMIT * held, max(ceiling, held))


def next_probe_interval(interval: int, intervals: tuple[int, int], held: float, solution: StepSolution,
                        safeguard: Optional[str]) -> int:
    """The steps from this probe to the next, in safeguarded mode.

    A probe whose fit agrees with the held step doubles the interval, up to the longest; any other
    brings it back to the shortest: the probes that only confirm the step are the ones to thin.

    Args:
        interval: the steps from the previous probe to this one.
        intervals: the shortest and the longest interval (``probe_every``, ``max_probe_interval``).
        held: the step held up to this probe (the probed distance).
        solution: what :func:`solve_step_size` fitted at this probe.
        safeguard: the event :func:`next_held_step` reported (``"stability_edge"``) or ``None``.

    Returns:
        ``min(2 * interval, longest)`` when the fitted minimiser lies within :data:`GROWTH_LIMIT`
        of ``held`` either way and no event fired; otherwise ``shortest``.

    Example:
        >>> agrees = solve_step_size(loss=1.0, trial_loss=0.5, slope=-1.0, trial_distance=1.0)  # a* = 1
        >>> next_probe_interval(8, (8, 64), 1.0, agrees, None), next_probe_interval(64, (8, 64), 1.0, agrees, None)
        (16, 64)
        >>> next_probe_interval(64, (8, 64), 4.0, agrees, None)  # the fit is 4x shorter than the held step
        8
    """
    shortest, longest = intervals
    agrees = (solution.event is None and safeguard is None
              and held / GROWTH_LIMIT <= solution.step_size <= GROWTH_LIMIT * held)
    return min(2 * interval, longest) if agrees else shortest


@dataclass(frozen=True)
class QLABStep:
    """Diagnostics of the last :meth:`QLAB.step`, in the paper's terms.

    ``step_size`` is the step actually taken along the update direction (0.0 when skipped on the
    host); it is also written to every ``param_group["lr"]``. On a step that probes,
    ``trial_distance`` is the ``beta`` that was probed and ``loss``, ``trial_loss``, ``slope``,
    ``curvature`` describe the fit; on a step that does not, they are NaN (nothing was measured,
    and nothing was read from the device).
    """

    step: int
    step_size: float
    trial_distance: float
    curvature: float
    loss: float
    trial_loss: float
    slope: float
    event: Optional[str]
    probes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QLAB(Optimizer):
    r"""QLABGrad: step sizes from a parabola fitted with one extra forward pass, and no learning rate.

    Every step that probes moves the parameters to the trial point ``w - beta d``, calls
    ``trial_loss_fn`` there (under ``torch.no_grad``), fits a parabola to the training loss, the
    slope ``-(g . d)`` and the trial loss, and takes the step. In ``"paper"`` mode every step
    probes and steps to the fitted minimiser, as QLABGrad is published. In ``"safeguarded"``
    mode (default) the first step probes, then one step in ``probe_every`` (by default, or in
    twice as many after a probe that confirms the step: ``max_probe_interval``); the others take
    a fused step of the size the last probe set (the held step, leaning into
    ``relative_update``) without calling ``trial_loss_fn`` and without reading anything from the device.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        initial_step: the first trial distance ``beta_0`` (> 0). In ``"safeguarded"`` mode the
            first step searches for the scale itself, so any value from 1e-6 to 10 trains alike.
        direction: what the parameters step along (see :mod:`lightning_qlab.directions`):
            ``"adam"`` (default: Adam's ``m_hat / (sqrt(v_hat) + eps)``), ``"rmsprop"``
            (``g / (sqrt(v_hat) + eps)``), ``"sgd"`` (``g``, QLABGrad as published) or
            ``"momentum"`` (heavy ball ``m <- mu m + g``). In safeguarded mode the parabola is
            always fitted along a descent direction of the current mini-batch (the RMS-scaled
            gradient for adam and rmsprop, ``g`` for sgd and momentum); in paper mode along the
            direction itself.
        mode: ``"safeguarded"`` (default) or ``"paper"``. See the module docstring.
        probe_every: probe one step in this many (safeguarded mode; default
            :data:`PROBE_EVERY`). Paper mode probes every step.
        max_probe_interval: the longest interval between probes (safeguarded mode). The interval
            doubles after each probe whose fit agrees with the held step, up to this many steps,
            and falls back to ``probe_every`` after one that does not (:func:`next_probe_interval`).
            ``None`` (default): :data:`PROBE_INTERVAL_GROWTH` ``x`` :data:`PROBE_EVERY` when
            ``probe_every`` is left at its default, and ``probe_every`` (a fixed interval) when it
            is set. Longer: fewer trial forwards, at a cost in accuracy on some models (the
            README's figures).
        momentum: ``mu`` of the momentum direction (per group).
        betas: Adam's moment decay rates; rmsprop uses ``betas[1]`` (per group).
        eps: the denominator term of the adam and rmsprop directions (per group).
        weight_decay: decoupled weight decay ``lambda`` (per group): ``w <- w (1 - a lambda)``
            next to the step ``a``, as in AdamW (Loshchilov & Hutter, 2019). Decoupled so that the
            parabola is fitted to the data loss alone, the only loss the trial forward sees.
        relative_update: safeguarded mode: the band ``(low, high)`` of moves per step relative to
            the initial weights, ``|w_{t+1} - w_t| / |w_0|``, that the step taken between probes
            leans into, within a factor :data:`GROWTH_LIMIT` of the held step
            (:func:`step_toward_relative_update`; default :data:`RELATIVE_UPDATE`). A number is a
            target (a band of one value); ``None``: the held step alone.
        shard_group: the process group over which plain-tensor parameters are *shards* (FSDP1's
            ``process_group``, whose flat parameters each process holds a piece of); ``None``
            (default) when they are whole. FSDP2's DTensor parameters say how they are sharded
            themselves and need nothing here. See :mod:`lightning_qlab.sharding`.

    Calling convention: compute the loss, call ``backward()``, then
    ``optimizer.step(loss, trial_loss_fn)``, where ``trial_loss_fn()`` returns the same
    mini-batch's loss at the parameters as they are when it is called (same batch, same mode,
    the same dropout masks: :class:`lightning_qlab.TrialForward` records and replays them).

    Skipped steps: a non-finite gradient skips the step and changes nothing, on every step (on a
    step that does not probe, on the device: ``param_group["lr"]`` cannot know it and still shows
    the held step; the skip is counted in :attr:`events` at the next probe). A non-finite or zero
    training loss or gradient is detected on the steps that probe. With ``reduce_losses`` a loss
    that is finite here but not on another rank is only seen after the trial forward; then every
    rank moves back from the trial point (to within rounding, identically on all ranks).

    Sharded parameters (FSDP2, FSDP1): every sum over the parameters is the global one (local
    sums, then one all-reduce per process group, packed), so every process takes the same step;
    the moment buffers live with the shards. Every process must call ``step`` alike, as under DDP.

    State: the buffers are created with the optimizer (not at the first step), and QLAB's own
    record (held step, estimate, counters) travels in the first parameter group of
    :meth:`state_dict`, so that ``torch.distributed.checkpoint`` saves and restores it too.

    Cost: per probing step, one trial forward, the direction in a few ``foreach`` passes, and one
    read of a few scalars from the device; per other step, one fused kernel (torch's AdamW or SGD
    kernel, the cost of an SGD step).

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> loss_on_batch = lambda: torch.nn.functional.mse_loss(model(x), y)
        >>> opt = QLAB(model.parameters())
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     loss = loss_on_batch()
        ...     loss.backward()
        ...     _ = opt.step(loss, loss_on_batch)
        >>> opt.last_step.step_size > 0 and opt.param_groups[0]["lr"] == opt.last_step.step_size
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        initial_step: float = 1e-3,
        direction: str = "adam",
        mode: str = "safeguarded",
        probe_every: Optional[int] = None,
        max_probe_interval: Optional[int] = None,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        relative_update: RelativeUpdate = RELATIVE_UPDATE,
        shard_group: Optional[Any] = None,
    ) -> None:
        self.probe_every, self.max_probe_interval = check_settings(
            initial_step, direction, mode, probe_every, max_probe_interval, momentum, betas, eps, weight_decay,
            relative_update)
        self.probe_interval = self.probe_every  # from the last probe to the next
        self.direction = direction  # before the groups are added: add_param_group creates the buffers
        defaults = dict(lr=0.0, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:  # a group's own settings are checked like the defaults
            check_settings(initial_step, direction, mode, probe_every, max_probe_interval, group["momentum"],
                           group["betas"], group["eps"], group["weight_decay"], relative_update,
                           owner="QLAB (a parameter group)")
        self.shard_group = shard_group
        self._layout: Optional[tuple[tuple[int, ...], Any, ShardLayout]] = None  # (param ids, group, layout)
        self._workspace = Workspace()  # the probing step's temporaries
        self.mode = mode
        self.initial_step = float(initial_step)
        # Optimizer-wide state: one line search runs along the concatenation of all groups.
        self.trial_distance = float(initial_step)  # beta; in safeguarded mode also the held step
        self.relative_update = relative_update_band(relative_update)  # (low, high) or None
        self.step_size = float(initial_step)  # the step taken between probes (safeguarded mode)
        # (a, |w_{t+1} - w_t|^2, |w_0|^2): the last probing step's move, read at the next probe
        # (until then the squares wait on the device: _unread_move), and the weights' norm when
        # training began, read once.
        self._measured: Optional[tuple[float, float, float]] = None
        self._unread_move: Optional[tuple[float, Tensor, Optional[Tensor]]] = None
        self.estimate = StepEstimate()
        self.steps = 0  # calls to step() that reached the rule, skipped ones included
        self.direction_updates = 0  # the moments' step count t (bias corrections)
        self.warm_started = False
        self.next_probe = 1  # the step that probes next (a skipped probe tries again on the next step)
        self.events: dict[str, int] = {name: 0 for name in EVENTS}
        self.last_step: Optional[QLABStep] = None
        self._unread_skips: Optional[Tensor] = None  # steps skipped on the device since the last read

    # ------------------------------------------------------------------ state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.requires_grad:
                self._buffers(p)

    def state_dict(self) -> dict[str, Any]:
        self._count_unread_skips()
        self._count_unread_move()
        state = super().state_dict()
        # One string in the first group: torch.distributed.checkpoint keeps only "state" and
        # "param_groups", and loads into the layout of a fresh optimizer's state dict.
        state["param_groups"][0][RECORD_KEY] = json.dumps({
            "trial_distance": self.trial_distance,
            "step_size": self.step_size,
            "measured": None if self._measured is None else list(self._measured),
            "estimate": asdict(self.estimate),
            "steps": self.steps,
            "direction_updates": self.direction_updates,
            "warm_started": self.warm_started,
            "probe_interval": self.probe_interval,
            "next_probe": self.next_probe,
            "events": dict(self.events),
            "direction": self.direction,
            "mode": self.mode,
            "probe_every": self.probe_every,
            "max_probe_interval": self.max_probe_interval,
            "relative_update": self.relative_update,  # the band, a list in JSON
            "last_step": None if self.last_step is None else self.last_step.as_dict(),
        })
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        qlab = saved_record(state_dict)
        state_dict.pop(RECORD_KEY, None)  # where checkpoints of earlier versions kept it
        state_dict["param_groups"] = [{k: v for k, v in group.items() if k != RECORD_KEY}
                                      for group in state_dict.get("param_groups", [])]
        if qlab is None:
            raise ValueError(
                "QLAB.load_state_dict: this state dict holds no QLAB record (param_groups[0]['qlab']); it "
                "was not saved by QLAB.state_dict() (a different optimizer's checkpoint?)."
            )
        for name in ("direction", "mode", "probe_every", "max_probe_interval", "relative_update"):
            saved, own = qlab.get(name, getattr(self, name)), getattr(self, name)
            if name == "relative_update":  # a list in the record; one number where older versions saved it
                saved = relative_update_band(saved)
            if saved != own:
                raise ValueError(
                    f"QLAB.load_state_dict: the checkpoint used {name}={saved!r} but this optimizer "
                    f"uses {name}={own!r}; construct it with the same {name} to resume."
                )
        super().load_state_dict(state_dict)
        self.trial_distance = float(qlab["trial_distance"])
        self.step_size = float(qlab.get("step_size", self.trial_distance))
        measured = qlab.get("measured")
        self._measured = None if measured is None else (float(measured[0]), float(measured[1]), float(measured[2]))
        self._unread_move = None
        self.estimate = StepEstimate(**qlab.get("estimate", {}))
        self.steps = int(qlab["steps"])
        self.direction_updates = int(qlab["direction_updates"])
        self.warm_started = bool(qlab["warm_started"])
        if "next_probe" in qlab:
            self.probe_interval, self.next_probe = int(qlab["probe_interval"]), int(qlab["next_probe"])
        else:  # the fixed schedule probed steps 1, 1 + k, 1 + 2k, ...
            self.next_probe = self.steps + 1 + (-self.steps) % self.probe_every
        self.events = {name: int(qlab["events"].get(name, 0)) for name in EVENTS}
        self.last_step = None if qlab["last_step"] is None else QLABStep(**qlab["last_step"])
        self._unread_skips = None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        loss: Optional[Tensor] = None,
        trial_loss_fn: Optional[Callable[[], Tensor]] = None,
        *,
        closure: Optional[Callable[[], Any]] = None,
        reduce_losses: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Tensor:
        """Take one QLAB step.

        Args:
            loss: the mini-batch training loss ``L(w)`` whose ``backward()`` produced the
                gradients (a scalar tensor; it may still carry its graph).
            trial_loss_fn: a no-argument callable returning the same mini-batch's loss at the
                parameters as they are when it is called. It is called under ``torch.no_grad``
                at the trial point on the steps that probe (several times on the very first step
                in safeguarded mode), and not at all on the others.
            closure: accepted for Lightning's optimizer plumbing, which passes its hook closure
                here; it is called first, with gradients enabled. QLAB never re-evaluates the
                training loss through it.
            reduce_losses: optional callable applied to the 1-D tensor ``[L(w), L(w - beta d)]``
                before the solve; under data parallelism, pass a mean over ranks so that every
                rank takes the same step (the gradient is already averaged, the losses are not).
                Called on the steps that probe only, on every rank alike.

        Returns:
            The training loss, detached.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        loss = _checked(loss, "loss", "the training loss whose backward() made the gradients")
        if trial_loss_fn is None or not callable(trial_loss_fn):
            raise TypeError(
                "QLAB.step needs trial_loss_fn: a no-argument callable returning the same "
                "mini-batch's loss at the current parameters, e.g. "
                "opt.step(loss, lambda: loss_fn(model(x), y))."
            )
        params, grads, groups = self._params_with_grad()
        loss = loss.detach()
        self.steps += 1
        if not params:
            return self._skip(loss, "zero_gradient")
        self.direction_updates += 1
        for p in params:
            self._buffers(p)
        layout = self._shard_layout(params)
        states = [self.state[p] for p in params]
        if layout.sharded:  # from here on, each process works on its own shards
            params, grads = [local(p) for p in params], [local(g) for g in grads]
            states = [{name: local(value) for name, value in state.items()} for state in states]
        _compat.foreach_add_([state["step"] for state in states], 1.0)
        if self.mode == "paper" or not self.warm_started or self.steps >= self.next_probe:
            return self._probing_step(loss, trial_loss_fn, reduce_losses, params, grads, states, groups, layout)
        return self._fused_step(loss, params, grads, states, groups, layout)

    def _fused_step(self, loss: Tensor, params: list[Tensor], grads: list[Tensor], states: list[dict],
                    groups: list, layout: ShardLayout) -> Tensor:
        """A step of the held size along the direction, in fused kernels; reads nothing."""
        found_inf = (~torch.isfinite(layout.total(squared_norms(grads)))).to(torch.float32)
        step_size = self.step_size
        direction = _DIRECTION_TABLE[self.direction]
        for group, index in _kernel_chunks(groups, params):
            subset = [states[i] for i in index]
            direction.fused_step(group, [params[i] for i in index], [grads[i] for i in index], subset, step_size,
                                 found_inf.to(params[index[0]].device), [state["step"] for state in subset])
        self._unread_skips = found_inf if self._unread_skips is None else self._unread_skips + found_inf
        self._record(step_size, math.nan, math.nan, math.nan, math.nan, math.nan, None, 0)
        return loss

    def _probing_step(self, loss: Tensor, trial_loss_fn: Callable[[], Tensor],
                      reduce_losses: Optional[Callable[[Tensor], Tensor]], params: list[Tensor],
                      grads: list[Tensor], states: list[dict], groups: list, layout: ShardLayout) -> Tensor:
        """Fit the parabola along d at the trial point, then take the step; one read in all."""
        direction = _DIRECTION_TABLE[self.direction]
        paper = self.mode == "paper"
        # Every process must know |g|^2 before the moments are updated: a skipped step must change
        # no buffer on any of them. Without reduce_losses the loss is known here; with it, every
        # rank must update its moments alike, so only the gradient (the same on every rank) decides.
        grad_sq = layout.total(squared_norms(grads))
        keep = torch.isfinite(grad_sq) & (grad_sq > 0)
        if reduce_losses is None:
            keep = keep & torch.isfinite(loss)
        found_inf = (~keep).to(torch.float32)
        ray = self._workspace.like("ray", params)  # d, written by the direction's kernels
        _compat.foreach_zero_(ray)
        for group, index in _kernel_chunks(groups, params):
            direction.probe(group, [states[i] for i in index], [grads[i] for i in index], [ray[i] for i in index],
                            [states[i]["step"] for i in index], found_inf.to(params[index[0]].device), paper)
        g_dot_d = layout.total(dots(grads, ray))
        beta = self.trial_distance
        if beta * beta < sys.float_info.min:
            # The curvature A = (...) / beta^2 can no longer be represented (beta^2 is zero or
            # subnormal): the trial distance has collapsed, which a consistent trial loss never causes.
            raise RuntimeError(
                f"QLAB: the trial distance collapsed to {beta:.3g} after {self.steps - 1} steps: "
                "the trial loss kept rising even for vanishing steps. This happens when "
                "trial_loss_fn does not evaluate the same function as the training forward "
                "(fresh dropout masks, another batch, eval mode): lightning_qlab.TrialForward "
                "replays the dropout masks for you."
            )
        # w itself, kept until the step: adding beta d back would not give w to the last bit, and a
        # step that is shorter than beta d's rounding (or not taken at all) must start from w exactly.
        origin = self._workspace.like("origin", params)
        _compat.foreach_copy_(origin, params)
        _compat.foreach_add_(params, ray, -beta)
        last_move = [None, None] if self._unread_move is None else list(self._unread_move[1:])  # on the device
        c, trial, gd, squared, unread, *move_squares = self._read(
            loss, trial_loss_fn, reduce_losses, params, origin, beta,
            [g_dot_d, grad_sq, self._unread_skips, *last_move])
        self._count_unread_skips(unread)
        self._count_unread_move(move_squares)
        if math.isfinite(squared) and squared > 0.0 and (reduce_losses is not None or math.isfinite(c)):
            for group, start, end in groups:  # the gradient counts (keep was 1): the rest of the moments
                if end > start:
                    direction.finish(group, states[start:end], grads[start:end], paper)
        skipped = None
        if not math.isfinite(squared):
            skipped = "nonfinite_gradient"
        elif squared == 0.0:
            skipped = "zero_gradient"
        elif not math.isfinite(c):
            skipped = "nonfinite_loss"
        elif not gd > 0.0:
            skipped = "not_descent"
        if skipped is not None:
            _compat.foreach_copy_(params, origin)
            return self._skip(loss, skipped, trial_loss=trial, slope=-gd)

        solution = solve_step_size(c, trial, -gd, beta, self.mode)
        probes = 1
        if not paper and not self.warm_started:

            def probe(from_distance: float, to_distance: float) -> float:
                """Move from w - from_distance d to w - to_distance d; the trial loss there."""
                _compat.foreach_add_(params, ray, from_distance - to_distance)
                return self._read(loss, trial_loss_fn, reduce_losses, params, origin, to_distance)[1]

            resolution = RESOLVED_CURVATURE_EPS * torch.finfo(loss.dtype).eps
            solution, beta, trial, probes = _warm_start(solution, beta, c, trial, gd, self.mode, probe, resolution)
            self.events["warm_start_probes"] += probes - 1

        event = solution.event
        if paper or not self.warm_started:  # the first probe sets the scale; the estimate starts after it
            step_size, self.trial_distance = solution.step_size, solution.next_trial_distance
            self.step_size = self.trial_distance
            self.warm_started = not paper
        else:
            held, self.estimate, edge_event = next_held_step(
                self.trial_distance, self.estimate, solution, self._stability_edge())
            if edge_event is not None:
                self.events[edge_event] += 1
                event = event or edge_event
            self.probe_interval = next_probe_interval(
                self.probe_interval, (self.probe_every, self.max_probe_interval), beta, solution, edge_event)
            self.trial_distance = held
            # After a fresh estimate (a non-finite trial) there is no bound to lean up to.
            ceiling = edge_bound(self._stability_edge(), self.estimate) if self.estimate.weight else held
            self.step_size = step_toward_relative_update(held, self.relative_update, self._measured, ceiling)
            step_size = 0.0 if solution.event == "nonfinite_trial" else self.step_size
        self.next_probe = self.steps + self.probe_interval
        self._move(params, origin, ray, groups, states, step_size)
        if step_size > 0.0 and self.relative_update is not None and not paper:
            self._measure_move(params, origin, ray, layout, step_size)
        if solution.event is not None:
            self.events[solution.event] += 1
        self._record(step_size, beta, solution.curvature, c, trial, -gd, event, probes)
        return loss

    # ------------------------------------------------------------------ internals
    def _move(self, params: list[Tensor], origin: list[Tensor], ray: list[Tensor], groups: list, states: list[dict],
              step_size: float) -> None:
        """From the trial point to ``w (1 - a lambda) - a u`` (``origin`` holds ``w``), group by group."""
        _compat.foreach_copy_(params, origin)
        direction = _DIRECTION_TABLE[self.direction]
        for group, start, end in groups:
            if end == start:
                continue
            decay = group["weight_decay"] * step_size
            if decay != 0.0:
                _compat.foreach_mul_(params[start:end], 1.0 - decay)
            direction.move(group, states[start:end], params[start:end], ray[start:end], self.direction_updates,
                           step_size, self.mode == "paper")

    def _measure_move(self, params: list[Tensor], origin: list[Tensor], scratch: list[Tensor], layout: ShardLayout,
                      step_size: float) -> None:
        """Keep ``|w_{t+1} - w_t|^2`` of the step just taken on the device, for the next probe to
        read, and ``|w_t|^2`` until a non-zero one is known (the first step's, unless the weights
        start at zero); ``scratch`` (tensors like the parameters) is overwritten."""
        for difference, before, after in zip(scratch, origin, params):
            torch.sub(before, after, out=difference)
        initial_known = self._measured is not None and self._measured[2] > 0.0
        weights_sq = None if initial_known else layout.total(squared_norms(origin))
        self._unread_move = (step_size, layout.total(squared_norms(scratch)), weights_sq)

    def _count_unread_move(self, squares: Optional[Sequence[float]] = None) -> None:
        """Turn the measured move into host floats (``squares``: the two values of
        ``_unread_move``, already read; the second counts only where the weights were measured)."""
        if self._unread_move is None:
            return
        step_size, moved, weights = self._unread_move
        moved_sq, weights_sq = squares if squares is not None else (moved, weights)
        initial_sq = self._measured[2] if weights is None else float(weights_sq)  # else: kept from before
        self._measured = (step_size, float(moved_sq), initial_sq)
        self._unread_move = None

    def _stability_edge(self) -> float:
        """The smallest stability edge over the groups (their momentum settings may differ)."""
        direction = _DIRECTION_TABLE[self.direction]
        return min(direction.edge(group) for group in self.param_groups)

    def _buffers(self, p: Tensor) -> None:
        """Create ``p``'s state if it has none: the direction's buffers (like ``p``: sharded like
        it) and the step count."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for name in _DIRECTION_TABLE[self.direction].buffers:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _shard_layout(self, params: list[Tensor]) -> ShardLayout:
        """How ``params`` are sharded over processes; rebuilt only when the parameters change."""
        key = tuple(id(p) for p in params)
        if self._layout is None or self._layout[:2] != (key, self.shard_group):
            self._layout = (key, self.shard_group, ShardLayout(params, self.shard_group))
        return self._layout[2]

    def _params_with_grad(self) -> tuple[list[Tensor], list[Tensor], list[tuple[dict, int, int]]]:
        """Flat lists of the parameters that have gradients, and each group's slice of them.

        A shard of FSDP1 that holds none of a parameter's elements has no gradient for it; it
        takes part with an empty one, so that every process steps the same parameters.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        groups: list[tuple[dict, int, int]] = []
        for group in self.param_groups:
            start = len(params)
            for p in group["params"]:
                if p.grad is None and self.shard_group is not None and p.requires_grad and p.numel() == 0:
                    p.grad = torch.zeros_like(p)
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "QLAB does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients for those parameters."
                    )
                params.append(p)
                grads.append(p.grad)
            groups.append((group, start, len(params)))
        return params, grads, groups

    def _read(
        self,
        loss: Tensor,
        trial_loss_fn: Callable[[], Tensor],
        reduce_losses: Optional[Callable[[Tensor], Tensor]],
        params: list[Tensor],
        origin: list[Tensor],
        beta: float,
        extras: Sequence[Optional[Tensor]] = (),
    ) -> list[float]:
        """Evaluate the trial loss at ``w - beta d`` (where the parameters are now) and read
        ``[c, trial loss, *extras]`` from the device in one go (an extra that is None reads as 0).

        If ``trial_loss_fn`` raises or returns something that is not a scalar tensor, the
        parameters are put back to ``w`` (``origin``) before the error propagates.
        """
        try:
            try:
                trial = trial_loss_fn()
            except Exception as error:
                raise RuntimeError(
                    f"QLAB: trial_loss_fn raised at the trial point w - {beta:g} d (see the error "
                    "above); the parameters were moved back to w. trial_loss_fn must return the "
                    "same mini-batch's loss at the parameters as they are when it is called."
                ) from error
            trial = _checked(trial, "trial_loss_fn()", "the mini-batch loss at the trial point")
            if trial.data_ptr() == loss.data_ptr():
                raise ValueError(
                    "QLAB: trial_loss_fn() returned the training loss itself (the same tensor), "
                    "not the loss recomputed at the trial point; it must run the forward pass, "
                    "e.g. lambda: loss_fn(model(x), y)."
                )
        except Exception:
            _compat.foreach_copy_(params, origin)
            raise
        # Loss differences are small: read them in float32 even under half precision, and in
        # float64 when the model computes in float64.
        dtype = wide_dtype(torch.promote_types(loss.dtype, trial.dtype))
        losses = torch.stack([loss.to(dtype).reshape(()), trial.detach().to(dtype).reshape(())])
        if reduce_losses is not None:
            losses = reduce_losses(losses)
        values = [losses.double()]
        values += [losses.new_zeros(1, dtype=torch.float64) if x is None else x.double().reshape(1).to(losses.device)
                   for x in extras]
        return torch.cat(values).tolist()

    def _count_unread_skips(self, unread: Optional[float] = None) -> None:
        """Add the steps skipped on the device since the last read to the events."""
        if self._unread_skips is None:
            return
        if unread is None:
            unread = float(self._unread_skips)
        self.events["nonfinite_gradient"] += int(round(unread))
        self._unread_skips = None

    def _skip(self, loss: Tensor, event: str, trial_loss: float = math.nan, slope: float = math.nan) -> Tensor:
        self.events[event] += 1
        self._record(0.0, self.trial_distance, math.nan, math.nan, trial_loss, slope, event, 0)
        return loss

    def _record(self, step_size: float, beta: float, curvature: float, loss: float, trial_loss: float,
                slope: float, event: Optional[str], probes: int) -> None:
        for group in self.param_groups:
            group["lr"] = step_size
        self.last_step = QLABStep(self.steps, step_size, beta, curvature, loss, trial_loss, slope, event, probes)


def _kernel_chunks(groups: list[tuple[dict, int, int]], params: list[Tensor]) -> Iterator[tuple[dict, list[int]]]:
    """Each group's parameters by device and dtype, as the fused kernels take them: the group and
    the indices into ``params``."""
    for group, start, end in groups:
        chunks: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index in range(start, end):
            chunks.setdefault((params[index].device, params[index].dtype), []).append(index)
        for indices in chunks.values():
            yield group, indices


def _warm_start(
    solution: StepSolution,
    beta: float,
    loss: float,
    trial_loss: float,
    g_dot_d: float,
    mode: str,
    probe: Callable[[float, float], float],
    resolution: float,
) -> tuple[StepSolution, float, float, int]:
    """The first step's search for the scale.

    Starting from the probe at ``beta`` (already solved in ``solution``), probe again until the
    fitted minimiser lies within a factor :data:`WARM_START_TOLERANCE` of ``beta``: then the first
    step interpolates. Each probe halves the distance while the trial loss is not finite, doubles it
    while the parabola opens downwards or its curvature term ``A beta^2`` is lost in the rounding
    of the loss (below ``resolution * max(|c|, |trial loss|)``), and otherwise jumps to the
    fitted minimiser. ``probe(from_distance, to_distance)`` moves the parameters and returns the
    trial loss there.

    The search keeps the bracket its probes established: up to ``below_tangent`` the loss was
    indistinguishable from or below its tangent (so the minimiser along d lies further out);
    from ``nonfinite`` on it may not be finite. A proposal outside that bracket means the loss
    along d is not parabola-like at this scale (for instance concave, then steep), and probing
    there would only cycle; the search then ends and the first step goes to the probed distance
    with the lowest trial loss.

    Returns:
        The solution to apply, the distance the parameters are now at, the trial loss there,
        and the number of probes spent (the first one included).
    """
    below_tangent, nonfinite = 0.0, math.inf
    best: Optional[tuple[float, float, StepSolution]] = None  # (trial loss, distance, solution)
    probes = 1
    while True:
        resolved = False
        if solution.event == "nonfinite_trial":
            nonfinite = min(nonfinite, beta)
        else:
            resolved = solution.curvature * beta * beta > resolution * max(abs(loss), abs(trial_loss))
            if not resolved:
                below_tangent = max(below_tangent, beta)
            if best is None or trial_loss < best[0]:
                best = (trial_loss, beta, solution)
        if probes >= MAX_WARM_START_PROBES:
            break
        new_beta = _warm_start_distance(solution, beta, resolved)
        if new_beta is None:
            break
        if not below_tangent < new_beta < nonfinite and best is not None:
            _, distance, probed = best
            solution = StepSolution(distance, distance, probed.curvature, probed.minimiser)
            break
        trial_loss = probe(beta, new_beta)
        beta = new_beta
        probes += 1
        solution = solve_step_size(loss, trial_loss, -g_dot_d, beta, mode)
    return solution, beta, trial_loss, probes


def _warm_start_distance(solution: StepSolution, beta: float, resolved: bool) -> Optional[float]:
    """The next distance the warm start proposes to probe, or None once the scale is found.

    Halve while the trial loss is not finite, double while the fitted curvature is not positive
    or not ``resolved`` from rounding, and otherwise jump to the fitted minimiser until it lies
    within [beta / T, T beta] (T is WARM_START_TOLERANCE): then the first step is an
    interpolation, not an extrapolation, and the fit agrees with where it was probed.
    """
    if solution.event == "nonfinite_trial":
        return beta / 2.0
    if not resolved:
        return GROWTH_LIMIT * beta
    if beta / WARM_START_TOLERANCE <= solution.minimiser <= WARM_START_TOLERANCE * beta:
        return None
    return solution.minimiser


def _checked(value: Any, name: str, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"QLAB: {name} must be a torch.Tensor holding {what}, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"QLAB: {name} must be a scalar ({what}), got shape {tuple(value.shape)}; reduce it "
            "with .mean() or .sum() first."
        )
    return value
