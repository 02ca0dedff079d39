"""examples/existing_module.py runs as a user would run it, and its converted module learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "existing_module.py"


def test_the_existing_module_example_runs_and_learns(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--log-dir", str(tmp_path), "--epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    accuracy = float(re.search(r"validation accuracy: ([0-9.]+)", completed.stdout).group(1))
    assert accuracy > 0.9  # chance is 0.1
    steps = int(re.search(r"steps: (\d+)", completed.stdout).group(1))
    assert steps == 2 * 32  # 2,000 samples in batches of 64, one QLAB step per batch
    assert (tmp_path / "existing_module" / "version_0" / "metrics.csv").exists()
