# Runs before any test module imports triton: without a CUDA device the Triton kernels run in the
# interpreter (TRITON_INTERPRET is read when @triton.jit decorates a kernel).
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
