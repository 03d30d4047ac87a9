import os
import shlex

import pytest
import torch

from tests.utils import WORST

SEED_VARIABLE = "LORA_FAST_TEST_SEED"
# the replay command printed by _fresh_seed, kept on the test item (tests/test_seed_replay.py reads it)
REPLAY_COMMAND = pytest.StashKey[str]()


def replay_command(nodeid: str, seed: int) -> str:
    """The shell command that reruns the test ``nodeid`` with ``seed``; quoted for a POSIX shell, so that a
    parametrized id with quotes or spaces in it pastes as it is printed."""
    return shlex.join(["python", "-m", "pytest", nodeid, "--seed", str(seed)])


def pytest_configure(config):
    # measured GEMM choices and tuned configs go to a folder of this run, not the user's ~/.cache/lora_fast
    # (tests that test the cache set their own folder)
    if not os.environ.get("LORA_FAST_CACHE_DIR", "").strip():
        import tempfile

        made = tempfile.mkdtemp(prefix="lora_fast-test-cache-")
        config._lora_fast_cache_dir = os.environ["LORA_FAST_CACHE_DIR"] = made


def pytest_unconfigure(config):
    made = getattr(config, "_lora_fast_cache_dir", None)
    if made:
        import shutil

        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop("LORA_FAST_CACHE_DIR", None)


def fixed_seed(config):
    """The seed given by --seed or $LORA_FAST_TEST_SEED, or None (fresh seeds)."""
    seed = config.getoption("--seed", default=None)
    if seed is None and os.environ.get(SEED_VARIABLE, "").strip():
        try:
            seed = int(os.environ[SEED_VARIABLE])
        except ValueError:
            raise pytest.UsageError(f"{SEED_VARIABLE}: expected an integer, got {os.environ[SEED_VARIABLE]!r}") \
                from None
    return seed


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, or the seed of --seed N / LORA_FAST_TEST_SEED=N; pytest shows the printed
    seed of a failing test, and that option replays it."""
    seed = fixed_seed(request.config)
    if seed is None:
        seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    command = replay_command(request.node.nodeid, seed)
    request.node.stash[REPLAY_COMMAND] = command
    print(f"torch.manual_seed({seed}); replay with: {command} (or {SEED_VARIABLE}={seed})")


@pytest.fixture(scope="session")
def device():
    """cuda when present (native kernels), else cpu (the kernels run in the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("largest relative error against float64 (max |err| / max |ref|)")
        for (dtype, name), rel in sorted(WORST.items()):
            terminalreporter.write_line(f"{dtype:>9} {name:>8}: {rel:.3e}")
