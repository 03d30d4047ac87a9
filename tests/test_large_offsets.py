"""Offsets past 2**31 elements along K: a column-major-like x (a large stride along K) and a weight whose last
rows lie more than 2**31 elements from its first (dX reads W as (N, K)). On CPU the views come from large
storages that are allocated but never touched (virtual memory), so the test needs no 17 GiB of RAM: only the
few elements the views reach are written; on a GPU the storages are real (17.6 GB). In a subprocess, since a
32-bit offset that wraps reads outside the storage and crashes the process instead of raising.

The interpreter computes these offsets without 32-bit wrap-around, so on CPU this checks the results of the
int64 path; a native GPU run is what catches a 32-bit offset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os
import torch
from lora_fast import lora_linear
from tests.utils import check_op, make_inputs

M, K, N, R = 5, 264, 260, 4
device = os.environ["LORA_FAST_TEST_DEVICE"]
x0, w0, b, A, B = make_inputs((M,), K, N, R, torch.float32, device)
# x (M, K) column-major-like, with stride 2**23 + 16 along K (below the launchers' copy limit of 2**24): its
# last columns start past 2**31 elements (263 * 2**23 > 2**31)
step = 2**23 + 16
x_store = torch.empty(step * K, dtype=torch.float32, device=device)
x = x_store.as_strided((M, K), (1, step))
x.copy_(x0)
# weight (N, K) with rows 2**23 + 16 elements apart: rows past 256 start beyond 2**31 (dX reads W along N)
row = 2**23 + 16
w_store = torch.empty(row * N, dtype=torch.float32, device=device)
w = w_store.as_strided((N, K), (row, 1))
w.copy_(w0)
assert (K - 1) * x.stride(1) >= 2**31 and (N - 1) * w.stride(0) >= 2**31
for p in (0.0, 0.3):
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    from lora_fast.kernels import dropout_keep_mask
    mask = dropout_keep_mask(seed, M, K, p) if p else None
    def op(*args, p=p):
        torch.manual_seed(3)
        return lora_linear(*args, dropout_p=p)
    check_op(op, x, w, b, A, B, 1.5, dropout_p=p, mask=mask)
print("OK")
'''


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux's lazy allocation of untouched memory")
def test_offsets_past_two_to_the_31(device):
    if device.type == "cuda" and torch.cuda.mem_get_info()[0] < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory for the two large storages")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_FAST_TEST_DEVICE": str(device)}
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
