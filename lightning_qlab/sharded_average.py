"""The iterate average of a module sharded with FSDP2 (Lightning's ``ModelParallelStrategy``).

Lightning's ``WeightAveraging`` deep-copies the module, which FSDP2 forbids, and its checkpoint
layout puts the training weights beside the state dict, where a distributed checkpoint keeps only
rank 0's copy. :class:`~lightning_qlab.averaging.PolynomialAveraging` uses this module instead
when the module is sharded:

* the average is a tree of plain modules holding detached copies of the module's parameters
  (DTensors, sharded like them) and buffers, under the same names and in the same order, so that
  ``AveragedModel.update_parameters`` and the swaps for validation pair them as for any module;
* a checkpoint's ``state_dict`` is the average (what evaluation loads), with the training weights
  nested in it under :data:`TRAINING_WEIGHTS`, so that ``torch.distributed.checkpoint`` writes
  every process's shards of both; resuming loads the nested weights back into the module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from lightning_qlab.averaged_model import HostCountedAverage

__all__ = ["TRAINING_WEIGHTS", "sharded_average", "save_sharded_layout", "load_sharded_layout"]

#: The key, inside a sharded checkpoint's ``state_dict``, of the training weights (the last iterate).
TRAINING_WEIGHTS = "current_model_state"


def tensor_copy(module: nn.Module) -> nn.Module:
    """Plain modules holding detached copies of ``module``'s parameters and buffers under the same
    names, in the same order (a parameter shared under two names stays shared), and nothing else."""
    root = nn.Module()
    copies: dict[int, Tensor] = {}

    def owner(path: list[str]) -> nn.Module:
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        return node

    for name, param in module.named_parameters():
        *path, leaf = name.split(".")
        copy = copies.setdefault(id(param), nn.Parameter(param.detach().clone(), requires_grad=False))
        owner(path).register_parameter(leaf, copy)
    for name, buffer in module.named_buffers():
        *path, leaf = name.split(".")
        owner(path).register_buffer(leaf, buffer.detach().clone())
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    if names != [n for n, _ in root.named_parameters()] + [n for n, _ in root.named_buffers()]:
        raise RuntimeError(
            f"PolynomialAveraging: the parameters of the sharded {type(module).__name__} could not be mirrored "
            "in the same order; turn weight averaging off (QLABConfig(weight_averaging=False))."
        )
    return root


def sharded_average(module: nn.Module, use_buffers: bool,
                    multi_avg_fn: Callable[[list[Tensor], list[Tensor], Tensor], None]) -> AveragedModel:
    """An ``AveragedModel`` of the sharded ``module`` (which cannot be deep-copied): its
    ``module`` is :func:`tensor_copy` of it."""
    average = HostCountedAverage(nn.Module(), use_buffers=use_buffers, multi_avg_fn=multi_avg_fn)
    average.module = tensor_copy(module)
    return average


def save_sharded_layout(average: Optional[AveragedModel], checkpoint: dict[str, Any], fit_ended: bool) -> None:
    """Write the average as ``checkpoint["state_dict"]``, with the training weights nested in it.

    Before the end of ``fit`` the strategy's ``state_dict`` holds the training weights and the
    average is the callback's; after it they are swapped (the module holds the average).
    """
    if average is None:
        return
    held = average.state_dict()
    held_module = {name[len("module."):]: value for name, value in held.items() if name.startswith("module.")}
    counters = {name: value for name, value in held.items() if not name.startswith("module.")}
    module_state = checkpoint["state_dict"]
    if fit_ended:
        checkpoint["state_dict"] = {**module_state, TRAINING_WEIGHTS: held_module}
    else:
        checkpoint["state_dict"] = {**held_module, TRAINING_WEIGHTS: module_state}
    checkpoint["averaging_state"] = counters  # plain tensors, the same on every process


def load_sharded_layout(average: Optional[AveragedModel], module: nn.Module, checkpoint: dict[str, Any],
                        path: Optional[Any]) -> None:
    """Resume from :func:`save_sharded_layout`'s checkpoint at ``path``: the strategy has loaded its
    ``state_dict`` (the average) into ``module``; move that into ``average`` and load the nested
    training weights into ``module``."""
    if average is None:
        return
    if "averaging_state" not in checkpoint or path is None:
        raise RuntimeError(
            "PolynomialAveraging: this sharded checkpoint was not written with weight averaging on, so it "
            "cannot resume a run that averages; resume with QLABConfig(weight_averaging=False)."
        )
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    loaded = module.state_dict()
    with torch.no_grad():
        for name, kept in average.module.state_dict().items():
            kept.copy_(loaded[name])
    average.load_state_dict({**average.state_dict(), **checkpoint["averaging_state"]})
    weights = get_model_state_dict(module)
    load({"state_dict": {TRAINING_WEIGHTS: weights}}, checkpoint_id=Path(path))
    set_model_state_dict(module, weights)
