"""GPU timings (CUDA only): the two ceilings of the cost model and the per-implementation measurements.

All times come from triton.testing.do_bench (median and the 20th/80th percentiles, in ms). Never called
without a CUDA device: the interpreter's times say nothing about a GPU.
"""

from typing import Dict, Tuple

import torch

QUANTILES = [0.5, 0.2, 0.8]


def _do_bench(fn, grad_to_none=None) -> Tuple[float, float, float]:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, grad_to_none=grad_to_none, quantiles=QUANTILES)
    return median, p20, p80


def ceilings(dtype: torch.dtype, device="cuda") -> Dict[str, float]:
    """{"gemm_flops_per_s": of an 8192^3 torch.matmul in ``dtype``, "copy_bytes_per_s": bytes read + written
    per second by a 1 GiB device-to-device copy}."""
    n = 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_ms = _do_bench(lambda: torch.matmul(a, b))[0]
    a = b = None   # free the operands before the copy buffers (the lambda is done with them)
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _do_bench(lambda: dst.copy_(src))[0]
    return {"gemm_flops_per_s": 2.0 * n**3 / (gemm_ms * 1e-3), "copy_bytes_per_s": 2.0 * src.numel() / (copy_ms * 1e-3)}


def measure(forward, x: torch.Tensor, trainable) -> Dict[str, object]:
    """Times of forward, backward and forward+backward ("full") of ``forward(x)``, and the peak memory of one
    forward+backward above what was allocated before it (torch.cuda.max_memory_allocated), in bytes."""
    y = forward(x)
    dy = torch.randn_like(y)
    out: Dict[str, object] = {}
    out["forward"] = _do_bench(lambda: forward(x))
    out["backward"] = _do_bench(lambda: y.backward(dy, retain_graph=True), grad_to_none=trainable)
    out["full"] = _do_bench(lambda: forward(x).backward(dy), grad_to_none=trainable)
    y = None
    for t in trainable:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward(x).backward(dy)
    torch.cuda.synchronize()
    out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    for t in trainable:
        t.grad = None
    return out
