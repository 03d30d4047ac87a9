"""A seed printed by a failing test replays it: --seed N and LORA_FAST_TEST_SEED=N fix the seed of every test."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import SEED_VARIABLE, fixed_seed

ROOT = Path(__file__).resolve().parents[1]


def test_seed_is_the_requested_one(request):
    seed = fixed_seed(request.config)
    if seed is not None:
        assert torch.initial_seed() == seed
    else:
        assert 0 <= torch.initial_seed() < 2**31
    print(f"first draw {torch.rand(1).item()!r}")


def _run(*args, env=None):
    out = subprocess.run([sys.executable, "-m", "pytest", f"{__file__}::test_seed_is_the_requested_one", "-q", "-s",
                          "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line for line in out.stdout.splitlines() if "first draw" in line)


def test_seed_replays_by_option_and_environment():
    env = {SEED_VARIABLE: ""}
    by_option = _run("--seed", "4242", env=env)
    by_variable = _run(env={SEED_VARIABLE: "4242"})
    torch.manual_seed(4242)
    expected = f"first draw {torch.rand(1).item()!r}"
    assert expected in by_option and expected in by_variable
