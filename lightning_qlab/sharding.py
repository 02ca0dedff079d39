"""Sums over parameters that are sharded over processes: FSDP2's DTensors and FSDP1's flat shards.

QLAB's rule sums over all parameters: ``|g|^2``, ``g . d`` and, on a step that does not probe,
whether any gradient entry is non-finite. When the parameters are sharded, each process holds a
piece of every sum. :class:`ShardLayout` adds the pieces with one all-reduce per process group the
shards are split over (one under FSDP, one per sharded mesh dimension of a 2-D mesh), every
quantity packed into that one tensor, so that every process solves the same parabola and takes
the same step. Parameters that are replicated (a DTensor's ``Replicate`` placements, plain
tensors that are not shards) are counted once: their part of a sum is not reduced.

The optimizer works on each process's local shard (``DTensor.to_local()``, a view of the same
storage), so its foreach and fused kernels run on plain tensors, as they do without sharding.

Two rules keep the collectives in step across processes: every process reduces the same
quantities in the same order, including a process whose shard of some parameter is empty (it
contributes zeros), and the layout is derived from the parameters alone, never from values.
What this module learned from: torch's ``clip_grad_norm_`` under FSDP2 (local norms of DTensor
shards, then a reduction over the mesh), and the double counting of replicated tensors that
learning-rate-free optimizers have run into under FSDP.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardLayout", "local", "shard_blocks", "data_parallel_mesh"]

try:  # torch.distributed.tensor exists on every platform torch supports, but may be built without it
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def local(tensor: Tensor) -> Tensor:
    """This process's shard of ``tensor`` (a view sharing its storage), or ``tensor`` itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def _sharded_over(param: Tensor, shard_group: Optional[Any]) -> tuple[Any, ...]:
    """The process groups over which ``param``'s elements are split (empty: replicated)."""
    if DTensor is not None and isinstance(param, DTensor):
        mesh = param.device_mesh
        for placement in param.placements:
            if not (placement.is_shard() or placement.is_replicate()):
                raise ValueError(
                    f"QLAB: a parameter has the DTensor placement {placement}; QLAB supports parameters "
                    "that are sharded (Shard) or replicated (Replicate) over the device mesh."
                )
        return tuple(mesh.get_group(dim) for dim, placement in enumerate(param.placements) if placement.is_shard())
    return () if shard_group is None else (shard_group,)


class ShardLayout:
    """How a list of parameters is split over processes, and how to sum over all of them.

    Args:
        params: the parameters, in the order the optimizer steps them (the same on every process).
        shard_group: the process group that plain-tensor parameters are shards over (FSDP1's
            ``process_group``); ``None`` when plain tensors are whole. DTensors carry their own.

    Example (one process, nothing sharded: the sum is a plain sum):
        >>> import torch
        >>> layout = ShardLayout([torch.zeros(2), torch.zeros(3)])
        >>> layout.sharded
        False
        >>> layout.sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([4., 6.])
    """

    def __init__(self, params: Sequence[Tensor], shard_group: Optional[Any] = None) -> None:
        splits = [_sharded_over(p, shard_group) for p in params]
        # Distinct splits in order of first appearance: the same order on every process.
        self._kinds: list[tuple[Any, ...]] = []
        for split in splits:
            if split not in self._kinds:
                self._kinds.append(split)
        self._kind_of = torch.tensor([self._kinds.index(split) for split in splits], dtype=torch.long)
        self._groups: list[Any] = []
        for kind in self._kinds:
            self._groups += [group for group in kind if group not in self._groups]
        self.sharded = bool(self._groups)

    def sum(self, per_param: Tensor) -> Tensor:
        """``per_param`` is ``(n_params, k)``: each parameter's local part of ``k`` sums. Returns
        the ``k`` global sums, the same on every process (one all-reduce per process group)."""
        if not self.sharded:
            return per_param.sum(0)
        if self._kind_of.device != per_param.device:  # moved once, not at every step
            self._kind_of = self._kind_of.to(per_param.device)
        index = self._kind_of
        by_kind = per_param.new_zeros(len(self._kinds), per_param.shape[1]).index_add_(0, index, per_param)
        for group in self._groups:
            rows = [i for i, kind in enumerate(self._kinds) if group in kind]
            packed = by_kind[rows]
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            by_kind[rows] = packed
        return by_kind.sum(0)

    def total(self, per_param: Tensor) -> Tensor:
        """One global sum: ``per_param`` holds each parameter's local part of it."""
        return self.sum(per_param.unsqueeze(1))[0]


def data_parallel_mesh(mesh: Any, owner: str) -> Any:
    """The data-parallel dimension of Lightning's ``ModelParallelStrategy`` mesh; a clear error when
    the strategy was asked for tensor parallelism, which needs a plan only the model's author can write."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{owner}: ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}, but "
            "this model shards with FSDP2 over the data-parallel processes only. Set "
            "trainer.strategy.init_args.data_parallel_size to the number of processes and "
            "tensor_parallel_size: 1 (configs/trainer/fsdp.yaml does), or override configure_model."
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_blocks(model: nn.Module, mesh: Any) -> None:
    """FSDP2 over ``mesh``: every block (each member of an ``nn.Sequential`` or ``nn.ModuleList``
    that holds parameters: an MLP's layers, a ResNet's residual blocks, a transformer's blocks)
    is its own unit, and ``model`` the root unit holding the rest (embeddings tied to an output
    layer stay together there). Sharding blocks, not single tensors, keeps one all-gather per
    block. Does nothing when ``model`` is already sharded (Lightning may call configure_model twice).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    blocks = [child for container in model.modules() if isinstance(container, (nn.Sequential, nn.ModuleList))
              for child in container.children() if any(True for _ in child.parameters())]
    for block in reversed(blocks):  # innermost first: fully_shard wants units nested bottom-up
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
