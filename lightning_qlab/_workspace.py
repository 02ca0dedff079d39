"""Parameter-shaped temporaries of QLAB's probing step, kept between probes on the CPU.

A probing step needs two temporaries the size of the parameters: ``w`` itself, to come back to
from the trial point, and the ray ``d``. On the CPU a fresh tensor that large is mapped
from the operating system page by page; on the MLP of ``benchmarks/step_cost.py`` that made a
probing step cost as much as two more forwards. Kept from one probe to the next, the same
tensors cost nothing after the first. On other devices nothing is kept: CUDA's caching allocator
already reuses freed blocks, and a block freed after the probe can hold activations until the
next one, where a kept one would add to the peak memory of every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Workspace"]


class Workspace:
    """Named lists of uninitialised tensors shaped like a list of parameters.

    Example:
        >>> params = [torch.zeros(3, 2), torch.zeros(4)]
        >>> space = Workspace()
        >>> first = space.like("origin", params)
        >>> [tuple(t.shape) for t in first], space.like("origin", params)[0] is first[0]
        ([(3, 2), (4,)], True)
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple, list[Tensor]]] = {}

    def like(self, name: str, tensors: list[Tensor]) -> list[Tensor]:
        """Tensors like ``tensors`` (shape, dtype, device, layout), contents undefined; the same
        ones as the last call with this name and these shapes when all of them are on the CPU."""
        if not all(t.device.type == "cpu" for t in tensors):
            return [torch.empty_like(t) for t in tensors]
        key = tuple((t.shape, t.stride(), t.dtype) for t in tensors)
        kept = self._kept.get(name)
        if kept is None or kept[0] != key:
            kept = (key, [torch.empty_like(t) for t in tensors])
            self._kept[name] = kept  # the previous list, for other shapes, is let go
        return kept[1]
