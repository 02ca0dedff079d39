"""The directions QLAB fits and steps along, one small class each, in one table.

Every direction keeps its per-parameter state (moment buffers) and answers four questions:

* ``probe``: write the ray ``d`` the parabola is fitted along into a zeroed workspace, updating
  the moments ``d`` is made of. In ``"safeguarded"`` mode ``d`` is a descent direction for the
  current mini-batch (``g`` or the RMS-scaled ``g``), so the fit is meaningful; in ``"paper"``
  mode it is the direction itself, as QLABGrad (v1) fits it. ``d`` comes out of torch's fused
  SGD/Adam kernels run on the zeroed workspace with step ``-1`` (``0 - (-1) u = u``): one pass
  over the parameters writes ``d`` and updates the moments, and ``found_inf`` (a device scalar,
  1.0 for a step to be skipped) leaves everything as it was -- ``d`` zero, the moments untouched --
  without a read, as it does for ``torch.amp.GradScaler``.
* ``finish``: after the probe's read, update the moments the probe did not need (the momentum
  of a safeguarded ``momentum`` or ``adam`` direction, which probe along ``g`` but step along
  their momentum).
* ``move``: ``w <- w - a u``, the step along the vector ``u`` the parameters move along. For
  ``sgd`` and ``rmsprop`` ``u`` is ``d``; ``momentum`` and ``adam`` step along their momentum,
  which carries past gradients.
* ``edge``: how many fitted minimisers the step can be before the update diverges on a
  quadratic (the stability edge): 2 without momentum; ``2 (1 + mu)`` for the heavy ball;
  ``2 (1 + beta1) / (1 - beta1)`` for Adam's averaged momentum (Cohen et al., "Adaptive
  gradient methods at the edge of stability", 2022).

:meth:`Direction.fused_step` takes a whole step of a given size without reading anything from
the device, with the same fused kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_qlab import _compat
from lightning_qlab._checks import wide_dtype

__all__ = ["DIRECTIONS", "Direction", "squared_norms", "dots"]


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's ``|t_i|^2`` (a device vector, float32 or wider; inf/NaN where an entry is)."""
    return torch.stack(_compat.foreach_norm(tensors, wide_dtype(tensors[0].dtype))).square()


def dots(grads: list[Tensor], ray: list[Tensor]) -> Tensor:
    """The vector of ``<g_i, d_i>``, accumulated in float32 or wider, on the device."""
    dtype = wide_dtype(grads[0].dtype)
    return torch.stack([torch.vdot(g.reshape(-1).to(dtype), d.reshape(-1).to(dtype)) for g, d in zip(grads, ray)])


class Direction:
    """One direction. Subclasses say which buffers they keep and how they use them.

    Every method gets the tensors of one parameter group; ``probe`` and ``fused_step`` get one
    device and dtype of it (what the fused kernels take), with the steps counted so far
    (``state["step"]``, this step included) for the bias corrections.
    """

    name = ""
    buffers: tuple[str, ...] = ()

    def edge(self, group: dict[str, Any]) -> float:
        return 2.0

    def probe(self, group: dict, states: list[dict], grads: list[Tensor], ray: list[Tensor], steps: list[Tensor],
              found_inf: Tensor, paper: bool) -> None:
        """Write ``d`` into ``ray`` (zeroed), updating the moments it is made of; nothing changes
        when ``found_inf`` is 1."""
        raise NotImplementedError

    def finish(self, group: dict, states: list[dict], grads: list[Tensor], paper: bool) -> None:
        """Add this step's gradient to the moments :meth:`probe` left alone."""

    def move(self, group: dict, states: list[dict], params: list[Tensor], ray: list[Tensor], t: int,
             step_size: float, paper: bool) -> None:
        """``w <- w - step_size * u`` in place (``u = d`` unless a safeguarded direction steps along
        its momentum); ``ray`` may be overwritten."""
        _compat.foreach_add_(params, ray, -step_size)

    def fused_step(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict], lr: float,
                   found_inf: Tensor, steps: list[Tensor]) -> None:
        raise NotImplementedError


class SGD(Direction):
    """``d = u = g``: QLABGrad as published."""

    name = "sgd"

    def probe(self, group, states, grads, ray, steps, found_inf, paper):
        _compat.fused_sgd_(ray, grads, [], momentum=0.0, lr=-1.0, found_inf=found_inf)

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

    def probe(self, group, states, grads, ray, steps, found_inf, paper):
        buffers = [s["momentum_buffer"] for s in states] if paper else []
        _compat.fused_sgd_(ray, grads, buffers, momentum=group["momentum"] if paper else 0.0, lr=-1.0,
                           found_inf=found_inf)

    def finish(self, group, states, grads, paper):
        if not paper:
            buffers = [s["momentum_buffer"] for s in states]
            _compat.foreach_mul_(buffers, group["momentum"])
            _compat.foreach_add_(buffers, grads)

    def move(self, group, states, params, ray, t, step_size, paper):
        if paper:
            super().move(group, states, params, ray, t, step_size, paper)
        else:
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

    def probe(self, group, states, grads, ray, steps, found_inf, paper):
        RMSprop.fused_step(self, dict(group, weight_decay=0.0), ray, grads, states, -1.0, found_inf, steps)

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

    def probe(self, group, states, grads, ray, steps, found_inf, paper):
        if paper:  # the fit along u itself
            Adam.fused_step(self, dict(group, weight_decay=0.0), ray, grads, states, -1.0, found_inf, steps)
        else:
            super().probe(group, states, grads, ray, steps, found_inf, paper)

    def finish(self, group, states, grads, paper):
        if not paper:
            _compat.foreach_lerp_([s["exp_avg"] for s in states], grads, 1.0 - group["betas"][0])

    def move(self, group, states, params, ray, t, step_size, paper):
        if paper:
            super().move(group, states, params, ray, t, step_size, paper)
            return
        # w - a m_hat / (sqrt(v_hat) + eps): the denominators are written over the probe's ray.
        beta1, beta2 = group["betas"]
        for den, square in zip(ray, (s["exp_avg_sq"] for s in states)):
            torch.sqrt(square, out=den)
        _compat.foreach_div_(ray, math.sqrt(1.0 - beta2 ** t))
        _compat.foreach_add_(ray, group["eps"])
        _compat.foreach_addcdiv_(params, [s["exp_avg"] for s in states], ray, -step_size / (1.0 - beta1 ** t))

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
