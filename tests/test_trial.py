"""TrialForward, the plain-PyTorch trial forward: it replays a micro-batch exactly and leaves no
trace, and the README's plain loop built on it steps exactly like QLABMixin."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import quiet_trainer
from lightning_qlab import TrialForward
from lightning_qlab.mixin import QLABConfig, QLABMixin

README = Path(__file__).resolve().parents[1] / "README.md"


def _dropout_batch_norm_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


# ------------------------------------------------------------------------------ the helper alone
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_replay_at_the_same_point_is_the_training_loss_and_leaves_no_trace(micro_batches):
    model = _dropout_batch_norm_net()
    x, y = torch.randn(8 * micro_batches, 6), torch.randint(0, 3, (8 * micro_batches,))
    trial = TrialForward(model)
    losses = [trial.record(_loss, model, x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(micro_batches)]
    after_training, rng_after_training = _state(model), torch.get_rng_state()

    replayed = trial.replay()

    expected = losses[0].detach() if micro_batches == 1 else torch.stack([v.detach() for v in losses]).mean()
    assert torch.equal(replayed, expected) and torch.equal(trial.recorded_loss(), expected)
    assert not replayed.requires_grad
    assert torch.equal(torch.get_rng_state(), rng_after_training)
    for name, value in _state(model).items():
        assert torch.equal(value, after_training[name]), name
    assert int(model[1].num_batches_tracked) == micro_batches  # the training forwards counted, the replay not
    # The replayed random state is what makes them equal: a fresh forward draws other masks.
    assert not torch.equal(_loss(model, x[:8], y[:8]).detach(), losses[0].detach())


def test_instance_norm_running_statistics_are_restored_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Unflatten(1, (4, 4)), torch.nn.InstanceNorm1d(4, track_running_stats=True),
        torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3),
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    trial = TrialForward(model)
    loss = trial.record(_loss, model, x, y)
    after_training = _state(model)
    with torch.no_grad():
        model[0].weight.add_(0.1 * torch.randn_like(model[0].weight))  # a trial point away from w
    assert not torch.equal(trial.replay(), loss.detach())
    statistics = [name for name in after_training if "running" in name or "num_batches" in name]
    assert len(statistics) == 3
    for name in statistics:
        assert torch.equal(model.state_dict()[name], after_training[name]), name


def test_half_precision_losses_are_widened_to_float32():
    model = _dropout_batch_norm_net().to(torch.bfloat16)
    x, y = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    trial = TrialForward(model)
    assert trial.record(_loss, model, x, y).dtype == torch.bfloat16  # backward sees the model's dtype
    assert trial.recorded_loss().dtype == trial.replay().dtype == torch.float32


def test_misuse_is_explained():
    model = _dropout_batch_norm_net()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    trial = TrialForward(model)
    with pytest.raises(RuntimeError, match=r"TrialForward.replay: no micro-batch has been recorded"):
        trial.replay()
    with pytest.raises(ValueError, match=r"per_sample must return a scalar loss, got a tensor of shape \(8,\)"):
        trial.record(_per_sample, model, x, y)
    assert len(trial) == 0  # a failed record records nothing
    trial.record(_loss, model, x, y)
    model.eval()
    with pytest.raises(RuntimeError, match=r"switched between train\(\) and eval\(\)"):
        trial.replay()
    model.train()
    trial.clear()
    assert len(trial) == 0


def _per_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


# ------------------------------------------------------------------------------ README == mixin
def _readme_plain_pytorch_blocks() -> tuple[str, str]:
    """The two code blocks of the README's "Plain PyTorch" section that train with TrialForward."""
    section = README.read_text().split("## Plain PyTorch\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "TrialForward" in block]
    assert len(blocks) == 2, "the README's Plain PyTorch section should show a step and an accumulated step"
    return blocks[0], blocks[1]


class _Seeded:
    """Micro-batches, with the global generator seeded from each one's index right before it is
    handed out: what a StepSeeding-like callback does for the Lightning run."""

    def __init__(self, batches: list[Any], first_index: int) -> None:
        self.batches, self.first_index = batches, first_index

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for offset, batch in enumerate(self.batches):
            torch.manual_seed(1000 + self.first_index + offset)
            yield batch


class _SeedEachBatch(Callback):
    def __init__(self) -> None:
        self.step_sizes: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = trainer.optimizers[0].last_step
        if last is not None and (not self.step_sizes or len(self.step_sizes) < last.step):
            self.step_sizes.append(last.step_size)


class _ReadmeModel(QLABMixin, LightningModule):
    def __init__(self, net: torch.nn.Module, accumulate: int) -> None:
        super().__init__()
        self.qlab_config = QLABConfig(accumulate_batches=accumulate, weight_averaging=False)
        self.net = net

    def qlab_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-micro-batch", "two-micro-batches"])
def test_the_readme_plain_loop_steps_like_the_mixin_bitwise(accumulate):
    step_block, accumulation_block = _readme_plain_pytorch_blocks()
    setup, loop = step_block.split("\nfor ", 1)
    loop = "for " + loop if accumulate == 1 else accumulation_block
    steps, batch_size = 3, 16
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * accumulate * batch_size, 784, generator=generator),
                         torch.randint(0, 10, (steps * accumulate * batch_size,), generator=generator))
    batches = list(DataLoader(data, batch_size=batch_size))

    # The README's code, as written, with its model's initial weights kept for the mixin.
    namespace: dict[str, Any] = {}
    torch.manual_seed(0)
    exec(compile(setup, "README.md", "exec"), namespace)
    initial = copy.deepcopy(namespace["model"])
    printed: list[float] = []
    namespace["print"] = printed.append
    if accumulate == 1:
        namespace["loader"] = _Seeded(batches, 0)
    else:
        namespace["loader"] = [_Seeded(batches[i : i + accumulate], i) for i in range(0, len(batches), accumulate)]
    exec(compile(loop, "README.md", "exec"), namespace)
    plain_net, plain_qlab = namespace["model"], namespace["optimizer"]

    mixin = _ReadmeModel(initial, accumulate)
    seeding = _SeedEachBatch()
    trainer = quiet_trainer(max_steps=steps, callbacks=[seeding])
    trainer.fit(mixin, DataLoader(data, batch_size=batch_size))
    mixin_qlab = trainer.optimizers[0]

    assert plain_qlab.steps == mixin_qlab.steps == steps
    assert plain_qlab.last_step == mixin_qlab.last_step  # every field, bitwise
    if accumulate == 1:
        assert printed == seeding.step_sizes
    for (name, plain), mixed in zip(plain_net.state_dict().items(), mixin.net.state_dict().values(), strict=True):
        assert torch.equal(plain, mixed), name  # the parameters and the BatchNorm statistics
    assert int(mixin.net[1].num_batches_tracked) == steps * accumulate  # the trial forwards left no count
