"""A slow, obviously correct float64 reference of the QLAB rule, for testing the fast optimizer.

Written from the formulas alone (DESIGN.md section 1 and the docstrings of
:mod:`lightning_qlab.optimizer`), on flat float64 vectors, with every branch spelled out. It
shares no code with the optimizer: the constants are repeated here and a test checks that they
still agree.

On a mini-batch with loss ``c = L(w)``, gradient ``g`` and descent direction ``d``::

    phi(a) = L(w - a d) ~ c + b a + A a^2,     b = -(g . d)
    A = (L(w - beta d) - c - b beta) / beta^2   (beta: the trial distance = previous step size)
    a = -b / (2 A)                              (the step size)
    w <- w (1 - a lambda) - a d                 (lambda: the group's decoupled weight decay)

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
RESOLVED_CURVATURE_EPS = 32.0  # the warm start trusts A beta^2 above 32 epsilons of the loss

EVENT_NAMES = (
    "negative_curvature",
    "extrapolation_capped",
    "nonfinite_trial",
    "nonfinite_gradient",
    "nonfinite_loss",
    "zero_gradient",
    "not_descent",
    "warm_start_probes",
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
    if beta / GROWTH_LIMIT <= decision.minimiser <= GROWTH_LIMIT * beta:
        return None  # the minimiser is an interpolation: done
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
        loss_eps: float = torch.finfo(torch.float64).eps,
    ) -> None:
        """``loss_eps``: the machine epsilon of the dtype the losses are computed in."""
        self.loss_eps = loss_eps
        self.groups = groups
        self.direction = direction
        self.mode = mode
        self.trial_distance = float(initial_step)
        self.steps = 0
        self.direction_updates = 0
        self.warm_started = False
        self.events = {name: 0 for name in EVENT_NAMES}
        self.momentum_buffer: Optional[Tensor] = None
        self.exp_avg: Optional[Tensor] = None
        self.exp_avg_sq: Optional[Tensor] = None
        self.last: Optional[ReferenceStep] = None
        self.warm_start_moves: list[str] = []  # "halve", "double" or "jump", in order

    # -------------------------------------------------------------------- directions
    def descent_direction(self, grad: Tensor) -> Tensor:
        """d for the configured direction; updates the momentum / Adam moments."""
        if self.direction == "sgd":
            return grad.clone()
        self.direction_updates += 1
        t = self.direction_updates
        d = torch.zeros_like(grad)
        if self.direction == "momentum":
            if self.momentum_buffer is None:
                self.momentum_buffer = torch.zeros_like(grad)
            for group in self.groups:
                s = slice(group.start, group.end)
                # heavy ball: m <- mu m + g, d = m
                self.momentum_buffer[s] = group.momentum * self.momentum_buffer[s] + grad[s]
                d[s] = self.momentum_buffer[s]
            return d
        if self.exp_avg is None:
            self.exp_avg = torch.zeros_like(grad)
            self.exp_avg_sq = torch.zeros_like(grad)
        for group in self.groups:
            s = slice(group.start, group.end)
            beta1, beta2 = group.betas
            if self.direction == "rmsprop":  # no first moment: d = g / (sqrt(v_hat) + eps)
                beta1 = 0.0
            self.exp_avg[s] = beta1 * self.exp_avg[s] + (1.0 - beta1) * grad[s]
            self.exp_avg_sq[s] = beta2 * self.exp_avg_sq[s] + (1.0 - beta2) * grad[s] ** 2
            m_hat = self.exp_avg[s] / (1.0 - beta1**t)
            v_hat = self.exp_avg_sq[s] / (1.0 - beta2**t)
            d[s] = m_hat / (torch.sqrt(v_hat) + group.eps)
        return d

    # -------------------------------------------------------------------- the step
    def skip(self, event: str) -> None:
        self.events[event] += 1
        self.last = ReferenceStep(self.steps, 0.0, self.trial_distance, math.nan, event, 0)

    def step(self, w: Tensor, loss: float, grad: Tensor, loss_at: Callable[[Tensor], float]) -> Tensor:
        """One QLAB step from ``w``; returns the new parameter vector (``w`` itself if skipped)."""
        assert w.dtype == torch.float64 and grad.dtype == torch.float64
        self.steps += 1
        grad_sq = float(torch.dot(grad, grad))
        if not math.isfinite(grad_sq):
            self.skip("nonfinite_gradient")
            return w
        if not math.isfinite(loss):
            self.skip("nonfinite_loss")
            return w
        if grad_sq == 0.0:
            self.skip("zero_gradient")
            return w
        d = self.descent_direction(grad)
        g_dot_d = float(torch.dot(grad, d))
        if self.direction != "sgd" and not g_dot_d > 0.0:
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
            self.warm_started = True
            self.events["warm_start_probes"] += probes - 1

        a = decision.step_size
        new_w = w.clone()
        for group in self.groups:
            s = slice(group.start, group.end)
            new_w[s] = w[s] * (1.0 - a * group.weight_decay) - a * d[s]
        if decision.event is not None:
            self.events[decision.event] += 1
        self.trial_distance = decision.next_trial_distance
        self.last = ReferenceStep(self.steps, a, beta, decision.curvature, decision.event, probes)
        return new_w
