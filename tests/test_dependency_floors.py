"""The declared dependencies cover what the package imports, each with a floor that CI tests.

.ci/run installs exactly the ">=" floors of pyproject.toml (through .ci/floors.py) and runs the
suite on them; these tests keep that list complete and readable by the helper.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, str]:
    """{normalised distribution name: requirement} from [project].dependencies."""
    output = subprocess.run([sys.executable, str(REPO_ROOT / ".ci" / "floors.py"), "constraints"],
                            capture_output=True, text=True, check=True).stdout
    pins = dict(line.split("==") for line in output.split())
    return {normalise(name): floor for name, floor in pins.items()}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_at_module_level() -> dict[str, str]:
    """{top-level module: first file} for the third-party modules lightning_qlab imports
    unconditionally (imports inside functions or try blocks are optional and not counted)."""
    modules: dict[str, str] = {}
    for path in sorted((REPO_ROOT / "lightning_qlab").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("__future__", "lightning_qlab"):
                    modules.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return modules


def test_every_module_the_package_imports_is_a_declared_dependency():
    floors = declared()
    distributions = metadata.packages_distributions()
    undeclared = []
    for module, path in imported_at_module_level().items():
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & floors.keys():
            undeclared.append(f"{module} (imported by {path}; installed as {sorted(names)})")
    assert not undeclared, "add to [project].dependencies in pyproject.toml, with a tested floor: " + ", ".join(undeclared)


def test_every_dependency_has_a_floor_the_helper_reads():
    floors = declared()
    assert {"torch", "torchvision", "lightning", "torchmetrics", "jsonargparse", "typing-extensions"} <= floors.keys()
    assert all(re.fullmatch(r"\d+(\.\d+)*", floor) for floor in floors.values()), floors


def test_the_installed_versions_are_at_least_the_floors():
    def release(version: str) -> tuple[int, ...]:
        numbers = [int(n) for n in re.match(r"\d+(\.\d+)*", version).group(0).split(".")]
        while len(numbers) > 1 and numbers[-1] == 0:  # "2.12.0" is "2.12"
            numbers.pop()
        return tuple(numbers)

    below = {name: metadata.version(name) for name, floor in declared().items()
             if release(metadata.version(name)) < release(floor)}
    assert not below, f"installed below the declared floors: {below}"
