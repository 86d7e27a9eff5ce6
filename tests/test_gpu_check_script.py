"""scripts/gpu_check.sh, the prepared device check: it parses, and refuses what it cannot do.

Its `run` step needs a GPU machine and the data; here only what fails fast is checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=60)


def test_script_parses():
    r = _bash("-n", str(SCRIPT))
    assert r.returncode == 0, r.stderr


def test_no_verb_prints_usage():
    r = _bash(str(SCRIPT))
    assert r.returncode == 2
    assert "usage: bash scripts/gpu_check.sh prepare|run" in r.stderr


def test_run_needs_out():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = _bash(str(SCRIPT), "run", env=env)
    assert r.returncode != 0
    assert "OUT" in r.stderr and "device machine" in r.stderr


def test_prepare_names_missing_data(tmp_path):
    # a data root without the Cowley README: refused before anything is copied
    env = dict(os.environ, DATA=str(tmp_path / "nowhere"))
    r = _bash(str(SCRIPT), "prepare", env=env)
    assert r.returncode == 1
    assert f"no Cowley data at {tmp_path / 'nowhere'}" in r.stderr
