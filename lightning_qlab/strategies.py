"""FSDP2 data parallelism over every process, in one line of config.

Lightning's ``ModelParallelStrategy`` applies FSDP2 (``fully_shard``, in the module's
``configure_model``) but sizes its device mesh for tensor parallelism by default: the processes
of a node form the tensor-parallel dimension, and data parallelism runs across nodes only. The
package's models shard over the data-parallel dimension and have no tensor-parallel plan, so
:class:`FSDP2Strategy` makes every process a data-parallel one, whatever the number of nodes
and devices: ``--config configs/trainer/fsdp.yaml`` works unchanged on one GPU, eight, or a
cluster job.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from lightning_qlab import _compat

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with ``data_parallel_size`` = every process (``num_nodes x
    devices``) and ``tensor_parallel_size`` = 1: FSDP2 shards the parameters, gradients and QLAB's
    moments over all processes, each of which reads its own part of every global batch.

    Args:
        save_distributed_checkpoint: each process writes its shards (a checkpoint is a folder);
            ``False`` gathers a whole-model checkpoint file on rank 0.
        process_group_backend: ``"nccl"`` on GPUs, ``"gloo"`` on CPUs by default.
        timeout: how long a collective may wait for the other processes.

    Example:
        >>> FSDP2Strategy().num_nodes
        1
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    @override
    def setup_environment(self) -> None:
        # Known only now: the accelerator connector has set the nodes and the devices.
        _compat.set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()
