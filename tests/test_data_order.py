"""The training data order: a function of the seed and the epoch, shared out between processes,
restored mid-epoch from a loader's state, with per-batch seeds for the random draws of loading."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_qlab.data import MNISTDataModule, TextDataModule
from lightning_qlab.data.base import make_loader
from lightning_qlab.data.order import EpochSampler, ResumableLoader


class NoisyItems(Dataset):
    """Item i is (i, a draw from torch's global generator): the draws stand for random augmentation."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(())


def passes(loader: ResumableLoader, epochs: range) -> list[list[tuple[list[int], list[float]]]]:
    """Every batch of every epoch: (indices, augmentation draws)."""
    seen = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        seen.append([(indices.tolist(), draws.tolist()) for indices, draws in loader])
    return seen


def test_the_order_depends_on_the_seed_and_the_epoch_only():
    torch.manual_seed(0)
    first = passes(ResumableLoader(NoisyItems(), batch_size=5, seed=7), range(3))
    torch.manual_seed(123)  # another state of the global generator
    random.random()
    second = passes(ResumableLoader(NoisyItems(), batch_size=5, seed=7), range(3))
    assert first == second
    orders = [[i for indices, _ in epoch for i in indices] for epoch in first]
    assert all(sorted(order) == list(range(23)) for order in orders)  # each epoch: every item once
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    other_seed = passes(ResumableLoader(NoisyItems(), batch_size=5, seed=8), range(1))
    assert [i for indices, _ in other_seed[0] for i in indices] != orders[0]
    # The draws made while loading differ between batches and epochs (they are not one seed reused).
    draws = [d for epoch in first for _, batch in epoch for d in batch]
    assert len(set(draws)) == len(draws)


def test_loading_leaves_the_global_generators_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    python_before = random.getstate()
    passes(ResumableLoader(NoisyItems(), batch_size=4, seed=1), range(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert random.getstate() == python_before


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_loader_continues_where_the_checkpoint_was_taken(num_workers):
    options = dict(batch_size=4, seed=3, num_workers=num_workers, persistent_workers=num_workers > 0)
    straight = passes(ResumableLoader(NoisyItems(), **options), range(2))

    interrupted = ResumableLoader(NoisyItems(), **options)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    taken = [next(iterator) for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2, "batch_size": 4}
    assert [t[0].tolist() for t in taken] == [indices for indices, _ in straight[1][:2]]

    resumed = ResumableLoader(NoisyItems(), **options)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # restored, not started: still where the checkpoint was
    resumed.sampler.set_epoch(1)  # as Lightning does before the epoch's first batch
    rest = [(indices.tolist(), draws.tolist()) for indices, draws in resumed]
    assert rest == straight[1][2:]  # the same batches, loaded with the same random draws
    assert resumed.state_dict()["batches"] == len(resumed) == 6
    # The next epoch starts from its beginning again.
    assert passes(resumed, range(2, 3)) == passes(ResumableLoader(NoisyItems(), **options), range(2, 3))


def test_a_state_from_another_epoch_does_not_skip():
    """A checkpoint taken after the last batch of epoch 0 is restored, but training goes on with epoch 1."""
    loader = ResumableLoader(NoisyItems(), batch_size=4, seed=3)
    loader.load_state_dict({"epoch": 0, "batches": 6, "batch_size": 4})
    assert passes(loader, range(1, 2)) == passes(ResumableLoader(NoisyItems(), batch_size=4, seed=3), range(1, 2))


def test_processes_share_each_epoch_out_between_them():
    data = TensorDataset(torch.arange(20))
    shares = [list(EpochSampler(data, batch_size=3, seed=0, num_replicas=2, rank=rank)) for rank in (0, 1)]
    indices = [[index for index, _ in share] for share in shares]
    assert sorted(indices[0] + indices[1]) == list(range(20))
    # The same order as Lightning's DistributedSampler with the same seed.
    reference = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    assert indices[1] == list(reference)
    # Batch seeds: one per batch of a rank, different between ranks.
    seeds = [[seed for _, seed in share] for share in shares]
    assert seeds[0][:3] == [seeds[0][0]] * 3 and seeds[0][3] != seeds[0][0]
    assert seeds[0][0] != seeds[1][0]


def test_the_seed_defaults_to_the_runs(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    assert EpochSampler(TensorDataset(torch.arange(4)), batch_size=2).seed == 11
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert EpochSampler(TensorDataset(torch.arange(4)), batch_size=2).seed == 0


def test_every_datamodule_trains_from_the_resumable_loader(tmp_path):
    """make_loader is the one place: the image modules and the text module both go through it."""
    assert isinstance(make_loader(object(), TensorDataset(torch.arange(4)), 2, True, 0, "fit"), ResumableLoader)
    assert not isinstance(make_loader(object(), TensorDataset(torch.arange(4)), 2, False, 0, "test"), ResumableLoader)
    text = tmp_path / "text.txt"
    text.write_text("hello world, " * 200)
    dm = TextDataModule(text, block_size=8, batch_size=4)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), ResumableLoader)
    assert not isinstance(dm.val_dataloader(), ResumableLoader)
    image = MNISTDataModule(data_dir=tmp_path, num_workers=0, val_size=2)
    image.train_set = TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    assert isinstance(image.train_dataloader(), ResumableLoader)
