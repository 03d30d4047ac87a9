"""Compile report: every kernel, autotune config, dtype and target compiled for a GPU on a machine without one.

    python -m lora_fast.compile_report [--target sm_80 sm_90] [--kernel fwd_gemm dx_gemm ...] [--json PATH]

The interpreter tests prove the arithmetic; this proves the GPU code. Each kernel is compiled from its real
``@triton.jit`` function by ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)`` with the specialisation
the launchers in ``lora_fast.kernels.ops`` produce on aligned shapes (16-byte aligned pointers, sizes and row
strides divisible by 16, contiguous unit strides folded to the constant 1, as Triton's JIT does), for every
config that ``lora_fast.kernels.configs`` hands the autotuner. Per row it reads, with the tools inside the
Triton wheel: registers and spill bytes from ``ptxas -v`` (the log Triton prints with TRITON_DUMP_PTXAS_LOG=1),
shared memory from the compiled kernel's metadata, and counts of tensor-core instructions (HGMMA on sm_90, HMMA
on sm_80) and TMA loads (UTMALDG) in the SASS from ``nvdisasm``.

A row fails when it spills, when its shared memory passes the target's per-block limit
(``configs.SMEM_LIMIT``: 227 KB on sm_90, 163 KB on sm_80, NVIDIA's CUDA C programming guide), when a GEMM
kernel has no tensor-core instruction for fp16/bf16, or when it does not compile. The command exits 1 when a
row fails. Compiling needs no GPU and no driver; the numbers are compile-time facts, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Optional, Sequence

TARGETS = {"sm_80": (8, 0), "sm_90": (9, 0)}
DTYPES = ("fp16", "bf16", "fp32")
RANKS = (16, 64)

# Each launch of ops.py, by the name the report uses: (kernel function, variants as {flag: value}).
# fwd_gemm: y = x W^T (+ b) + scale S B; dx_gemm: dX = dY W + scale keep (dS A^T), keep read from the bits the
# forward stored; xa_proj: S = dropout(x) A, storing the keep-mask's bits ("bits");
# dyb_proj: dS = dY B^T with the dB partials when the rank is small; da_reduce: dA = (keep x)^T dS, keep read from
# the bits ("bits": the 16-bit op) or regenerated from the seed (DoRA, 4-bit) (the dB
# reduction of a large rank, reduce_rows(dy, S), compiles to the same kernel with the same specialisation);
# grad_finish: dA or dB = (scale * the sum of their partials) in the adapters' dtype.
# DoRA (kernels/dora.py; its GEMMs and narrow passes are the kernels above, the forward GEMM also with an fp32
# output for 16-bit x: dora_wide_gemm): dora_norm: one pass over W forming W + s (A B)^T tile by tile, the norm
# and g = m / norm; dora_scale: y = g ⊙ U + b (Y1 + g ⊙ U with dropout) and V = U / norm; dora_grad: g ⊙ dY,
# (g - 1) ⊙ dY and the dm partials; dora_combine: dropout(x), x - dropout(x), and dX's masked add.
# dora_norm_4bit: the norm pass on a 4-bit weight dequantized in registers (QDoRA).
DORA_KERNELS = ("dora_wide_gemm", "dora_norm", "dora_norm_4bit", "dora_scale", "dora_grad", "dora_combine")
# fwd_gemm_tma / dx_gemm_tma: the persistent TMA GEMM (kernels/gemm_tma.py) in the forward and dX layouts, sm_90 only
TMA_KERNELS = ("fwd_gemm_tma", "dx_gemm_tma")
# fwd_gemm_ws / dx_gemm_ws: the warp-specialised Gluon GEMM (kernels/gemm_ws.py, opt-in), sm_90 and bf16 only; its
# rows also fail without USETMAXREG (the producer's register budget) in the SASS
WS_KERNELS = ("fwd_gemm_ws", "dx_gemm_ws")
# QLoRA (ops_4bit.py): fwd_gemm_4bit / dx_gemm_4bit: the same GEMMs reading a 4-bit (NF4 / FP4) weight and
# dequantizing each tile before the MMA; dequant_4bit: the weight dequantized into a 16-bit scratch buffer.
QLORA_KERNELS = ("fwd_gemm_4bit", "dx_gemm_4bit", "dequant_4bit")
# fwd_gemm_4bit_tma / dx_gemm_4bit_tma: the persistent TMA variant of the 4-bit GEMMs (nf4.py, opt-in
# LORA_FAST_GEMM_4BIT=tma), sm_90 and 16-bit only; its rows also fail without UTMALDG in the SASS
QLORA_TMA_KERNELS = ("fwd_gemm_4bit_tma", "dx_gemm_4bit_tma")
# several adapters in one batch (kernels/multi.py, opt-in LORA_FAST_MULTI=triton): multi_proj: S = dropout(x) A[idx];
# multi_gemm: y = x W^T + b + s S B[idx] and dX = dY W + keep (dS A[idx]^T); multi_reduce: dA[a], dB[a] per adapter;
# each unsorted (a tile loops over the adapters present in it) and "sorted" (rows visited in adapter order through a
# permutation, LORA_FAST_MULTI_ORDER=sorted); one fixed config per kernel (no autotuning)
MULTI_KERNELS = ("multi_proj", "multi_gemm", "multi_reduce")
KERNELS = (("fwd_gemm", "dx_gemm", "xa_proj", "dyb_proj", "da_reduce", "grad_finish") + TMA_KERNELS + WS_KERNELS
           + QLORA_KERNELS + QLORA_TMA_KERNELS + DORA_KERNELS + MULTI_KERNELS)
# kernels without a dot or a reduction through shared memory (may report 0 bytes of shared memory), and without
# a rank dimension that changes their code
ELEMENTWISE_KERNELS = ("grad_finish", "dequant_4bit", "dora_scale", "dora_grad", "dora_combine")
GEMM_KERNELS = (("fwd_gemm", "dx_gemm", "fwd_gemm_4bit", "dx_gemm_4bit", "dora_wide_gemm") + TMA_KERNELS
                + WS_KERNELS + QLORA_TMA_KERNELS)
# compiled without FP contraction, as ops_4bit launches them (bitsandbytes' nested absmax: a product, then a sum)
NO_FMA_KERNELS = ("fwd_gemm_4bit", "dx_gemm_4bit", "dequant_4bit", "dora_norm_4bit") + QLORA_TMA_KERNELS
# Aligned sizes of the specialisation: any multiple of 16 gives the same code (the JIT keys on "divisible
# by 16" only); 4096 stands for the hidden sizes of the models the README benchmarks.
_SIZE = 4096


@dataclass(frozen=True)
class Job:
    """One compilation: a launch of ``kernel`` with ``variant`` flags, one config, dtype, target and rank."""

    kernel: str
    variant: str
    dtype: str
    target: str
    rank: int
    config: dict
    num_warps: int
    num_stages: int
    fp32_precision: str = "ieee"


@dataclass
class Row:
    """What one compilation shows; ``failures`` lists the checks it fails (empty: it passes)."""

    kernel: str
    variant: str
    dtype: str
    target: str
    rank: int
    block_r: int
    config: str
    num_warps: int
    num_stages: int
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared: Optional[int] = None
    mma: Optional[int] = None           # HGMMA (sm_90) or HMMA (sm_80) instructions in the SASS
    mma_name: str = ""
    tma_loads: Optional[int] = None     # UTMALDG instructions
    global_loads: Optional[int] = None  # LDG instructions (plain global loads: what TMA does not carry)
    setmaxnreg: Optional[int] = None    # USETMAXREG instructions (warp-specialised register budgets)
    instructions: Optional[int] = None  # SASS instructions in the kernel (the static count, loops once)
    tensormaps: Optional[int] = None    # PTX instructions that create device-side tensor maps (tensormap.replace,
    #                                     tensormap.cp_fenceproxy, fence.proxy.tensormap)
    scratch: Optional[int] = None       # global scratch per program (bytes; the device-side descriptors' tensor maps)
    compile_s: float = 0.0
    error: str = ""
    failures: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- jobs
def _dtype_label(dtype: str, precision: str) -> str:
    return f"{dtype}/{precision}" if dtype == "fp32" else dtype


def _variants(kernel: str, rank: int, configs_mod) -> list:
    """The constexpr flag sets the launchers pass to ``kernel``: forward with and without bias, etc."""
    if kernel == "fwd_gemm":   # ops.lora_forward: dropout is applied in the projection, never here
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False), dict(HAS_BIAS=True, HAS_DROPOUT=False)]
    if kernel == "dx_gemm":    # ops.lora_backward: no bias term in dX
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False), dict(HAS_BIAS=False, HAS_DROPOUT=True)]
    # the TMA GEMM: LOWRANK_TMA, the low-rank term's operands by TMA (the S pass's rounded copy of S or dS, B or
    # A's rows), what ops.lora_forward / lora_backward and DoRA's GEMMs into x's dtype launch on the TMA path (the
    # first, measuring call of a key included; DoRA's dY W of scale 0 with dropout from the dS pass's second copy);
    # without it (lora_forward / lora_backward's zero_rows, 16-bit adapters whose rows are not 16-byte multiples)
    # by pointer loads
    # RM_FP32 (not a kernel flag: RM's pointer type): fp32 adapters by pointer loads (those callers); with the S /
    # dS pass's copy of RM (COPY_RM) fp32 adapters launch the LOWRANK_TMA rows
    # HOST_DESC (LORA_FAST_TMA_DESC=host, kernels/descriptors.py): the same launches with host-side descriptors; before
    # the last (heaviest) set, which stays the one ``variants="heaviest"`` keeps
    if kernel == "fwd_gemm_tma":   # Q = W^T from W's rows; RM = B (R, N)
        return [dict(Q_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, LOWRANK_TMA=False),
                dict(Q_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, LOWRANK_TMA=False, RM_FP32=True),
                dict(Q_TRANSPOSED=True, HAS_BIAS=False, HAS_DROPOUT=False, LOWRANK_TMA=True),
                dict(Q_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, LOWRANK_TMA=False, HOST_DESC=True),
                dict(Q_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, LOWRANK_TMA=True, HOST_DESC=True),
                dict(Q_TRANSPOSED=True, HAS_BIAS=True, HAS_DROPOUT=False, LOWRANK_TMA=True)]
    if kernel == "dx_gemm_tma":    # Q = W as stored; RM = A^T read from A's (K, R) rows (RM_ROWS_N)
        # the first: the pointer-load term with 16-bit RM (zero_rows; 16-bit A whose rows are not 16-byte multiples)
        return [dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=False, LOWRANK_TMA=False),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=True, LOWRANK_TMA=False),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=False, LOWRANK_TMA=False, RM_FP32=True),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=True, LOWRANK_TMA=False, RM_FP32=True),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=False, LOWRANK_TMA=True, RM_ROWS_N=True),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=True, LOWRANK_TMA=False, HOST_DESC=True),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=True, LOWRANK_TMA=True, RM_ROWS_N=True,
                     MASK_TMA=True, HOST_DESC=True),
                dict(Q_TRANSPOSED=False, HAS_BIAS=False, HAS_DROPOUT=True, LOWRANK_TMA=True, RM_ROWS_N=True,
                     MASK_TMA=True)]
    if kernel == "fwd_gemm_ws":
        return [dict(Q_TRANSPOSED=True, HAS_BIAS=False), dict(Q_TRANSPOSED=True, HAS_BIAS=True)]
    if kernel == "dx_gemm_ws":     # dX without dropout only (ops.ws_eligible)
        return [dict(Q_TRANSPOSED=False, HAS_BIAS=False)]
    # the narrow passes finish their reductions in the launch; the split variants (K or M split, then the last
    # program sums the splits) carry that code on top of the unsplit one
    # Q_FP32 (not a kernel flag: Q's pointer type): fp32 adapters on a 16-bit base (PEFT's default), whose Q tile
    # takes the fp16 range guard (a power-of-two factor per rank column) before its cast; not for fp32 inputs
    # WRITE_MASK (the 16-bit op's S pass stores the keep-mask's bits; DoRA's and the 4-bit op's do not: a subset)
    # WRITE_TERM (the 16-bit op's S and dS passes on the TMA GEMM's path: the term's rounded copy, gemm_tma.py), with
    # COPY_RM for fp32 adapters (then the programs past the row groups also cast B or A's rows to the dot dtype);
    # WRITE_TERM2 (DoRA's dS pass with dropout, Q = B ⊙ g fp32: a second copy, of scale 0, for its dY W GEMM)
    if kernel == "xa_proj":
        return [dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=False, SPLIT_K=False),
                dict(HAS_DROPOUT=True, WRITE_MASK=True, WRITE_PARTIAL=False, SPLIT_K=True),
                dict(HAS_DROPOUT=True, WRITE_MASK=True, WRITE_PARTIAL=False, SPLIT_K=True, WRITE_TERM=True),
                dict(HAS_DROPOUT=True, WRITE_MASK=True, WRITE_PARTIAL=False, SPLIT_K=True, Q_FP32=True),
                dict(HAS_DROPOUT=True, WRITE_MASK=True, WRITE_PARTIAL=False, SPLIT_K=True, Q_FP32=True,
                     WRITE_TERM=True, COPY_RM=True)]
    if kernel == "dyb_proj":   # ops.lora_backward fuses dB (its partials) when 4 * R < PROJ_BLOCK_M
        partials = 4 * rank < configs_mod.PROJ_BLOCK_M
        return [dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=partials, SPLIT_K=True),
                dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=partials, SPLIT_K=True, WRITE_TERM=True),
                dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=partials, SPLIT_K=True, Q_FP32=True),
                dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=partials, SPLIT_K=True, Q_FP32=True,
                     WRITE_TERM=True, COPY_RM=True),
                dict(HAS_DROPOUT=False, WRITE_MASK=False, WRITE_PARTIAL=partials, SPLIT_K=True, Q_FP32=True,
                     WRITE_TERM=True, COPY_RM=True, WRITE_TERM2=True)]
    if kernel == "da_reduce":   # with dropout every op (LoRA, DoRA, 4-bit) reads the forward's bits
        return [dict(HAS_DROPOUT=False, SPLIT_M=True), dict(HAS_DROPOUT=True, SPLIT_M=True)]
    if kernel in ("grad_finish", "dora_norm"):
        return [dict()]
    if kernel == "dora_norm_4bit":   # nested absmax is the heavier dequantization; any-shape: per-element gathers
        return [dict(NESTED=False, ALIGNED=False), dict(NESTED=True, ALIGNED=True)]   # the heaviest last
    if kernel == "dora_wide_gemm":   # U = x W^T + s S B (no bias) or x_d W^T + s S B, into fp32
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False)]
    if kernel == "dora_scale":   # y = g ⊙ U + b without dropout, Y1 + g ⊙ U with; V when the magnitude trains
        # (the heaviest last, as --heaviest-variant takes it)
        return [dict(HAS_BASE=False, HAS_BIAS=False, WRITE_V=False), dict(HAS_BASE=False, HAS_BIAS=True, WRITE_V=True),
                dict(HAS_BASE=True, HAS_BIAS=False, WRITE_V=True)]
    if kernel == "dora_grad":    # dm when the magnitude trains; g ⊙ dY for dX, (g - 1) ⊙ dY with dropout
        return [dict(HAS_DM=False, WRITE_G=True, WRITE_G1=False), dict(HAS_DM=True, WRITE_G=True, WRITE_G1=False),
                dict(HAS_DM=True, WRITE_G=False, WRITE_G1=True)]
    if kernel == "dora_combine":  # forward dropout(x); backward dX + keep/(1-p) ⊙ inner
        return [dict(HAS_BASE=False), dict(HAS_BASE=True)]
    # 4-bit: the double-quantized (nested) absmax is the heavier dequantization
    # (ALIGNED=False: a weight whose rows do not hold whole blocks, per-element gathers on the small tile)
    if kernel == "fwd_gemm_4bit":
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ALIGNED=False),
                dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ALIGNED=True),
                dict(HAS_BIAS=True, HAS_DROPOUT=False, NESTED=True, ALIGNED=True)]
    if kernel == "dx_gemm_4bit":
        return [dict(HAS_BIAS=False, HAS_DROPOUT=True, NESTED=True, ALIGNED=False),
                dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ALIGNED=True),
                dict(HAS_BIAS=False, HAS_DROPOUT=True, NESTED=True, ALIGNED=True)]
    # the TMA variants: rows of whole blocks only (ops_4bit.tma_eligible_4bit); the absmax by loads (ABSMAX_BOX 0)
    # or by TMA (4 fp32 or 16 uint8 codes per box row: ops_4bit.absmax_box)
    if kernel == "fwd_gemm_4bit_tma":
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ABSMAX_BOX=0),
                dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ABSMAX_BOX=4),
                dict(HAS_BIAS=True, HAS_DROPOUT=False, NESTED=True, ABSMAX_BOX=16)]
    if kernel == "dx_gemm_4bit_tma":
        return [dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ABSMAX_BOX=0),
                dict(HAS_BIAS=False, HAS_DROPOUT=False, NESTED=False, ABSMAX_BOX=4),
                dict(HAS_BIAS=False, HAS_DROPOUT=True, NESTED=True, ABSMAX_BOX=16)]
    if kernel == "dequant_4bit":
        return [dict(NESTED=False), dict(NESTED=True)]
    # the multi-adapter kernels, unsorted then sorted (MULTI_FWD: the forward's operand layout; else the backward's)
    # (the heaviest last: with dropout and fp32 adapters on a 16-bit base, Q_FP32; fp32 rows drop the Q_FP32 ones)
    if kernel == "multi_proj":    # S = dropout(x) A[idx]
        return [dict(HAS_DROPOUT=d, SORTED=o, **({"Q_FP32": True} if q else {}))
                for d, q in ((False, False), (True, False), (True, True)) for o in (False, True)]
    if kernel == "multi_gemm":    # the forward (bias, no mask) and dX (the mask's bits read; fp32 A on 16-bit)
        return [dict(MULTI_FWD=f, HAS_BIAS=f, HAS_DROPOUT=not f, SORTED=o, **({"Q_FP32": True} if q else {}))
                for f, q in ((True, False), (False, False), (False, True)) for o in (False, True)]
    if kernel == "multi_reduce":  # dA (with the mask's bits) and dB in one launch
        return [dict(HAS_DROPOUT=d, SORTED=o) for d in (False, True) for o in (False, True)]
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _variant_label(flags: dict) -> str:
    names = {"HAS_BIAS": "bias", "HAS_DROPOUT": "dropout", "WRITE_PARTIAL": "dB", "SPLIT_K": "split",
             "SPLIT_M": "split", "HAS_BASE": "base", "Q_TRANSPOSED": "W^T", "HAS_DM": "dm", "WRITE_G": "g",
             "WRITE_G1": "g-1", "NESTED": "nested", "WRITE_V": "V", "Q_FP32": "fp32-Q", "ABSMAX_BOX": "absmax-tma",
             "WRITE_MASK": "bits", "SORTED": "sorted", "MULTI_FWD": "fwd", "LOWRANK_TMA": "term-tma",
             "WRITE_TERM": "term", "MASK_TMA": "bits-tma", "RM_FP32": "fp32-RM", "COPY_RM": "rm-copy",
             "WRITE_TERM2": "term2", "HOST_DESC": "host-desc"}
    label = "+".join(names[k] for k, v in flags.items() if v and k in names) or "-"
    return label + ("/any-shape" if flags.get("ALIGNED") is False else "")


def launch_configs(kernel: str, flags: dict, capability, dtype, rank: int = 16) -> list:
    """The autotune configs the launcher of ``kernel`` hands Triton for these flags, capability, dtype and rank."""
    from .kernels import configs as cfg
    from .kernels import ops_4bit

    if kernel in WS_KERNELS:
        return cfg.gemm_ws_configs(capability, dtype, block_r=cfg.block_r(rank))
    if kernel in TMA_KERNELS:
        return cfg.gemm_tma_configs(capability, dtype, dropout=flags.get("HAS_DROPOUT", False),
                                    block_r=cfg.block_r(rank), rm_fp32=flags.get("RM_FP32", False))
    if kernel in ("fwd_gemm_4bit", "dx_gemm_4bit"):   # the any-shape path has its own (small) tile
        if flags.get("ALIGNED", True):
            return ops_4bit.gemm_4bit_configs(capability, dtype)
        return ops_4bit.gemm_4bit_any_shape_configs(capability, dtype)
    if kernel in QLORA_TMA_KERNELS:
        return ops_4bit.gemm_4bit_tma_configs(capability, dtype)
    if kernel == "dequant_4bit":
        return ops_4bit.dequant_configs(capability, dtype)
    if kernel == "dora_wide_gemm":
        from .kernels import dora

        return dora.wide_gemm_configs(capability, dtype)
    if kernel in MULTI_KERNELS:   # kernels/multi.py's one fixed config per kernel
        import triton

        from .kernels import multi

        factory = {"multi_proj": multi._proj_config, "multi_gemm": multi._gemm_config,
                   "multi_reduce": multi._reduce_config}[kernel]
        if kernel == "multi_gemm":
            c = factory(dtype, flags.get("HAS_DROPOUT", False), cfg.block_r(rank), gpu=True)
        elif kernel == "multi_proj":
            c = factory(dtype, flags.get("HAS_DROPOUT", False), cfg.block_r(rank), flags.get("Q_FP32", False),
                        gpu=True)
        else:
            c = factory(dtype, gpu=True)
        c = dict(c)
        return [triton.Config(c, num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages"))]
    if kernel in GEMM_KERNELS:   # ops.gemm_lowrank: its own list when it regenerates a keep-mask
        return cfg.gemm_configs(capability, dtype, dropout=flags.get("HAS_DROPOUT", False))
    if kernel in ("xa_proj", "dyb_proj"):   # ops.lowrank_project: its own list when it regenerates a keep-mask
        return cfg.proj_configs(capability, dtype, dropout=flags.get("HAS_DROPOUT", False),
                                partials=flags.get("WRITE_PARTIAL", False), q_fp32=flags.get("Q_FP32", False))
    if kernel == "da_reduce":
        return cfg.reduce_configs(capability, dtype)
    if kernel == "grad_finish":
        return cfg.finish_configs(capability, dtype)
    if kernel in DORA_KERNELS:
        from .kernels import dora

        factory = dora.norm_configs if kernel in ("dora_norm", "dora_norm_4bit") else dora.elementwise_configs
        return factory(capability, dtype)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def make_jobs(targets: Sequence[str] = tuple(TARGETS), kernels: Sequence[str] = KERNELS,
              dtypes: Sequence[str] = DTYPES, ranks: Sequence[int] = RANKS, *, first_config: bool = False,
              fp32_precisions: Sequence[str] = ("ieee",), variants: str = "all") -> list:
    """The compilations of the report: every config the launchers can pick for each kernel, dtype and target.

    ``variants="heaviest"`` keeps one flag set per kernel, the one with the most work in it (bias, dropout).
    Raises ValueError for an unknown target, kernel, dtype or precision.
    """
    import torch

    from .kernels import configs as cfg

    for name, given, allowed in (("target", targets, TARGETS), ("kernel", kernels, KERNELS),
                                 ("dtype", dtypes, DTYPES), ("fp32 precision", fp32_precisions, ("ieee", "tf32"))):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"{name} must be among {list(allowed)}, got {bad}")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    jobs = []
    for target in targets:
        for kernel in kernels:
            for dtype in dtypes:
                if kernel in TMA_KERNELS + QLORA_TMA_KERNELS and (TARGETS[target][0] < 9 or dtype == "fp32"):
                    continue   # 16-bit operands on Hopper and newer only (ops.tma_eligible, tma_eligible_4bit)
                if kernel in WS_KERNELS and (TARGETS[target][0] != 9 or dtype != "bf16"):
                    continue   # sm_90 and bf16 only (ops.ws_eligible)
                # only kernels with a rank dimension depend on the rank (the same code for every multiple of 16)
                for rank in (ranks[:1] if kernel in ELEMENTWISE_KERNELS else ranks):
                    flag_sets = [f for f in _variants(kernel, rank, cfg)
                                 if not (f.get("Q_FP32") and dtype == "fp32")]
                    if variants == "heaviest":
                        flag_sets = flag_sets[-1:]
                    for flags in flag_sets:
                        config_list = launch_configs(kernel, flags, TARGETS[target], torch_dtype[dtype], rank)
                        if first_config:
                            config_list = config_list[:1]
                        for c in config_list:
                            for precision in (fp32_precisions if dtype == "fp32" else ("ieee",)):
                                jobs.append(Job(kernel, _variant_label(flags), dtype, target, rank,
                                                dict(c.kwargs, **flags), c.num_warps, c.num_stages, precision))
    return jobs


# ------------------------------------------------------------------------------------------ specialisation
class _Ptr:
    """A pointer argument: 16-byte aligned, as every tensor torch allocates (and the launchers pass) is."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Desc:
    """A host-side tensor descriptor argument (kernels/descriptors.py) of element type ``dtype`` and ``block`` shape."""

    def __init__(self, dtype: str, block):
        self.dtype, self.block = dtype, list(block)


def launch_args(job: Job) -> tuple:
    """(kernel function, {argument: value}) as ops.py would launch ``job`` on aligned (M, K) x (K, N) shapes.

    Values mirror ops.py: the strides of contiguous x, dY, S, dS and nn.Linear's (N, K) weight, with the
    weight used transposed in forward (stride_qk = 1) and as stored in dX; unused pointers get the tensor
    ops.py passes in their place (the output), so their element types match the launch too.
    """
    import torch
    import triton.language as tl

    from .kernels import configs as cfg
    from .kernels.gemm import gemm_lowrank_kernel
    from .kernels.gemm_tma import gemm_lowrank_tma_kernel
    from .kernels.lowrank import lowrank_proj_kernel, reduce_m_kernel, sum_partials_kernel

    x = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[job.dtype]
    job_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[job.dtype]
    M = N = K = _SIZE
    R = job.rank
    meta = job.config   # the config's block sizes and the variant's flags
    dropout = meta.get("HAS_DROPOUT", False)
    common = dict(BLOCK_R=cfg.block_r(R),
                  DOT_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[job.dtype],
                  INPUT_PRECISION=job.fp32_precision if job.dtype == "fp32" else "ieee")
    if job.kernel in ("fwd_gemm", "dora_wide_gemm"):
        # P = x (M, K); Q = W^T: (k, n) -> weight[n, k]; L = S (M, R) fp32; RM = B (R, N); OUT = y (M, N), or
        # DoRA's unscaled sum in fp32 (kernels/dora.py _gemm_wide)
        wide = job.kernel == "dora_wide_gemm"
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(x), BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"),
                    RM_ptr=_Ptr("fp32" if wide else x), OUT_ptr=_Ptr("fp32" if wide else x),
                    MASK_ptr=_Ptr("fp32" if wide else x), M=M, N=N, K=K, R=R, M_BUCKET=M,
                    stride_pm=K, stride_pk=1, stride_qk=1, stride_qn=K, stride_lm=R, stride_lr=1,
                    stride_rr=N, stride_rn=1, stride_om=N, stride_on=1, stride_mask=0, lowrank_scale=0.5)
        return gemm_lowrank_kernel, dict(args, **common, **meta)
    if job.kernel == "dx_gemm":
        # P = dY (M, N_out); Q = W (N_out, K_in) as stored; L = dS fp32; RM = A^T: (r, k) -> A[k, r]; MASK: the
        # keep-mask's bits, uint8 rows of K_in / 8 bytes
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(x), BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(x),
                    OUT_ptr=_Ptr(x), MASK_ptr=_Ptr("u8" if dropout else x), M=M, N=K, K=N, R=R, M_BUCKET=M,
                    stride_pm=N, stride_pk=1, stride_qk=K, stride_qn=1, stride_lm=R, stride_lr=1,
                    stride_rr=1, stride_rn=R, stride_om=K, stride_on=1, stride_mask=K // 8 if dropout else 0,
                    lowrank_scale=0.5)
        return gemm_lowrank_kernel, dict(args, **common, **meta)
    if job.kernel in WS_KERNELS:
        # as the TMA kernel's, without the dropout arguments (the config holds NUM_WARPS = num_warps)
        from .kernels.gemm_ws import gemm_lowrank_ws_kernel

        fwd = job.kernel == "fwd_gemm_ws"
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(x), BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(x),
                    OUT_ptr=_Ptr(x), M=M, N=N if fwd else K, K=K if fwd else N, R=R, M_BUCKET=M,
                    stride_pm=K if fwd else N, stride_qrow=K, stride_lm=R, stride_lr=1,
                    stride_rr=N if fwd else 1, stride_rn=1 if fwd else R, stride_om=N if fwd else K,
                    lowrank_scale=0.5, NUM_SMS=132)
        return gemm_lowrank_ws_kernel, dict(args, BLOCK_R=common["BLOCK_R"], **meta)
    if job.kernel in TMA_KERNELS:
        # forward: P = x (M, K), Q = W's (N, K) rows read transposed, OUT = y (M, N); dX: P = dY (M, N_out), Q = W's
        # rows as stored, OUT = dX (M, K_in); L fp32 (M, R); RM = B (R, N) or A^T ((r, k) -> A[k, r])
        fwd = job.kernel == "fwd_gemm_tma"
        # with LOWRANK_TMA, L is the S pass's copy in the dot dtype, rows padded to 16 bytes, and F fp32 (fp16 only)
        term = meta.get("LOWRANK_TMA", False)
        meta = dict(meta)
        rm = "fp32" if meta.pop("RM_FP32", False) else x   # fp32 adapters by pointer loads
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(x), BIAS_ptr=_Ptr(x), L_ptr=_Ptr(x if term else "fp32"),
                    RM_ptr=_Ptr(rm), OUT_ptr=_Ptr(x), MASK_ptr=_Ptr("u8" if dropout else x),
                    F_ptr=_Ptr("fp32" if term and x == "fp16" else x), M=M, N=N if fwd else K,
                    K=K if fwd else N, R=R, M_BUCKET=M, stride_pm=K if fwd else N, stride_qrow=K,
                    stride_lm=-(-R // 8) * 8 if term else R, stride_lr=1, stride_rr=N if fwd else 1,
                    stride_rn=1 if fwd else R, stride_om=N if fwd else K,
                    stride_mask=K // 8 if dropout else 0, lowrank_scale=0.5, NUM_SMS=132)
        term = meta.get("LOWRANK_TMA", False)   # with it, the bias by a descriptor too
        flags = {"RM_ROWS_N": False, "MASK_TMA": False, "BIAS_TMA": term, "HOST_DESC": False, **meta}
        values = dict(args, **common, **flags)
        # with HOST_DESC the operands read or written by TMA are descriptors of the config's block shapes
        from .kernels.descriptors import tma_gemm_specs

        for name, (_, _, block) in tma_gemm_specs(values).items():
            values[name] = _Desc(values[name].dtype, block)
        return gemm_lowrank_tma_kernel, values
    if job.kernel in ("xa_proj", "dyb_proj"):
        if job.kernel == "xa_proj":   # P = x (M, K), Q = A (K, R)
            strides = dict(stride_pm=K, stride_pk=1, stride_qk=R, stride_qr=1)
        else:                         # P = dY (M, N), Q = B^T: (n, r) -> B[r, n]
            strides = dict(stride_pm=N, stride_pk=1, stride_qk=1, stride_qr=N)
        # SPLIT (splits, M, R) fp32 and PARTIAL (groups, R, K) fp32 scratch; GRAD = dB (R, N) in the adapters'
        # dtype: x's, or fp32 with Q_FP32 (then Q = A or B^T is fp32 too)
        meta = dict(meta)
        adapters = "fp32" if meta.pop("Q_FP32", False) else x
        # MASK: the keep-mask's bits (uint8 rows of K / 8 bytes) with WRITE_MASK, else the output (ops.py)
        write_mask = meta.get("WRITE_MASK", False)
        # TERM: the TMA GEMM's copy of the term's left operand in the dot dtype (rows padded to 16 bytes), F its
        # fp32 row factors (fp16), with WRITE_TERM; else the output (ops.py)
        meta.setdefault("WRITE_TERM", False)
        term = meta["WRITE_TERM"]
        # TERM2, F2: the second copy (WRITE_TERM2), the same layout as TERM's; else the output (ops.py)
        meta.setdefault("WRITE_TERM2", False)
        term2 = meta["WRITE_TERM2"]
        # COPY_RM: RMS = B (R, N) fp32 (forward) or A's (K, R) fp32 rows (dS pass), RMC its copy in x's dtype with
        # rows padded to 16 bytes; else both the output (ops.py)
        meta.setdefault("COPY_RM", False)
        copy = meta["COPY_RM"]
        if not copy:
            copy_strides = dict(stride_sr=0, stride_sn=0, stride_cr=0, stride_cn=0)
        elif job.kernel == "xa_proj":
            copy_strides = dict(stride_sr=N, stride_sn=1, stride_cr=N, stride_cn=1)
        else:
            copy_strides = dict(stride_sr=1, stride_sn=R, stride_cr=1, stride_cn=-(-R // 8) * 8)
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(adapters), OUT_ptr=_Ptr("fp32"), L_ptr=_Ptr("fp32"),
                    PARTIAL_ptr=_Ptr("fp32"), SEED_ptr=_Ptr("i64" if dropout else "fp32"), SPLIT_ptr=_Ptr("fp32"),
                    GRAD_ptr=_Ptr(adapters), COUNTER_ptr=_Ptr("i32"), MASK_ptr=_Ptr("u8" if write_mask else "fp32"),
                    TERM_ptr=_Ptr(x if term else "fp32"), F_ptr=_Ptr("fp32"),
                    TERM2_ptr=_Ptr(x if term2 else "fp32"), F2_ptr=_Ptr("fp32"),
                    RMS_ptr=_Ptr("fp32"), RMC_ptr=_Ptr(x if copy else "fp32"), N_RM=N if copy else 0,
                    **copy_strides, COPY_N=max(16, cfg.COPY_RM_ELEMENTS // cfg.block_r(R)) if copy else 0,
                    M=M, K=K, R=R, M_BUCKET=M, ROWS_PER_PROGRAM=2 * cfg.PROJ_BLOCK_M, K_PER_SPLIT=K // 4, **strides,
                    stride_om=R, stride_or=1, stride_lm=R, stride_lr=1, stride_gr=K, stride_gk=1,
                    stride_mask=K // 8 if write_mask else 0, stride_tm=-(-R // 8) * 8 if term else 0,
                    out_scale=1.0 / 0.9, grad_scale=0.5, dropout_p=0.1, term_scale=0.5, term2_scale=0.0,
                    BLOCK_M=cfg.PROJ_BLOCK_M)
        return lowrank_proj_kernel, dict(args, **common, **meta)
    if job.kernel == "da_reduce":
        # P = x (M, K), L = dS (M, R) fp32; ROWS_PER_SPLIT is a multiple of REDUCE_BLOCK_M
        # OUT = dA (K, R) in x's dtype; COUNTER int32
        # the keep-mask with dropout: its bits (MASK, uint8 rows of K / 8 bytes); without, the pointer is dA (ops.py)
        args = dict(P_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), PARTIAL_ptr=_Ptr("fp32"), OUT_ptr=_Ptr(x),
                    COUNTER_ptr=_Ptr("i32"), MASK_ptr=_Ptr("u8" if dropout else x),
                    M=M, K=K, R=R, ROWS_PER_SPLIT=16 * cfg.reduce_blocks(job_dtype)[0], M_BUCKET=M, stride_pm=K,
                    stride_pk=1, stride_lm=R, stride_lr=1, stride_ok=R, stride_or=1,
                    stride_mask=K // 8 if dropout else 0, scale=0.5,
                    BLOCK_M=cfg.reduce_blocks(job_dtype)[0], BLOCK_K=cfg.reduce_blocks(job_dtype)[1])
        return reduce_m_kernel, dict(args, **common, **meta)
    if job.kernel in MULTI_KERNELS:
        return _multi_launch_args(job, x, common, R, M, N, K, meta)
    if job.kernel == "dora_norm_4bit":
        return _dora_launch_args(job, x, R, M, N, K, meta)
    if job.kernel in NO_FMA_KERNELS:
        return _launch_args_4bit(job, x, common, meta)
    if job.kernel == "grad_finish":
        # PARTIAL (splits, K, R) fp32 -> OUT (K, R) in the adapters' dtype (x's dtype: the narrowest store)
        args = dict(PARTIAL_ptr=_Ptr("fp32"), OUT_ptr=_Ptr(x), SPLITS=4, ROWS=K, COLS=R, NUMEL=K * R, stride_or=R,
                    stride_oc=1, scale=0.5, BLOCK=cfg.FINISH_BLOCK)
        return sum_partials_kernel, dict(args, **meta)
    if job.kernel in DORA_KERNELS:
        return _dora_launch_args(job, x, R, M, N, K, meta)
    raise ValueError(f"kernel must be one of {KERNELS}, got {job.kernel!r}")


def _multi_launch_args(job: Job, x: str, common: dict, R: int, M: int, N: int, K: int, meta: dict) -> tuple:
    """(kernel, arguments) of kernels/multi.py's launches: 8 adapters, each factor read through the int64
    adapter table (its rows: addresses or gradient offsets, strides, ranks; the strides are runtime values, as
    the launcher passes them); the int64 index; sorted, the int64 permutation and segment starts (unsorted, the
    index stands in for them, as the launcher passes it); the (n,) fp32 rows of the constants table; with dropout
    the keep-mask's bits (MASK, uint8 rows of philox.mask_row_bytes(K) bytes: written by multi_proj, read by dX
    and dA), without it another tensor of the launch stands in (as the launchers pass it)."""
    from . import philox
    from .kernels import multi

    n = 8
    meta = dict(meta)
    adapters = "fp32" if meta.pop("Q_FP32", False) else x
    dropout = meta.get("HAS_DROPOUT", False)
    per_adapter = dict(IDX_ptr=_Ptr("i64"), PERM_ptr=_Ptr("i64"))
    mask = dict(stride_mask=philox.mask_row_bytes(K) if dropout else 0)
    table = dict(RANK_ptr=_Ptr("i64"))
    if job.kernel == "multi_proj":   # the forward: P = x (M, K), Q = A (n, K, R), OUT = S (M, R) fp32
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(adapters), **per_adapter, ROW_SCALE_ptr=_Ptr("fp32"),
                    DROP_P_ptr=_Ptr("fp32"), SEED_ptr=_Ptr("i64" if dropout else "fp32"), OUT_ptr=_Ptr("fp32"),
                    M=M, K=K, R=R, N_ADAPTERS=n, stride_pm=K, stride_pk=1, stride_om=R, stride_or=1,
                    MASK_ptr=_Ptr("u8" if dropout else "fp32"), **mask, QT_ptr=_Ptr("i64"), **table)
        return multi.multi_proj_kernel, dict(args, **common, **meta)
    if job.kernel == "multi_gemm":
        fwd = meta.pop("MULTI_FWD")
        # forward: P = x, Q = W^T ((k, n) -> weight[n, k]), RM = B[a] (R, N); dX: P = dY (M, N_out), Q = W as
        # stored, RM = A[a]^T ((r, k) -> A[a, k, r]); L = S or dS (M, R) fp32
        args = dict(P_ptr=_Ptr(x), Q_ptr=_Ptr(x), BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(adapters),
                    **per_adapter, ROW_SCALE_ptr=_Ptr("fp32"), OUT_ptr=_Ptr(x),
                    MASK_ptr=_Ptr("u8" if dropout else x), **mask, M=M, N=N if fwd else K, K=K if fwd else N, R=R,
                    N_ADAPTERS=n, stride_pm=K if fwd else N, stride_pk=1, stride_qk=1 if fwd else K,
                    stride_qn=K if fwd else 1, stride_lm=R, stride_lr=1, stride_om=N if fwd else K, stride_on=1,
                    RMT_ptr=_Ptr("i64"), **table)
        return multi.multi_gemm_kernel, dict(args, **common, **meta)
    # multi_reduce: dA (n, K, R) from x and dS, dB (n, R, N) from dY and S, in the adapters' dtype (x's)
    args = dict(X_ptr=_Ptr(x), DS_ptr=_Ptr("fp32"), DA_ptr=_Ptr(adapters), DY_ptr=_Ptr(x), S_ptr=_Ptr("fp32"),
                DB_ptr=_Ptr(adapters), **per_adapter, SEG_ptr=_Ptr("i64"), DA_SCALE_ptr=_Ptr("fp32"),
                DB_SCALE_ptr=_Ptr("fp32"), MASK_ptr=_Ptr("u8" if dropout else "fp32"), **mask,
                M=M, K=K, N=N, R=R, K_BLOCKS=K // 64, stride_xm=K, stride_xk=1, stride_dsm=R, stride_dsr=1,
                stride_dym=N, stride_dyn=1, stride_sm=R, stride_sr=1, DAT_ptr=_Ptr("i64"), DBT_ptr=_Ptr("i64"),
                **table)
    return multi.multi_reduce_kernel, dict(args, **common, **meta)


def _dora_launch_args(job: Job, x: str, R: int, M: int, N: int, K: int, meta: dict) -> tuple:
    """(kernel, arguments) of the DoRA launches of kernels/dora.py: contiguous (M, N) and (M, K) tensors, the
    (N, K) weight as stored."""
    from .kernels import dora

    blocks = dora.ELEMENTWISE_BLOCK
    if job.kernel == "dora_norm":
        # the weight in x's dtype; A, B and the magnitude fp32 (PEFT's adapters on a 16-bit base)
        blk = dora.norm_block(R)
        args = dict(W_ptr=_Ptr(x), A_ptr=_Ptr("fp32"), B_ptr=_Ptr("fp32"), MAG_ptr=_Ptr("fp32"),
                    NORM_ptr=_Ptr("fp32"), GSCALE_ptr=_Ptr("fp32"), N=N, K=K, R=R, stride_wn=K, stride_wk=1,
                    stride_ak=R, stride_ar=1, stride_br=N, stride_bn=1, scale=0.5, **blk)
        return dora.dora_norm_kernel, dict(args, **meta)
    if job.kernel == "dora_norm_4bit":
        # blocksize 64 (QLoRA's), fp32 absmax or uint8 codes with a 256-block fp32 absmax when nested; the
        # quantized dtype is the compute dtype; A, B and the magnitude fp32
        import triton.language as tl

        blk = dora.norm_block(R)
        nested = meta["NESTED"]
        w_dtype = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[x.split("/")[0]]
        args = dict(W_ptr=_Ptr("u8"), CODE_ptr=_Ptr("fp32"), ABSMAX_ptr=_Ptr("u8" if nested else "fp32"),
                    CODE2_ptr=_Ptr("fp32"), ABSMAX2_ptr=_Ptr("fp32"), OFFSET_ptr=_Ptr("fp32"), A_ptr=_Ptr("fp32"),
                    B_ptr=_Ptr("fp32"), MAG_ptr=_Ptr("fp32"), NORM_ptr=_Ptr("fp32"), GSCALE_ptr=_Ptr("fp32"),
                    N=N, K=K, R=R, stride_ak=R, stride_ar=1, stride_br=N, stride_bn=1, scale=0.5, **blk,
                    QBLOCK=64, QBLOCK2=256, W_DTYPE=w_dtype, X_DTYPE=w_dtype, NEAREST_BF16=False)
        return dora.dora_norm_4bit_kernel, dict(args, **meta)
    if job.kernel == "dora_scale":
        args = dict(U_ptr=_Ptr("fp32"), BASE_ptr=_Ptr(x), GSCALE_ptr=_Ptr("fp32"), NORM_ptr=_Ptr("fp32"),
                    BIAS_ptr=_Ptr(x), OUT_ptr=_Ptr(x), V_ptr=_Ptr(x), M=M, N=N, stride_um=N, stride_un=1,
                    stride_bm=N, stride_bn=1, stride_om=N, stride_on=1, stride_vm=N, stride_vn=1, **blocks)
        return dora.dora_scale_kernel, dict(args, **meta)
    if job.kernel == "dora_grad":
        args = dict(DY_ptr=_Ptr(x), V_ptr=_Ptr(x), GSCALE_ptr=_Ptr("fp32"), DYG_ptr=_Ptr(x), DYG1_ptr=_Ptr(x),
                    PARTIAL_ptr=_Ptr("fp32"), M=M, N=N, ROWS_PER_SPLIT=16 * blocks["BLOCK_M"], stride_dm=N,
                    stride_dn=1, stride_vm=N, stride_vn=1, stride_gm=N, stride_gn=1, **blocks)
        return dora.dora_grad_kernel, dict(args, **meta)
    # dora_combine: T (M, K), BASE (M, K), OUT (M, K), the forward's keep-mask bits (uint8 rows of K / 8 bytes)
    args = dict(T_ptr=_Ptr(x), BASE_ptr=_Ptr(x), OUT_ptr=_Ptr(x), MASK_ptr=_Ptr("u8"), M=M, K=K, stride_tm=K,
                stride_tk=1, stride_bm=K, stride_bk=1, stride_om=K, stride_ok=1, stride_mask=K // 8,
                keep_scale=1.0 / 0.9,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_K=blocks["BLOCK_N"])
    return dora.dropout_combine_kernel, dict(args, **meta)


def _launch_args_4bit(job: Job, x: str, common: dict, meta: dict) -> tuple:
    """The 4-bit kernels as ops_4bit.py launches them: an (N, K) weight packed two codes per byte, blocksize 64
    (QLoRA's), fp32 absmax, or uint8 codes with a 256-block fp32 absmax and offset when nested; the weight's
    dtype is the compute dtype (a model quantized from its own dtype)."""
    import triton.language as tl

    from .kernels.nf4 import dequant_4bit_kernel, gemm_4bit_lowrank_kernel, gemm_4bit_lowrank_tma_kernel

    M = N = K = _SIZE
    R = job.rank
    nested = meta["NESTED"]
    weight = dict(W_ptr=_Ptr("u8"), CODE_ptr=_Ptr("fp32"), ABSMAX_ptr=_Ptr("u8" if nested else "fp32"),
                  CODE2_ptr=_Ptr("fp32"), ABSMAX2_ptr=_Ptr("fp32"), OFFSET_ptr=_Ptr("fp32"))
    weight_meta = dict(QBLOCK=64, QBLOCK2=256, NEAREST_BF16=False,
                       W_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[job.dtype])
    if job.kernel == "dequant_4bit":
        return dequant_4bit_kernel, dict(weight, OUT_ptr=_Ptr(x), NUMEL=N * K, BLOCK=_dequant_block(),
                                         **weight_meta, **meta)
    dropout = meta.get("HAS_DROPOUT", False)
    if job.kernel in QLORA_TMA_KERNELS:
        # as the cp.async kernel's below, P by rows only; NUM_SMS of an H100 / H200
        fwd = job.kernel == "fwd_gemm_4bit_tma"
        args = dict(P_ptr=_Ptr(x), **weight, BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(x),
                    OUT_ptr=_Ptr(x), MASK_ptr=_Ptr("u8" if dropout else x), M=M, N=N if fwd else K,
                    K=K if fwd else N, R=R, M_BUCKET=M, W_COLS=K, stride_pm=K if fwd else N, stride_lm=R,
                    stride_lr=1, stride_rr=N if fwd else 1, stride_rn=1 if fwd else R, stride_om=N if fwd else K,
                    stride_on=1, stride_mask=K // 8 if dropout else 0, lowrank_scale=0.5, NUM_SMS=132,
                    TRANSPOSE_W=fwd)
        return gemm_4bit_lowrank_tma_kernel, dict(args, **weight_meta, **common, **meta)
    if job.kernel == "fwd_gemm_4bit":
        # P = x (M, K); Q = deq(W)^T; L = S fp32; RM = B (R, N)
        args = dict(P_ptr=_Ptr(x), **weight, BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(x),
                    OUT_ptr=_Ptr(x), MASK_ptr=_Ptr(x), M=M, N=N, K=K, R=R, M_BUCKET=M, W_COLS=K,
                    stride_pm=K, stride_pk=1, stride_lm=R, stride_lr=1,
                    stride_rr=N, stride_rn=1, stride_om=N, stride_on=1, stride_mask=0, lowrank_scale=0.5,
                    TRANSPOSE_W=True)
    else:
        # P = dY (M, N); Q = deq(W) (N, K); L = dS fp32; RM = A^T: (r, k) -> A[k, r]
        args = dict(P_ptr=_Ptr(x), **weight, BIAS_ptr=_Ptr(x), L_ptr=_Ptr("fp32"), RM_ptr=_Ptr(x),
                    OUT_ptr=_Ptr(x), MASK_ptr=_Ptr("u8" if dropout else x), M=M, N=K, K=N, R=R, M_BUCKET=M,
                    W_COLS=K, stride_pm=N, stride_pk=1, stride_lm=R, stride_lr=1,
                    stride_rr=1, stride_rn=R, stride_om=K, stride_on=1, stride_mask=K // 8 if dropout else 0,
                    lowrank_scale=0.5,
                    TRANSPOSE_W=False)
    return gemm_4bit_lowrank_kernel, dict(args, **weight_meta, **common, **meta)


def _dequant_block() -> int:
    from .kernels.ops_4bit import DEQUANT_BLOCK

    return DEQUANT_BLOCK


def specialise(fn, args: dict, constexpr_names: set, backend) -> tuple:
    """(signature, constexprs, attrs) for ASTSource, specialised as Triton's JIT does at a launch.

    Pointers get tt.divisibility 16; an int equal to 1 becomes the constant 1 (its stride folds away); an int
    divisible by 16 gets tt.divisibility 16; floats are fp32. Keys are argument positions, as both Triton 3.6
    and 3.9 accept; the attribute format comes from the backend's own parse_attr.
    """
    missing = [n for n in fn.arg_names if n not in args]
    extra = [n for n in args if n not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"arguments of {fn.__name__}: missing {missing}, unknown {extra}")
    aligned = backend.parse_attr("D")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if name in constexpr_names or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, _Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = aligned
        elif isinstance(value, _Desc):   # as Triton's JIT types a TensorDescriptor (no attributes)
            signature[name] = f"tensordesc<{value.dtype}[{','.join(map(str, value.block))}]>"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {fn.__name__}: cannot specialise {value!r}")
    return signature, constexprs, attrs


# --------------------------------------------------------------------------------------------- compiling
def _tool(name: str) -> str:
    """Path of a CUDA binary shipped inside the Triton wheel (knobs on 3.4+, else the wheel's bin folder)."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name).path
    except (ImportError, AttributeError, RuntimeError):
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if not os.path.exists(path):
            raise RuntimeError(f"{name} not found in the Triton wheel ({path})") from None
        return path


def constexpr_names(fn) -> set:
    """Names of the ``tl.constexpr`` parameters of a jitted (or interpreted) kernel."""
    import inspect

    import triton.language as tl

    params = inspect.signature(fn.fn).parameters.values()
    return {p.name for p in params if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def _config_label(job: Job) -> str:
    c = job.config
    if "BLOCK_N" in c:
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
    if "BLOCK_K" in c:
        return f"BK{c['BLOCK_K']}"
    if "BLOCK_C" in c:   # the multi-adapter gradient reduction: rows x columns per step
        return f"BM{c['BLOCK_M']}xBC{c['BLOCK_C']}"
    return "-"


def compile_job(job: Job) -> Row:
    """Compile ``job`` for its target and read registers, spills, shared memory and SASS instruction counts.

    Must run where TRITON_INTERPRET is off when lora_fast.kernels is first imported (``run_jobs`` sees to it)
    and TRITON_DUMP_PTXAS_LOG=1 with an empty Triton cache, so that ptxas runs and its log can be read.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from .kernels import configs as cfg

    cap = TARGETS[job.target]
    row = Row(job.kernel, job.variant, _dtype_label(job.dtype, job.fp32_precision), job.target, job.rank,
              cfg.block_r(job.rank), _config_label(job), job.num_warps, job.num_stages)
    fn, args = launch_args(job)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{fn!r} is not a JITFunction: import lora_fast.kernels with TRITON_INTERPRET=0")
    target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
    signature, constexprs, attrs = specialise(fn, args, constexpr_names(fn), make_backend(target))
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # 3.9's FP-fusion default notice, once per worker
            options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
            if job.kernel in NO_FMA_KERNELS:
                options["enable_fp_fusion"] = False
            source = ASTSource
            if job.kernel in WS_KERNELS:   # a Gluon kernel, with the register cap its launcher sets
                from triton.experimental.gluon._runtime import GluonASTSource

                source = GluonASTSource
                options["maxnreg"] = cfg.ws_maxnreg(job.num_warps)
            compiled = triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        row.failures = ["does not compile"]
        return row
    row.compile_s = round(time.perf_counter() - start, 2)
    row.shared = int(compiled.metadata.shared)
    row.scratch = int(getattr(compiled.metadata, "global_scratch_size", 0))
    row.tensormaps = len(re.findall(r"\btensormap\.(?:replace|cp_fenceproxy)|\bfence\.proxy\.tensormap",
                                    compiled.asm["ptx"]))
    ptxas_log = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if regs is None or spills is None:
        row.error = "no ptxas log (TRITON_DUMP_PTXAS_LOG unset or a cached kernel)"
    else:
        row.registers = int(regs.group(1))
        row.spill_stores, row.spill_loads = int(spills.group(1)), int(spills.group(2))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    row.mma_name = "HGMMA" if cap[0] >= 9 else "HMMA"
    # opcodes sit after the "/*addr*/" column; HMMA is not a prefix of HGMMA, so plain word matches suffice
    row.mma = len(re.findall(rf"\b{row.mma_name}\.", sass))
    row.tma_loads = len(re.findall(r"\bUTMALDG\b", sass))
    row.global_loads = len(re.findall(r"\bLDG\b", sass))
    row.setmaxnreg = len(re.findall(r"\bUSETMAXREG\b", sass))
    row.instructions = len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.MULTILINE))
    row.failures = check(row, job)
    return row


def check(row: Row, job: Job) -> list:
    """The checks of the report: no spill, shared memory within the target's limit, tensor cores in GEMMs."""
    from .kernels import configs as cfg

    failures = []
    if row.error:
        failures.append(row.error)
    if row.spill_stores or row.spill_loads:
        failures.append(f"spills {row.spill_stores} B stored / {row.spill_loads} B loaded")
    limit = cfg.smem_limit(TARGETS[job.target])
    if row.shared is not None and row.shared > limit:
        failures.append(f"shared memory {row.shared} B > {limit} B")
    if job.kernel in GEMM_KERNELS + MULTI_KERNELS and job.dtype in ("fp16", "bf16") and not row.mma:
        failures.append(f"no {row.mma_name} in a {job.dtype} GEMM")
    if job.kernel in WS_KERNELS and not row.setmaxnreg:
        failures.append("no USETMAXREG in the warp-specialised GEMM")
    if job.kernel in (TMA_KERNELS + WS_KERNELS + QLORA_TMA_KERNELS) and not row.tma_loads:
        failures.append("no TMA load (UTMALDG) in the TMA GEMM")
    if job.config.get("HOST_DESC") and (row.tensormaps or row.scratch):
        failures.append(f"host-side descriptors, yet {row.tensormaps} tensor-map instructions and {row.scratch} B "
                        "of scratch")
    return failures


@contextlib.contextmanager
def _worker_env(cache_dir: str):
    """Environment the compile workers start with; restored afterwards (the caller may be a test session)."""
    wanted = {"TRITON_INTERPRET": "0", "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache_dir}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_jobs(jobs: Sequence[Job], workers: int = 0, progress=None) -> list:
    """Compile ``jobs`` in ``workers`` fresh processes (0: one per CPU) and return their rows in job order.

    Fresh (spawned) processes import the kernels with TRITON_INTERPRET=0, so this works from a process that
    runs them in the interpreter (the test session), and they use an empty Triton cache, so ptxas runs.
    ``progress(done, total)`` is called after each compilation when given.
    """
    workers = workers or os.cpu_count() or 1
    cache_dir = tempfile.mkdtemp(prefix="lora_fast_compile_report_")
    rows = [None] * len(jobs)
    try:
        with _worker_env(cache_dir), ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
            for done, future in enumerate(as_completed(futures), 1):
                rows[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(jobs))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------- output
_COLUMNS = ("kernel", "variant", "target", "dtype", "R", "config", "warps", "stages", "regs", "spill st/ld",
            "smem B", "MMA", "TMA", "LDG", "SASS", "tmap", "check")


def _cells(row: Row) -> list:
    def num(v):
        return "?" if v is None else str(v)
    mma = "?" if row.mma is None else f"{row.mma} {row.mma_name}"
    return [row.kernel, row.variant, row.target, row.dtype, str(row.block_r), row.config, str(row.num_warps),
            str(row.num_stages), num(row.registers), f"{num(row.spill_stores)}/{num(row.spill_loads)}",
            num(row.shared), mma, num(row.tma_loads), num(row.global_loads), num(row.instructions),
            num(row.tensormaps), "; ".join(row.failures) or "ok"]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table, or a GitHub markdown table with ``markdown=True``."""
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(_COLUMNS, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                     for cells in [list(_COLUMNS), *body])


def _progress_printer(stream, every: int, start: float):
    """``progress(done, total)`` for ``run_jobs``: one line counting up in place on a terminal; on a file or a
    pipe (a CI log, ``> report.txt 2>&1``) a line every ``every`` compilations and at the end, with the time."""
    def progress(done, total):
        if stream.isatty():
            print(f"\rcompiled {done}/{total}", end="" if done < total else "\n", file=stream, flush=True)
        elif every and (done % every == 0 or done == total):
            print(f"compiled {done}/{total} ({time.perf_counter() - start:.0f} s)", file=stream, flush=True)
    return progress


def summary(rows: Sequence[Row]) -> list:
    """One dict per (kernel, target): compilations, the largest register count, spill bytes and shared memory,
    and how many rows fail; in the order the rows come."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    def most(rs, name):
        values = [getattr(r, name) for r in rs if getattr(r, name) is not None]
        return max(values) if values else None

    out = []
    for (kernel, target), rs in groups.items():
        spill = [(r.spill_stores or 0) + (r.spill_loads or 0) for r in rs]
        # tensor cores are checked in the 16-bit rows (fp32 with input_precision "ieee" has none, by design)
        mma = [r.mma for r in rs if r.mma is not None and r.dtype in ("fp16", "bf16")]
        out.append(dict(kernel=kernel, target=target, compilations=len(rs), max_regs=most(rs, "registers"),
                        max_spill=max(spill), max_smem=most(rs, "shared"), min_mma=min(mma) if mma else None,
                        mma_name=rs[0].mma_name, fail=sum(bool(r.failures) for r in rs)))
    return out


def markdown_page(rows: Sequence[Row], command: str, elapsed: float, full: Optional[int] = None) -> str:
    """A markdown page of the report: the command that made it, the versions, a summary per kernel and target,
    and every row (the table ``--markdown`` prints), one section per target. ``full``: the number of
    compilations of the full report when ``rows`` are a subset of it (the page says so)."""
    import platform

    import torch
    import triton

    from . import _version

    failed = sum(bool(r.failures) for r in rows)
    try:   # the source the kernels came from, when run from a git checkout
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    source = f"lora-fast {_version.__version__}" + (f" at {commit}" if commit else "")
    lines = ["# Compile report", "",
             f"Generated by `{command}` ({source}, triton {triton.__version__}, torch "
             f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}; {elapsed:.0f} s). Regenerate it with the same command; "
             "do not edit it by hand.", "",
             f"**{len(rows)} compilations: {len(rows) - failed} pass, {failed} fail.** "
             + (f"A subset of the full report's {full} compilations (`python -m lora_fast.compile_report`, every "
                "config, variant, dtype and rank on both targets). " if full is not None and full != len(rows) else "")
             +
             "Compile-time facts from a machine without a GPU, not measurements: the GPU image may run another "
             "Triton version, whose numbers differ.", "",
             "## Columns", "", _LEGEND.replace("\n", " ").replace("columns: ", "", 1), "",
             "## Summary per kernel and target", "",
             "| kernel | target | compilations | max regs | max spill B | max smem B | min MMA (16-bit) | failing |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        def num(v):
            return "?" if v is None else str(v)
        mma = "-" if s["min_mma"] is None else f"{s['min_mma']} {s['mma_name']}"
        lines.append(f"| {s['kernel']} | {s['target']} | {s['compilations']} | {num(s['max_regs'])} | "
                     f"{s['max_spill']} | {num(s['max_smem'])} | {mma} | {s['fail']} |")
    for target in dict.fromkeys(r.target for r in rows):
        lines += ["", f"## Every compilation, {target}", "",
                  format_table([r for r in rows if r.target == target], markdown=True)]
    return "\n".join(lines) + "\n"


_LEGEND = """columns: kernel, variant (bias / dropout / dB-partials / - for none), target, dtype, R (LoRA rank),
config (BLOCK_M x BLOCK_N x BLOCK_K, or BLOCK_K of the narrow kernels), warps, stages, regs (registers per
thread), spill st/ld (spill bytes stored / loaded, from ptxas), smem B (shared memory per block), MMA
(tensor-core instructions in the SASS: HGMMA on sm_90, HMMA on sm_80; counted in the code, not executed),
TMA (UTMALDG bulk tensor loads), SASS (instructions in the kernel's code, each loop body counted once: how
kernel variants compare without a GPU), tmap (PTX instructions creating device-side tensor maps: tensormap.replace,
tensormap.cp_fenceproxy, fence.proxy.tensormap; 0 with host-side descriptors), check (ok, or why the row fails).
Compiled with the installed triton: the GPU image may run another version, whose numbers differ."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: print the table, optionally write JSON; exit status 1 when a row fails a check."""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_LEGEND,
                                     prog="python -m lora_fast.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--target", nargs="+", choices=list(TARGETS), default=list(TARGETS),
                        help="GPU architectures: sm_80 (A100), sm_90 (H100/H200)")
    parser.add_argument("--kernel", nargs="+", choices=list(KERNELS), default=list(KERNELS),
                        help="fwd_gemm: y = x W^T + b + scale S B; dx_gemm: dX = dY W + scale dS A^T (with the "
                             "dropout mask); xa_proj: S = dropout(x) A; dyb_proj: dS = dY B^T, with the dB "
                             "partials S^T dY when 4 * rank < PROJ_BLOCK_M (rank 16: yes, rank 64: no, then dB "
                             "runs on da_reduce's kernel); da_reduce: dA = dropout(x)^T dS; grad_finish: dA, dB "
                             "= scale * sum of their partials, cast; fwd_gemm_tma, dx_gemm_tma: the persistent "
                             "TMA GEMM (sm_90, 16-bit); fwd_gemm_ws, dx_gemm_ws: the warp-specialised Gluon GEMM "
                             "(opt-in LORA_FAST_GEMM=ws; sm_90, bf16; rows fail without USETMAXREG); "
                             "fwd_gemm_4bit, dx_gemm_4bit: the GEMMs on a 4-bit (NF4/FP4, "
                             "QLoRA) weight dequantized per tile; fwd_gemm_4bit_tma, dx_gemm_4bit_tma: their "
                             "persistent TMA variant (opt-in LORA_FAST_GEMM_4BIT=tma; sm_90, 16-bit); "
                             "dequant_4bit: the 4-bit weight into a 16-bit scratch buffer; dora_*: DoRA's norm, "
                             "column scale, backward prologue and dropout combine (kernels/dora.py)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="input dtype (fp32 rows use input_precision 'ieee', torch's default)")
    parser.add_argument("--rank", nargs="+", type=int, default=list(RANKS),
                        help="LoRA ranks (BLOCK_R = max(16, next power of two)); default: 16 64")
    parser.add_argument("--tf32", action="store_true",
                        help="also fp32 rows with input_precision='tf32' (torch's 'high' matmul precision)")
    parser.add_argument("--first-config", action="store_true", help="only the first config of each list")
    parser.add_argument("--heaviest-variant", action="store_true",
                        help="one flag set per kernel: the one with bias / dropout / partials")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", nargs="?", const="-",
                        help="without PATH: print the table as markdown; with PATH: print the text table and "
                             "write a markdown page to PATH (the command, versions, a summary per kernel and "
                             "target, and every row; docs/compile-report.md is made this way)")
    parser.add_argument("--progress-every", metavar="N", type=int, default=25,
                        help="when stderr is not a terminal, print a progress line every N compilations "
                             "(default 25; 0: none); on a terminal one line counts up in place")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.rank):
        parser.error(f"--rank: ranks must be >= 1, got {args.rank}")
    if args.progress_every < 0:
        parser.error(f"--progress-every: must be >= 0, got {args.progress_every}")

    jobs = make_jobs(args.target, args.kernel, args.dtype, args.rank, first_config=args.first_config,
                     fp32_precisions=("ieee", "tf32") if args.tf32 else ("ieee",),
                     variants="heaviest" if args.heaviest_variant else "all")

    start = time.perf_counter()
    progress = _progress_printer(sys.stderr, args.progress_every, start)
    print(f"compiling {len(jobs)} kernels ({args.jobs or os.cpu_count() or 1} processes)", file=sys.stderr,
          flush=True)
    rows = run_jobs(jobs, args.jobs, progress)
    elapsed = time.perf_counter() - start
    print(format_table(rows, markdown=args.markdown == "-"))
    failed = [r for r in rows if r.failures]
    import triton
    print(f"\n{len(rows)} compilations (triton {triton.__version__}) in {elapsed:.0f} s: "
          f"{len(rows) - len(failed)} pass, {len(failed)} fail", file=sys.stderr)
    if args.markdown not in (None, "-"):
        given = list(sys.argv[1:] if argv is None else argv)
        if "--json" in given:   # where the JSON went is no part of what the page shows
            at = given.index("--json")
            del given[at:at + 2]
        command = shlex.join(["python", "-m", "lora_fast.compile_report", *given])
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown_page(rows, command, elapsed, full=len(make_jobs())))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
