"""The package's networks and ImageClassifier: architectures by exact parameter counts, the switch
between QLABGrad and a baseline optimizer, metrics against hand-computed values, checkpoints."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlab.mixin import QLABConfig
from lightning_qlab.models import ImageClassifier, MultiLayerPerceptron, ResNet18CIFAR, ResNet50, SmallCNN
from lightning_qlab.optimizer import QLAB


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ backbones
def test_mlp_layers_and_parameter_count():
    net = MultiLayerPerceptron(in_features=784, hidden_sizes=(512, 256), num_classes=10)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 256), (256, 10)]
    assert count(net) == (784 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10) == 535_818
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_small_cnn_parameter_count_and_shapes():
    net = SmallCNN(in_channels=3, image_size=32, channels=(32, 64, 128), hidden_size=256, num_classes=10)
    convs = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
    batch_norms = 2 * 2 * (32 + 64 + 128)
    head = (128 * 4 * 4 * 256 + 256) + (256 * 10 + 10)
    assert count(net) == convs + batch_norms + head == 814_570
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    grey = SmallCNN(in_channels=1, image_size=28, channels=(16, 32), num_classes=10)
    assert grey(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_cifar_stem_and_feature_map_size():
    net = ResNet18CIFAR(num_classes=10)
    # The standard CIFAR-10 ResNet-18 (3x3 stride-1 stem, no max-pool) has 11,173,962 parameters.
    assert count(net) == 11_173_962
    assert (net.conv1.kernel_size, net.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(net.maxpool, nn.Identity)
    sizes = {}
    for name in ("layer1", "layer4"):
        getattr(net, name).register_forward_hook(lambda m, i, out, name=name: sizes.update({name: out.shape}))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sizes["layer1"][-2:] == (32, 32) and sizes["layer4"][-2:] == (4, 4)


def test_resnet50_is_torchvisions_resnet50():
    ours = ResNet50(num_classes=1000).state_dict()
    reference = torchvision.models.resnet50(weights=None).state_dict()
    assert list(ours) == list(reference)
    assert all(ours[key].shape == reference[key].shape for key in ours)
    assert sum(t.numel() for k, t in ours.items() if "running" not in k and "num_batches" not in k) == 25_557_032


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SmallCNN(image_size=30), "divisible by 8"),
        (lambda: MultiLayerPerceptron(dropout=1.0), "dropout"),
        (lambda: MultiLayerPerceptron(hidden_sizes=(128, 0)), "hidden_size"),
        (lambda: ResNet18CIFAR(num_classes=0), "num_classes"),
    ],
)
def test_backbones_reject_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ------------------------------------------------------------------ ImageClassifier
def small_classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(MultiLayerPerceptron(in_features=12, hidden_sizes=(8,), num_classes=10), **kwargs)


def test_qlab_by_default_configured_from_qlab_config():
    model = small_classifier(qlab_config=QLABConfig(direction="momentum", initial_step=0.05, momentum=0.8))
    assert model.automatic_optimization is False
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, QLAB)
    assert (optimizer.direction, optimizer.initial_step) == ("momentum", 0.05)
    assert optimizer.param_groups[0]["momentum"] == 0.8


def test_baseline_optimizer_switches_to_automatic_optimization():
    model = small_classifier(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3),
    )
    assert model.automatic_optimization is True
    configured = model.configure_optimizers()
    assert type(configured["optimizer"]) is torch.optim.SGD
    assert configured["optimizer"].param_groups[0]["lr"] == 0.1
    assert isinstance(configured["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    plateau = small_classifier(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau),
    )
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val_loss"


def test_classifier_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="lr_scheduler is set but optimizer is not"):
        small_classifier(lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3))
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches"):
        small_classifier(optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                         qlab_config=QLABConfig(accumulate_batches=2))
    with pytest.raises(ValueError, match="top_k"):
        small_classifier(top_k=(1, 11))
    with pytest.raises(TypeError, match="backbone must be a torch.nn.Module"):
        ImageClassifier(backbone="resnet18", num_classes=10)
    # Refused when the model is built (a configuration error), not when fit calls configure_optimizers.
    with pytest.raises(ValueError, match="optimizer is QLAB"):
        small_classifier(optimizer=functools.partial(QLAB, initial_step=0.1))
    with pytest.raises(ValueError, match="optimizer is QLAB"):  # how jsonargparse builds a class_path
        small_classifier(optimizer=functools.partial(lambda factory, cls, **kw: factory(cls, **kw), None, QLAB))
    with pytest.raises(ValueError, match="optimizer is QLAB"):  # one it cannot see through: at fit
        small_classifier(optimizer=lambda params: QLAB(params)).configure_optimizers()
    with pytest.raises(ValueError, match=r"returned shape \(2, 10\), expected \(batch, 7\)"):
        ImageClassifier(MultiLayerPerceptron(12, (8,), 10), num_classes=7)(torch.zeros(2, 12))


def test_validation_metrics_match_hand_computed_values():
    # The "backbone" passes the inputs through, so the inputs are the logits. The true label of
    # sample i has rank i % 12 among its scores: 1 of 12 is top-1 correct, 5 of 12 top-5 correct.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 12, generator=generator)
    order = logits.argsort(dim=1, descending=True)
    labels = order[torch.arange(12), torch.arange(12)]
    model = ImageClassifier(nn.Flatten(), num_classes=12, top_k=(1, 5))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (results,) = trainer.validate(model, DataLoader(TensorDataset(logits, labels), batch_size=4))
    assert results["val_acc"] == pytest.approx(1 / 12)
    assert results["val_acc_top5"] == pytest.approx(5 / 12)
    assert results["val_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    predictions = trainer.predict(model, DataLoader(TensorDataset(logits, labels), batch_size=4))
    assert torch.equal(torch.cat(predictions), order[:, 0])


def test_checkpoint_hyperparameters_load_with_weights_only(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 12), torch.randint(0, 10, (32,)))
    model = small_classifier(qlab_config=QLABConfig(direction="adam", initial_step=0.01), top_k=(1, 3))
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=8))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(
        path, backbone=MultiLayerPerceptron(in_features=12, hidden_sizes=(8,), num_classes=10), weights_only=True
    )
    assert restored.qlab_config == model.qlab_config
    assert restored.top_k == (1, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
