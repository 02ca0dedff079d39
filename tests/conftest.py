"""Shared fixtures: the offline copies of the real data sets, laid out in temporary folders.

The data live in ``../shared/data`` beside the checkout (or where ``QLAB_SHARED_DATA`` points).
That folder is read-only, so each fixture copies or extracts what it needs into a temporary
folder. Tests that need real data skip with the reason when it is absent (a fresh clone).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The folder with MNIST/raw and cifar10-jpeg.zip, or None when this machine has none."""
    candidates = [os.environ.get("QLAB_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _require(relative: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / relative).exists():
        pytest.skip(
            f"offline data {relative!r} not found: put it under ../shared/data beside the "
            "checkout or point QLAB_SHARED_DATA at a folder that holds it"
        )
    return root / relative


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable folder holding MNIST/raw/*.gz, so torchvision.datasets.MNIST(root, download=True)
    verifies the archives, extracts them and never goes online."""
    raw = _require("MNIST/raw")
    root = tmp_path_factory.mktemp("mnist")
    shutil.copytree(raw, root / "MNIST" / "raw")
    for path in (root / "MNIST" / "raw").iterdir():
        path.chmod(0o644)
    return root


@pytest.fixture(scope="session")
def cifar10_jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A subset of the JPEG copy of CIFAR-10 in ImageFolder layout: 100 training and 20 test
    images per class, at <root>/cifar10-jpeg/{train,test}/<class>/*.jpg."""
    archive = _require("cifar10-jpeg.zip")
    root = tmp_path_factory.mktemp("cifar10")
    per_split = {"train": 100, "test": 20}
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3]:
                continue
            split, label = parts[1], parts[2]
            key = (split, label)
            if taken.get(key, 0) >= per_split.get(split, 0):
                continue
            taken[key] = taken.get(key, 0) + 1
            zf.extract(name, root)
    return root / "cifar10-jpeg"


@pytest.fixture(scope="session")
def fortunes_text() -> Path:
    """The offline English text (about 2.5 MB, gzip-compressed), read in place."""
    return _require("text/fortunes.txt.gz")
