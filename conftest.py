# Runs before any test module imports triton: without a CUDA device the Triton kernels run in the
# interpreter (TRITON_INTERPRET is read when @triton.jit decorates a kernel).
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="torch seed of every test (default: $LORA_FAST_TEST_SEED, else fresh per test); a failing "
                          "test prints the seed it ran with, to replay it")
