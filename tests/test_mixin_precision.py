"""bf16-mixed against 32-true on real MNIST: the mixin's precision handling loses no accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import quiet_trainer
from lightning_qlab.callback import QLABMonitor
from lightning_qlab.mixin import QLABMixin

TRAIN_SAMPLES = 8_000  # a subset, 2 epochs of 63 steps; the whole 10,000-image test set


class MNISTPerceptron(QLABMixin, LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def qlab_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def _as_tensors(dataset, samples: int) -> TensorDataset:
    images = (dataset.data[:samples].float() / 255.0 - 0.1307) / 0.3081
    return TensorDataset(images.reshape(-1, 784), dataset.targets[:samples])


@pytest.mark.slow
def test_bf16_mixed_reaches_the_accuracy_of_32_true_on_mnist(mnist_root):
    from torchvision.datasets import MNIST

    train = _as_tensors(MNIST(mnist_root, train=True, download=True), TRAIN_SAMPLES)
    test = _as_tensors(MNIST(mnist_root, train=False, download=True), 10_000)
    accuracy, dtypes = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        model, monitor = MNISTPerceptron(), QLABMonitor(plot=False)
        order = torch.Generator().manual_seed(0)
        trainer = quiet_trainer(max_epochs=2, precision=precision, callbacks=[monitor])
        trainer.fit(model, DataLoader(train, batch_size=128, shuffle=True, generator=order))
        with torch.no_grad():
            correct = model.net(test.tensors[0]).argmax(1) == test.tensors[1]
            accuracy[precision] = 100.0 * correct.float().mean().item()
        with trainer.precision_plugin.forward_context():
            dtypes[precision] = model.net(test.tensors[0][:2]).dtype
        assert len(monitor.steps) == trainer.global_step == 2 * 63
        assert all(size > 0 for size in monitor.step_sizes)
    assert dtypes == {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}  # autocast was really on
    assert accuracy["32-true"] > 85.0
    assert abs(accuracy["bf16-mixed"] - accuracy["32-true"]) <= 0.5, accuracy
