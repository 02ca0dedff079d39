"""Every optimizer the benchmarks run, defined once.

A :class:`Contender` is either a QLAB setting (``QLABConfig`` fields) or a torch optimizer named by
class path with its arguments. The same definition serves the CLI panels (``compare.py``, as the
one-line override a user would write) and the plain PyTorch loops (``heldout.py``,
``step_cost.py``, via :meth:`Contender.build`). The learning-rate-free peers come from their PyPI
packages (``pip install -e .[bench]``); a peer that is not installed builds to ``None`` and is
reported as such.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_qlab.mixin import QLABConfig
from lightning_qlab.optimizer import QLAB

__all__ = ["Contender", "qlab", "sgd", "adam", "adamw", "peers", "floor", "installed"]


@dataclass(frozen=True)
class Contender:
    """One optimizer setting, and the family it is reported in.

    ``qlab`` holds QLABConfig settings (a QLAB contender); otherwise ``class_path`` and
    ``init_args`` name a torch optimizer. ``extra_forward`` marks the floor: an SGD step plus
    one no-grad forward, QLAB's unavoidable extra work.
    """

    name: str
    family: str  # "QLAB", "SGD grid", "Momentum grid", "Adam", "AdamW grid", "LR-free", "floor"
    qlab: Optional[dict[str, Any]] = None
    class_path: Optional[str] = None
    init_args: dict[str, Any] = field(default_factory=dict)
    extra_forward: bool = False

    @property
    def requires(self) -> Optional[str]:
        """The module a peer's package provides (None for torch and QLAB)."""
        if self.class_path is None or self.class_path.startswith("torch."):
            return None
        return self.class_path.split(".")[0]

    @property
    def evaluates_average(self) -> bool:
        """Whether the model this contender leaves after training is the average of its iterates
        (QLAB with the mixin's averaging on)."""
        return self.qlab is not None and self.qlab.get("weight_averaging", True)

    def cli_overrides(self) -> tuple[str, ...]:
        """The command-line arguments that select this optimizer in a shipped config."""
        if self.qlab is not None:
            return ("--model.init_args.qlab_config", json.dumps(self.qlab))
        spec = {"class_path": self.class_path, "init_args": self.init_args}
        return ("--model.init_args.optimizer", json.dumps(spec))

    def build(self, params: Iterable[Tensor]) -> Optional[torch.optim.Optimizer]:
        """The optimizer over ``params`` for a plain PyTorch loop; None when its package is missing."""
        if self.qlab is not None:
            return QLAB(params, **QLABConfig(**self.qlab).optimizer_kwargs())
        if not installed(self):
            return None
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)(params, **self.init_args)


def installed(contender: Contender) -> bool:
    return contender.requires is None or importlib.util.find_spec(contender.requires) is not None


def qlab(direction: str = "adam", mode: str = "safeguarded", initial_step: Optional[float] = None,
         **settings: Any) -> Contender:
    """A QLAB setting. The published rule (``mode="paper"``) evaluates its last iterate."""
    config: dict[str, Any] = {"direction": direction, "mode": mode, **settings}
    if mode == "paper":
        config.setdefault("weight_averaging", False)
    if initial_step is not None:
        config["initial_step"] = initial_step
    suffix = "" if initial_step is None else f" beta0={initial_step:g}"
    return Contender(f"QLAB {direction} {mode}{suffix}", "QLAB", qlab=config)


def sgd(lr: float, momentum: float = 0.0) -> Contender:
    if momentum:
        return Contender(f"SGD momentum {momentum:g} lr={lr:g}", "Momentum grid", class_path="torch.optim.SGD",
                         init_args={"lr": lr, "momentum": momentum})
    return Contender(f"SGD lr={lr:g}", "SGD grid", class_path="torch.optim.SGD", init_args={"lr": lr})


def adam(lr: float = 1e-3) -> Contender:
    return Contender(f"Adam lr={lr:g}", "Adam", class_path="torch.optim.Adam", init_args={"lr": lr})


def adamw(lr: float, weight_decay: float = 0.01) -> Contender:
    """AdamW with torch's default weight decay."""
    return Contender(f"AdamW lr={lr:g}", "AdamW grid", class_path="torch.optim.AdamW",
                     init_args={"lr": lr, "weight_decay": weight_decay})


def peers() -> list[Contender]:
    """The learning-rate-free peers at their authors' recommended settings."""
    return [
        Contender("D-Adaptation SGD", "LR-free", class_path="dadaptation.DAdaptSGD", init_args={"lr": 1.0}),
        Contender("Prodigy", "LR-free", class_path="prodigyopt.Prodigy", init_args={"lr": 1.0}),
        Contender("Schedule-Free AdamW", "LR-free", class_path="schedulefree.AdamWScheduleFree",
                  init_args={"lr": 0.0025}),
        Contender("DoG", "LR-free", class_path="dog.DoG", init_args={"lr": 1.0}),
    ]


def floor(lr: float = 0.1) -> Contender:
    return Contender("floor: SGD + 1 no-grad forward", "floor", class_path="torch.optim.SGD",
                     init_args={"lr": lr}, extra_forward=True)
