"""Helpers the tests share (the fixtures are in conftest.py): the repository root and running an
entry point as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The caller's environment without HYDRA_FULL_ERROR, plus ``extra``; one compute thread per
    run, since a tiny model gains nothing from two and the test runs share the machine."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (from the repo root)."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` after checking it exited 0 without a traceback."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result
