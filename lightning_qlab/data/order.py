"""The order of the training samples: a function of the seed and the epoch, resumable mid-epoch.

``DataLoader(shuffle=True)`` draws each epoch's order from the global random generator, so the
order depends on every random draw made before the epoch began, which no checkpoint captures.
Here epoch ``e`` reads ``randperm(n)`` seeded with ``seed + e`` (the order Lightning's
``DistributedSampler`` uses), each process reads its share of it, and a loader that Lightning
restores from a mid-epoch checkpoint starts at the batch the checkpoint was taken after, without
loading the batches before it. The random draws made while a batch is loaded (random crops and
flips) are seeded per batch too, so they come out the same after resuming, in worker processes
as well.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> loader = ResumableLoader(TensorDataset(torch.arange(6)), batch_size=2, seed=0)
    >>> first = [batch[0].tolist() for batch in loader]
    >>> state = loader.state_dict()  # after the whole epoch: {'epoch': 0, 'batches': 3, ...}
    >>> again = ResumableLoader(TensorDataset(torch.arange(6)), batch_size=2, seed=0)
    >>> again.load_state_dict({**state, "batches": 1})  # as if checkpointed after one batch
    >>> [batch[0].tolist() for batch in again] == first[1:]
    True
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_qlab.seeding import derive_seed, run_seed, seeded

__all__ = ["EpochSampler", "ResumableLoader"]

# Kept apart from the seeds StepSeeding derives, so that no batch loads with a training step's draws.
_LOADING_STREAM = 1


class EpochSampler(DistributedSampler):
    """This process's share of epoch ``e``'s shuffled order (``randperm`` seeded with ``seed + e``),
    from batch ``start`` on, as ``(index, batch_seed)`` keys for :class:`ResumableLoader`.

    A :class:`~torch.utils.data.DistributedSampler`, so Lightning does not replace it under DDP;
    the processes are read from ``torch.distributed`` when it is initialised (Lightning calls
    ``train_dataloader`` after that), otherwise there is one. ``__len__`` is the whole share:
    Lightning counts the batches of a resumed epoch from where the checkpoint left off.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: Optional[int] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if num_replicas is None or rank is None:
            num_replicas, rank = _processes()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=run_seed() if seed is None else seed)
        self.batch_size = batch_size
        self.start = 0  # batches of this pass to skip

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        for position in range(self.start * self.batch_size, len(indices)):
            batch = position // self.batch_size
            yield indices[position], derive_seed(self.seed, _LOADING_STREAM, self.epoch, self.rank, batch)


class ResumableLoader(DataLoader):
    """A shuffling training DataLoader whose order Lightning can checkpoint and resume mid-epoch.

    Lightning saves ``state_dict()`` (the epoch and the batches delivered so far) in every
    checkpoint and hands it back through ``load_state_dict`` when it resumes inside an epoch;
    the next pass then starts after those batches. Each batch is loaded with torch's CPU
    generator, ``random`` and ``numpy.random`` seeded from ``(seed, epoch, rank, batch)`` and put
    back afterwards, and the loader draws nothing from the global generator.

    Args:
        dataset: a map-style dataset (indexable, with ``len``).
        batch_size: samples per batch per process (the last batch of an epoch may be smaller).
        seed: the seed of the order; ``None`` takes the run's (``seed_everything``'s, else 0).
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...), but no
            ``shuffle``, ``sampler`` or ``batch_sampler``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: Optional[int] = None, **kwargs: Any) -> None:
        sampler = EpochSampler(dataset, batch_size, seed)
        # Its own generator: starting a pass (the workers' base seed) leaves the global one alone.
        generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(_SeededBatches(dataset), batch_size=batch_size, sampler=sampler, generator=generator,
                         **kwargs)
        self._epoch = 0
        self._delivered = 0  # batches of the current pass handed out, the skipped ones included
        self._resume: Optional[dict[str, int]] = None

    def __iter__(self) -> "_Pass":  # type: ignore[override]
        return _Pass(self)

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # restored, not started yet: still where the checkpoint was
            return dict(self._resume)
        return {"epoch": self._epoch, "batches": self._delivered, "batch_size": self.sampler.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        saved_batch_size = state_dict.get("batch_size", self.sampler.batch_size)
        if saved_batch_size != self.sampler.batch_size:
            rank_zero_warn(
                f"ResumableLoader: the checkpoint was taken with batch_size={saved_batch_size}, this run has "
                f"batch_size={self.sampler.batch_size}; the rest of the epoch starts after "
                f"{state_dict['batches']} batches of the new size, not where the checkpoint left off."
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"]),
                        "batch_size": int(saved_batch_size)}

    def _begin_pass(self) -> None:
        # Called at the first batch of a pass, after Lightning's set_epoch: the sampler's epoch is
        # the one being trained, also when the pass was created before set_epoch.
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        resume, self._resume = self._resume, None
        sampler.start = resume["batches"] if resume is not None and resume["epoch"] == sampler.epoch else 0
        self._epoch = sampler.epoch
        self._delivered = sampler.start


class _Pass(Iterator[Any]):
    """One pass over a :class:`ResumableLoader`, started lazily at its first batch."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader
        self.iterator: Optional[Iterator[Any]] = None

    def __next__(self) -> Any:
        if self.iterator is None:
            self.loader._begin_pass()
            self.iterator = DataLoader.__iter__(self.loader)
        batch = next(self.iterator)
        self.loader._delivered += 1
        return batch


class _SeededBatches(Dataset):
    """The dataset, read by ``(index, batch_seed)`` keys: each batch loads under its own seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded(seed):
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        indices = [index for index, _ in keys]
        with seeded(keys[0][1]):  # every key of a batch carries the batch's seed
            getitems = getattr(self.dataset, "__getitems__", None)
            return list(getitems(indices)) if callable(getitems) else [self.dataset[i] for i in indices]


def _processes() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
