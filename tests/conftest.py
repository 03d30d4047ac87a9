import pytest
import torch

from tests.utils import WORST


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; pytest shows the printed seed of a failing test, to replay it."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")


@pytest.fixture(scope="session")
def device():
    """cuda when present (native kernels), else cpu (the kernels run in the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("largest relative error against float64 (max |err| / max |ref|)")
        for (dtype, name), rel in sorted(WORST.items()):
            terminalreporter.write_line(f"{dtype:>9} {name:>8}: {rel:.3e}")
