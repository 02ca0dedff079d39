"""Gradient clipping that keeps QLAB's fitted parabola exact.

QLAB fits ``phi(a) = L(w - a d)`` with slope ``-(g . d)`` and reads ``g`` from ``.grad``. After
clipping, ``.grad`` holds the clipped gradient while the losses are still those of ``L``: the slope
would be too shallow, the fitted curvature too small and the step too long. :func:`clip_gradients`
therefore returns ``s = (g_clipped . d) / (g . d)``, and the losses handed to QLAB are multiplied
by it: the step is fitted to ``s L``, whose slope along ``d`` is what QLAB computes and whose
minimiser along ``d`` is that of ``L``. For clipping by norm ``s`` is the clip coefficient (any
direction); for clipping by value ``d`` is the clipped gradient itself, which is why value
clipping needs ``direction="sgd"``.

Example (plain PyTorch)::

    scale = clip_gradients(optimizer, max_norm=1.0)
    optimizer.step(loss, trial.replay, reduce_losses=None if scale is None else lambda l: l * scale)
    optimizer.last_step = unscaled(optimizer.last_step, scale)   # diagnostics of L itself
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_qlab._checks import wide_dtype
from lightning_qlab._compat import foreach_mul_, foreach_norm
from lightning_qlab.sharding import ShardLayout, local

__all__ = ["CLIP_VALUE_NEEDS_SGD", "clip_gradients", "unscaled"]

CLIP_VALUE_NEEDS_SGD = (
    "QLABConfig: gradient_clip_value works with direction='sgd' only, got direction={direction!r}. "
    "Clipping by value changes the direction element by element, and QLAB's slope along a "
    "momentum or Adam direction would then need the unclipped gradient. Use gradient_clip_norm instead."
)


def clip_gradients(
    optimizer: Any, max_norm: Optional[float] = None, max_value: Optional[float] = None
) -> Optional[Tensor]:
    """Clip the gradients of ``optimizer``'s parameters in place: every element to
    ``[-max_value, max_value]``, then the total 2-norm to ``max_norm`` (``None``: not that one).

    Returns:
        ``s = (g_clipped . d) / (g . d)`` as a device scalar, or None when nothing was asked for,
        no parameter has a gradient, or the gradient is not finite (left untouched, so that QLAB
        or the GradScaler skips the step: clipping by value would turn inf into a number).
    """
    if max_norm is None and max_value is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return None
    # Sharded parameters (FSDP): each process clips its shards by the norm of the whole gradient.
    layout = ShardLayout(params, getattr(optimizer, "shard_group", None))
    grads = [local(p.grad) for p in params]
    dtype = wide_dtype(grads[0].dtype)

    def total_norm() -> Tensor:
        return layout.total(torch.stack(foreach_norm(grads, dtype)).square()).sqrt()

    total = total_norm()
    if not math.isfinite(total.item()):
        return None
    scale: Optional[Tensor] = None
    if max_value is not None:
        direction = getattr(optimizer, "direction", "sgd")
        if direction != "sgd":
            raise ValueError(CLIP_VALUE_NEEDS_SGD.format(direction=direction))
        sums = []
        for grad in grads:  # one temporary the size of a single tensor at a time
            magnitude = grad.detach().abs().to(dtype).flatten()
            clipped = magnitude.clamp(max=max_value)
            sums.append(torch.stack([torch.dot(clipped, clipped), torch.dot(magnitude, clipped)]).to(total.device))
            grad.clamp_(-max_value, max_value)
        clipped_sq, cross = layout.sum(torch.stack(sums))
        # d = g_clipped: s = |g_c|^2 / (g . g_c); 1 when nothing was clipped (or g = 0).
        scale = torch.where(cross > 0, clipped_sq / cross, torch.ones_like(cross))
    if max_norm is not None:
        if scale is not None:  # the norm after clipping by value
            total = total_norm()
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        foreach_mul_(grads, coefficient.to(grads[0].dtype))
        scale = coefficient if scale is None else scale * coefficient.to(scale)
    return scale


def unscaled(last_step: Any, scale: Optional[Tensor]) -> Any:
    """QLAB's record of a step fitted to ``s L``, described in terms of ``L`` itself (losses, slope
    and curvature divided by ``s``; step sizes are unaffected)."""
    if scale is None or last_step is None:
        return last_step
    s = float(scale)
    if not (s > 0 and math.isfinite(s) and s != 1.0):
        return last_step
    return replace(
        last_step,
        loss=last_step.loss / s,
        trial_loss=last_step.trial_loss / s,
        slope=last_step.slope / s,
        curvature=last_step.curvature / s,
    )
