"""A slow, obviously correct float64 reference of the QLAB rule, for testing the fast optimizer.

Written from the formulas alone (DESIGN.md section 1 and the docstrings of
:mod:`lightning_qlab.optimizer`), on flat float64 vectors, with every branch spelled out. It
shares no code with the optimizer: the constants are repeated here and a test checks that they
still agree.

On a mini-batch with loss ``c = L(w)``, gradient ``g`` and the probed direction ``d``::

    phi(a) = L(w - a d) ~ c + b a + A a^2,     b = -(g . d)
    A = (L(w - beta d) - c - b beta) / beta^2   (beta: the trial distance)
    a* = -b / (2 A)                             (the fitted minimiser)
    w <- w (1 - a lambda) - a u                 (lambda: the group's decoupled weight decay)

Paper mode probes every step with beta = the previous step, steps to a = a*, and u = d.
Safeguarded mode probes on step 1 and then after twice the last interval, at most
``max_probe_interval`` steps (by default twice PROBE_EVERY; ``probe_every``, a fixed interval,
when only that is set), when the probe's a* lay within a factor 2 of the held step and no event
fired, or after ``probe_every`` steps when not (a skipped probe probes again on the next step);
it holds the step
``a`` in between (probed at beta = a), and steps along ``u``, which is the momentum for the
momentum and adam directions. The held step after a probe (the first probe's warm start sets it):

    s = exp(mean of log a* over the probes, weights 0.9^age, bias-corrected)
    a = edge / 2 * s       if a > edge / 2 * s  (edge: the update's stability edge, in units of a*)
    a = s                  at the first probe after the warm start
    a = max(a, s)          otherwise

and the step taken until the next probe leans into the band ``relative_update = (low, high)`` of
relative updates of the initial weights (a number x is the band (x, x)): with ``(a', |dw'|)`` the
size and displacement of the last probing step's move and ``|w_0|`` the weights' norm at the first
measured move (the first non-zero one),

    r = min(max(a, low * a' * |w_0| / |dw'|), high * a' * |w_0| / |dw'|)
    step = min(max(r, a / 2), 2 a, max(edge / 2 * s, a))
                                     (step = a before the first measured move, or when |dw'| or |w_0|
                                     is 0; after a non-finite trial loss, at most a)

Usage::

    ref = ReferenceQLAB(groups=[Group(0, 6, weight_decay=0.1), Group(6, 9)], initial_step=1e-3)
    w = ref.step(w, loss=f(w), grad=grad_f(w), loss_at=f)   # loss_at(v) = the same batch's loss at v
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# The safeguards' constants, as documented in lightning_qlab.optimizer.
GROWTH_LIMIT = 2.0  # extrapolation is trusted up to twice the probed distance
MAX_WARM_START_PROBES = 80  # trial forwards the first step may spend finding the scale
WARM_START_TOLERANCE = 1.25  # the first step's search stops when the fit is within 25% of the probe
RESOLVED_CURVATURE_EPS = 32.0  # the warm start trusts A beta^2 above 32 epsilons of the loss
PROBE_EVERY = 8  # safeguarded mode's default probing interval
PROBE_INTERVAL_GROWTH = 2  # by default the interval may grow to twice probe_every
ESTIMATE_MEMORY = 0.9  # the weight of the past in the running mean of log a*
RELATIVE_UPDATE = (4e-3, 8e-3)  # the band of relative updates per step the step taken leans into

EVENT_NAMES = (
    "negative_curvature",
    "extrapolation_capped",
    "nonfinite_trial",
    "nonfinite_gradient",
    "nonfinite_loss",
    "zero_gradient",
    "not_descent",
    "warm_start_probes",
    "stability_edge",
)


@dataclass
class Group:
    """A parameter group: the slice ``[start, end)`` of the flat vector and its settings."""

    start: int
    end: int
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class Decision:
    """What the rule decided at one probe."""

    step_size: float
    next_trial_distance: float
    curvature: float
    minimiser: float
    event: Optional[str]


def rule(loss: float, trial_loss: float, g_dot_d: float, beta: float, mode: str) -> Decision:
    """The step-size rule for one probe at distance ``beta``, branch by branch."""
    if not math.isfinite(trial_loss):
        # Nothing is known between 0 and beta: take no step, probe half as far next time.
        return Decision(0.0, beta / 2.0, math.nan, math.nan, "nonfinite_trial")
    slope = -g_dot_d  # b = phi'(0)
    curvature = (trial_loss - loss - slope * beta) / beta**2  # A
    if curvature <= 0.0:
        if mode == "paper":
            # The paper keeps the previous step size.
            return Decision(beta, beta, curvature, math.nan, "negative_curvature")
        # Safeguarded: go as far as extrapolation is trusted.
        return Decision(GROWTH_LIMIT * beta, GROWTH_LIMIT * beta, curvature, math.nan, "negative_curvature")
    minimiser = -slope / (2.0 * curvature)
    if mode == "paper":
        next_beta = minimiser if minimiser > 0.0 else beta
        return Decision(minimiser, next_beta, curvature, minimiser, None)
    if minimiser > GROWTH_LIMIT * beta:
        capped = GROWTH_LIMIT * beta
        return Decision(capped, capped, curvature, minimiser, "extrapolation_capped")
    return Decision(minimiser, minimiser, curvature, minimiser, None)


def warm_start_next(decision: Decision, beta: float, resolved: bool) -> Optional[tuple[float, str]]:
    """The first step's next probing distance and the move's name, or None once the scale is found.

    ``resolved``: the curvature term A beta^2 stands out of the rounding of the loss values.
    """
    if decision.event == "nonfinite_trial":
        return beta / 2.0, "halve"  # halve while the trial loss is not finite
    if decision.curvature <= 0.0:
        return GROWTH_LIMIT * beta, "double"  # double while the parabola opens downwards
    if not resolved:
        return GROWTH_LIMIT * beta, "double (unresolved)"  # or its curvature is rounding noise
    if beta / WARM_START_TOLERANCE <= decision.minimiser <= WARM_START_TOLERANCE * beta:
        return None  # the minimiser is close to where it was probed: done
    return decision.minimiser, "jump"  # jump to the fitted minimiser and probe there


@dataclass
class ReferenceStep:
    """The reference's record of one step (the fields of ``QLABStep`` it can know)."""

    step: int
    step_size: float
    trial_distance: float
    curvature: float
    event: Optional[str]
    probes: int


class ReferenceQLAB:
    """The QLAB rule on a flat float64 parameter vector, one group slice at a time."""

    def __init__(
        self,
        groups: list[Group],
        initial_step: float = 1e-3,
        direction: str = "sgd",
        mode: str = "safeguarded",
        probe_every: Optional[int] = None,
        max_probe_interval: Optional[int] = None,
        relative_update: Optional[float | tuple[float, float]] = RELATIVE_UPDATE,
        loss_eps: float = torch.finfo(torch.float64).eps,
    ) -> None:
        """``loss_eps``: the machine epsilon of the dtype the losses are computed in."""
        self.loss_eps = loss_eps
        self.groups = groups
        self.direction = direction
        self.mode = mode
        self.probe_every = 1 if mode == "paper" else probe_every or PROBE_EVERY
        # The interval never passes it; by default it may double once, a set interval stays fixed.
        growth = PROBE_INTERVAL_GROWTH if mode != "paper" and probe_every is None else 1
        self.longest = max_probe_interval or growth * self.probe_every
        self.interval = self.probe_every
        self.next_probe = 1
        self.probed: list[int] = []  # the steps that probed (or tried to: skipped probes included)
        self.trial_distance = float(initial_step)  # also the held step in safeguarded mode
        if isinstance(relative_update, float):  # a number is a band of one value
            relative_update = (relative_update, relative_update)
        self.relative_update = relative_update  # (low, high) or None
        self.step_size = float(initial_step)  # the step taken between probes
        self.measured: Optional[tuple[float, float, float]] = None  # (a', |dw'|, |w_0|)
        self.log_sum = 0.0  # the running mean of log a*: its sum and its bias correction
        self.weight = 0.0
        self.steps = 0
        self.t = 0  # the moments' step count: every step, skipped ones included
        self.warm_started = False
        self.events = {name: 0 for name in EVENT_NAMES}
        self.m: Optional[Tensor] = None  # momentum buffer / Adam's first moment
        self.v: Optional[Tensor] = None  # Adam's and rmsprop's second moment
        self.last: Optional[ReferenceStep] = None
        self.warm_start_moves: list[str] = []  # "halve", "double" or "jump", in order
        self.leans: list[str] = []  # per lean: "lengthen", "shorten" or "stand" (inside the band)

    # -------------------------------------------------------------------- directions
    def update_moments(self, grad: Tensor) -> None:
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        for group in self.groups:
            s = slice(group.start, group.end)
            beta1, beta2 = group.betas
            if self.direction == "momentum":  # heavy ball: m <- mu m + g
                self.m[s] = group.momentum * self.m[s] + grad[s]
            if self.direction == "adam":
                self.m[s] = beta1 * self.m[s] + (1.0 - beta1) * grad[s]
            if self.direction in ("adam", "rmsprop"):
                self.v[s] = beta2 * self.v[s] + (1.0 - beta2) * grad[s] ** 2

    def vectors(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """(d, u): the direction the parabola is fitted along, and the one the step follows."""
        d, u = grad.clone(), grad.clone()
        for group in self.groups:
            s = slice(group.start, group.end)
            beta1, beta2 = group.betas
            if self.direction == "momentum":
                u[s] = self.m[s]
            if self.direction in ("adam", "rmsprop"):
                denominator = torch.sqrt(self.v[s] / (1.0 - beta2**self.t)) + group.eps
                d[s] = grad[s] / denominator
                u[s] = d[s]
                if self.direction == "adam":
                    u[s] = self.m[s] / (1.0 - beta1**self.t) / denominator
        if self.mode == "paper":  # QLABGrad (v1) fits along the direction itself
            d = u
        return d, u

    def edge(self) -> float:
        """The stability edge of the update, in fitted minimisers (the smallest over groups)."""
        if self.direction == "momentum":
            return min(2.0 * (1.0 + g.momentum) for g in self.groups)
        if self.direction == "adam":
            return min(2.0 * (1.0 + g.betas[0]) / (1.0 - g.betas[0]) for g in self.groups)
        return 2.0

    # -------------------------------------------------------------------- the step
    def toward_relative_update(self, held: float, ceiling: float) -> float:
        if self.relative_update is None or self.measured is None:
            return held
        a, moved, norm = self.measured
        if moved == 0.0 or norm == 0.0:  # nothing measured to lean towards
            return held
        low, high = self.relative_update
        target = min(max(held, low * a * norm / moved), high * a * norm / moved)
        self.leans.append("lengthen" if target > held else "shorten" if target < held else "stand")
        return min(max(target, held / 2), 2 * held, max(ceiling, held))

    def skip(self, event: str) -> None:
        self.events[event] += 1
        self.last = ReferenceStep(self.steps, 0.0, self.trial_distance, math.nan, event, 0)

    def move(self, w: Tensor, u: Tensor, a: float) -> Tensor:
        new_w = w.clone()
        for group in self.groups:
            s = slice(group.start, group.end)
            new_w[s] = w[s] * (1.0 - a * group.weight_decay) - a * u[s]
        return new_w

    def step(self, w: Tensor, loss: float, grad: Tensor, loss_at: Callable[[Tensor], float]) -> Tensor:
        """One QLAB step from ``w``; returns the new parameter vector (``w`` itself if skipped)."""
        assert w.dtype == torch.float64 and grad.dtype == torch.float64
        self.steps += 1
        self.t += 1
        # A gradient whose squared norm overflows counts as non-finite too: the optimizer decides
        # on the norm, to skip on the device without reading every element.
        grad_sq = float(torch.dot(grad, grad))
        finite = bool(torch.isfinite(grad).all()) and math.isfinite(grad_sq)
        if self.warm_started and self.steps < self.next_probe:
            # A step that does not probe: only a non-finite gradient skips it.
            a = self.step_size
            self.last = ReferenceStep(self.steps, a, math.nan, math.nan, None, 0)
            if not finite:
                self.events["nonfinite_gradient"] += 1
                return w
            self.update_moments(grad)
            return self.move(w, self.vectors(grad)[1], a)

        self.probed.append(self.steps)
        if not finite:
            self.skip("nonfinite_gradient")
            return w
        if grad_sq == 0.0:
            self.skip("zero_gradient")
            return w
        if not math.isfinite(loss):
            self.skip("nonfinite_loss")
            return w
        self.update_moments(grad)
        d, u = self.vectors(grad)
        g_dot_d = float(torch.dot(grad, d))
        if not g_dot_d > 0.0:
            self.skip("not_descent")
            return w

        def trial_loss(distance: float) -> float:
            return float(loss_at(w - distance * d))

        beta = self.trial_distance
        trial = trial_loss(beta)
        decision = rule(loss, trial, g_dot_d, beta, self.mode)
        probes = 1
        if self.mode == "safeguarded" and not self.warm_started:
            # The warm start: what the probes so far established about the loss along d.
            below_tangent = 0.0  # up to here the loss lay on or below its tangent line
            nonfinite = math.inf  # from here on the trial loss may be inf/NaN
            probed: list[tuple[float, float, Decision]] = []  # (trial loss, distance, decision)
            while True:
                resolved = False
                if decision.event == "nonfinite_trial":
                    nonfinite = min(nonfinite, beta)
                else:
                    probed.append((trial, beta, decision))
                    rounding = RESOLVED_CURVATURE_EPS * self.loss_eps * max(abs(loss), abs(trial))
                    resolved = decision.curvature * beta**2 > rounding
                    if not resolved:  # on, below or indistinguishable from the tangent
                        below_tangent = max(below_tangent, beta)
                if probes == MAX_WARM_START_PROBES:
                    break
                move = warm_start_next(decision, beta, resolved)
                if move is None:
                    break
                next_beta, name = move
                if next_beta <= below_tangent or next_beta >= nonfinite:
                    # Out of the bracket: step to the probed distance with the lowest trial loss
                    # (the first such probe when several tie).
                    lowest = min(t for t, _, _ in probed)
                    _, distance, at_best = next(p for p in probed if p[0] == lowest)
                    decision = Decision(distance, distance, at_best.curvature, at_best.minimiser, None)
                    self.warm_start_moves.append("stop at best")
                    break
                self.warm_start_moves.append(name)
                beta = next_beta
                trial = trial_loss(beta)
                decision = rule(loss, trial, g_dot_d, beta, self.mode)
                probes += 1
            self.events["warm_start_probes"] += probes - 1

        event = decision.event
        if self.mode == "paper" or not self.warm_started:
            a, self.trial_distance = decision.step_size, decision.next_trial_distance
            self.step_size = self.trial_distance
            self.warm_started = True
        elif decision.event == "nonfinite_trial":
            a, self.trial_distance = 0.0, decision.next_trial_distance  # halve, estimate afresh
            self.step_size = self.toward_relative_update(self.trial_distance, ceiling=self.trial_distance)
            self.log_sum = self.weight = 0.0
            self.interval = self.probe_every
        else:
            first = self.weight == 0.0
            self.log_sum = ESTIMATE_MEMORY * self.log_sum + (1 - ESTIMATE_MEMORY) * math.log(decision.step_size)
            self.weight = ESTIMATE_MEMORY * self.weight + (1 - ESTIMATE_MEMORY)
            smoothed = math.exp(self.log_sum / self.weight)
            held = self.trial_distance
            if held > self.edge() / 2 * smoothed:
                held = self.edge() / 2 * smoothed
                self.events["stability_edge"] += 1
                event = event or "stability_edge"
            else:
                held = smoothed if first else max(held, smoothed)
            agrees = event is None and beta / 2 <= decision.step_size <= 2 * beta
            self.interval = min(2 * self.interval, self.longest) if agrees else self.probe_every
            self.trial_distance = held
            a = self.step_size = self.toward_relative_update(held, ceiling=max(self.edge() / 2, 1.0) * smoothed)
        self.next_probe = self.steps + self.interval
        if decision.event is not None:
            self.events[decision.event] += 1
        self.last = ReferenceStep(self.steps, a, beta, decision.curvature, event, probes)
        new_w = self.move(w, u, a)
        if a > 0.0 and self.mode == "safeguarded" and self.relative_update is not None:
            initial = self.measured[2] if self.measured is not None and self.measured[2] > 0.0 else None
            self.measured = (a, float(torch.linalg.norm(new_w - w)),
                             float(torch.linalg.norm(w)) if initial is None else initial)
        return new_w
