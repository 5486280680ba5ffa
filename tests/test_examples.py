"""Every script in examples/ runs and prints what it claims (tiny sizes, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHECKED = {"routing_on_your_tensors.py", "channel_energies.py", "moe_in_your_model.py", "custom_policy.py"}


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env, cwd=EXAMPLES.parent, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_example_has_a_test():
    assert {p.name for p in EXAMPLES.glob("*.py")} == CHECKED


def test_routing_on_your_tensors():
    out = run_example("routing_on_your_tensors.py")
    assert "all selections feasible: True" in out
    assert "jesa <= des: True" in out and "jesa == optimal: True" in out
    energies = dict(re.findall(r"^(\S+)(?: \(MILP\))?: energy ([\d.]+) µJ for the batch", out, re.M))
    assert set(energies) == {"des", "jesa", "topk@2", "channel_topk@2", "optimal"}
    assert 0 < float(energies["jesa"]) <= float(energies["des"])


def test_channel_energies():
    out = run_example("channel_energies.py")
    assert "energy grows with distance: True" in out
    assert float(re.search(r"largest outage gap to the closed form: ([\d.]+)", out).group(1)) < 0.02
    assert len(re.findall(r"^  device \d at", out, re.M)) == 4


@pytest.mark.parametrize("policy", ["jesa", "des"])
def test_moe_in_your_model_learns(policy):
    out = run_example("moe_in_your_model.py", "--policy", policy, "--steps", "40")
    first, last = map(float, re.search(r"first 5 steps ([\d.]+), of the last 5 steps ([\d.]+)", out).groups())
    assert last < 0.8 * first
    energies = [float(e) for e in re.findall(r"energy ([\d.]+) µJ/token", out)]
    assert energies and all(e > 0 for e in energies)


def test_custom_policy_routes_and_trains():
    """A policy registered from user code routes through route() and MoELayer and trains."""
    out = run_example("custom_policy.py", "--steps", "40")
    experts, mine, top2 = map(
        float,
        re.search(
            r"price_rule: ([\d.]+) experts/input, energy ([\d.]+) µJ; "
            r"topk@2: energy ([\d.]+) µJ",
            out,
        ).groups(),
    )
    assert 1.0 <= experts <= 2.0 and 0 < mine < top2
    first, last = map(float, re.search(r"first 5 steps ([\d.]+), of the last 5 steps ([\d.]+)", out).groups())
    assert last < 0.8 * first
