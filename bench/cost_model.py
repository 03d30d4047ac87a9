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
  With dropout, the mask's bits (M K / 8 bytes) are written by the S pass and read by dX and dA: counted by
  ``estimate`` (``Assumptions.mask``), not by the ideal bound. As ops.py launches them (kernels/ops.py,
  configs.PROJ_BLOCK_M and SPLIT_QUANTUM).
- addmm-chain: as lora-fast, plus a read and write of y (y.addmm_) and of dX (dX.addmm_), and a second read
  of dY (dB = S^T dY is its own GEMM). Dropout: a pass writing dropout(x) and a bool mask, read back in backward.
- book, peft: eager autograd: the low-rank output T = S B is written (M, N), scaled in its own pass and added
  in another; backward scales dY, reads it twice (dS, dB), writes the low-rank dX and adds it to the base dX.
  Dropout: CUDA's fused dropout (writes dropout(x) and a bool mask) and its backward pass.
- compile: modelled as the best Inductor can do without fusing across GEMMs: the scale and the add go into
  GEMMs, which is the addmm-chain's traffic.
- lora-fast-dora (kernels/dora.py): the norm pass (reads W once and forms W + s (A B)^T tile by tile: r
  multiply-adds per element; nothing cached), S = dropout(x) A, the GEMM writing the unscaled sum U in fp32,
  then one column-scale pass (reads U, writes y and V = U / norm for dm); backward one prologue pass (reads dY
  and V, writes g dY for dX), B ⊙ g in fp32 (R x N) and lora-fast's backward on dY with B ⊙ g (g enters dS and
  dB in fp32), dB scaled by g after (R x N). Dropout: dropout(x) and x - dropout(x) written, two GEMMs
  (Y1 = (x - x_d) W^T + b and U = x_d W^T + s S B), (g - 1) dY written instead of g dY, a second dX GEMM and a
  masked add.
- peft-dora (PEFT 0.21's dora.py, eager, W frozen): B A formed through lora_B(lora_A(eye(K))) (a K x K identity
  and the K x N product written), W + s B A and its norm (three N x K passes), the LoRA term as peft's, and
  five elementwise M x N passes for (g - 1) base + g s T and the final add; backward their gradients (five
  M x N passes, two of them reductions for dm). Dropout: a second base GEMM on dropout(x), forward and dX.

For the issue's check (H200, 790 TFLOP/s, 4.3 TB/s, bf16, M=8192, r=16) forward+backward relative to F.linear
is about 1.09 (lora-fast, with its partials), 1.18 (addmm-chain), 1.36 (peft) at
4096->4096; tests/test_bench.py asserts it.

That bound is ideal: it runs lora-fast's own GEMM at cuBLAS's rate and costs nothing per launch. ``estimate``
adds what is known to cost more (issue 28, item 4), each a stated parameter of ``Assumptions``, printed beside
the bound by ``python -m bench.cost_model``:
- lora-fast's fused GEMM runs at ``gemm_fraction`` of the measured cuBLAS rate (default 0.85: the middle of the
  0.80-0.90 that a reading of the sm_90 SASS gave for the persistent TMA kernel, issue 28; no GPU has measured
  it). The measured choice (kernels/choice.py) may take the cuBLAS path instead, which writes the low-rank term
  into y (or dX) first and has cuBLAS read it back (addmm with beta = 1): an extra write and read of the output
  and a launch; each GEMM costs the cheaper of the two, as the choice would time them.
- ``launch_s`` per launch, for every implementation (ramp-up, tail and the gap between dependent kernels).
- The dropout mask: lora-fast writes it bit-packed once in the S pass and reads it in dX and dA (``mask="bits"``,
  the default since issue 28: M K / 8 bytes each, no Philox in the GEMM). ``mask="seed"`` models the earlier
  regeneration from the seed (no bytes), which costs Philox arithmetic where it is not hidden under memory
  traffic, the dX GEMM's prologue (and the low-rank term of the cuBLAS path): ``philox_s_per_element`` per element
  of x (default from issue 28's estimate, 25-45 us per dX GEMM at M=8192, K=4096 on an H200).
"""

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Sequence

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
    # lora-fast's fused GEMMs: the output's bytes, and the flops and bytes read (L, RM, bias) of the low-rank term
    # and bias, which the cuBLAS path (kernels/choice.py) writes into the output before addmm (``estimate``)
    out_bytes: float = 0.0
    term_flops: float = 0.0
    term_bytes: float = 0.0

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
               Kernel("y = x W^T + b + s S B", base + 2.0 * M * r * N, x + w + y + bias_b + s32 + b, GEMM,
                      out_bytes=y, term_flops=2.0 * M * r * N, term_bytes=bias_b + s32 + b)]
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
    backward += [Kernel("dX = dY W + keep (dS A^T)", base + 2.0 * M * r * K, y + w + x + s32 + a, GEMM,
                        out_bytes=x, term_flops=2.0 * M * r * K, term_bytes=s32 + a),
                 Kernel("dA = s (keep x)^T dS", 2.0 * M * K * r, x + s32 + 2 * da_partials + a, REDUCE)]
    return {"forward": forward, "backward": backward}


def _lora_fast_dora(M: int, K: int, N: int, r: int, e: int, bias_b: int, sms: int, drop: bool,
                    mask: int) -> Dict[str, List[Kernel]]:
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s32 = K * r * e, r * N * e, M * r * 4
    u = M * N * 4   # the unscaled sum, kept in fp32 until g scales it (the output itself when e = 4)
    base = 2.0 * M * N * K
    lora = _lora_fast(M, K, N, r, e, bias_b, sms)
    # the norm pass: each W tile plus s (A B)^T formed from A and B (r multiply-adds per element), squared and
    # summed; m read, the norm and g written. Its dot is IEEE fp32 on the CUDA cores (about 67 TFLOP/s on an
    # H200, not the tensor-core GEMM rate this model divides by): about 8 us at 4096 x 4096, r 16, unmeasured
    forward = [Kernel("norm, g: one pass over W + s (A B)^T", 2.0 * N * K * r + 3.0 * N * K, w + a + b + 3 * N * 4)]
    forward += [k for k in lora["forward"] if k.launch != GEMM]   # S = dropout(x) A and its finishing pass
    if drop:
        forward += [Kernel("x_d = dropout(x)", 0, 2 * x), Kernel("x - x_d", 0, 2 * x),
                    Kernel("Y1 = (x - x_d) W^T + b", base + 2.0 * M * r * N, x + w + y + bias_b + s32 + b, GEMM),
                    Kernel("U = x_d W^T + s S B (fp32)", base + 2.0 * M * r * N, x + w + u + s32 + b, GEMM),
                    Kernel("y = Y1 + g U, V = U / norm", 0, u + 3 * y + 2 * N * 4)]
    else:
        forward += [Kernel("U = x W^T + s S B (fp32)", base + 2.0 * M * r * N, x + w + u + s32 + b, GEMM),
                    Kernel("y = g U + b, V = U / norm", 0, u + 2 * y + bias_b + 2 * N * 4)]
    backward = [Kernel("g dY (or (g - 1) dY), dm partials", 0, 3 * y),
                Kernel("B g (fp32)", 0, b + r * N * 4 + N * 4)] + lora["backward"]
    backward += [Kernel("dB = g dB' (from fp32)", 0, r * N * 4 + N * 4 + b)]
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
    the norm's low-rank term s (A B)^T formed over W (2 NKr) to its forward."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    lora = impl != "F.linear"
    fwd = 2.0 * M * N * K + (2.0 * M * r * (K + N) if lora else 0.0) + (2.0 * N * K * r if "dora" in impl else 0.0)
    bwd = 2.0 * M * N * K + (4.0 * M * r * (K + N) if lora else 0.0)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What ``estimate`` adds to the ideal bound (module docstring); ``describe()`` is printed with the estimate."""

    gemm_fraction: float = 0.85            # lora-fast's fused GEMM rate / cuBLAS's (issue 28: 0.80-0.90, unmeasured)
    launch_s: float = 3e-6                 # per launch: an assumed few microseconds, not a measurement
    mask: str = "bits"                     # "bits": bit-packed, written once (issue 28); "seed": regenerated
    philox_s_per_element: float = 1.0e-12  # ~35 us per dX GEMM at M=8192, K=4096 (issue 28: 25-45 us)

    def __post_init__(self):
        if not 0 < self.gemm_fraction <= 1:
            raise ValueError(f"gemm_fraction: expected a fraction in (0, 1], got {self.gemm_fraction}")
        if self.launch_s < 0 or self.philox_s_per_element < 0:
            raise ValueError("launch_s and philox_s_per_element: expected non-negative seconds")
        if self.mask not in ("seed", "bits"):
            raise ValueError(f"mask: expected 'seed' or 'bits', got {self.mask!r}")

    def describe(self) -> str:
        mask = (f"regenerated from the seed, {self.philox_s_per_element * 1e12:.2f} ps of Philox per element of x "
                "in the dX GEMM" if self.mask == "seed" else "bit-packed, M K / 8 bytes written once and read twice")
        return (f"lora-fast's GEMM at {self.gemm_fraction:.2f} of cuBLAS's rate; {self.launch_s * 1e6:.1f} us per "
                f"launch (every implementation); dropout mask {mask}")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """``estimate``'s answer: seconds, launches counted, and the path each lora-fast GEMM of the mode takes."""

    seconds: float
    launches: int
    gemm_paths: tuple = ()   # lora-fast: "fused" or "cublas" per GEMM, in launch order


def gemm_paths_time(k: Kernel, gemm_flops_per_s: float, copy_bytes_per_s: float, assume: Assumptions,
                    extra_s: float = 0.0, extra_bytes: float = 0.0) -> Dict[str, float]:
    """Seconds of one lora-fast GEMM (a ``Kernel`` with ``out_bytes``) on each path of kernels/choice.py:
    "fused", the Triton kernel at ``gemm_fraction`` of the cuBLAS rate, one launch; "cublas", the low-rank term
    (and bias) written into the output by one launch, then addmm reading P, Q and that output and writing it,
    at the cuBLAS rate, the output's extra write and read not overlapped (+ 2 M N e / copy rate).
    ``extra_s`` / ``extra_bytes``: the mask's Philox time or bytes, paid where the low-rank
    term is formed (the fused kernel, or the term's launch)."""
    fused = max(k.flops / (gemm_flops_per_s * assume.gemm_fraction), (k.bytes + extra_bytes) / copy_bytes_per_s)
    term = max(k.term_flops / gemm_flops_per_s, (k.term_bytes + extra_bytes + k.out_bytes) / copy_bytes_per_s)
    # addmm reads P and Q and writes the output under its MMA; the output's read (beta = 1) comes in each tile's
    # epilogue, after its MMA, and is charged on top (not overlapped), as is the term's write of it
    addmm = max((k.flops - k.term_flops) / gemm_flops_per_s, (k.bytes - k.term_bytes) / copy_bytes_per_s)
    addmm += k.out_bytes / copy_bytes_per_s
    return {"fused": fused + extra_s + assume.launch_s, "cublas": term + extra_s + addmm + 2 * assume.launch_s}


def estimate(impl: str, mode: str, M: int, K: int, N: int, r: int, dtype: str, gemm_flops_per_s: float,
             copy_bytes_per_s: float, *, bias: bool = False, dropout: float = 0.0, sms: int = 132,
             assume: Optional[Assumptions] = None) -> Estimate:
    """The bound of ``bound`` with what it leaves out (module docstring, ``Assumptions``): a cost per launch for
    every implementation; for lora-fast its GEMMs at ``gemm_fraction`` of cuBLAS or on the cuBLAS path, the
    cheaper (as the measured choice would pick), and the dropout mask's Philox time or bytes. The other
    implementations' GEMMs are cuBLAS's: they keep the measured rate. Raises ValueError as ``bound`` does."""
    assume = assume or Assumptions()
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if gemm_flops_per_s <= 0 or copy_bytes_per_s <= 0:
        raise ValueError("ceilings: expected positive GEMM and copy rates")
    ks = kernels(impl, M, K, N, r, dtype, bias=bias, dropout=dropout, sms=sms)
    passes = ks["forward"] + ks["backward"] if mode == "full" else ks[mode]
    mask_bits = M * K / 8 if impl == "lora-fast" and dropout > 0 and assume.mask == "bits" else 0.0
    seconds, launches, paths = 0.0, 0, []
    for k in passes:
        if impl == "lora-fast" and k.out_bytes:
            is_dx = k.name.startswith("dX")
            philox = (assume.philox_s_per_element * M * K if is_dx and dropout > 0 and assume.mask == "seed"
                      else 0.0)
            times = gemm_paths_time(k, gemm_flops_per_s, copy_bytes_per_s, assume, philox,
                                    mask_bits if is_dx else 0.0)
            path = min(times, key=times.get)
            seconds += times[path]
            launches += 1 if path == "fused" else 2
            paths.append(path)
            continue
        extra = 0.0
        if mask_bits and k.name.startswith(("S = ", "dA = ")):   # the mask written, then read by dA
            extra = mask_bits
        seconds += max(k.flops / gemm_flops_per_s, (k.bytes + extra) / copy_bytes_per_s) + assume.launch_s
        launches += 1
    return Estimate(seconds, launches, tuple(paths))


IMPLS = ("F.linear", "book", "peft", "addmm-chain", "lora-fast")

# --- several adapters in one batch (issue 30) -------------------------------------------------------------------
MULTI_IMPLS = ("lora-fast-multi", "peft-mixed", "lora-fast-separate")


def multi_kernels(impl: str, n: int, M: int, K: int, N: int, r: int, dtype: str = "bfloat16", *,
                  sms: int = 132) -> Dict[str, List[Kernel]]:
    """The launches of one training step of ``n`` adapters of rank ``r`` on one frozen base, M rows split evenly
    (rows grouped by adapter, as PEFT's ``adapter_names`` batches usually come), x requiring grad:

    - "lora-fast-multi": ``lora_linear_multi``'s five launches (kernels/multi.py): the base GEMM once for all
      adapters; each adapter's A and B read once; the int64 row index read by every pass (the gradient pass once
      per adapter: its programs walk every row block); dA and dB written per adapter.
    - "peft-mixed": PEFT's ``adapter_names`` loop (``_mixed_batch_forward``): the base layer once, then per
      adapter a gather of its rows, lora_A, lora_B, the scale and an indexed add into the output; backward their
      gradients (the indexed add's gather of dY, the scale, dS, dB, the low-rank dX scattered into dX, dA).
    - "lora-fast-separate": n separate ``lora_linear`` steps on M / n rows each (W read n times).

    Raises ValueError for an unknown implementation or n < 1."""
    if n < 1:
        raise ValueError(f"n: expected at least one adapter, got {n}")
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(ELEMENT_BYTES)}, got {dtype!r}")
    e = ELEMENT_BYTES[dtype]
    if impl == "lora-fast-separate":
        out = {"forward": [], "backward": []}
        rows = [M // n + (1 if i < M % n else 0) for i in range(n)]
        for m in rows:
            for mode, ks in _lora_fast(m, K, N, r, e, 0, sms).items():
                out[mode] += ks
        return out
    x, y, w = M * K * e, M * N * e, N * K * e
    a, b, s32, idx = K * r * e, r * N * e, M * r * 4, M * 8
    base = 2.0 * M * N * K
    if impl == "lora-fast-multi":
        fwd = [Kernel("S = dropout(x) A[idx]", 2.0 * M * K * r, x + n * a + idx + s32, "multi_proj_kernel"),
               Kernel("y = x W^T + b + s S B[idx]", base + 2.0 * M * r * N, x + w + y + idx + s32 + n * b,
                      "multi_gemm_kernel", out_bytes=y, term_flops=2.0 * M * r * N, term_bytes=idx + s32 + n * b)]
        bwd = [Kernel("dS = dY B[idx]^T", 2.0 * M * N * r, y + n * b + idx + s32, "multi_proj_kernel"),
               Kernel("dX = dY W + keep (dS A[idx]^T)", base + 2.0 * M * r * K, y + w + x + idx + s32 + n * a,
                      "multi_gemm_kernel", out_bytes=x, term_flops=2.0 * M * r * K, term_bytes=idx + s32 + n * a),
               Kernel("dA[a], dB[a] per adapter", 2.0 * M * r * (K + N), x + y + 2 * s32 + n * idx + n * (a + b),
                      "multi_reduce_kernel")]
        return {"forward": fwd, "backward": bwd}
    if impl == "peft-mixed":
        fwd = [Kernel("y = x W^T", base, x + w + y)]
        bwd = [Kernel("dX = dY W", base, y + w + x)]
        for i in range(n):
            m = M // n + (1 if i < M % n else 0)
            xs, ys, ss = m * K * e, m * N * e, m * r * e
            fwd += [Kernel(f"x[rows {i}]", 0, 2 * xs), Kernel(f"S{i} = x A", 2.0 * m * K * r, xs + a + ss),
                    Kernel(f"T{i} = S B", 2.0 * m * r * N, ss + b + ys), Kernel(f"T{i} * s", 0, 2 * ys),
                    Kernel(f"y[rows {i}] += T", 0, 3 * ys)]
            bwd += [Kernel(f"dY[rows {i}]", 0, 2 * ys), Kernel(f"dT{i} = s dY", 0, 2 * ys),
                    Kernel(f"dS{i} = dT B^T", 2.0 * m * N * r, ys + b + ss),
                    Kernel(f"dB{i} = S^T dT", 2.0 * m * N * r, ys + ss + b),
                    Kernel(f"dX{i} = dS A^T", 2.0 * m * r * K, ss + a + xs),
                    Kernel(f"dA{i} = x^T dS", 2.0 * m * K * r, xs + ss + a),
                    Kernel(f"dX[rows {i}] += dX{i}", 0, 3 * xs)]
        return {"forward": fwd, "backward": bwd}
    raise ValueError(f"impl: expected one of {', '.join(MULTI_IMPLS)}; got {impl!r}")


def multi_bound(impl: str, n: int, mode: str, M: int, K: int, N: int, r: int, dtype: str,
                gemm_flops_per_s: float, copy_bytes_per_s: float, *, sms: int = 132,
                launch_s: float = 0.0) -> float:
    """Seconds of ``multi_kernels``' launches in ``mode`` (the roofline sum of ``bound``), plus ``launch_s`` per
    launch (0: the ideal bound). Raises ValueError."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if gemm_flops_per_s <= 0 or copy_bytes_per_s <= 0:
        raise ValueError("ceilings: expected positive GEMM and copy rates")
    ks = multi_kernels(impl, n, M, K, N, r, dtype, sms=sms)
    passes = ks["forward"] + ks["backward"] if mode == "full" else ks[mode]
    return sum(k.time(gemm_flops_per_s, copy_bytes_per_s) + launch_s for k in passes)


# --- rows unsorted or sorted by adapter (issue 30 item 1) --------------------------------------------------------
# kernels/multi.py's GPU tiles (its _proj_config, _gemm_config (16-bit), _reduce_config): rows per tile of the
# projection, of the GEMM and of the gradient reduction, and the column widths they step over
MULTI_BLOCKS = dict(proj_m=64, proj_k=64, gemm_m=128, gemm_n=128, gemm_k=32, reduce_m=64, reduce_c=64)
MULTI_BATCHES = ("even", "uneven", "random")


def multi_batch_index(kind: str, M: int, n: int, seed: int = 0) -> List[int]:
    """The adapter of each of M rows: "even" (M / n rows each, grouped by adapter), "uneven" (adapter a's share
    proportional to 2**-a, grouped: bench/multi_adapter.py's splits) or "random" (the even split shuffled with
    random.Random(seed): rows interleaved at random). Raises ValueError for another kind or n < 1."""
    import random

    if n < 1:
        raise ValueError(f"n: expected at least one adapter, got {n}")
    if kind not in MULTI_BATCHES:
        raise ValueError(f"kind: expected one of {MULTI_BATCHES}, got {kind!r}")
    if kind == "uneven":
        weights = [2.0**-a for a in range(n)]
        counts = [int(M * w / sum(weights)) for w in weights]
        counts[0] += M - sum(counts)
    else:
        counts = [M // n + (a < M % n) for a in range(n)]
    idx = [a for a, c in enumerate(counts) for _ in range(c)]
    if kind == "random":
        random.Random(seed).shuffle(idx)
    return idx


def adapters_per_tile(idx: Sequence[int], block_m: int) -> List[int]:
    """How many distinct adapters (>= 0; -1 rows add none) each tile of ``block_m`` consecutive rows holds."""
    return [len({a for a in idx[t:t + block_m] if a >= 0}) for t in range(0, len(idx), block_m)]


def multi_order_costs(idx: Sequence[int], n: int, K: int, N: int, r: int, dtype: str = "bfloat16", *,
                      order: str = "unsorted", blocks: Optional[dict] = None) -> Dict[str, dict]:
    """The low-rank work of one training step of lora_linear_multi's kernels for this row index, counted from
    the index itself (not a formula of n): per pass, ``dots`` (tensor-core tile products tl.dot issues for the
    low-rank operands; a tile loops over the adapters present in it, one dot each), ``flops`` (2 m n k of those
    dots, zero rows included: what the tensor cores execute), ``adapter_bytes`` (A or B tiles read: each tile
    reads the operand of every adapter present in it) and ``index_bytes`` (int64 index, permutation and
    segment starts read). The base GEMM's dots are the same in both orders and not counted here.

    order "unsorted": tiles of consecutive rows; "sorted": tiles of the rows in adapter order (a stable sort),
    and each adapter's gradient programs walk its own segment only, in blocks from its start, instead of every
    row block; plus "sort": the sort's own pass (reads the index, writes the sorted index and the permutation,
    three launches: sort, arange, searchsorted; a radix sort's passes over the keys are not modelled: a lower bound).
    The sort is counted once, as one call with a raw index pays it; layers that share one selection
    (``lora_fast.AdapterRows``: every wrapped layer of a forward under ``use_adapter_names``, or patch_peft's
    ``adapter_names`` batches) pay it once per forward in all, not once each.

    Passes: "S" (x A[idx], forward), "dS" (dY B[idx]^T), "y term" (S B[idx] in the forward GEMM), "dX term"
    (dS A[idx]^T in the dX GEMM), "dA dB" (the per-adapter reduction). Raises ValueError."""
    if order not in ("unsorted", "sorted"):
        raise ValueError(f"order: expected 'unsorted' or 'sorted', got {order!r}")
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(ELEMENT_BYTES)}, got {dtype!r}")
    if any(a < -1 or a >= n for a in idx):
        raise ValueError(f"idx: expected values in [-1, {n})")
    bl = dict(MULTI_BLOCKS, **(blocks or {}))
    e = ELEMENT_BYTES[dtype]
    br = max(16, 1 << (r - 1).bit_length())   # configs.block_r: the rank padded to a power of two, at least 16
    M = len(idx)
    rows = sorted(idx) if order == "sorted" else list(idx)   # Python's sort is stable; only the values matter
    perm = 8 if order == "sorted" else 0   # bytes of the permutation read per row visited

    def cdiv(a, b):
        return -(-a // b)

    out = {}
    proj = adapters_per_tile(rows, bl["proj_m"])
    for name, width in (("S", K), ("dS", N)):
        steps = cdiv(width, bl["proj_k"])
        out[name] = dict(dots=sum(proj) * steps, flops=2.0 * sum(proj) * steps * bl["proj_m"] * bl["proj_k"] * br,
                         adapter_bytes=sum(proj) * width * r * e, index_bytes=M * (8 + perm), tiles=len(proj))
    gemm = adapters_per_tile(rows, bl["gemm_m"])
    for name, width in (("y term", N), ("dX term", K)):
        cols = cdiv(width, bl["gemm_n"])
        out[name] = dict(dots=sum(gemm) * cols, flops=2.0 * sum(gemm) * cols * bl["gemm_m"] * br * bl["gemm_n"],
                         adapter_bytes=sum(gemm) * r * width * e, index_bytes=M * (8 + perm) * cols,
                         tiles=len(gemm) * cols)
    col_blocks = cdiv(K, bl["reduce_c"]) + cdiv(N, bl["reduce_c"])
    if order == "unsorted":
        # program (column block, a) walks every row block, reads its index, and dots those holding a row of a
        blocks_with = sum(sum(1 for t in range(0, M, bl["reduce_m"]) if a in idx[t:t + bl["reduce_m"]])
                          for a in range(n))
        index_bytes = n * col_blocks * M * 8
    else:
        counts = [sum(1 for v in idx if v == a) for a in range(n)]
        blocks_with = sum(cdiv(c, bl["reduce_m"]) for c in counts)
        index_bytes = col_blocks * (2 * n * 8 + (M - counts_base(idx)) * 8)   # segment bounds, permutation
    out["dA dB"] = dict(dots=blocks_with * col_blocks,
                        flops=2.0 * blocks_with * col_blocks * bl["reduce_m"] * bl["reduce_c"] * br,
                        adapter_bytes=0, index_bytes=index_bytes, tiles=n * col_blocks)
    if order == "sorted":
        out["sort"] = dict(dots=0, flops=0.0, adapter_bytes=0, index_bytes=M * 8 + 2 * M * 8 + (n + 1) * 8,
                           tiles=0, launches=3)
    return out


def counts_base(idx: Sequence[int]) -> int:
    """Rows of adapter -1 (the base layer alone)."""
    return sum(1 for v in idx if v < 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m bench.cost_model: the ideal bound and the adjusted estimate side by side, per implementation."""
    parser = argparse.ArgumentParser(prog="python -m bench.cost_model", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--K", type=int, default=4096, help="in_features")
    parser.add_argument("--N", type=int, default=4096, help="out_features")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(ELEMENT_BYTES))
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--gemm-tflops", type=float, default=790.0,
                        help="cuBLAS's rate (default: an H200's large bf16 matmul as measured earlier on one)")
    parser.add_argument("--copy-tbs", type=float, default=4.3, help="device copy rate, read + write (H200: 4.3)")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--gemm-fraction", type=float, default=Assumptions.gemm_fraction)
    parser.add_argument("--launch-us", type=float, default=Assumptions.launch_s * 1e6)
    parser.add_argument("--mask", choices=("seed", "bits"), default=Assumptions.mask)
    parser.add_argument("--philox-ps", type=float, default=Assumptions.philox_s_per_element * 1e12,
                        help="picoseconds of Philox per element of x in the dX GEMM (mask=seed)")
    parser.add_argument("--adapters", type=int, nargs="*", default=[],
                        help="also print a training step of this many adapters in one batch (issue 30: "
                             "lora_linear_multi, PEFT's adapter_names loop, n separate lora_linear steps)")
    parser.add_argument("--order", action="store_true",
                        help="with --adapters: the low-rank dots and bytes of lora_linear_multi's kernels with rows "
                             "unsorted and sorted by adapter, for an even, an uneven and a randomly interleaved "
                             "batch (issue 30 item 1)")
    args = parser.parse_args(argv)
    assume = Assumptions(args.gemm_fraction, args.launch_us * 1e-6, args.mask, args.philox_ps * 1e-12)
    rates = (args.gemm_tflops * 1e12, args.copy_tbs * 1e12)
    shape = (args.M, args.K, args.N, args.rank, args.dtype)
    kw = dict(bias=args.bias, dropout=args.dropout)
    print(f"M={args.M} K={args.K} N={args.N} r={args.rank} {args.dtype} dropout {args.dropout:g}, "
          f"{args.gemm_tflops:g} TFLOP/s, {args.copy_tbs:g} TB/s, {args.sms} SMs")
    print(f"estimate assumes: {assume.describe()}")
    floor = {m: bound("F.linear", m, *shape, *rates, **kw) for m in MODES}
    floor_est = {m: estimate("F.linear", m, *shape, *rates, **kw, sms=args.sms, assume=assume).seconds
                 for m in MODES}
    head = f"{'impl':<12} {'mode':<9} {'bound us':>9} {'estimate us':>12} {'bound/F.lin':>12} {'est./F.lin':>11}"
    print(head + "  launches  lora-fast GEMM paths")
    for impl in IMPLS:
        for m in MODES:
            b = bound(impl, m, *shape, *rates, **kw)
            e = estimate(impl, m, *shape, *rates, **kw, sms=args.sms, assume=assume)
            print(f"{impl:<12} {m:<9} {b * 1e6:9.1f} {e.seconds * 1e6:12.1f} {b / floor[m]:12.3f} "
                  f"{e.seconds / floor_est[m]:11.3f}  {e.launches:8d}  {', '.join(e.gemm_paths) or '-'}")
    if args.adapters:
        print(f"several adapters in one batch (forward + backward, M rows split evenly; bound with "
              f"{assume.launch_s * 1e6:.1f} us per launch; ratio: to lora-fast with one adapter on the M rows)")
        one = bound("lora-fast", "full", *shape, *rates) + 5 * assume.launch_s
        for count in args.adapters:
            for impl in MULTI_IMPLS:
                t = multi_bound(impl, count, "full", *shape, *rates, sms=args.sms, launch_s=assume.launch_s)
                launches = sum(len(v) for v in multi_kernels(impl, count, *shape, sms=args.sms).values())
                print(f"  n={count:<3} {impl:<20} {t * 1e6:9.1f} us  {t / one:6.3f}  {launches:5d} launches")
    if args.adapters and args.order:
        print(order_table(args.adapters, args.M, args.K, args.N, args.rank, args.dtype,
                          args.gemm_tflops * 1e12, args.copy_tbs * 1e12))
    return 0


def order_table(ns: Sequence[int], M: int, K: int, N: int, r: int, dtype: str, gemm_flops_per_s: float,
                copy_bytes_per_s: float) -> str:
    """The text of ``--order``: per batch kind, n and order, the low-rank dots per tile of the forward GEMM and
    of S, the dots of the whole step, the extra tensor-core work relative to the base GEMMs' (forward and dX),
    and the adapter and index bytes; base GEMM dots per output tile for comparison."""
    bl = MULTI_BLOCKS
    base_dots_per_tile = -(-K // bl["gemm_k"])
    base_flops = 2 * 2.0 * M * N * K
    lines = [f"rows unsorted / sorted by adapter (M={M}, {K}x{N}, r={r}, {dtype}; base GEMM: {base_dots_per_tile} "
             f"dots per {bl['gemm_m']}x{bl['gemm_n']} output tile; counted from each batch's index)",
             f"  {'batch':<7} {'n':>3} {'order':<9} {'y dots/tile':>11} {'S dots/tile':>11} {'step dots':>10} "
             f"{'extra MMA %':>11} {'adapter MB':>10} {'index MB':>9} {'launches':>8}"]
    for kind in MULTI_BATCHES:
        for n in ns:
            idx = multi_batch_index(kind, M, n)
            for order in ("unsorted", "sorted"):
                c = multi_order_costs(idx, n, K, N, r, dtype, order=order)
                lowrank_flops = sum(v["flops"] for v in c.values())
                lines.append(
                    f"  {kind:<7} {n:>3} {order:<9} {c['y term']['dots'] / c['y term']['tiles']:11.2f} "
                    f"{c['S']['dots'] / c['S']['tiles']:11.2f} {sum(v['dots'] for v in c.values()):10d} "
                    f"{100 * lowrank_flops / base_flops:11.2f} "
                    f"{sum(v['adapter_bytes'] for v in c.values()) / 1e6:10.2f} "
                    f"{sum(v['index_bytes'] for v in c.values()) / 1e6:9.2f} "
                    f"{5 + sum(v.get('launches', 0) for v in c.values()):8d}")
    lines.append("  launches: one call with a raw index; layers sharing one AdapterRows (use_adapter_names, "
                 "patch_peft's adapter_names) launch 5 each, plus the sort's 3 once per forward")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
