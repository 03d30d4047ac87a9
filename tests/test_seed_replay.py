"""A seed printed by a failing test replays it: --seed N and LORA_FAST_TEST_SEED=N fix the seed of every test."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPLAY_COMMAND, SEED_VARIABLE, fixed_seed

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


@pytest.mark.parametrize("case", [("nf4", 'say "hi"', "it's")], ids=str)
def test_printed_replay_command_pastes_into_a_shell(case, request):
    """The command a test prints (tests/conftest.py) for an id with quotes and spaces: a POSIX shell splits it
    into the node id and the seed, and running it through sh replays this very test with that seed."""
    command = request.node.stash[REPLAY_COMMAND]
    argv = shlex.split(command)
    assert "'" in request.node.nodeid and '"' in request.node.nodeid and " " in request.node.nodeid
    assert argv == ["python", "-m", "pytest", request.node.nodeid, "--seed", argv[-1]]
    if os.environ.get("LORA_FAST_REPLAYED"):   # the replayed run: the seed the command names
        assert torch.initial_seed() == int(argv[-1])
        return
    # the printed command through a shell, with this interpreter for "python"
    pasted = shlex.quote(sys.executable) + command[len("python"):] + " -q -p no:cacheprovider"
    out = subprocess.run(["sh", "-c", pasted], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORA_FAST_REPLAYED": "1", SEED_VARIABLE: ""})
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
