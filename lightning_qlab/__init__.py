"""lightning-qlab: QLABGrad, a learning-rate-free step-size rule, for PyTorch and PyTorch Lightning.

The layout follows the dependency order. Plain PyTorch: :mod:`~lightning_qlab.optimizer` (the
rule), :mod:`~lightning_qlab.trial` (the trial forward: replaying a micro-batch at the trial
point) and :mod:`~lightning_qlab.averaging` (what is evaluated: the average of the iterates).
Lightning glue on top: :mod:`~lightning_qlab.mixin` (QLAB inside a LightningModule, with
:mod:`~lightning_qlab.accumulation` and :mod:`~lightning_qlab.clipping`) <-
:mod:`~lightning_qlab.callback`, :mod:`~lightning_qlab.models` <- :mod:`~lightning_qlab.cli`. Beside
them, for runs that resume exactly: :mod:`~lightning_qlab.seeding` (each training batch's random
draws), :mod:`~lightning_qlab.data.order` (the training order), :mod:`~lightning_qlab.preemption`
(SIGTERM) and :mod:`~lightning_qlab.checkpoints` (finding and checking checkpoints). For sharded
training: :mod:`~lightning_qlab.sharding` (sums over sharded parameters, used by the optimizer),
:mod:`~lightning_qlab.sharded_average` (the average of an FSDP2 module) and
:mod:`~lightning_qlab.strategies` (FSDP2 over every process). Every use of a private torch or
Lightning name is in :mod:`~lightning_qlab._compat`.
"""

from lightning_qlab.averaging import PolynomialAveraging, polynomial_decay_multi_avg_fn
from lightning_qlab.callback import QLABMonitor
from lightning_qlab.mixin import QLABConfig, QLABMixin
from lightning_qlab.optimizer import QLAB, QLABStep, solve_step_size
from lightning_qlab.preemption import Preemption
from lightning_qlab.seeding import StepSeeding
from lightning_qlab.strategies import FSDP2Strategy
from lightning_qlab.trial import TrialForward

__all__ = [
    "FSDP2Strategy",
    "PolynomialAveraging",
    "Preemption",
    "QLAB",
    "QLABConfig",
    "QLABMixin",
    "QLABMonitor",
    "QLABStep",
    "StepSeeding",
    "TrialForward",
    "polynomial_decay_multi_avg_fn",
    "solve_step_size",
]
__version__ = "0.1.0"
