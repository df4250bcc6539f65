"""`make demo`'s own script, from a fresh folder (its own file: it runs alongside the others)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def test_demo_fast(tmp_path: Path) -> None:
    """`make demo`'s own script, in fast mode, from a fresh folder."""
    proc = subprocess.run([sys.executable, "-m", "streamer.cli", "demo", "--fast"], cwd=tmp_path,
                          capture_output=True, timeout=400, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all requests completed" in proc.stdout
    assert proc.stdout.count("completed") >= 12
