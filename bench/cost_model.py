"""A roofline bound per implementation: the sum over its kernels of max(FLOPs / GEMM rate, bytes / copy rate).

Both ceilings come from the same run (``timing.ceilings``): the GEMM rate of a large torch.matmul in the data
dtype and the bytes moved per second (read + write) by a large device-to-device copy. Each kernel list below
is what the implementation launches on a GPU with the base weight W frozen and x requiring grad (as inside
a network); per element, e bytes for x's dtype, 4 for fp32, 1 for a bool mask. Sizes: x (M, K), W (N, K),
A (K, r), B (r, N), y (M, N).

- lora-fast: five launches. Forward S = dropout(x) A (reads x; split along K when its row blocks leave SMs
  idle, then one fp32 (M, r) sum per split, written and read back by the last split in the same launch), then
  the GEMM with the low-rank term fused in; backward dS = dY B^T with dB in the same pass (reads dY, writes one
  fp32 (r, N) partial per row group, configs.proj_layout, read back by the last group in the launch; a second
  pass over dY for dB instead when 4r >= 128), dX = dY W with the low-rank term fused in, dA = (keep x)^T dS
  (reads x, writes one fp32 (K, r) partial per split, about two programs per SM, read back by the last split).
  The mask is regenerated from a seed: no bytes. As ops.py launches them (kernels/ops.py, configs.PROJ_BLOCK_M
  and SPLIT_QUANTUM).
- addmm-chain: as lora-fast, plus a read and write of y (y.addmm_) and of dX (dX.addmm_), and a second read
  of dY (dB = S^T dY is its own GEMM). Dropout: a pass writing dropout(x) and a bool mask, read back in backward.
- book, peft: eager autograd: the low-rank output T = S B is written (M, N), scaled in its own pass and added
  in another; backward scales dY, reads it twice (dS, dB), writes the low-rank dX and adds it to the base dX.
  Dropout: CUDA's fused dropout (writes dropout(x) and a bool mask) and its backward pass.
- compile: modelled as the best Inductor can do without fusing across GEMMs: the scale and the add go into
  GEMMs, which is the addmm-chain's traffic.
- lora-fast-dora (kernels/dora.py): the norm's W A (reads W once; ||W_n||^2 is cached, (A^T A) B is tiny),
  lora-fast's forward, then one column-scale pass (reads Y0, writes y); backward one prologue pass (reads dY
  and U, writes g dY) and lora-fast's backward on g dY. Dropout: dropout(x) written and a second GEMM on it
  (PEFT's formula), (g - 1) dY written, a second dX GEMM and a masked add.
- peft-dora (PEFT 0.21's dora.py, eager, W frozen): B A formed through lora_B(lora_A(eye(K))) (a K x K identity
  and the K x N product written), W + s B A and its norm (three N x K passes), the LoRA term as peft's, and
  five elementwise M x N passes for (g - 1) base + g s T and the final add; backward their gradients (five
  M x N passes, two of them reductions for dm). Dropout: a second base GEMM on dropout(x), forward and dX.

For the issue's check (H200, 790 TFLOP/s, 4.3 TB/s, bf16, M=8192, r=16) forward+backward relative to F.linear
is about 1.09 (lora-fast, with its partials), 1.18 (addmm-chain), 1.36 (peft) at
4096->4096; tests/test_bench.py asserts it.
"""

import dataclasses
from typing import Dict, List

from lora_fast.kernels import configs

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MODES = ("forward", "backward", "full")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch: its floating-point operations and the bytes it reads plus writes in device memory."""

    name: str
    flops: float
    bytes: float
    launch: str = ""   # lora-fast: the Triton kernel this launch runs (bench.launches pairs it with a profile)

    def time(self, gemm_flops_per_s: float, copy_bytes_per_s: float) -> float:
        return max(self.flops / gemm_flops_per_s, self.bytes / copy_bytes_per_s)


# lora-fast's Triton kernels (kernels/gemm.py, kernels/lowrank.py), as a profiler names their launches
GEMM, PROJ, REDUCE, FINISH = "gemm_lowrank_kernel", "lowrank_proj_kernel", "reduce_m_kernel", "sum_partials_kernel"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lora_fast(M: int, K: int, N: int, r: int, e: int, bias_b: int, sms: int) -> Dict[str, List[Kernel]]:
    """lora-fast's launches with the splits and partials of kernels/ops.py (configs.proj_layout for the narrow
    passes, dA in 64 x 64 blocks over about two programs per SM)."""
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s32 = K * r * e, r * N * e, M * r * 4
    base = 2.0 * M * N * K

    def layout(length: int, partials: bool = False):   # ops._proj_layout on a GPU: (row groups, K splits)
        rows, cols = configs.proj_layout(M, length, r, configs.PROJ_BLOCK_M, sms, partials)
        return _cdiv(M, rows), _cdiv(length, cols)

    def split_bytes(splits: int) -> int:   # the raw sum of each K split written, then read back by the last split
        return 2 * splits * s32 if splits > 1 else 0

    def reduce_splits(length: int) -> int:  # ops._splits with 64 x 64 blocks
        row_blocks = _cdiv(M, 64)
        return max(1, min(row_blocks, _cdiv(2 * sms, _cdiv(length, 64))))

    # each narrow pass finishes its own reductions (kernels/lowrank.py): its partials are written and read back
    # by the last program of each output block, in the same launch
    _, s_splits = layout(K)
    forward = [Kernel("S = dropout(x) A", 2.0 * M * K * r, x + a + s32 + split_bytes(s_splits), PROJ),
               Kernel("y = x W^T + b + s S B", base + 2.0 * M * r * N, x + w + y + bias_b + s32 + b, GEMM)]
    if 4 * r < configs.PROJ_BLOCK_M:
        groups, ds_splits = layout(N, partials=True)
        partials = groups * r * N * 4
        backward = [Kernel("dS = dY B^T, dB = s S^T dY", 4.0 * M * N * r,
                           y + b + s32 + s32 + split_bytes(ds_splits) + 2 * partials + b, PROJ)]
    else:
        _, ds_splits = layout(N)
        partials = reduce_splits(N) * N * r * 4
        backward = [Kernel("dS = dY B^T", 2.0 * M * N * r, y + b + s32 + split_bytes(ds_splits), PROJ),
                    Kernel("dB = s dY^T S", 2.0 * M * N * r, y + s32 + 2 * partials + b, REDUCE)]
    da_splits = reduce_splits(K)
    da_partials = da_splits * K * r * 4 if da_splits > 1 else 0
    backward += [Kernel("dX = dY W + keep (dS A^T)", base + 2.0 * M * r * K, y + w + x + s32 + a, GEMM),
                 Kernel("dA = s (keep x)^T dS", 2.0 * M * K * r, x + s32 + 2 * da_partials + a, REDUCE)]
    return {"forward": forward, "backward": backward}


def _lora_fast_dora(M: int, K: int, N: int, r: int, e: int, bias_b: int, sms: int, drop: bool,
                    mask: int) -> Dict[str, List[Kernel]]:
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s32 = K * r * e, r * N * e, M * r * 4
    base = 2.0 * M * N * K
    lora = _lora_fast(M, K, N, r, e, bias_b, sms)
    norm = [Kernel("W A (norm)", 2.0 * N * K * r, w + a + N * r * 4),
            Kernel("norm, g = m / norm", 2.0 * N * r * r, 2 * N * r * 4 + b + 4 * N * 4)]
    forward = norm + lora["forward"]
    if drop:
        forward += [Kernel("x_d = dropout(x)", 0, 2 * x),
                    Kernel("U = x_d W^T + s S B", base + 2.0 * M * r * N, x + w + y + s32 + b),
                    Kernel("y += (g - 1) U", 0, 3 * y)]
    else:
        forward += [Kernel("y = Y0 + (g - 1)(Y0 - b)", 0, 2 * y + bias_b)]
    backward = [Kernel("g dY, dm partials", 0, (4 if drop else 3) * y)] + lora["backward"]
    if drop:
        backward += [Kernel("dX_inner = ((g - 1) dY) W + s dS A^T", base + 2.0 * M * r * K, y + w + x + s32 + a),
                     Kernel("dX += keep dX_inner / (1 - p)", 0, 3 * x)]
    return {"forward": forward, "backward": backward}


def _peft_dora(M: int, K: int, N: int, r: int, e: int, bias_b: int, drop: bool, mask: int) -> Dict[str, List[Kernel]]:
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s16 = K * r * e, r * N * e, M * r * e
    base = 2.0 * M * N * K
    gemm_fwd = Kernel("y = x W^T", base, x + w + y + bias_b)
    gemm_bwd = Kernel("dX = dY W", base, y + w + x)
    fwd = [Kernel("dropout(x)", 0, 2 * x + mask)] if drop else []
    fwd += [gemm_fwd,
            Kernel("lora_weight = lora_B(lora_A(eye(K)))", 2.0 * K * K * r + 2.0 * K * r * N, K * K * e + a + w + b),
            Kernel("s * lora_weight", 0, 2 * w), Kernel("W + s lora_weight", 0, 3 * w),
            Kernel("row norms", 2.0 * N * K, w),
            Kernel("S = x A", 2.0 * M * K * r, x + a + s16), Kernel("T = S B", 2.0 * M * r * N, s16 + b + y)]
    fwd += [Kernel("base = x_d W^T", base, x + w + y)] if drop else [Kernel("base = y - b", 0, 2 * y + bias_b)]
    fwd += [Kernel(name, 0, n * y) for name, n in (("(g - 1) base", 2), ("g T", 2), ("* s", 2),
                                                    ("sum", 3), ("y + sum", 3))]
    bwd = [Kernel(name, 0, n * y) for name, n in (("d(g T) = s dY", 2), ("dT = g d", 2), ("dm: sum d T", 2),
                                                   ("dbase = (g - 1) dY", 2), ("dm: sum dY base", 2))]
    bwd += [Kernel("dS = dT B^T", 2.0 * M * N * r, y + b + s16), Kernel("dB = S^T dT", 2.0 * M * N * r, y + s16 + b),
            gemm_bwd, Kernel("dA = x^T dS", 2.0 * M * K * r, x + s16 + a),
            Kernel("dX_lora = dS A^T", 2.0 * M * r * K, s16 + a + x)]
    if drop:
        bwd += [Kernel("dX_d = dbase W", base, y + w + x), Kernel("dX_d += dX_lora", 0, 3 * x),
                Kernel("dropout backward", 0, 2 * x + mask)]
    else:
        bwd += [Kernel("dY + dbase", 0, 3 * y), Kernel("dX_base += dX_lora", 0, 3 * x)]
    bwd += [Kernel("dX = dX_base + dX_d", 0, 3 * x)] if drop else []
    return {"forward": fwd, "backward": bwd}


def kernels(impl: str, M: int, K: int, N: int, r: int, dtype: str = "bfloat16", *, bias: bool = False,
            dropout: float = 0.0, sms: int = 132) -> Dict[str, List[Kernel]]:
    """{"forward": [...], "backward": [...]} kernels of ``impl`` (see the module docstring). ``sms``: the GPU's
    streaming multiprocessors (132 on an H100 / H200), which set lora-fast's splits.

    Raises ValueError for an unknown implementation or dtype.
    """
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(ELEMENT_BYTES)}, got {dtype!r}")
    e = ELEMENT_BYTES[dtype]
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s16 = K * r * e, r * N * e, M * r * e
    mask = M * K  # bool
    bias_b = N * e if bias else 0
    base = 2.0 * M * N * K
    drop = dropout > 0
    gemm_fwd = Kernel("y = x W^T", base, x + w + y + bias_b)
    gemm_bwd = Kernel("dX = dY W", base, y + w + x)
    if impl == "F.linear":
        return {"forward": [gemm_fwd], "backward": [gemm_bwd]}
    if impl == "lora-fast":
        return _lora_fast(M, K, N, r, e, bias_b, sms)
    if impl == "lora-fast-dora":
        return _lora_fast_dora(M, K, N, r, e, bias_b, sms, drop, mask)
    if impl == "peft-dora":
        return _peft_dora(M, K, N, r, e, bias_b, drop, mask)
    if impl in ("addmm-chain", "compile"):
        fwd = [Kernel("dropout(x)", 0, 2 * x + mask)] if drop else []
        fwd += [Kernel("S = x A", 2.0 * M * K * r, x + a + s16), gemm_fwd,
                Kernel("y += s S B", 2.0 * M * r * N, 2 * y + s16 + b)]
        bwd = [Kernel("dS = dY B^T", 2.0 * M * N * r, y + b + s16),
               Kernel("dB = S^T dY", 2.0 * M * N * r, y + s16 + b), gemm_bwd]
        if drop:
            bwd += [Kernel("T = dS A^T", 2.0 * M * r * K, s16 + a + x),
                    Kernel("dX += keep T / (1-p)", 0, 3 * x + mask)]
        else:
            bwd += [Kernel("dX += s dS A^T", 2.0 * M * r * K, 2 * x + s16 + a)]
        bwd += [Kernel("dA = x^T dS", 2.0 * M * K * r, x + s16 + a)]
        return {"forward": fwd, "backward": bwd}
    if impl in ("book", "peft"):
        fwd = [Kernel("dropout(x)", 0, 2 * x + mask)] if drop else []
        fwd += [gemm_fwd, Kernel("S = x A", 2.0 * M * K * r, x + a + s16),
                Kernel("T = S B", 2.0 * M * r * N, s16 + b + y), Kernel("T * s", 0, 2 * y),
                Kernel("y + T", 0, 3 * y)]
        bwd = [Kernel("dT = s dY", 0, 2 * y), Kernel("dS = dT B^T", 2.0 * M * N * r, y + b + s16),
               Kernel("dB = S^T dT", 2.0 * M * N * r, y + s16 + b), gemm_bwd,
               Kernel("dA = x^T dS", 2.0 * M * K * r, x + s16 + a),
               Kernel("dX_lora = dS A^T", 2.0 * M * r * K, s16 + a + x)]
        if drop:
            bwd += [Kernel("dropout backward", 0, 2 * x + mask)]
        bwd += [Kernel("dX = dX_base + dX_lora", 0, 3 * x)]
        return {"forward": fwd, "backward": bwd}
    raise ValueError("impl: expected one of F.linear, book, peft, addmm-chain, compile, lora-fast, peft-dora, "
                     f"lora-fast-dora; got {impl!r}")


def bound(impl: str, mode: str, M: int, K: int, N: int, r: int, dtype: str, gemm_flops_per_s: float,
          copy_bytes_per_s: float, *, bias: bool = False, dropout: float = 0.0) -> float:
    """Lower bound in seconds of ``impl`` in ``mode`` ("forward", "backward" or "full"). Raises ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if gemm_flops_per_s <= 0 or copy_bytes_per_s <= 0:
        raise ValueError("ceilings: expected positive GEMM and copy rates")
    ks = kernels(impl, M, K, N, r, dtype, bias=bias, dropout=dropout)
    passes = ks["forward"] + ks["backward"] if mode == "full" else ks[mode]
    return sum(k.time(gemm_flops_per_s, copy_bytes_per_s) for k in passes)


def flops(impl: str, mode: str, M: int, K: int, N: int, r: int) -> float:
    """Useful FLOPs of one call (for TFLOP/s): the base GEMM per pass (W frozen: no dW) plus, for a LoRA row,
    the low-rank products (forward 2 Mr(K+N); backward 4 Mr(K+N): dS, dB, the low-rank dX, dA); a DoRA row adds
    the norm's cross term W A (2 NKr) to its forward."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    lora = impl != "F.linear"
    fwd = 2.0 * M * N * K + (2.0 * M * r * (K + N) if lora else 0.0) + (2.0 * N * K * r if "dora" in impl else 0.0)
    bwd = 2.0 * M * N * K + (4.0 * M * r * (K + N) if lora else 0.0)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
