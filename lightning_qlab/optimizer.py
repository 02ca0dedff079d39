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

DIRECTIONS = ("sgd", "momentum", "adam")
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
        direction: ``"sgd"`` (``d = g``, QLABGrad), ``"momentum"`` (heavy ball,
            ``m <- mu m + g``, ``d = m``) or ``"adam"`` (``d = m_hat / (sqrt(v_hat) + eps)``).
        mode: ``"safeguarded"`` (default) or ``"paper"`` (the rule exactly as published; for
            comparisons). See *Safeguards*.
        momentum: ``mu`` for the momentum direction (per group).
        betas: Adam's moment decay rates for the adam direction (per group).
        eps: Adam's denominator term for the adam direction (per group).
        weight_decay: decoupled weight decay ``lambda`` (per group): ``w <- w - a lambda w``
            next to the step, as in AdamW (Loshchilov & Hutter, 2019). Decoupled rather than an
            L2 term in the gradient so that the parabola is fitted to the data loss alone: the
            trial forward does not see an L2 term, so coupling it into ``g`` would fit a slope
            and a curvature that belong to two different functions.

    Calling convention: compute the loss, call ``backward()``, then
    ``optimizer.step(loss, trial_loss_fn)`` where ``trial_loss_fn()`` returns the same
    mini-batch's loss at the parameters as they are when it is called (same batch, same mode,
    the same dropout masks). Inside Lightning, :class:`lightning_qlab.QLABMixin` does this.

    Safeguards (``"safeguarded"`` mode; each is counted in :attr:`events`):
        * extrapolation bounded at :data:`GROWTH_LIMIT` times the probed distance;
        * negative fitted curvature extrapolates to the same bound (the paper keeps ``beta``);
        * an inf/NaN trial loss: the step is not taken and ``beta`` halves;
        * a first step that probes until the scale is found (doubling while the parabola opens
          downwards, halving while the trial loss is not finite, jumping to the fitted minimiser
          otherwise), at most :data:`MAX_WARM_START_PROBES` trial forwards, once per run.

    In both modes a non-finite or zero gradient skips the step with the parameters and direction
    state untouched, and a non-finite training loss skips it too (the parameters are moved back
    from the trial point).

    Cost: per step one trial forward, one fused update to the trial point and one to the new
    point (``torch._foreach_*``, in place, no copy of the parameters), and two reads of scalars
    from the device: the squared gradient norm before anything is changed (so that a non-finite
    gradient changes nothing, as ``torch.amp.GradScaler`` does), and the losses and ``g . d``
    after the trial forward (for the solve).

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
        direction: str = "sgd",
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

        # Read 1: before anything changes, so that a non-finite gradient changes nothing.
        grad_sq = _sum_of_squares(grads)
        grad_sq_value = grad_sq.item()
        if not math.isfinite(grad_sq_value):
            return self._skip(loss, "nonfinite_gradient")
        if grad_sq_value == 0.0:
            return self._skip(loss, "zero_gradient")

        directions, slope_dot = self._descent_direction(params, grads, groups, grad_sq)
        beta = self.trial_distance
        torch._foreach_add_(params, directions, alpha=-beta)
        probes = 1
        values = self._read_losses(loss, trial_loss_fn, reduce_losses, slope_dot)
        train_loss, trial_loss, g_dot_d = values

        if not math.isfinite(train_loss):
            torch._foreach_add_(params, directions, alpha=beta)
            return self._skip(loss, "nonfinite_loss", trial_loss=trial_loss, slope=-g_dot_d)
        if self.direction != "sgd" and not g_dot_d > 0.0:
            torch._foreach_add_(params, directions, alpha=beta)
            return self._skip(loss, "not_descent", trial_loss=trial_loss, slope=-g_dot_d)

        solution = solve_step_size(train_loss, trial_loss, -g_dot_d, beta, self.mode)
        if self.mode == "safeguarded" and not self.warm_started:
            # Warm start: probe until the fitted minimiser lies within the trusted interval.
            while probes < MAX_WARM_START_PROBES:
                new_beta = _warm_start_distance(solution, beta)
                if new_beta is None:
                    break
                torch._foreach_add_(params, directions, alpha=beta - new_beta)
                beta = new_beta
                probes += 1
                _, trial_loss, _ = self._read_losses(loss, trial_loss_fn, reduce_losses, slope_dot)
                solution = solve_step_size(train_loss, trial_loss, -g_dot_d, beta, self.mode)
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
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
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
        torch._foreach_div_(directions, bias_correction1)
        return directions

    def _read_losses(
        self,
        loss: Tensor,
        trial_loss_fn: Callable[[], Tensor],
        reduce_losses: Optional[Callable[[Tensor], Tensor]],
        g_dot_d: Tensor,
    ) -> tuple[float, float, float]:
        """Evaluate the trial loss and read (c, trial loss, g . d) from the device in one go."""
        try:
            trial = trial_loss_fn()
        except Exception as error:  # re-raised with the parameters' whereabouts explained
            raise RuntimeError(
                "QLAB: trial_loss_fn raised at the trial point; the parameters are left at the "
                f"trial point w - {self.trial_distance:g} d, so restore them from a checkpoint "
                "or fix trial_loss_fn and rebuild the model."
            ) from error
        trial = _check_loss(trial, "trial_loss_fn()", "the mini-batch loss at the trial point")
        losses = torch.stack([loss.float().reshape(()), trial.detach().float().reshape(())])
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


def _warm_start_distance(solution: StepSolution, beta: float) -> Optional[float]:
    """The next distance to probe on the first step, or None once the scale is found.

    Halve while the trial loss is not finite, double while the parabola opens downwards, and
    otherwise jump to the fitted minimiser until it lies within [beta / G, G beta] (G is
    GROWTH_LIMIT): then the first step is an interpolation, not an extrapolation.
    """
    if solution.event == "nonfinite_trial":
        return beta / 2.0
    if solution.curvature <= 0.0:
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
