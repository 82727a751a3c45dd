"""The tree stays lint-clean and the producer's types check, as `make lint` asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy"])
def test_clean(command: list[str]) -> None:
    completed = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
