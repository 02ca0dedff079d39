"""The directions QLAB fits and steps along, one small class each, in one table.

Every direction keeps its per-parameter state (moment buffers) and answers three questions:

* ``probe``: the ray ``d`` the parabola is fitted along. In ``"safeguarded"`` mode it is a
  descent direction for the current mini-batch (``g`` or the RMS-scaled ``g``), so the fit is
  meaningful; in ``"paper"`` mode it is the direction itself, as QLABGrad (v1) fits it. A
  :class:`Ray` keeps ``d`` as ``scale * numerators / denominators`` without materialising it: a
  probing step's cost is mostly passes over the parameters, and on the CPU each new
  parameter-sized tensor also pays for fresh memory.
* ``move``: ``w <- w - a u``, the step along the vector ``u`` the parameters move along. For
  ``sgd`` and ``rmsprop`` ``u`` is ``d``; ``momentum`` and ``adam`` step along their momentum,
  which carries past gradients (Adam's step is one ``addcdiv`` with its probe's denominators).
* ``edge``: how many fitted minimisers the step can be before the update diverges on a
  quadratic (the stability edge): 2 without momentum; ``2 (1 + mu)`` for the heavy ball;
  ``2 (1 + beta1) / (1 - beta1)`` for Adam's averaged momentum (Cohen et al., "Adaptive
  gradient methods at the edge of stability", 2022).

The moment updates take a device scalar ``keep`` (1.0, or 0.0 for a step to be skipped): a
non-finite gradient must change nothing, and that is only known on the device until QLAB reads
it. Gradients are made finite before (see :func:`finite_gradients`), so ``keep = 0`` turns the
update into the identity without a read.

:meth:`Direction.fused_step` takes a whole step without reading anything from the device, with
torch's fused Adam/SGD kernels: ``found_inf`` skips it on the device when the gradient is not
finite, as ``torch.amp.GradScaler`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_qlab import _compat
from lightning_qlab._checks import wide_dtype

__all__ = ["DIRECTIONS", "Direction", "Ray", "finite_gradients"]


def finite_gradients(grads: list[Tensor]) -> Tensor:
    """Each gradient's ``|g_i|^2`` (a device vector, float32 or wider, inf/NaN where an entry is);
    then non-finite entries are set to 0 in place, so that a step that will be skipped can still
    be computed harmlessly."""
    dtype = wide_dtype(grads[0].dtype)
    squared_norms = torch.stack(_compat.foreach_norm(grads, dtype)).square()
    for grad in grads:
        grad.nan_to_num_(0.0, 0.0, 0.0)
    return squared_norms


@dataclass(frozen=True)
class Ray:
    """The probed direction ``d = scale * numerators / denominators`` (``scale * numerators``
    without denominators), tensor by tensor, never materialised."""

    numerators: list[Tensor]
    denominators: Optional[list[Tensor]] = None
    scale: float = 1.0

    def dots(self, grads: list[Tensor], scratch: list[Tensor]) -> Tensor:
        """The vector of ``<g_i, d_i>`` in float32 or wider, on the device; ``scratch`` (tensors
        like the gradients, overwritten) holds the quotients ``n_i / den_i``."""
        dtype = wide_dtype(grads[0].dtype)
        quotients = self.numerators if self.denominators is None else [
            torch.div(n, den, out=out) for n, den, out in zip(self.numerators, self.denominators, scratch)]
        dots = [torch.vdot(g.reshape(-1).to(dtype), q.reshape(-1).to(dtype)) for g, q in zip(grads, quotients)]
        return torch.stack(dots) * self.scale

    def shift_(self, params: list[Tensor], distance: float) -> None:
        """``w <- w - distance * d`` in place."""
        if self.denominators is None:
            _compat.foreach_add_(params, self.numerators, -distance * self.scale)
        else:
            _compat.foreach_addcdiv_(params, self.numerators, self.denominators, -distance * self.scale)


def _decay(rate: float, keep: Tensor) -> Tensor:
    """``rate`` where the step is kept, 1.0 where it is skipped (a device scalar)."""
    return keep * rate + (1.0 - keep)


class Direction:
    """One direction. Subclasses say which buffers they keep and how they use them."""

    name = ""
    buffers: tuple[str, ...] = ()

    def edge(self, group: dict[str, Any]) -> float:
        return 2.0

    def update_moments(self, group: dict, states: list[dict], grads: list[Tensor], keep: Tensor, t: int) -> None:
        """Add this step's gradient to the buffers (nothing when ``keep`` is 0)."""

    def probe(self, group: dict, states: list[dict], grads: list[Tensor], t: int, paper: bool,
              scratch: list[Tensor]) -> Ray:
        """The ray ``d`` to fit along; ``scratch`` (tensors like the gradients) may hold its
        denominators."""
        raise NotImplementedError

    def move(self, group: dict, states: list[dict], params: list[Tensor], ray: Ray, t: int, step_size: float
             ) -> None:
        """``w <- w - step_size * u`` in place (``u = d`` unless the direction steps along its momentum);
        safeguarded mode only: paper mode steps along the probed ray itself."""
        ray.shift_(params, step_size)

    def fused_step(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict], lr: float,
                   found_inf: Tensor, steps: list[Tensor]) -> None:
        raise NotImplementedError


class SGD(Direction):
    """``d = u = g``: QLABGrad as published."""

    name = "sgd"

    def probe(self, group, states, grads, t, paper, scratch):
        return Ray(grads)

    def fused_step(self, group, params, grads, states, lr, found_inf, steps):
        _decay_weights(group, params, lr, found_inf)
        _compat.fused_sgd_(params, grads, [], momentum=0.0, lr=lr, found_inf=found_inf)


class Momentum(Direction):
    """The heavy ball: ``m <- mu m + g``; probes along ``g`` (the fit along ``m`` in paper mode),
    steps along ``m``."""

    name = "momentum"
    buffers = ("momentum_buffer",)

    def edge(self, group):
        return 2.0 * (1.0 + group["momentum"])

    def update_moments(self, group, states, grads, keep, t):
        buffers = [s["momentum_buffer"] for s in states]
        _compat.foreach_mul_(buffers, _decay(group["momentum"], keep))
        _compat.foreach_add_(buffers, grads)  # a zeroed gradient adds nothing

    def probe(self, group, states, grads, t, paper, scratch):
        return Ray([s["momentum_buffer"] for s in states] if paper else grads)

    def move(self, group, states, params, ray, t, step_size):
        _compat.foreach_add_(params, [s["momentum_buffer"] for s in states], -step_size)

    def fused_step(self, group, params, grads, states, lr, found_inf, steps):
        _decay_weights(group, params, lr, found_inf)
        buffers = [s["momentum_buffer"] for s in states]
        _compat.fused_sgd_(params, grads, buffers, momentum=group["momentum"], lr=lr, found_inf=found_inf)


class RMSprop(Direction):
    """``d = u = g / (sqrt(v_hat) + eps)``, ``v`` the running mean of ``g^2`` at rate
    ``betas[1]``, bias-corrected as in Adam."""

    name = "rmsprop"
    buffers = ("exp_avg_sq",)

    def update_moments(self, group, states, grads, keep, t):
        beta2 = group["betas"][1]
        squares = [s["exp_avg_sq"] for s in states]
        _compat.foreach_mul_(squares, _decay(beta2, keep))
        _compat.foreach_addcmul_(squares, grads, grads, 1.0 - beta2)

    def ray(self, group, states, numerators, t, denominators, scale: float = 1.0) -> Ray:
        """``scale * numerators / (sqrt(v_hat) + eps)``, the denominators written into ``denominators``."""
        _compat.foreach_copy_(denominators, [s["exp_avg_sq"] for s in states])
        _compat.foreach_sqrt_(denominators)
        _compat.foreach_div_(denominators, math.sqrt(1.0 - group["betas"][1] ** t))
        _compat.foreach_add_(denominators, group["eps"])
        return Ray(numerators, denominators, scale)

    def probe(self, group, states, grads, t, paper, scratch):
        return self.ray(group, states, grads, t, scratch)

    def fused_step(self, group, params, grads, states, lr, found_inf, steps):
        # Adam's kernel with beta1 = 0 is this update; its first moment would just be a copy of the
        # gradient, so the gradients serve as that buffer (the kernel writes g back into g).
        _compat.fused_adamw_(params, grads, grads, [s["exp_avg_sq"] for s in states], steps, lr=lr,
                             beta1=0.0, beta2=group["betas"][1], weight_decay=group["weight_decay"],
                             eps=group["eps"], found_inf=found_inf)


class Adam(RMSprop):
    """Adam's ``u = m_hat / (sqrt(v_hat) + eps)``; probes along the RMS-scaled gradient (along
    ``u`` itself in paper mode)."""

    name = "adam"
    buffers = ("exp_avg", "exp_avg_sq")

    def edge(self, group):
        beta1 = group["betas"][0]
        return 2.0 * (1.0 + beta1) / (1.0 - beta1)

    def update_moments(self, group, states, grads, keep, t):
        beta1 = group["betas"][0]
        averages = [s["exp_avg"] for s in states]
        _compat.foreach_mul_(averages, _decay(beta1, keep))
        _compat.foreach_add_(averages, grads, 1.0 - beta1)
        super().update_moments(group, states, grads, keep, t)

    def probe(self, group, states, grads, t, paper, scratch):
        if paper:  # the fit along u = m_hat / (sqrt(v_hat) + eps) itself
            return self.ray(group, states, [s["exp_avg"] for s in states], t, scratch,
                            scale=1.0 / (1.0 - group["betas"][0] ** t))
        return self.ray(group, states, grads, t, scratch)

    def move(self, group, states, params, ray, t, step_size):
        # w - a m_hat / (sqrt(v_hat) + eps): Adam's step, with the denominators of the probe's ray.
        _compat.foreach_addcdiv_(params, [s["exp_avg"] for s in states], ray.denominators,
                                 -step_size / (1.0 - group["betas"][0] ** t))

    def fused_step(self, group, params, grads, states, lr, found_inf, steps):
        _compat.fused_adamw_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                             steps, lr=lr, beta1=group["betas"][0], beta2=group["betas"][1],
                             weight_decay=group["weight_decay"], eps=group["eps"], found_inf=found_inf)


def _decay_weights(group: dict, params: list[Tensor], lr: float, found_inf: Tensor) -> None:
    """Decoupled weight decay ``w <- w (1 - lr lambda)``, not applied on a skipped step."""
    if group["weight_decay"] != 0.0:
        skipped = found_inf.to(wide_dtype(params[0].dtype))
        _compat.foreach_mul_(params, 1.0 - lr * group["weight_decay"] * (1.0 - skipped))


DIRECTIONS: dict[str, Direction] = {d.name: d for d in (Adam(), RMSprop(), SGD(), Momentum())}
