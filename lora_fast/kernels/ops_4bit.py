"""Launchers of the fused LoRA linear on a 4-bit base (QLoRA): the per-tile dequantizing GEMM (forward y and
backward dX), the dequantization kernel, and the two paths built from them.

Shapes: x (M, K), the packed weight of logical shape (N, K) (``lora_fast.qlora.Packed4bit``: bitsandbytes'
layout), bias (N,), A (K, R), B (R, N), dy (M, N). Maths: LoRA (Hu et al. 2021, eq. 3) on a frozen 4-bit
NormalFloat / FP4 base (QLoRA, Dettmers et al. 2023): y = x deq(W)^T + b + scale * dropout(x) A B. The narrow
passes (S = dropout(x) A; dS = dY B^T with the dB partials; dA) are the 16-bit op's launchers, unchanged.

Two paths, the same results up to fp32 summation order:
- "fused": the GEMM reads the packed codes and dequantizes each tile in registers before the MMA; nothing of
  size N x K in 16 bits is written. "tma" (opt-in: ``LORA_FAST_GEMM_4BIT=tma``; no GPU has run it yet) is the
  same path with the persistent TMA variant of that GEMM on sm_90 and newer (``gemm_4bit_lowrank_tma_kernel``),
  where ``tma_eligible_4bit`` accepts the operands, and the cp.async kernel otherwise (chosen before launch).
- "dequant": one dequantization pass into an (N, K) scratch weight in the compute dtype, then the 16-bit op's
  launchers (``ops.lora_forward`` / ``ops.lora_backward``) on it; the scratch is freed when the call returns
  (forward and backward each make their own).

With dropout, both paths draw the keep-mask once per step: the forward's S = dropout(x) A pass stores it
bit-packed (``keep_out``, ``ops.new_keep_mask``) and the backward's dX GEMM and dA pass read those bits (issue 28).
"""

import torch
import triton

from .. import philox
from . import configs, ops
from .nf4 import dequant_4bit_kernel, gemm_4bit_lowrank_kernel, gemm_4bit_lowrank_tma_kernel

_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the 4-bit GEMM. Each weight tile is dequantized in
# registers (a byte tile split into nibbles, a 16-entry code-table lookup per element, one absmax per tile row)
# before it goes to shared memory for the MMA, so the tiles are those of the 16-bit lists (configs.py) that leave
# registers for that: the 128x256 tiles are left out. Unmeasured on a GPU; compile report (triton 3.9, sm_80 and
# sm_90, fp16/bf16/fp32, ranks 16 and 64, with and without dropout and double quantization): no spills. A first
# version that gathered one byte and one absmax per element through an int64 index tile spilled 36 B to 1 KB on
# every sm_90 tile but 64x64 (255 registers); that path is kept for weights whose rows do not hold whole blocks,
# on the tiles of _GEMM_4BIT_ANY_SHAPE.
_GEMM_4BIT = {
    9: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3)],
    8: [(128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3)],
}
_GEMM_4BIT_FP32 = [(32, 32, 32, 4, 3)]
# the TMA variant (sm_90, 16-bit): the tiles of the sm_90 list, 3 stages. Compile report (triton 3.9 and 3.6, sm_90,
# bf16 / fp16, ranks 16 and 64, forward with and without bias, dX with and without dropout, flat and nested
# absmax, absmax by loads or by TMA): no spills, at most 236 registers, 6-9 UTMALDG, 28-78 KB of shared memory (the
# cp.async kernel: 43-136 KB); unmeasured on a GPU
_GEMM_4BIT_TMA = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3)]
# the per-element path (rows that do not hold whole blocks: no real layer): one small tile. 64 rows, since sm_90's
# wgmma needs them (32x32 compiled to no HGMMA); fp32 with BLOCK_K 16 (32x32x32 spilled 4 B in dX with dropout
# at rank 64 on sm_80). Compile report, triton 3.9.
_GEMM_4BIT_ANY_SHAPE = [(64, 64, 32, 4, 3)]
_GEMM_4BIT_ANY_SHAPE_FP32 = [(32, 32, 16, 4, 3)]
# the dequantization kernel: a memory-bound elementwise pass (a byte in, two bytes out per element); 1024
# elements per program with 4 warps is 8 per thread, as configs.FINISH_BLOCK
DEQUANT_BLOCK = 1024
# the nested absmax is a product then a sum in bitsandbytes (two fp32 roundings): no FMA contraction
_NO_FMA = dict(enable_fp_fusion=False)


def gemm_4bit_configs(capability, dtype: torch.dtype) -> list:
    """Autotune configs of ``gemm_4bit_lowrank_kernel`` for a compute capability (major, minor) and compute
    dtype, pruned by shared memory as configs.gemm_configs does."""
    arch = 9 if capability[0] >= 9 else 8
    table = _GEMM_4BIT_FP32 if dtype == torch.float32 else _GEMM_4BIT[arch]
    limit, elt = configs.smem_limit(capability), 4 if dtype == torch.float32 else 2
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in table
        if s * (bm * bk + bk * bn) * elt <= limit
    ]


def gemm_4bit_tma_configs(capability, dtype: torch.dtype) -> list:
    """Autotune configs of ``gemm_4bit_lowrank_tma_kernel`` (16-bit inputs, sm_90 and newer), pruned by shared
    memory: the pipeline's P tile, byte tile and absmax box (16 bytes per weight row) per stage, and the
    dequantized weight tile the MMA reads (a bound of the compiled kernels' shared memory at ranks 16 and 64:
    compile report, sm_90)."""
    limit = configs.smem_limit(capability)
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _GEMM_4BIT_TMA
        if s * (bm * bk * 2 + bk * bn // 2 + max(bn, bk) * 16) + bk * bn * 2 <= limit
    ]


def gemm_4bit_any_shape_configs(capability, dtype: torch.dtype) -> list:
    """The config of ``gemm_4bit_lowrank_kernel`` with ALIGNED=False (per-element gathers)."""
    table = _GEMM_4BIT_ANY_SHAPE_FP32 if dtype == torch.float32 else _GEMM_4BIT_ANY_SHAPE
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in table]


def dequant_configs(capability, dtype: torch.dtype) -> list:
    """The one config of ``dequant_4bit_kernel`` (memory-bound; nothing to tune)."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


_interp = dict(configs.INTERP_GEMM, num_warps=4, num_stages=1)
_gemm_fwd = ops._Launcher(gemm_4bit_lowrank_kernel, gemm_4bit_configs, ["M_BUCKET", "N", "K", "R"], _interp,
                          pointers=12, scalars=1)
# dX reads the weight as stored ((N, K), reduction over N), the forward transposed: tuned apart
_gemm_dx = ops._Launcher(gemm_4bit_lowrank_kernel, gemm_4bit_configs, ["M_BUCKET", "N", "K", "R"], _interp,
                         pointers=12, scalars=1)
# a weight whose rows do not hold whole quantization blocks (in_features % blocksize != 0: no real model has
# one) takes the per-element path on the small fp32 tile
_gemm_any_shape = ops._Launcher(gemm_4bit_lowrank_kernel, gemm_4bit_any_shape_configs, ["M_BUCKET", "N", "K", "R"],
                                _interp, pointers=12, scalars=1)
# the TMA variant (opt-in, "tma"): forward and dX tuned apart, as the cp.async kernel's
_TMA_INTERP = dict(configs.INTERP_GEMM, num_warps=4, num_stages=1)
_gemm_tma_fwd = ops._Launcher(gemm_4bit_lowrank_tma_kernel, gemm_4bit_tma_configs, ["M_BUCKET", "N", "K", "R"],
                              _TMA_INTERP, pointers=12, scalars=1)
_gemm_tma_dx = ops._Launcher(gemm_4bit_lowrank_tma_kernel, gemm_4bit_tma_configs, ["M_BUCKET", "N", "K", "R"],
                             _TMA_INTERP, pointers=12, scalars=1)
_dequant = ops._Launcher(dequant_4bit_kernel, dequant_configs, [], dict(num_warps=4, num_stages=1),
                         pointers=7, scalars=0)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return getattr(tl, _TL_DTYPES[dtype])


def _weight_args(packed):
    """The six pointer arguments of the packed weight; unused nested ones get absmax (never read)."""
    if packed.nested:
        return (packed.data, packed.code, packed.absmax, packed.code2, packed.absmax2, packed.offset)
    return (packed.data, packed.code, packed.absmax, packed.absmax, packed.absmax, packed.absmax)


def _weight_meta(packed):
    return dict(QBLOCK=packed.blocksize, NESTED=packed.nested, QBLOCK2=packed.blocksize2 if packed.nested else 1,
                W_DTYPE=_tl_dtype(packed.dtype), NEAREST_BF16=ops._INTERPRETED)


def dequantize(packed, dtype: torch.dtype) -> torch.Tensor:
    """deq(W) as an (N, K) contiguous tensor in ``dtype``: code_table[code] * absmax in fp32, rounded to the
    quantized tensor's dtype, then to ``dtype`` (bitsandbytes' dequantize_4bit followed by ``.to(dtype)``)."""
    N, K = packed.shape
    out = torch.empty((N, K), dtype=dtype, device=packed.data.device)
    numel = N * K
    if numel:
        _dequant((ops._cdiv(numel, DEQUANT_BLOCK),), *_weight_args(packed), out, numel,
                 BLOCK=DEQUANT_BLOCK, **_weight_meta(packed), **_NO_FMA, device=out.device, dtype=dtype)
    return out


def tma_eligible_4bit(P, packed) -> bool:
    """Whether the TMA variant of the 4-bit GEMM can take these operands: P (M, K') fp16 or bf16 on Hopper or newer
    (any device under the interpreter), with unit stride along its rows, a 16-byte aligned base and row stride
    (tensor descriptors' requirements); the weight's rows holding whole quantization blocks (in_features %
    blocksize == 0, the tiled path) of a multiple of 32 codes (rows of 16-byte multiples), its packed codes
    contiguous from a 16-byte aligned address. Others take the cp.async kernel."""
    if P.dtype not in (torch.float16, torch.bfloat16) or (not ops._INTERPRETED and ops._capability(P.device)[0] < 9):
        return False
    K = packed.shape[1]
    data = packed.data
    return (K % packed.blocksize == 0 and K % 32 == 0 and data.stride(0) == 1 and data.data_ptr() % 16 == 0
            and P.stride(1) == 1 and (P.stride(0) * P.element_size()) % 16 == 0 and P.data_ptr() % 16 == 0)


def absmax_box(packed) -> int:
    """Absmax values per row of the TMA box that loads them in the TMA variant (4 fp32, or 16 uint8 codes when
    nested: 16 bytes, the narrowest box TMA takes), or 0 where the absmax, seen as a (N, in_features / blocksize)
    matrix, has rows that are not 16-byte multiples or is not contiguous from a 16-byte aligned address: the
    kernel then loads it with (cp.async-pipelined) loads."""
    absmax = packed.absmax
    per_row = packed.shape[1] // packed.blocksize
    elt = absmax.element_size()
    if absmax.stride(0) == 1 and absmax.data_ptr() % 16 == 0 and (per_row * elt) % 16 == 0:
        return 16 // elt
    return 0


def gemm_4bit_lowrank(P, packed, transpose: bool, bias, L, RM, rm_strides, lowrank_scale, *, dropout_p=0.0,
                      keep=None, out=None, tma=False):
    """OUT (M, N') in P's dtype = P @ Q (+ bias) + lowrank_scale * (keep ⊙ (L @ RM)), Q = deq(W)^T (N' = N,
    forward, ``transpose``) or deq(W) (N' = K, dX); RM (R, N') given by (tensor, strides). With ``dropout_p`` > 0,
    ``keep`` is the bit-packed keep-mask of the output's N' columns (uint8 (M, ``philox.mask_row_bytes(N')``):
    ``ops.lowrank_project(keep_out=)``, ``rng.packed_keep_mask``). ``tma``: the TMA variant where
    ``tma_eligible_4bit`` accepts the operands (else the cp.async kernel).
    Raises ValueError for dropout without ``keep``."""
    if dropout_p > 0 and keep is None:
        raise ValueError("gemm_4bit_lowrank: dropout_p > 0 needs keep, the bit-packed keep-mask")
    M = P.shape[0]
    N, K = packed.shape
    n_out, k_red = (N, K) if transpose else (K, N)
    R = L.shape[1]
    if out is None:
        out = torch.empty((M, n_out), dtype=P.dtype, device=P.device)
    if tma and tma_eligible_4bit(P, packed):
        return _gemm_4bit_tma(P, packed, transpose, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out)

    def grid(meta):
        return (ops._cdiv(M, meta["BLOCK_M"]) * ops._cdiv(n_out, meta["BLOCK_N"]),)

    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()   # N elements; the kernel reads the bias with unit stride
    # rows of whole quantization blocks (every real layer): the tiled path; other shapes gather per element,
    # on small tiles
    aligned = K % packed.blocksize == 0
    launch = (_gemm_fwd if transpose else _gemm_dx) if aligned else _gemm_any_shape
    dropout = dropout_p > 0
    launch(grid, P, *_weight_args(packed), bias if bias is not None else out, L, RM, out,
           keep if dropout else out,
           M, n_out, k_red, R, ops._m_bucket(M), K,
           P.stride(0), P.stride(1), L.stride(0), L.stride(1), rm_strides[0], rm_strides[1],
           out.stride(0), out.stride(1), keep.stride(0) if dropout else 0,
           float(lowrank_scale),
           BLOCK_R=configs.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
           TRANSPOSE_W=transpose, ALIGNED=aligned, **_weight_meta(packed), DOT_DTYPE=configs.dot_dtype(P.dtype),
           INPUT_PRECISION=configs.input_precision(P.dtype), **_NO_FMA, device=P.device, dtype=P.dtype)
    return out


def _gemm_4bit_tma(P, packed, transpose, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out):
    """The persistent TMA variant (nf4.gemm_4bit_lowrank_tma_kernel) on operands ``tma_eligible_4bit`` accepts."""
    M = P.shape[0]
    N, K = packed.shape
    n_out, k_red = (N, K) if transpose else (K, N)
    R = L.shape[1]
    num_sms = 2 if ops._INTERPRETED else ops._sm_count(P.device)

    def grid(meta):
        return (min(num_sms, ops._cdiv(M, meta["BLOCK_M"]) * ops._cdiv(n_out, meta["BLOCK_N"])),)

    if not ops._INTERPRETED:
        ops._ensure_allocator()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    launch = _gemm_tma_fwd if transpose else _gemm_tma_dx
    dropout = dropout_p > 0
    launch(grid, P, *_weight_args(packed), bias if bias is not None else out, L, RM, out,
           keep if dropout else out,
           M, n_out, k_red, R, ops._m_bucket(M), K,
           P.stride(0), L.stride(0), L.stride(1), rm_strides[0], rm_strides[1], out.stride(0), out.stride(1),
           keep.stride(0) if dropout else 0, float(lowrank_scale),
           BLOCK_R=configs.block_r(R), NUM_SMS=num_sms, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
           TRANSPOSE_W=transpose, ABSMAX_BOX=absmax_box(packed), **_weight_meta(packed),
           DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype), **_NO_FMA,
           device=P.device, dtype=P.dtype)
    return out


def lora_forward_4bit(x, packed, bias, A, B, scale, dropout_p=0.0, seed=None, out=None, *, path="fused",
                      keep_out=None):
    """Forward of the fused LoRA linear on a 4-bit base: y (M, N) in x's dtype (into ``out`` when given) and
    S = dropout(x) @ A (M, R) fp32, which backward needs (with x and, with dropout, the keep-mask's bits; the
    packed weight is read again). The keep-mask comes from ``seed`` (int64, one element) when dropout_p > 0;
    ``keep_out`` (``ops.new_keep_mask(M, K)``): where the S pass also stores it bit-packed, for
    ``lora_backward_4bit(keep=)``. ``path``: "fused", "tma" (the fused path with the TMA GEMM where eligible) or
    "dequant"."""
    if path == "dequant":
        return ops.lora_forward(x, dequantize(packed, x.dtype), bias, A, B, scale, dropout_p, seed, out=out,
                                keep_out=keep_out)
    x = ops._along_k(x, 1)
    S, _, _ = ops.project_input(x, A, dropout_p, seed, keep_out)
    y = gemm_4bit_lowrank(x, packed, True, bias, S, B, (B.stride(0), B.stride(1)), scale, out=out,
                          tma=path == "tma")
    return y, S


def lora_backward_4bit(dy, x, packed, A, B, S, scale, dropout_p=0.0, keep=None, *, need_dx=True, need_dA=True,
                       need_dB=True, path="fused"):
    """Backward on a 4-bit base: (dx, dA, dB), each None when not needed. As ``ops.lora_backward``, with
    dX = dY deq(W) + scale * keep/(1-p) ⊙ (dS A^T) from the 4-bit GEMM ("fused") or from the 16-bit GEMM on a
    dequantized scratch weight ("dequant"). With dropout the keep-mask is ``keep`` (required), the bits the
    forward stored (``lora_forward_4bit(keep_out=)``), read by the dX GEMM and the dA pass: no Philox in the
    backward. Raises ValueError for dropout without ``keep``."""
    if dropout_p > 0 and keep is None:
        raise ValueError("lora_backward_4bit: dropout_p > 0 needs keep, the forward's bit-packed keep-mask")
    if path == "dequant" and need_dx:
        return ops.lora_backward(dy, x, dequantize(packed, dy.dtype), A, B, S, scale, dropout_p,
                                 need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, keep=keep)
    # without dX no path reads the weight: the narrow passes alone
    R = A.shape[1]
    dy, x = ops._along_k(dy, 1), ops._along_k(x, 1)
    dx = dA = dB = None
    if need_dB:
        dB = torch.empty_like(B, memory_format=torch.preserve_format)   # B's layout: see ops._empty_like
    fused_dB = need_dB and 4 * R < ops._proj_block_m()   # as ops.lora_backward
    dS, _ = ops.lowrank_project(dy, B, B.stride(1), B.stride(0), R, partial_of=S if fused_dB else None,
                                grad=dB if fused_dB else None, grad_scale=scale)
    if need_dB and not fused_dB:
        ops.reduce_rows(dy, S, scale, dB, transpose=True)
    dropout_p = philox.quantize(dropout_p)   # what the keep-mask's 8-bit uniforms apply (idempotent)
    keep_scale = 1.0 / (1.0 - dropout_p)
    if need_dx:
        # Q = deq(W) as (N, K); RM = A^T: element (r, k) is A[k, r]
        dx = gemm_4bit_lowrank(dy, packed, False, None, dS, A, (A.stride(1), A.stride(0)), scale * keep_scale,
                               dropout_p=dropout_p, keep=keep, tma=path == "tma")
    if need_dA:
        dA = ops.reduce_rows(x, dS, scale * keep_scale, torch.empty_like(A, memory_format=torch.preserve_format),
                             dropout_p=dropout_p, keep=keep)
    return dx, dA, dB
