"""QLABGrad: the quadratic-loss-approximation step-size rule as a ``torch.optim.Optimizer``.

Reference: M. Fu, F.-X. Wu, "QLABGrad: a Hyperparameter-Free and Convergence-Guaranteed Scheme for
Deep Learning", AAAI 2024 (arXiv:2302.00252; v1 "QLAB: Quadratic Loss Approximation-Based Optimal
Learning Rate for Deep Learning" adds the momentum and Adam directions).

On a mini-batch with loss ``c = L(w)``, gradient ``g`` and descent direction ``d``, the loss along
the direction is modelled as a parabola in the step size ``a``::

    phi(a) = L(w - a d) ~ c + b a + A a^2,       b = -(g . d)

The curvature ``A`` comes from one extra forward pass at the *trial point* ``w - beta d``, where the
*trial distance* ``beta`` is the previous step size::

    A = (L(w - beta d) - c - b beta) / beta^2,    a = -b / (2 A)

This module has no Lightning import: it is usable in any PyTorch loop. The maths of the rule lives
in :func:`solve_step_size` and nowhere else in the package.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["QLAB", "QLABStep", "StepSolution", "solve_step_size", "DIRECTIONS", "MODES", "EVENTS"]

DIRECTIONS = ("sgd", "rmsprop", "momentum", "adam")
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
}

# The fitted parabola is trusted up to GROWTH_LIMIT times the probed distance beta. A parabola
# through phi(0), phi'(0) and phi(beta) interpolates on [0, beta]; far beyond beta it
# extrapolates from one noisy mini-batch, which is how the unbounded rule diverges. Classic
# safeguarded line searches bound extrapolation by a fixed multiple of the bracket for the same
# reason (Nocedal & Wright, "Numerical Optimization", 2nd ed., sec. 3.5). With the bound at 2 the
# step size can still grow geometrically (x1000 in 10 steps), so no scale is out of reach, while a
# single bad fit can at most double the step.
GROWTH_LIMIT = 2.0

# The first step probes until the fitted minimiser lies inside [beta / GROWTH_LIMIT,
# GROWTH_LIMIT * beta]. From any initial distance between 1e-12 and 1e12 that takes well under
# this many trial forwards (each probe either doubles, halves or jumps to the fitted minimiser).
MAX_WARM_START_PROBES = 80

# A probe can only measure curvature that stands out of the rounding of the loss values. The
# warm start trusts a fit when its curvature term A beta^2 exceeds this many machine epsilons of
# the loss's dtype, relative to the loss (for a float32 loss of 2.3: 32 * 1.2e-7 * 2.3 ~ 9e-6);
# below that the fitted minimiser is rounding noise, and the probe doubles as if A <= 0. Measured
# on an MNIST MLP with float32 losses, against the same fit in float64: with A beta^2 at 1
# epsilon the fitted minimiser was off by 25%, at 10 epsilons by 5%; at 1e-7 epsilons (a first
# probe at 1e-6) it came out as 1e-6 instead of 5.
RESOLVED_CURVATURE_EPS = 32.0


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


@dataclass(frozen=True)
class QLABStep:
    """Diagnostics of the last :meth:`QLAB.step`, in the paper's terms.

    ``step_size`` is the step actually taken along ``-d`` (0.0 when skipped); it is also written
    to every ``param_group["lr"]``. ``trial_distance`` is the ``beta`` that was probed.
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
    r"""QLABGrad: a step size from one extra forward pass per step, and no learning rate.

    Each :meth:`step` moves the parameters to the trial point ``w - beta d``, calls
    ``trial_loss_fn`` there (under ``torch.no_grad``), fits a parabola to the training loss, the
    slope ``-(g . d)`` and the trial loss, and moves to its minimiser ``w - a d``. The step size
    ``a`` becomes the next trial distance ``beta``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        initial_step: the first trial distance ``beta_0`` (> 0). In ``"safeguarded"`` mode the
            first step searches for the scale itself, so any value from 1e-6 to 10 trains alike.
        direction: ``"rmsprop"`` (default: the gradient scaled per coordinate,
            ``d = g / (sqrt(v_hat) + eps)`` with ``v`` the bias-corrected running mean of ``g^2``
            at rate ``betas[1]``), ``"sgd"`` (``d = g``, QLABGrad as published), ``"momentum"``
            (heavy ball, ``m <- mu m + g``, ``d = m``) or ``"adam"``
            (``d = m_hat / (sqrt(v_hat) + eps)``). The last two are experimental (see below).
        mode: ``"safeguarded"`` (default) or ``"paper"`` (the rule exactly as published; for
            comparisons). See *Safeguards*.
        momentum: ``mu`` for the momentum direction (per group).
        betas: Adam's moment decay rates for the adam direction; rmsprop uses ``betas[1]``
            (per group).
        eps: the denominator term of the adam and rmsprop directions (per group).
        weight_decay: decoupled weight decay ``lambda`` (per group): ``w <- w - a lambda w``
            next to the step, as in AdamW (Loshchilov & Hutter, 2019). Decoupled rather than an
            L2 term in the gradient so that the parabola is fitted to the data loss alone: the
            trial forward does not see an L2 term, so coupling it into ``g`` would fit a slope
            and a curvature that belong to two different functions.

    Calling convention: compute the loss, call ``backward()``, then
    ``optimizer.step(loss, trial_loss_fn)`` where ``trial_loss_fn()`` returns the same
    mini-batch's loss at the parameters as they are when it is called (same batch, same mode,
    the same dropout masks). Inside Lightning, :class:`lightning_qlab.QLABMixin` does this.

    Why ``direction="rmsprop"`` is the default: the parabola is fitted to the current
    mini-batch, so the line has to be a descent direction for that mini-batch. Scaling the
    gradient per coordinate keeps it one (``g . d = sum g^2 / (sqrt(v_hat) + eps) > 0``), while
    the momentum and adam directions, which carry past gradients, are not always one: on the MNIST
    panel they drift upwards and diverge. Against the published ``d = g`` it measured the same
    or better on every benchmark in the README's results, at the last iterate: 97.99 vs 97.93%
    on MNIST, 67.44 vs 63.91% on CIFAR-10; with the average of the iterates that
    :class:`~lightning_qlab.QLABMixin` evaluates, 98.40 vs 98.33% and 78.53 vs 76.69%. It also
    learns a recurrent task (the adding problem) that ``d = g``, like plain SGD, does not learn
    in the budget at all. ``betas[1] = 0.999`` and ``eps = 1e-8`` are Adam's published defaults
    (Kingma & Ba, 2015), taken unchanged rather than tuned: ``v_hat`` averages ``g^2`` over
    about 1/(1 - 0.999) = 1,000 steps.
    ``direction="sgd"`` is QLABGrad exactly as published.

    Safeguards (``"safeguarded"`` mode; each is counted in :attr:`events`):
        * extrapolation bounded at :data:`GROWTH_LIMIT` times the probed distance;
        * negative fitted curvature extrapolates to the same bound (the paper keeps ``beta``);
        * an inf/NaN trial loss: the step is not taken and ``beta`` halves;
        * a first step that probes until the scale is found (doubling while the parabola opens
          downwards or its curvature is too small to stand out of the loss's rounding, halving
          while the trial loss is not finite, jumping to the fitted minimiser otherwise), at most
          :data:`MAX_WARM_START_PROBES` trial forwards, once per run. A probe is never proposed
          where earlier probes showed the loss on or below its tangent, or not finite; the
          search then stops at the probed point with the lowest loss.

    In both modes a non-finite or zero gradient, or a non-finite training loss, skips the step
    with the parameters and the direction state untouched. With ``reduce_losses`` a loss that is
    finite here but not on another rank is only seen after the trial forward; then every rank
    moves back from the trial point (to within rounding, identically on all ranks).

    Cost: per step one trial forward, one fused update to the trial point and one to the new
    point (``torch._foreach_*``, in place, no copy of the parameters), and two reads of scalars
    from the device: the squared gradient norm and the training loss before anything is changed
    (so that a non-finite gradient or loss changes nothing, as ``torch.amp.GradScaler`` does),
    and the losses and ``g . d`` after the trial forward (for the solve).

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
        direction: str = "rmsprop",
        mode: str = "safeguarded",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if isinstance(initial_step, bool) or not isinstance(initial_step, (int, float)):
            raise TypeError(f"QLAB: initial_step must be a positive number, got {initial_step!r}")
        if not math.isfinite(initial_step) or initial_step <= 0:
            raise ValueError(
                f"QLAB: initial_step must be positive and finite, got {initial_step!r}; "
                "any value in 1e-6 ... 10 works in 'safeguarded' mode."
            )
        if direction not in DIRECTIONS:
            raise ValueError(f"QLAB: unknown direction {direction!r}; choose one of {DIRECTIONS}.")
        if mode not in MODES:
            raise ValueError(f"QLAB: unknown mode {mode!r}; choose one of {MODES}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"QLAB: momentum must be in [0, 1), got {momentum!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"QLAB: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"QLAB: eps must be positive, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"QLAB: weight_decay must be non-negative, got {weight_decay!r}")
        defaults = dict(
            lr=0.0, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        self.direction = direction
        self.mode = mode
        self.initial_step = float(initial_step)
        # Optimizer-wide state: one line search runs along the concatenation of all groups.
        self.trial_distance = float(initial_step)
        self.steps = 0  # calls to step() that reached the rule, skipped ones included
        self.direction_updates = 0  # updates of the momentum/Adam buffers (Adam's bias correction)
        self.warm_started = False
        self.events: dict[str, int] = {name: 0 for name in EVENTS}
        self.last_step: Optional[QLABStep] = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["qlab"] = {
            "trial_distance": self.trial_distance,
            "steps": self.steps,
            "direction_updates": self.direction_updates,
            "warm_started": self.warm_started,
            "events": dict(self.events),
            "direction": self.direction,
            "mode": self.mode,
            "last_step": None if self.last_step is None else self.last_step.as_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        qlab = state_dict.pop("qlab", None)
        if qlab is None:
            raise ValueError(
                "QLAB.load_state_dict: this state dict has no 'qlab' entry; it was not saved by "
                "QLAB.state_dict() (a different optimizer's checkpoint?)."
            )
        if qlab["direction"] != self.direction:
            raise ValueError(
                f"QLAB.load_state_dict: the checkpoint used direction={qlab['direction']!r} but "
                f"this optimizer uses direction={self.direction!r}; construct it with the same "
                "direction to resume."
            )
        super().load_state_dict(state_dict)
        self.trial_distance = float(qlab["trial_distance"])
        self.steps = int(qlab["steps"])
        self.direction_updates = int(qlab["direction_updates"])
        self.warm_started = bool(qlab["warm_started"])
        self.events = {name: int(qlab["events"].get(name, 0)) for name in EVENTS}
        self.last_step = None if qlab["last_step"] is None else QLABStep(**qlab["last_step"])

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
                at the trial point (several times on the very first step in safeguarded mode).
            closure: accepted for Lightning's optimizer plumbing, which passes its hook closure
                here; it is called first, with gradients enabled. QLAB never re-evaluates the
                training loss through it.
            reduce_losses: optional callable applied to the 1-D tensor ``[L(w), L(w - beta d)]``
                before the solve; under data parallelism, pass a mean over ranks so that every
                rank takes the same step (the gradient is already averaged, the losses are not).

        Returns:
            The training loss, detached.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        loss = _check_loss(loss, "loss", "the training loss whose backward() made the gradients")
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

        # Read 1, before anything changes: the squared gradient norm (so that a non-finite
        # gradient changes nothing) and, in the same transfer, the local training loss.
        grad_sq = _sum_of_squares(grads)
        grad_sq_value, local_loss = torch.stack([grad_sq, loss.to(grad_sq).reshape(())]).tolist()
        if not math.isfinite(grad_sq_value):
            return self._skip(loss, "nonfinite_gradient")
        if not math.isfinite(local_loss) and reduce_losses is None:
            # Skipped before the direction state or the parameters move, so nothing changes.
            # With reduce_losses the decision waits for the reduced loss below: every rank
            # must take part in the same collectives and make the same decision.
            return self._skip(loss, "nonfinite_loss")
        if grad_sq_value == 0.0:
            return self._skip(loss, "zero_gradient")

        beta = self.trial_distance
        if beta * beta == 0.0:
            # The curvature A = (...) / beta^2 can no longer be represented: the trial distance
            # has collapsed, which a consistent trial loss never causes (it only shrinks beta
            # while the loss at beta rises, and a smooth loss stops rising for small beta).
            raise RuntimeError(
                f"QLAB: the trial distance collapsed to {beta:.3g} after {self.steps - 1} steps: "
                "the trial loss kept rising even for vanishing steps. This happens when "
                "trial_loss_fn does not evaluate the same function as the training forward "
                "(fresh dropout masks, another batch, eval mode): QLABMixin replays the dropout "
                "masks for you; in a plain loop, re-seed the RNG or evaluate without dropout."
            )
        directions, slope_dot = self._descent_direction(params, grads, groups, grad_sq)
        torch._foreach_add_(params, directions, alpha=-beta)
        probes = 1
        train_loss, trial_loss, g_dot_d = self._read_losses(
            loss, trial_loss_fn, reduce_losses, slope_dot, params, directions, beta
        )

        if not math.isfinite(train_loss):
            # Only reachable with reduce_losses (another rank's loss was not finite): every rank
            # moves back from the trial point by the same arithmetic, so the replicas stay equal.
            torch._foreach_add_(params, directions, alpha=beta)
            return self._skip(loss, "nonfinite_loss", trial_loss=trial_loss, slope=-g_dot_d)
        if self.direction != "sgd" and not g_dot_d > 0.0:
            torch._foreach_add_(params, directions, alpha=beta)
            return self._skip(loss, "not_descent", trial_loss=trial_loss, slope=-g_dot_d)

        solution = solve_step_size(train_loss, trial_loss, -g_dot_d, beta, self.mode)
        if self.mode == "safeguarded" and not self.warm_started:

            def probe(from_distance: float, to_distance: float) -> float:
                """Move from w - from_distance d to w - to_distance d; the trial loss there."""
                torch._foreach_add_(params, directions, alpha=from_distance - to_distance)
                return self._read_losses(
                    loss, trial_loss_fn, reduce_losses, slope_dot, params, directions, to_distance
                )[1]

            resolution = RESOLVED_CURVATURE_EPS * torch.finfo(loss.dtype).eps
            solution, beta, trial_loss, probes = _warm_start(
                solution, beta, train_loss, trial_loss, g_dot_d, self.mode, probe, resolution
            )
            self.warm_started = True
            self.events["warm_start_probes"] += probes - 1

        step_size = solution.step_size
        # From the trial point w - beta d to w (1 - a lambda) - a d, group by group.
        for group, group_params, group_dirs in groups_with(groups, params, directions):
            decay = group["weight_decay"] * step_size
            if decay != 0.0:
                torch._foreach_mul_(group_params, 1.0 - decay)
            torch._foreach_add_(group_params, group_dirs, alpha=beta * (1.0 - decay) - step_size)
        if solution.event is not None:
            self.events[solution.event] += 1
        self.trial_distance = solution.next_trial_distance
        self._record(step_size, beta, solution.curvature, train_loss, trial_loss, -g_dot_d,
                     solution.event, probes)
        return loss

    # ------------------------------------------------------------------ internals
    def _params_with_grad(self) -> tuple[list[Tensor], list[Tensor], list[tuple[dict, int, int]]]:
        """Flat lists of the parameters that have gradients, and each group's slice of them."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        groups: list[tuple[dict, int, int]] = []
        for group in self.param_groups:
            start = len(params)
            for p in group["params"]:
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

    def _descent_direction(
        self, params: list[Tensor], grads: list[Tensor], groups: list, grad_sq: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """The direction d (updating momentum/Adam buffers) and g . d as a device scalar."""
        if self.direction == "sgd":
            return grads, grad_sq
        self.direction_updates += 1
        directions: list[Tensor] = []
        for group, start, end in groups:
            group_params, group_grads = params[start:end], grads[start:end]
            if not group_params:
                continue
            if self.direction == "momentum":
                directions += self._momentum_direction(group, group_params, group_grads)
            else:
                directions += self._adam_direction(group, group_params, group_grads)
        return directions, _dot(grads, directions)

    def _momentum_direction(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        buffers = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                # The first buffer is the gradient itself, as in torch.optim.SGD.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        return buffers

    def _adam_direction(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Adam's direction; for rmsprop the same without the first moment (the gradient itself)."""
        beta1, beta2 = group["betas"]
        rmsprop = self.direction == "rmsprop"
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self.state[p]
            if "exp_avg_sq" not in state:
                if not rmsprop:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not rmsprop:
                exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        if rmsprop:
            exp_avgs, beta1 = grads, 0.0
        else:
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        t = self.direction_updates
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        # d = (m / bc1) / (sqrt(v / bc2) + eps), computed like torch.optim.Adam's foreach path.
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(bias_correction2))
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(exp_avgs, denominators)
        if bias_correction1 != 1.0:
            torch._foreach_div_(directions, bias_correction1)
        return directions

    def _read_losses(
        self,
        loss: Tensor,
        trial_loss_fn: Callable[[], Tensor],
        reduce_losses: Optional[Callable[[Tensor], Tensor]],
        g_dot_d: Tensor,
        params: list[Tensor],
        directions: list[Tensor],
        beta: float,
    ) -> tuple[float, float, float]:
        """Evaluate the trial loss at ``w - beta d`` (where the parameters are now) and read
        (c, trial loss, g . d) from the device in one go.

        If ``trial_loss_fn`` raises or returns something that is not a scalar tensor, the
        parameters are moved back to ``w`` (by adding ``beta d``) before the error propagates.
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
            trial = _check_loss(trial, "trial_loss_fn()", "the mini-batch loss at the trial point")
            if trial.data_ptr() == loss.data_ptr():
                raise ValueError(
                    "QLAB: trial_loss_fn() returned the training loss itself (the same tensor), "
                    "not the loss recomputed at the trial point; it must run the forward pass, "
                    "e.g. lambda: loss_fn(model(x), y)."
                )
        except Exception:
            torch._foreach_add_(params, directions, alpha=beta)
            raise
        # Loss differences are small: read them in float32 even under half precision, and in
        # float64 when the model computes in float64.
        dtype = torch.promote_types(torch.promote_types(loss.dtype, trial.dtype), torch.float32)
        losses = torch.stack([loss.to(dtype).reshape(()), trial.detach().to(dtype).reshape(())])
        if reduce_losses is not None:
            losses = reduce_losses(losses)
        values = torch.cat([losses.double(), g_dot_d.double().reshape(1).to(losses.device)])
        c, t, gd = values.tolist()
        return c, t, gd

    def _skip(self, loss: Tensor, event: str, trial_loss: float = math.nan, slope: float = math.nan) -> Tensor:
        self.events[event] += 1
        self._record(0.0, self.trial_distance, math.nan, math.nan, trial_loss, slope, event, 0)
        return loss

    def _record(self, step_size: float, beta: float, curvature: float, loss: float, trial_loss: float,
                slope: float, event: Optional[str], probes: int) -> None:
        for group in self.param_groups:
            group["lr"] = step_size
        self.last_step = QLABStep(self.steps, step_size, beta, curvature, loss, trial_loss, slope, event, probes)


def groups_with(groups: list, params: list[Tensor], directions: list[Tensor]):
    """Yield (group, its parameters, their directions) for the groups that have gradients."""
    for group, start, end in groups:
        if end > start:
            yield group, params[start:end], directions[start:end]


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
    fitted minimiser lies within [beta / G, G beta], G = GROWTH_LIMIT: then the first step
    interpolates. Each probe halves the distance while the trial loss is not finite, doubles it
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
    within [beta / G, G beta] (G is GROWTH_LIMIT): then the first step is an interpolation, not
    an extrapolation.
    """
    if solution.event == "nonfinite_trial":
        return beta / 2.0
    if not resolved:
        return GROWTH_LIMIT * beta
    if beta / GROWTH_LIMIT <= solution.minimiser <= GROWTH_LIMIT * beta:
        return None
    return solution.minimiser


def _check_loss(value: Any, name: str, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"QLAB: {name} must be a torch.Tensor holding {what}, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"QLAB: {name} must be a scalar ({what}), got shape {tuple(value.shape)}; reduce it "
            "with .mean() or .sum() first."
        )
    return value


def _sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """sum_i |t_i|^2 in float32 or wider, as a device scalar."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().sum()


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """sum_i <x_i, y_i> in float32 or wider, as a device scalar."""
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return torch.stack([torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(xs, ys)]).sum()
