"""Train an existing LightningModule with QLABGrad: add the mixin, write `qlab_loss`, done.

`Classifier` below is an ordinary LightningModule (BatchNorm, dropout, Adam with a learning rate).
`QLABClassifier` is the whole conversion: list `QLABMixin` first and say what the loss of a batch
is. The mixin supplies training_step and configure_optimizers; everything else (forward,
validation_step, metrics) is inherited unchanged. At the first step it warns that Classifier's own
training_step and configure_optimizers (with their logging, Adam and its learning rate) are not used.

Run on CPU in well under a minute (generated data; or real MNIST with --mnist-root)::

    python examples/existing_module.py
    python examples/existing_module.py --mnist-root /path/with/MNIST/raw --epochs 1
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_qlab.callback import QLABMonitor
from lightning_qlab.mixin import QLABConfig, QLABMixin


# ------------------------------------------------------------------------- the module you have
class Classifier(LightningModule):
    """An MLP classifier trained with Adam: nothing QLAB-specific here."""

    def __init__(self, inputs: int = 784, hidden: int = 128, classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(inputs, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# ------------------------------------------------------------------------- the conversion
class QLABClassifier(QLABMixin, Classifier):
    """The same classifier, trained by QLABGrad: no learning rate to choose."""

    def qlab_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


# ------------------------------------------------------------------------- data and the run
def generated_data(samples: int, inputs: int = 784, classes: int = 10, seed: int = 0) -> TensorDataset:
    """Noisy samples around one fixed random prototype per class (a stand-in for MNIST); the
    seed picks the samples, so training and validation sets share the classes."""
    prototypes = torch.randn(classes, inputs, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(prototypes[labels] + 6.0 * torch.randn(samples, inputs, generator=generator), labels)


def mnist_data(root: str) -> tuple[Subset, Subset]:
    from torchvision import datasets, transforms

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(root, train=True, download=True, transform=to_tensor)
    test = datasets.MNIST(root, train=False, download=True, transform=to_tensor)
    return Subset(train, range(10_000)), Subset(test, range(2_000))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-root", help="a folder with MNIST/raw/*.gz; generated data when omitted")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--log-dir", default=None, help="where logs and the step-size plot go (a temp dir by default)")
    args = parser.parse_args(argv)

    seed_everything(0, verbose=False)
    if args.mnist_root:
        train, test = mnist_data(args.mnist_root)
    else:
        train, test = generated_data(2_000), generated_data(1_000, seed=1)
    model = QLABClassifier()
    model.qlab_config = QLABConfig(direction="rmsprop")  # the defaults, spelled out; see QLABConfig
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="qlab-example-")
    monitor = QLABMonitor()
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=CSVLogger(log_dir, name="existing_module"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(test, batch_size=500),
    )
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"steps: {trainer.global_step}, last step size: {monitor.step_sizes[-1]:.4g}")
    print(f"validation accuracy: {accuracy:.4f}")
    print(f"step-size plot: {monitor.plot_path}")
    return accuracy


if __name__ == "__main__":
    main()
