"""The examples in the package's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_qlab

MODULES = sorted(info.name for info in pkgutil.walk_packages(lightning_qlab.__path__, "lightning_qlab."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    results = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert results.failed == 0


@pytest.mark.parametrize("name", ["lightning_qlab.optimizer", "lightning_qlab.averaging", "lightning_qlab.mixin"])
def test_the_core_modules_have_examples(name: str) -> None:
    found = doctest.DocTestFinder().find(importlib.import_module(name))
    assert sum(len(test.examples) for test in found) >= 2
