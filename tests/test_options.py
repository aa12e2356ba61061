"""The suite's own command-line options refuse what they do not know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_server_kind_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--pg", "bogus", "--collect-only", "-q", "-n", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 4  # pytest's usage error
    assert "argument --pg: invalid choice: 'bogus'" in result.stderr
    assert "'default'" in result.stderr
    assert "'pg15'" in result.stderr
