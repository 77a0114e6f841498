"""The lint configuration in pyproject.toml ([tool.ruff]) holds for the whole repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or next((str(p) for p in [Path(sys.executable).parent / "ruff"] if p.exists()), None)
    if ruff is None:
        pytest.skip("ruff is not installed (scripts/install.sh installs it)")
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
