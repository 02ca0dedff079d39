"""Checks shared across the package: what counts as a number, a training loss, and the dtype losses
are read in. Plain PyTorch (no Lightning import), so that the optimizer can use them too."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_number(value: Any) -> bool:
    """An int or a float, but not a bool (``True`` is an int to Python, never a setting's value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An int, but not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: loss differences are small, and half precision rounds them away."""
    return torch.promote_types(dtype, torch.float32)


def widened(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`wide_dtype` (itself when it already is)."""
    return tensor.to(wide_dtype(tensor.dtype))


def check_loss(value: Any, where: str, during: str) -> Tensor:
    """``value`` as a 0-dim floating-point tensor, or an error saying what ``where`` returned instead.

    ``during`` is ``"training"`` or ``"trial"``; a training loss computed with gradients enabled
    must keep its autograd graph.
    """
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{where} must return the mini-batch loss as a scalar torch.Tensor, got "
            f"{type(value).__name__} (during the {during} forward). Return the tensor itself, "
            "not loss.item() or a dict."
        )
    if value.numel() != 1:
        raise ValueError(
            f"{where} must return a scalar loss, got a tensor of shape {tuple(value.shape)} "
            f"(during the {during} forward); reduce it with .mean() or .sum()."
        )
    if not value.is_floating_point():
        raise TypeError(f"{where} must return a floating-point loss, got dtype {value.dtype}.")
    if during == "training" and torch.is_grad_enabled() and not value.requires_grad:
        raise RuntimeError(
            f"{where} returned a loss that does not require grad: the training forward must "
            f"keep its autograd graph (no .detach(), no torch.no_grad() inside {where})."
        )
    return value.reshape(())
