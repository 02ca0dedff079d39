"""StepSeeding: the random draws of every training batch as a function of the run's seed and the
batch's place in training, so that a run resumed from a checkpoint draws what the uninterrupted
run drew.

The global random generators carry every draw made since ``seed_everything``: a validation run,
a sanity check or a dataloader started at another moment shifts everything after it, and a
checkpoint does not hold them. Seeding them at the start of each training batch from
``(seed, rank, epoch, batch)`` (as fairseq seeds each update) removes that history: dropout masks
and any other draw of a training step depend on where the step is, not on what ran before it.

Example:
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(callbacks=[StepSeeding()], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

__all__ = ["StepSeeding", "derive_seed", "run_seed", "seeded"]

# Lightning's name for the seed of the run (set by seed_everything; read by its DistributedSampler).
SEED_VARIABLE = "PL_GLOBAL_SEED"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (signed 64-bit integers), and on their order.

    Example:
        >>> derive_seed(42, 0, 3) == derive_seed(42, 0, 3) != derive_seed(42, 3, 0)
        True
    """
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def run_seed() -> int:
    """The seed of this run: ``seed_everything``'s (``PL_GLOBAL_SEED``), or 0 when none was set,
    as Lightning's own ``DistributedSampler`` does."""
    return int(os.environ.get(SEED_VARIABLE, 0))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator, ``random`` and ``numpy.random`` seeded from ``seed``;
    put the three generators back as they were afterwards."""
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    _seed_cpu_generators(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _seed_cpu_generators(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class StepSeeding(Callback):
    """Seeds torch (CPU and accelerators), ``random`` and ``numpy.random`` at the start of every
    training batch from the run's seed, the process's rank, the epoch and the batch index.

    The seed is ``seed_everything``'s (``PL_GLOBAL_SEED``); without one, rank 0 draws a seed at the
    start of fit and shares it with the other processes. It is saved in checkpoints: a resumed run
    continues with the seed it started with, whatever the command line says now, and makes it the
    run's seed (``PL_GLOBAL_SEED``) for the samplers that read it.

    ``lightning fit`` adds one to the Trainer unless the configuration has one already.
    """

    def __init__(self) -> None:
        self.seed: Optional[int] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if SEED_VARIABLE in os.environ:
            self.seed = run_seed()
        else:
            # Unseeded: still one seed per run, the same on every rank, kept in the checkpoints.
            drawn = random.SystemRandom().randrange(2**31)
            self.seed = int(trainer.strategy.broadcast(drawn, src=0))
            os.environ[SEED_VARIABLE] = str(self.seed)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.seed is not None, "StepSeeding.setup did not run"
        seed = derive_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx)
        torch.manual_seed(seed)  # every device's generator too
        random.seed(seed)
        np.random.seed(seed % 2**32)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is None:
            return
        if saved != self.seed:
            rank_zero_info(
                f"StepSeeding: the checkpoint was trained with seed {saved} (this command gives "
                f"{self.seed}); the resumed run continues with seed {saved}."
            )
        self.seed = int(saved)
        # The samplers of the training data read the run's seed from here when they are built.
        os.environ[SEED_VARIABLE] = str(self.seed)
