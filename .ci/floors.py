"""The lowest versions pyproject.toml declares, for the CI leg that installs and tests them.

    python .ci/floors.py requirements   # name[extras]==floor per dependency, for pip install -r
    python .ci/floors.py constraints    # name==floor, for pip install -c (constraints take no extras)
    python .ci/floors.py check          # exit 1 unless the installed versions are exactly the floors

The floors are read from [project].dependencies, so the leg tests whatever the project declares;
a dependency without a ">=" floor is an error, since nothing would say which version to test.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def floors() -> list[tuple[str, str, str]]:
    """(name, "[extras]" or "", floor version) for every runtime dependency."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    result = []
    for requirement in dependencies:
        name, extras, specifiers = REQUIREMENT.match(requirement.split(";")[0]).groups()
        lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
        if len(lower) != 1:
            sys.exit(f"floors.py: {requirement!r} in pyproject.toml has no single '>=' floor to test.")
        result.append((name, extras or "", lower[0]))
    return result


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(command: str) -> int:
    if command == "requirements":
        print("\n".join(f"{name}{extras}=={floor}" for name, extras, floor in floors()))
    elif command == "constraints":
        print("\n".join(f"{name}=={floor}" for name, _, floor in floors()))
    elif command == "check":
        wrong = []
        for name, _, floor in floors():
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "not installed"
            # "2.12.0" is the floor "2.12": compare release numbers padded with zeros.
            if _release(installed) != _release(floor):
                wrong.append(f"{name} {installed} (floor {floor})")
            print(f"  {normalise(name)}=={installed}")
        if wrong:
            print("floors.py: not the declared floors: " + "; ".join(wrong), file=sys.stderr)
            return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


def _release(version: str) -> tuple[int, ...]:
    """The release numbers without trailing zeros: "2.12.0+cu130" -> (2, 12)."""
    match = re.match(r"\d+(\.\d+)*", version)
    numbers = [int(n) for n in match.group(0).split(".")] if match else [-1]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
