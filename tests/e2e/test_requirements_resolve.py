"""The pinned requirements resolve for Python 3.10, the oldest the README names (scripts/check_requirements.sh:
pip's resolver in dry-run mode for another Python; it needs the package index)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_pins_resolve_for_python_3_10():
    result = subprocess.run(["bash", "scripts/check_requirements.sh", "3.10"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    if "(from versions: none)" in result.stdout and "transformers" in result.stdout:
        pytest.skip("the package index is unreachable from here")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "python 3.10: runtime pins resolve" in result.stdout
    assert "python 3.10: test pins resolve" in result.stdout
