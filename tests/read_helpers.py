"""Counting reads from the device: what a test of "QLAB reads nothing between probes" needs.

On an accelerator each read of a device value (``.item()``, ``.tolist()``, ``float(t)``,
``bool(t)``) waits for every kernel queued before it. :func:`counted_reads` counts them by
wrapping those methods of ``torch.Tensor`` (which works on the CPU as well);
:func:`cuda_synchronisations` asks CUDA itself, which also sees synchronisations inside torch ops.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


@contextmanager
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    reads: list[str] = []
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def wrapper(self, *args, _original=original, _name=name, **kwargs):
                reads.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, wrapper)
        yield reads


@contextmanager
def cuda_synchronisations() -> Iterator[list[str]]:
    """The synchronisations CUDA's sync debug mode reports inside the block (messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        synchronisations: list[str] = []
        try:
            yield synchronisations
        finally:
            torch.cuda.set_sync_debug_mode("default")
            synchronisations += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
