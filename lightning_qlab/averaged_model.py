"""An :class:`~torch.optim.swa_utils.AveragedModel` whose update waits for nothing on the device.

torch's ``AveragedModel.update_parameters`` tests its ``n_averaged`` buffer, which lives beside the
parameters, twice per call (``n_averaged == 0`` to copy the first iterate, ``n_averaged > 0`` to
average the rest): on a GPU, two synchronisations every training step, which stall the queue of
kernels the way any read of a device value does. :class:`HostCountedAverage` keeps the count on the
host as well and hands ``multi_avg_fn`` a number; the buffer is still updated (on the device,
without a read) and saved, so checkpoints are those of ``AveragedModel``.
"""

from __future__ import annotations

import itertools
from typing import Optional

from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["HostCountedAverage"]


class HostCountedAverage(AveragedModel):
    """``AveragedModel`` with a host-side count; needs ``multi_avg_fn`` (it averages per
    device and dtype, as torch's does).

    :meth:`adopt` turns an ``AveragedModel`` built elsewhere (by Lightning's ``WeightAveraging``)
    into one, without copying the module again.
    """

    _count: Optional[int] = None  # None: read n_averaged once, at the next update

    @classmethod
    def adopt(cls, average: AveragedModel) -> "HostCountedAverage":
        if average.multi_avg_fn is None:
            raise ValueError("HostCountedAverage needs an AveragedModel built with multi_avg_fn.")
        average.__class__ = cls  # the same fields; only update_parameters and load_state_dict differ
        average._count = None
        return average  # type: ignore[return-value]

    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)  # once, after construction or a load
        if self.use_buffers:
            averaged = list(itertools.chain(self.module.parameters(), self.module.buffers()))
            current = list(itertools.chain(model.parameters(), model.buffers()))
        else:
            averaged, current = list(self.parameters()), list(model.parameters())
        groups: dict[tuple, tuple[list, list]] = {}
        for a, c in zip(averaged, current):
            group = groups.setdefault((a.device, a.dtype), ([], []))
            group[0].append(a.detach())
            group[1].append(c.detach().to(a.device))
        for group_averaged, group_current in groups.values():
            if self._count == 0:  # the first iterate, once: tensor by tensor, as DTensors allow
                for a, c in zip(group_averaged, group_current):
                    a.copy_(c)
            else:
                self.multi_avg_fn(group_averaged, group_current, self._count)
        self.n_averaged += 1
        self._count += 1

    def load_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._count = None
        return super().load_state_dict(*args, **kwargs)
