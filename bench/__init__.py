"""lora-fast's benchmark suite: ``python -m bench`` (see bench/__main__.py and the README's Performance section).

Without a CUDA device the Triton kernels only run in the interpreter, which must be chosen before triton is
imported; the bench uses it for correctness and saved-bytes checks on small shapes, never for timing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
