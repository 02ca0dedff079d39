"""The DataModules on real data (the offline MNIST archives and the CIFAR-10 JPEG copy) and on a
tiny generated ImageNet-style folder: splits, labels, transforms, and the errors for missing data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_qlab.data import (
    CIFAR10DataModule,
    DataMismatchError,
    DataNotFoundError,
    ImageNetDataModule,
    MNISTDataModule,
)
from lightning_qlab.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from lightning_qlab.data.mnist import MNIST_MEAN, MNIST_STD


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 40) -> None:
    """``root/<class>/<i>.png``: per_class RGB images per class, each one flat colour."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size + 8, 3), (label * 20 + i) % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


# ------------------------------------------------------------------ MNIST
def test_mnist_split_labels_and_normalisation(mnist_root):
    dm = MNISTDataModule(data_dir=mnist_root, batch_size=32, num_workers=0, val_size=5000, split_seed=3)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    # The split is a seeded permutation: disjoint, complete, the same for the same seed.
    train_indices, val_indices = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_indices & val_indices and len(train_indices | val_indices) == 60_000
    again = MNISTDataModule(data_dir=mnist_root, num_workers=0, val_size=5000, split_seed=3)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices
    other = MNISTDataModule(data_dir=mnist_root, num_workers=0, val_size=5000, split_seed=4)
    other.setup("fit")
    assert other.val_set.indices != dm.val_set.indices
    # The first MNIST test digit is a 7; its corner pixel is background (0) after normalisation.
    image, label = dm.test_set[0]
    assert label == 7 and image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image[0, 0, 0].item() == pytest.approx((0.0 - MNIST_MEAN[0]) / MNIST_STD[0])
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and labels.shape == (32,)
    # val_size=0 holds nothing out: no validation loop.
    assert MNISTDataModule(data_dir=mnist_root, val_size=0).val_dataloader() == []


def test_mnist_missing_offline_says_what_to_put_where(tmp_path):
    dm = MNISTDataModule(data_dir=tmp_path / "nowhere", num_workers=0, download=False)
    with pytest.raises(DataNotFoundError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    for archive in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert archive in message


def copy_mnist_archives(mnist_root: Path, root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        (raw / archive.name).write_bytes(archive.read_bytes())
    return raw


def test_a_damaged_mnist_archive_is_named_not_reported_missing(mnist_root, tmp_path):
    raw = copy_mnist_archives(mnist_root, tmp_path)
    archive = raw / "t10k-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:5000])  # a copy that did not finish
    with pytest.raises(DataMismatchError, match=r"t10k-images-idx3-ubyte.gz in .* damaged \(their MD5"):
        MNISTDataModule(data_dir=tmp_path, num_workers=0).prepare_data()


def test_a_damaged_unpacked_mnist_file_says_to_unpack_again(mnist_root, tmp_path):
    raw = copy_mnist_archives(mnist_root, tmp_path)
    MNISTDataModule(data_dir=tmp_path, num_workers=0).prepare_data()  # unpacks
    unpacked = raw / "train-labels-idx1-ubyte"
    unpacked.write_bytes(unpacked.read_bytes()[:100])
    with pytest.raises(DataMismatchError, match="cannot be read .* Delete .*train-labels-idx1-ubyte"):
        MNISTDataModule(data_dir=tmp_path, num_workers=0).prepare_data()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": -3}, "batch_size must be a positive integer, got -3"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"val_size": 60_000}, "val_size=60000 holds out every one of the 60000"),
        ({"data_dir": ""}, "data_dir must be a folder path"),
    ],
)
def test_mnist_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)


# ------------------------------------------------------------------ CIFAR-10
def test_cifar10_image_folder_layout(cifar10_jpeg_root):
    dm = CIFAR10DataModule(data_dir=cifar10_jpeg_root, layout="image_folder", batch_size=16,
                           num_workers=0, val_size=100)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    # The subset holds 100 training and 20 test images per class.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (900, 100, 200)
    assert dm.test_set.classes == CIFAR10_CLASSES  # ImageFolder's labels = torchvision's CIFAR10 labels
    # Validation images are not augmented: exactly the normalised JPEG.
    index = dm.val_set.indices[0]
    path, label = dm.val_set.dataset.samples[index]
    image, loaded_label = dm.val_set[0]
    expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    expected = (expected.permute(2, 0, 1) - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(
        CIFAR10_STD)[:, None, None]
    assert loaded_label == label
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    # Training images are randomly cropped from the padded image and flipped: seeded, they differ
    # from the plain image for most draws.
    torch.manual_seed(0)
    augmented = [dm.train_set.dataset[index][0] for _ in range(8)]
    assert sum(not torch.equal(a, expected) for a in augmented) >= 6
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32)


def test_cifar10_wrong_classes_and_missing_folders(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog"], per_class=1)
    write_image_folder(tmp_path / "test", ["cat", "dog"], per_class=1)
    dm = CIFAR10DataModule(data_dir=tmp_path, layout="image_folder", num_workers=0, val_size=1)
    with pytest.raises(DataMismatchError, match="missing: airplane, automobile, bird, deer, frog and 3 more"):
        dm.prepare_data()
    missing = CIFAR10DataModule(data_dir=tmp_path / "absent", layout="image_folder", num_workers=0)
    with pytest.raises(DataNotFoundError, match=r"absent/train does not exist; expected images at .*/train/<class>/"):
        missing.prepare_data()


def test_cifar10_torchvision_layout_missing_offline(tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, layout="torchvision", num_workers=0, download=False)
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="layout must be"):
        CIFAR10DataModule(layout="folders")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + bytes(1000))  # cut short
    with pytest.raises(DataMismatchError, match="cifar-10-python.tar.gz is damaged"):
        CIFAR10DataModule(data_dir=tmp_path, layout="torchvision", num_workers=0).prepare_data()
    with pytest.raises(ValueError, match="val_size=50000"):
        CIFAR10DataModule(val_size=50_000)


# ------------------------------------------------------------------ ImageNet layout
def test_imagenet_folder_layout_and_preprocessing(tmp_path):
    classes = [f"n0{i}" for i in range(4)]
    write_image_folder(tmp_path / "train", classes, per_class=3, size=40)
    write_image_folder(tmp_path / "val", classes, per_class=2, size=40)
    dm = ImageNetDataModule(data_dir=tmp_path, batch_size=4, num_workers=0, num_classes=4, crop_size=24)
    assert dm.resize_size == round(24 * 256 / 224)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (12, 8)
    image, label = dm.val_set[3]  # the second image of class 1: flat colour 21
    assert image.shape == (3, 24, 24) and label == 1
    expected = (21 / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(image[:, 12, 12], expected, rtol=0, atol=1e-5)
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 24, 24)
    dm.setup("test")
    assert dm.test_set is dm.val_set


def test_imagenet_errors_name_the_layout(tmp_path):
    write_image_folder(tmp_path / "train", ["n01", "n02"], per_class=1)
    (tmp_path / "val").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.png")
    flat = ImageNetDataModule(data_dir=tmp_path, num_workers=0, num_classes=2)
    with pytest.raises(DataNotFoundError, match="sort them into the training set's class folders"):
        flat.prepare_data()
    (tmp_path / "val" / "n01").mkdir()
    (tmp_path / "val" / "n02").mkdir()
    too_few = ImageNetDataModule(data_dir=tmp_path, num_workers=0, num_classes=1000)
    with pytest.raises(DataMismatchError, match="has 2 class folders but num_classes is 1000"):
        too_few.prepare_data()
    with pytest.raises(ValueError, match="resize_size must be an integer >= crop_size"):
        ImageNetDataModule(crop_size=224, resize_size=200)
