"""DoRA kernels and their launchers: the norm without the N x K matrix, the output column scale, the backward
prologue (column-scaled dY and the magnitude's gradient) and the dropout combine.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) as PEFT computes it (use_dora=True):
g = m / ||W + scale (A B)^T||_row (the norm per output feature, detached, paper sec. 4.3) and

    without dropout:  y = g ⊙ (x W^T + scale x A B) + b
    with dropout:     y = x W^T + b + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B,   x_d = dropout(x)

Shapes: x (M, K), weight (N, K) as nn.Linear stores it, A (K, R), B (R, N), magnitude (N,). g = 1 on rows
whose norm is 0 (no direction: the plain LoRA output there).
What is reused: S = dropout(x) A is the narrow projection (lowrank.py); U = x W^T + scale S B (fp32 output for
16-bit x), Y1 = (x - x_d) W^T + b, U = x_d W^T + scale S B and the dX products are the fused GEMM (gemm.py, or
nf4.py's on a 4-bit weight); dS, dA, dB are LoRA's narrow passes; partial sums are finished by
``sum_partials_kernel``. New here: the norm pass (one read of W, or of the packed 4-bit weight, forming
W + scale (A B)^T tile by tile in fp32: no cache, no N x K matrix) and three small memory-bound kernels: the
column scale, the backward prologue and the dropout combine.
"""

import torch
import triton
import triton.language as tl

from .. import philox
from . import configs
from .gemm import gemm_lowrank_kernel
from .nf4 import dequant_tile, dequant_values, round_weight
from .ops import (
    _INTERPRETED,
    _along_k,
    _cdiv,
    _Launcher,
    _m_bucket,
    _proj_block_m,
    _splits,
    finish,
    gemm_lowrank,
    lowrank_project,
    project_input,
    reduce_rows,
    second_term,
    term_for,
)
from .rng import load_keep_bits

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pow2(e):
    """2**e for integer-valued fp32 e in [-126, 127], built from its exponent bits (exact, whatever exp2's
    precision)."""
    return ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_squares(acc, unit, v):
    """Adds the squares of the (BLOCK_N, BLOCK_K) tile ``v`` to ``acc``, kept in units of ``unit**2`` per row (a
    power of two per row, (BLOCK_N,)): unit = 2**ceil(log2 max |v_n|) over the row so far (clamped to
    [2**-126, 2**127]), so that no scaled square overflows fp32 (rows with entries past ~1.8e19) or underflows it
    (rows near 1e-30, whose squares lie below fp32's range), as LAPACK's nrm2 scales its sum of squares. Where the
    unit grows, acc is rescaled by (old / new)**2. Powers of two scale exactly; only parts below ~2**-120 of the
    row's largest square can underflow. Where no square over- or underflowed before, the sum is the unscaled
    one's, bit for bit, times unit**-2. Returns (acc, unit)."""
    top = tl.minimum(tl.maximum(tl.max(tl.abs(v), axis=1), unit), 1.7014118346046923e38)   # 2**127
    e = tl.ceil(tl.log2(tl.maximum(top, 1.1754943508222875e-38)))                          # 2**-126
    e = tl.minimum(tl.maximum(e, -126.0), 127.0)
    new = _pow2(e)
    ratio = unit * _pow2(-e)
    acc = acc * (ratio * ratio)[:, None]
    w = v * _pow2(-e)[:, None]
    return acc + w * w, new


@triton.jit
def _store_norm(acc, unit, MAG_ptr, NORM_ptr, GSCALE_ptr, offs_n, mask_n):
    """NORM = unit * sqrt of the row sums of ``acc`` (the squares of W + scale (A B)^T in units of unit**2),
    GSCALE = MAG / NORM. A zero row (W_n + scale (A B)^T_n = 0) has no direction: g = 1 there (the row's output
    is the plain LoRA output, finite), not 0/0."""
    norm = tl.sqrt(tl.sum(acc, axis=1)) * unit
    mag = tl.load(MAG_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(NORM_ptr + offs_n, norm, mask=mask_n)
    tl.store(GSCALE_ptr + offs_n, tl.where(norm > 0, mag / tl.where(norm > 0, norm, 1.0), 1.0), mask=mask_n)


@triton.jit
def dora_norm_kernel(
    # pointers: W (N, K) through its strides; A (K, R); B (R, N); MAG (N,) the magnitude; NORM, GSCALE (N,) fp32
    # outputs
    W_ptr, A_ptr, B_ptr, MAG_ptr, NORM_ptr, GSCALE_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_ak, stride_ar, stride_br, stride_bn,
    # scalars
    scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """NORM[n] = ||W_n + scale (A B)^T_n|| and GSCALE[n] = MAG[n] / NORM[n] (1 where NORM[n] = 0), in fp32.

    One pass over W: each (BLOCK_N, BLOCK_K) tile of W is loaded, the matching tile of scale (A B)^T is formed
    from scale B^T (BLOCK_N, R) and A^T (R, BLOCK_K) by an fp32 dot (R multiply-adds per element, IEEE fp32: no
    TF32), added, and the squares are accumulated in fp32 in units of a per-row power of two (``_scaled_squares``:
    rows past fp32's square range keep their norm). Nothing of size N x K is stored, no term is expanded (so no
    cancellation between ||W_n||^2 and the cross terms), nothing is cached."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    rows = offs_n[:, None].to(tl.int64)
    bt = tl.load(B_ptr + offs_r[None, :] * stride_br + rows * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                 other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    unit = tl.full((BLOCK_N,), 1.1754943508222875e-38, tl.float32)   # 2**-126: acc's unit so far, per row
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        w = tl.load(W_ptr + rows * stride_wn + ks[None, :].to(tl.int64) * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        at = tl.load(A_ptr + ks[None, :].to(tl.int64) * stride_ak + offs_r[:, None] * stride_ar,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        v = tl.dot(bt, at, acc=w, input_precision="ieee", out_dtype=tl.float32)
        acc, unit = _scaled_squares(acc, unit, v)
    _store_norm(acc, unit, MAG_ptr, NORM_ptr, GSCALE_ptr, offs_n, mask_n)


@triton.jit
def dora_norm_4bit_kernel(
    # pointers: the 4-bit weight (W packed uint8, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET: nf4.py's layout); A (K, R);
    # B (R, N); MAG (N,); NORM, GSCALE (N,) fp32 outputs
    W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, A_ptr, B_ptr, MAG_ptr, NORM_ptr, GSCALE_ptr,
    # sizes
    N, K, R,
    # strides
    stride_ak, stride_ar, stride_br, stride_bn,
    # scalars
    scale,
    # meta-parameters: ALIGNED: K % QBLOCK == 0 (byte tiles, one absmax per row), else one gather per element;
    # W_DTYPE the quantized tensor's dtype, X_DTYPE the compute dtype (deq(W) rounded to each, as bitsandbytes)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr,
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, QBLOCK2: tl.constexpr, W_DTYPE: tl.constexpr,
    X_DTYPE: tl.constexpr, NEAREST_BF16: tl.constexpr,
):
    """``dora_norm_kernel`` on a 4-bit weight dequantized in registers: NORM[n] = ||deq(W)_n + scale (A B)^T_n||
    with deq(W) rounded as the forward's GEMM reads it (to W_DTYPE, then to the compute dtype X_DTYPE), and
    GSCALE[n] = MAG[n] / NORM[n] (1 where NORM[n] = 0). One pass over the packed weight, nothing stored."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    rows = offs_n[:, None].to(tl.int64)
    bt = tl.load(B_ptr + offs_r[None, :] * stride_br + rows * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                 other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    unit = tl.full((BLOCK_N,), 1.1754943508222875e-38, tl.float32)   # 2**-126: acc's unit so far, per row
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        if ALIGNED:
            w = dequant_tile(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, offs_n, mask_n, k0, K,
                             BLOCK_N, BLOCK_K, QBLOCK, NESTED, QBLOCK2)
        else:
            w = dequant_values(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr,
                               rows * K + ks[None, :], mask_n[:, None] & mask_k[None, :], QBLOCK, NESTED, QBLOCK2)
        w = round_weight(w, W_DTYPE, X_DTYPE, NEAREST_BF16).to(tl.float32)
        w = tl.where(mask_n[:, None] & mask_k[None, :], w, 0.0)
        at = tl.load(A_ptr + ks[None, :].to(tl.int64) * stride_ak + offs_r[:, None] * stride_ar,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        v = tl.dot(bt, at, acc=w, input_precision="ieee", out_dtype=tl.float32)
        acc, unit = _scaled_squares(acc, unit, v)
    _store_norm(acc, unit, MAG_ptr, NORM_ptr, GSCALE_ptr, offs_n, mask_n)


@triton.jit
def dora_scale_kernel(
    # pointers: U (M, N); BASE (M, N) or a dummy; GSCALE, NORM (N,) fp32; BIAS (N,) or a dummy; OUT (M, N);
    # V (M, N) or a dummy
    U_ptr, BASE_ptr, GSCALE_ptr, NORM_ptr, BIAS_ptr, OUT_ptr, V_ptr,
    # sizes
    M, N,
    # strides
    stride_um, stride_un, stride_bm, stride_bn, stride_om, stride_on, stride_vm, stride_vn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    WRITE_V: tl.constexpr,
):
    """OUT = BASE? + GSCALE ⊙ U + BIAS?, and V = U / NORM (0 on rows of NORM 0) when WRITE_V, GSCALE, NORM and
    BIAS broadcast over rows, in fp32, one rounding each. Without dropout U = x W^T + s S B (no bias): OUT =
    g ⊙ (Y0 - b) + b, the sum scaled by g directly (PEFT's result, with no (g - 1) term to cancel); with dropout
    BASE = (x - x_d) W^T + b and U = x_d W^T + s S B. V (what the magnitude's gradient reads) stays in range
    where U (in fp32, possibly beyond 16-bit range at large scales) may not. OUT may be BASE or U (in place)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    u = tl.load(U_ptr + rows * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GSCALE_ptr + offs_n, mask=mask_n, other=0.0)
    out = g[None, :] * u
    if HAS_BIAS:
        out += tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BASE:
        out += tl.load(BASE_ptr + rows * stride_bm + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    if WRITE_V:
        norm = tl.load(NORM_ptr + offs_n, mask=mask_n, other=0.0)
        inv = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
        tl.store(V_ptr + rows * stride_vm + cols * stride_vn, (u * inv[None, :]).to(V_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(OUT_ptr + rows * stride_om + cols * stride_on, out.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dora_grad_kernel(
    # pointers: DY, V (M, N); GSCALE (N,) fp32; DYG, DYG1 (M, N) outputs (dummies without WRITE_G, WRITE_G1);
    # PARTIAL (SPLITS, N) fp32 output (a dummy without HAS_DM)
    DY_ptr, V_ptr, GSCALE_ptr, DYG_ptr, DYG1_ptr, PARTIAL_ptr,
    # sizes (ROWS_PER_SPLIT: a multiple of BLOCK_M)
    M, N, ROWS_PER_SPLIT,
    # strides (DYG and DYG1 share theirs)
    stride_dm, stride_dn, stride_vm, stride_vn, stride_gm, stride_gn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DM: tl.constexpr, WRITE_G: tl.constexpr,
    WRITE_G1: tl.constexpr,
):
    """One pass over dY: DYG = g ⊙ dY (the dX product's operand without dropout), DYG1 = (g - 1) ⊙ dY (dropout's
    second GEMM), and PARTIAL[split, n] = sum over the split's rows of dY ⊙ V: the magnitude's gradient
    dm = colsum(dY ⊙ (x_d W^T + s S B)) / norm with V = (x_d W^T + s S B) / norm saved by the forward (0 on
    zero-norm rows), finished by sum_partials_kernel (fixed order). The low-rank gradients do not read DYG: they
    take g in fp32 (``dora_backward``)."""
    pid_s = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n[None, :].to(tl.int64)
    g = tl.load(GSCALE_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_n[None, :]
        rows = offs_m[:, None].to(tl.int64)
        dy = tl.load(DY_ptr + rows * stride_dm + cols * stride_dn, mask=mask, other=0.0).to(tl.float32)
        if WRITE_G:
            tl.store(DYG_ptr + rows * stride_gm + cols * stride_gn, (g * dy).to(DYG_ptr.dtype.element_ty),
                     mask=mask)
        if WRITE_G1:
            tl.store(DYG1_ptr + rows * stride_gm + cols * stride_gn, ((g - 1.0) * dy).to(DYG1_ptr.dtype.element_ty),
                     mask=mask)
        if HAS_DM:
            v = tl.load(V_ptr + rows * stride_vm + cols * stride_vn, mask=mask, other=0.0).to(tl.float32)
            acc += dy * v
    if HAS_DM:
        tl.store(PARTIAL_ptr + pid_s.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def dropout_combine_kernel(
    # pointers: T (M, K); BASE (M, K) or a dummy; OUT (M, K); MASK: the forward's bit-packed keep-mask (uint8 rows
    # of stride_mask bytes)
    T_ptr, BASE_ptr, OUT_ptr, MASK_ptr,
    # sizes
    M, K,
    # strides
    stride_tm, stride_tk, stride_bm, stride_bk, stride_om, stride_ok, stride_mask,
    # scalars
    keep_scale,
    # meta-parameters (BLOCK_K a multiple of 8: whole bytes of the mask)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BASE: tl.constexpr,
):
    """OUT = BASE? + keep_scale * keep ⊙ T, keep the keep-mask of an (M, K) input read from the bits the forward's
    S = dropout(x) A pass stored (rng.load_keep_bits: no Philox here, issue 28). Forward: x_d = dropout(x) and
    x - x_d (no BASE / BASE = x); backward: dX = dY W + keep/(1-p) ⊙ ((g-1) ⊙ dY) W (BASE, in place)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_k[None, :].to(tl.int64)
    t = tl.load(T_ptr + rows * stride_tm + cols * stride_tk, mask=mask, other=0.0).to(tl.float32)
    keep = load_keep_bits(MASK_ptr, offs_m, mask_m, k0, K, stride_mask, BLOCK_K)
    out = tl.where(keep, t * keep_scale, 0.0)
    if HAS_BASE:
        out += tl.load(BASE_ptr + rows * stride_bm + cols * stride_bk, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + rows * stride_om + cols * stride_ok, out.to(OUT_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- configs
# Memory-bound elementwise and narrow kernels: one config each, nothing to tune. 32 x 128 tiles with 4 warps
# are 32 elements per thread (eight 16-byte loads in 16-bit), the usual size for an elementwise pass.
ELEMENTWISE_BLOCK = dict(BLOCK_M=32, BLOCK_N=128)
# The norm pass holds a (BLOCK_N, BLOCK_K) fp32 accumulator, the W tile, scale B^T (BLOCK_N, BLOCK_R) and A^T
# (BLOCK_R, BLOCK_K) in fp32 (an FMA dot, no tensor cores: IEEE fp32): BLOCK_K shrinks as the rank grows so that
# A^T stays at NORM_TILE values. 4096 (BLOCK_K 64 at rank 64) spilled ~400 B on sm_80 and sm_90 (compile report,
# triton 3.9); 1024 keeps rank 16 at BLOCK_K 64. Unmeasured on a GPU.
NORM_BLOCK_N = 32
NORM_TILE = 1024
# under the interpreter: small blocks, so that the odd test shapes cross block edges
INTERP_ELEMENTWISE_BLOCK = dict(BLOCK_M=16, BLOCK_N=32)
INTERP_NORM_BLOCK = dict(BLOCK_N=16, BLOCK_K=32)


def elementwise_configs(capability, dtype: torch.dtype) -> list:
    """The one config of the DoRA elementwise kernels (scale, backward prologue, dropout combine)."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


def norm_configs(capability, dtype: torch.dtype) -> list:
    """The one config of ``dora_norm_kernel``."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


def wide_gemm_configs(capability, dtype: torch.dtype) -> list:
    """The forward GEMM's configs (configs.gemm_configs) for DoRA's unscaled sum stored in fp32 from 16-bit
    operands: on sm_80 without the 128x128 4-warp tile, which spilled 100-132 B at rank 64 with the fp32 store
    (compile report, triton 3.9; the other tiles and sm_90 compile without spills)."""
    table = configs.gemm_configs(capability, dtype)
    if capability[0] < 9:
        table = [c for c in table if not (c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)]
    return table


def norm_block(R: int) -> dict:
    """BLOCK_N, BLOCK_K, BLOCK_R of ``dora_norm_kernel`` for rank R."""
    block_r = configs.block_r(R)
    if _INTERPRETED:
        return dict(INTERP_NORM_BLOCK, BLOCK_R=block_r)
    return dict(BLOCK_N=NORM_BLOCK_N, BLOCK_K=max(16, min(64, NORM_TILE // block_r)), BLOCK_R=block_r)


_one = dict(num_warps=4, num_stages=1)
_wide_gemm = _Launcher(gemm_lowrank_kernel, wide_gemm_configs, ["M_BUCKET", "N", "K", "R"],
                       dict(configs.INTERP_GEMM, num_warps=4, num_stages=1), pointers=7, scalars=1)
_norm = _Launcher(dora_norm_kernel, norm_configs, [], _one, pointers=6, scalars=1)
_norm_4bit = _Launcher(dora_norm_4bit_kernel, norm_configs, [], _one, pointers=11, scalars=1)
_scale = _Launcher(dora_scale_kernel, elementwise_configs, [], _one, pointers=7, scalars=0)
_grad = _Launcher(dora_grad_kernel, elementwise_configs, [], _one, pointers=6, scalars=0)
_combine = _Launcher(dropout_combine_kernel, elementwise_configs, [], _one, pointers=4, scalars=1)


def _eblock():
    return INTERP_ELEMENTWISE_BLOCK if _INTERPRETED else ELEMENTWISE_BLOCK


# ---------------------------------------------------------------------------------------------- launchers


def dora_norm(weight, A, B, magnitude, scale: float):
    """(norm, g): the detached DoRA norm ||W_n + scale (A B)^T_n|| per output feature and g = magnitude / norm
    (1 where the norm is 0), both (N,) fp32, from one pass over W that forms the rows of W + scale (A B)^T tile by
    tile in fp32 and reduces their squares (``dora_norm_kernel``): nothing cached, nothing of size N x K stored.
    weight (N, K) (any strides), A (K, R), B (R, N), magnitude (N,)."""
    N, K = weight.shape
    R = A.shape[1]
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    gscale = torch.empty(N, dtype=torch.float32, device=weight.device)
    if N:
        blk = norm_block(R)
        _norm((_cdiv(N, blk["BLOCK_N"]),), weight, A, B, magnitude, norm, gscale, N, K, R,
              weight.stride(0), weight.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), float(scale),
              **blk, device=weight.device, dtype=weight.dtype)
    return norm, gscale


def dora_norm_4bit(packed, A, B, magnitude, scale: float, x_dtype: torch.dtype):
    """``dora_norm`` on a 4-bit weight (qlora.Packed4bit, bitsandbytes' layout) dequantized in registers, rounded
    as the forward's GEMM reads it (to the quantized dtype, then to ``x_dtype``): (norm, g), (N,) fp32 each."""
    from . import ops_4bit

    N, K = packed.shape
    R = A.shape[1]
    norm = torch.empty(N, dtype=torch.float32, device=A.device)
    gscale = torch.empty(N, dtype=torch.float32, device=A.device)
    if N:
        blk = norm_block(R)
        meta = ops_4bit._weight_meta(packed)
        _norm_4bit((_cdiv(N, blk["BLOCK_N"]),), *ops_4bit._weight_args(packed), A, B, magnitude, norm, gscale,
                   N, K, R, A.stride(0), A.stride(1), B.stride(0), B.stride(1), float(scale), **blk,
                   ALIGNED=K % packed.blocksize == 0, X_DTYPE=ops_4bit._tl_dtype(x_dtype), **meta,
                   **ops_4bit._NO_FMA, device=A.device, dtype=x_dtype)
    return norm, gscale


def column_scale(U, gscale, norm, *, bias=None, base=None, out=None, v_dtype=None):
    """OUT (M, N) = base? + gscale ⊙ U + bias? and, when ``v_dtype`` is given, V = U / norm (0 where the norm is
    0) in that dtype: (out, V or None), one launch (``out`` may be ``base`` or ``U``)."""
    M, N = U.shape
    if out is None:
        out = torch.empty_like(U)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    V = torch.empty((M, N), dtype=v_dtype, device=U.device) if v_dtype is not None else None
    blk = _eblock()
    b = base if base is not None else out
    v = V if V is not None else out
    _scale((_cdiv(M, blk["BLOCK_M"]), _cdiv(N, blk["BLOCK_N"])), U, b, gscale, norm,
           bias if bias is not None else out, out, v, M, N, U.stride(0), U.stride(1), b.stride(0), b.stride(1),
           out.stride(0), out.stride(1), v.stride(0), v.stride(1), **blk, HAS_BASE=base is not None,
           HAS_BIAS=bias is not None, WRITE_V=V is not None, device=U.device, dtype=U.dtype)
    return out, V


def dropout_combine(T, keep_scale: float, keep, *, base=None, out=None):
    """OUT (M, K) = base? + keep_scale * keep ⊙ T, ``keep`` the bit-packed keep-mask of an (M, K) input (uint8 (M,
    ``philox.mask_row_bytes(K)``), what ``project_input(keep_out=)`` stored), one launch."""
    M, K = T.shape
    if out is None:
        out = torch.empty((M, K), dtype=T.dtype, device=T.device)
    blk = _eblock()
    b = base if base is not None else out
    _combine((_cdiv(M, blk["BLOCK_M"]), _cdiv(K, blk["BLOCK_N"])), T, b, out, keep, M, K,
             T.stride(0), T.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), keep.stride(0),
             float(keep_scale), BLOCK_M=blk["BLOCK_M"], BLOCK_K=blk["BLOCK_N"],
             HAS_BASE=base is not None, device=T.device, dtype=T.dtype)
    return out


def _wide(x, N):
    """The (M, N) fp32 scratch of the unscaled sum: the GEMM's fp32 accumulator stored as it is, so that a
    low-rank term beyond 16-bit range is still scaled back by g before its one rounding (PEFT keeps it in the
    adapters' fp32 too)."""
    return torch.empty((x.shape[0], N), dtype=torch.float32, device=x.device)


def _gemm_wide(P, weight, N, bias, S, B, scale, out, term=None):
    """P W^T (+ bias) + scale S B into ``out``. When out's dtype is P's: ops.gemm_lowrank (its measured path;
    ``term``: S's rounded copy for the TMA kernel, ops.term_for); an fp32 ``out`` for 16-bit P (DoRA's unscaled
    sum): the fused Triton GEMM, which stores its fp32 accumulator in out's dtype (cuBLAS's addmm and the TMA kernel
    write P's dtype), on its own configs (wide_gemm_configs)."""
    q_strides = (weight.stride(1), weight.stride(0))
    if out.dtype == P.dtype:
        return gemm_lowrank(P, weight, q_strides, N, bias, S, B, (B.stride(0), B.stride(1)), scale, out=out,
                            term=term)
    M, K = P.shape
    R = S.shape[1]

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    _wide_gemm(grid, P, weight, bias if bias is not None else out, S, B, out, out,
               M, N, K, R, _m_bucket(M), P.stride(0), P.stride(1), q_strides[0], q_strides[1], S.stride(0),
               S.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1), 0, float(scale),
               BLOCK_R=configs.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=False,
               DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
               device=P.device, dtype=P.dtype)
    return out


def dora_forward(x, weight, bias, A, B, gscale, norm, scale: float, dropout_p: float = 0.0, seed=None, *,
                 out=None, keep_v: bool = True, base_gemm=None, keep_out=None):
    """Forward of the fused DoRA linear: (y, S, V). x (M, K), weight (N, K), bias (N,) or None, A (K, R),
    B (R, N), gscale and norm (N,) fp32 (``dora_norm``). S = dropout(x) A (M, R) fp32.

      without dropout  U = x W^T + scale S B (the fused LoRA GEMM, no bias, fp32 output), then one column-scale
                       pass y = g ⊙ U + b (PEFT's g ⊙ (Y0 - b) + b, no cancelling (g - 1) term);
      with dropout     x_d = dropout(x) and x - x_d materialised, Y1 = (x - x_d) W^T + b (x's dtype) and
                       U = x_d W^T + scale S B (fp32): y = Y1 + g ⊙ U (PEFT's x W^T + b + (g - 1) ⊙ x_d W^T +
                       g ⊙ scale x_d A B, grouped so that no term cancels another).
    V = U / norm (0 on zero-norm rows), in x's dtype, is returned when ``keep_v`` (the magnitude's gradient reads
    it). ``base_gemm(P, bias, L, lowrank_scale, out)``: the GEMM P deq(W)^T + bias + lowrank_scale L B of a
    4-bit base (weight is then None). With dropout the keep-mask is drawn once, from ``seed`` (int64, one element),
    by the S pass, which stores it bit-packed into ``keep_out`` (required: ``ops.new_keep_mask(M, K)``); x_d and
    x - x_d read those bits, as dora_backward does (no Philox after the S pass).
    Raises ValueError for dropout without ``keep_out``.
    """
    M, K = x.shape
    N = B.shape[1]
    x = _along_k(x, 1)
    if dropout_p > 0 and keep_out is None:
        raise ValueError("dora_forward: dropout_p > 0 needs keep_out, the bit-packed keep-mask to fill")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rest = term = None
    if base_gemm is None:
        weight = _along_k(weight, 1)

        def base_gemm(P, bias_, L, lowrank_scale, out_, term_=None):
            return _gemm_wide(P, weight, N, bias_, L, B, lowrank_scale, out_, term_)

        if philox.quantize(dropout_p) > 0:
            # (x - x_d) W^T + b: the one GEMM of the two into x's dtype (ops.gemm_lowrank's paths, TMA included);
            # its low-rank term (scale 0) by TMA as lora_linear's (the S pass writes 0 * S rounded, as the pointer
            # loads round it: the same result), so its buffer is made before the S pass
            rest = torch.empty((M, K), dtype=x.dtype, device=x.device)
            term = term_for(rest, weight, (weight.stride(1), weight.stride(0)), N, A.shape[1], out, B,
                            (B.stride(0), B.stride(1)), 0.0)
    S, dropout_p, keep_scale = project_input(x, A, dropout_p, seed, keep_out, term)
    v_dtype = x.dtype if keep_v else None
    wide = out if x.dtype == torch.float32 and dropout_p == 0 else _wide(x, N)
    if dropout_p == 0:
        base_gemm(x, None, S, scale, wide)
        _, V = column_scale(wide, gscale, norm, bias=bias, out=out, v_dtype=v_dtype)
        return out, S, V
    x_d = dropout_combine(x, keep_scale, keep_out)
    rest = dropout_combine(x, -keep_scale, keep_out, base=x, out=rest)   # x - x_d
    if term is not None:
        base_gemm(rest, bias, S, 0.0, out, term)
    else:
        base_gemm(rest, bias, S, 0.0, out)
    del rest
    base_gemm(x_d, None, S, scale, wide)
    del x_d
    _, V = column_scale(wide, gscale, norm, base=out, out=out, v_dtype=v_dtype)
    return out, S, V


def dora_backward(dy, x, weight, A, B, S, V, gscale, scale: float, dropout_p: float = 0.0, keep=None, *,
                  need_dx=True, need_dA=True, need_dB=True, need_dm=True, need_g1=False, need_g=False,
                  dx_gemm=None):
    """Backward of the fused DoRA linear: (dx, dA, dB, dm, dyg, dyg1), each None when not needed.

    g enters the low-rank gradients in fp32, never through a 16-bit g ⊙ dY (which a small g, ~1e-6 when the
    magnitude is small against the norm or at large scales, puts among fp16's subnormals, where PEFT's fp32
    adapters keep its digits): dS = dY (B ⊙ g)^T with B ⊙ g an (R, N) fp32 tensor, and dB = g ⊙ (scale S^T dY),
    the column scale applied to the (R, N) fp32 result, in one pass over dY when the rank allows (as
    ops.lora_backward); dA = scale/(1-p) (keep ⊙ x)^T dS. One prologue pass over dY writes the per-split
    partials of dm = colsum(dY ⊙ V), V = (x_d W^T + scale S B) / norm saved by dora_forward, and what the dX
    product reads: without dropout dyg = g ⊙ dY in dY's dtype and dX = dyg W + scale dS A^T in one GEMM (its
    base term takes g ⊙ dY rounded once to dY's dtype, as PEFT's dX does); with dropout (g - 1) ⊙ dY and
    dX = dY W + keep/(1-p) ⊙ (((g-1) ⊙ dY) W + scale dS A^T): two GEMMs (as PEFT's two) and one masked add.
    dyg (without dropout, when dX or ``need_g`` asks for it) and dyg1 (with dropout and ``need_g1``) are
    returned for the caller's dW = dyg^T x (or dY^T x + dyg1^T x_d).
    ``dx_gemm(P, L, lowrank_scale)``: P deq(W) + lowrank_scale L A^T of a 4-bit base (weight is then None).
    With dropout ``keep`` is the forward's bit-packed keep-mask (``dora_forward(keep_out=)``), read by the masked
    add and the dA pass: no Philox in the backward. Raises ValueError for dropout without ``keep``.
    """
    if dropout_p > 0 and keep is None:
        raise ValueError("dora_backward: dropout_p > 0 needs keep, the forward's bit-packed keep-mask")
    M, N = dy.shape
    R = A.shape[1]
    K = x.shape[1]
    dy, x = _along_k(dy, 1), _along_k(x, 1)
    own_gemm = dx_gemm is None
    if own_gemm:
        weight = _along_k(weight, 0)
        w = (weight.stride(0), weight.stride(1))
        a_t = (A.stride(1), A.stride(0))   # RM = A^T: element (r, k) is A[k, r]

        def dx_gemm(P, L, lowrank_scale, term=None, rm=None):
            RM, rm_strides = rm if rm is not None else (A, a_t)
            return gemm_lowrank(P, weight, w, K, None, L, RM, rm_strides, lowrank_scale, backward=True, term=term)

    dropout_p = philox.quantize(dropout_p)
    dx = dA = dB = dm = dyg = dyg1 = None
    blk = _eblock()
    splits = _splits(M, N, blk["BLOCK_M"], blk["BLOCK_N"], dy.device)
    rows_per_split = _cdiv(_cdiv(M, blk["BLOCK_M"]), splits) * blk["BLOCK_M"]
    splits = _cdiv(M, rows_per_split)
    write_g = dropout_p == 0 and (need_dx or need_g)
    write_g1 = dropout_p > 0 and need_g1
    if write_g:
        dyg = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    if write_g1:
        dyg1 = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    partial = torch.empty((splits, N), dtype=torch.float32, device=dy.device) if need_dm else None
    if write_g or write_g1 or need_dm:
        v = V if need_dm else dy
        g_out = dyg if write_g else dyg1 if write_g1 else dy   # a dummy when neither is written
        _grad((splits, _cdiv(N, blk["BLOCK_N"])), dy, v, gscale, g_out, dyg1 if write_g1 else g_out,
              partial if need_dm else gscale, M, N, rows_per_split,
              dy.stride(0), dy.stride(1), v.stride(0), v.stride(1), g_out.stride(0), g_out.stride(1), **blk,
              HAS_DM=need_dm, WRITE_G=write_g, WRITE_G1=write_g1, device=dy.device, dtype=dy.dtype)
    if need_dm:
        dm = torch.empty(N, dtype=torch.float32, device=dy.device)
        finish(partial.view(splits, 1, N), 1.0, dm.view(1, N))
    if not (need_dx or need_dA or need_dB):
        return dx, dA, dB, dm, dyg, dyg1
    # g on B's columns in fp32 (R x N): dS = dY (B ⊙ g)^T reads dY itself (an fp32 Q on a 16-bit dY: the
    # projection's power-of-two factors keep a tiny B ⊙ g out of fp16's subnormals, kernels/lowrank.py)
    Bg = torch.mul(B, gscale)
    grad = None
    if need_dB:
        # in B's layout (a transposed view of PEFT's parameter: see ops._empty_like)
        dB = torch.empty_like(B, memory_format=torch.preserve_format)
        grad = dB if B.dtype == torch.float32 else torch.empty(B.shape, dtype=torch.float32, device=B.device)
    fused_dB = need_dB and 4 * R < _proj_block_m()   # as ops.lora_backward
    # the TMA dX GEMM's term of scale dS A^T by TMA, as lora_linear's: its rounded copy of dS (and fp32 A's copy in
    # the dot dtype) written by the dS pass (ops.term_for), for the GEMM of the scaled term (dyg's, or dyg1's with
    # dropout). With dropout the GEMM of dY alone (scale 0, the same key) reads a second copy the same pass writes,
    # 0 · dS rounded (ops.second_term: the operands its pointer loads would form) and A's copy: no LDG left in it
    term = term0 = None
    term_p = dyg if dropout_p == 0 else dyg1
    if own_gemm and need_dx and term_p is not None:
        term = term_for(term_p, weight, w, K, R, None, A, a_t, scale, backward=True)
        if dropout_p > 0:
            term0 = second_term(term, 0.0)
    dS, _ = lowrank_project(dy, Bg, Bg.stride(1), Bg.stride(0), R, partial_of=S if fused_dB else None,
                            grad=grad if fused_dB else None, grad_scale=scale, term=term, term2=term0)
    if need_dB:
        if not fused_dB:
            reduce_rows(dy, S, scale, grad, transpose=True)
        torch.mul(grad, gscale, out=dB)   # dB = g ⊙ (scale S^T dY): g in fp32, one rounding to B's dtype
    keep_scale = 1.0 / (1.0 - dropout_p)
    term_arg = {} if term is None else {"term": term}
    if need_dx and dropout_p == 0:
        dx = dx_gemm(dyg, dS, scale, **term_arg)
    elif need_dx:
        # the GEMM with the term first: on a key's first call it is the one whose paths are timed (ops.gemm_lowrank)
        inner = dx_gemm(dyg1, dS, scale, **term_arg)
        # dY W: RM read from fp32 A's copy in the dot dtype when the dS pass wrote one (every path casts its RM tile
        # to the dot dtype, round to nearest even, as the copy was made: the same result, on the 16-bit configs);
        # on the TMA path its term (0 · dS rounded, A) by TMA from the dS pass's second copy
        dx = dx_gemm(dy, dS, 0.0, **({} if term0 is None else {"term": term0}),
                     **({} if term is None or term.rm is None else {"rm": (term.rm, term.rm_strides)}))
        dropout_combine(inner, keep_scale, keep, base=dx, out=dx)
    if need_dA:
        dA = reduce_rows(x, dS, scale * keep_scale, torch.empty_like(A, memory_format=torch.preserve_format),
                         dropout_p=dropout_p, keep=keep)
    return dx, dA, dB, dm, dyg, dyg1
