"""DoRA kernels and their launchers: the norm without the N x K matrix, the output column scale, the backward
prologue (column-scaled dY and the magnitude's gradient) and the dropout combine.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) as PEFT computes it (use_dora=True):
g = m / ||W + scale (A B)^T||_row (the norm per output feature, detached, paper sec. 4.3) and

    without dropout:  y = g ⊙ (x W^T + scale x A B) + b
    with dropout:     y = x W^T + b + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B,   x_d = dropout(x)

Shapes: x (M, K), weight (N, K) as nn.Linear stores it, A (K, R), B (R, N), magnitude (N,).
What is reused: S = dropout(x) A and W A are the narrow projection (lowrank.py); Y0 = x W^T + b + scale S B,
U = x_d W^T + scale S B and the dX products are the fused GEMM (gemm.py); dS, dA, dB are LoRA's narrow passes;
partial sums are finished by ``sum_partials_kernel``. New here: five small memory-bound kernels: the squared row
norms of W (cached by the caller while W is unchanged), the norm and g, the column scale, the backward prologue
and the dropout combine.
"""

import torch
import triton
import triton.language as tl

from .. import philox
from . import configs
from .ops import (
    _INTERPRETED,
    _along_k,
    _cdiv,
    _Launcher,
    _proj_block_m,
    _splits,
    finish,
    gemm_lowrank,
    lowrank_project,
    project_input,
    reduce_rows,
)
from .rng import keep_mask

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def row_sumsq_kernel(
    # pointers: W (N, K) through its strides; OUT (N,) fp32
    W_ptr, OUT_ptr,
    # sizes
    N, K,
    # strides
    stride_wn, stride_wk,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[n] = sum_k W[n, k]^2 in fp32: ||W_n||^2, the frozen part of DoRA's squared norm."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    rows = W_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(rows + (k0 + offs_k)[None, :].to(tl.int64) * stride_wk, mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc += w * w
    tl.store(OUT_ptr + offs_n, tl.sum(acc, axis=1), mask=mask_n)


@triton.jit
def dora_norm_kernel(
    # pointers: WSQ (N,) fp32 = ||W_n||^2; WA (N, R) fp32 = W A; B (R, N); GB (R, N) fp32 = (A^T A) B;
    # MAG (N,) the magnitude; NORM, GSCALE (N,) fp32 outputs
    WSQ_ptr, WA_ptr, B_ptr, GB_ptr, MAG_ptr, NORM_ptr, GSCALE_ptr,
    # sizes
    N, R,
    # strides
    stride_wan, stride_war, stride_br, stride_bn, stride_gr, stride_gn,
    # scalars
    scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """NORM[n] = sqrt(||W_n||^2 + sum_r B[r, n] (2 scale (W A)[n, r] + scale^2 ((A^T A) B)[r, n]))
    = ||W_n + scale (A B)^T_n|| (B_n the n-th column of B), and GSCALE[n] = MAG[n] / NORM[n]; all in fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_r < R)[None, :]
    cols = offs_n[:, None].to(tl.int64)
    wa = tl.load(WA_ptr + cols * stride_wan + offs_r[None, :] * stride_war, mask=mask, other=0.0)
    bt = tl.load(B_ptr + offs_r[None, :] * stride_br + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    gbt = tl.load(GB_ptr + offs_r[None, :] * stride_gr + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    cross = tl.sum(bt * (2.0 * scale * wa + scale * scale * gbt), axis=1)
    sq = tl.load(WSQ_ptr + offs_n, mask=mask_n, other=0.0) + cross
    # rounding can leave a tiny negative where W_n + scale (A B)^T_n is zero: the norm is then 0, as PEFT's
    norm = tl.sqrt(tl.maximum(sq, 0.0))
    mag = tl.load(MAG_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(NORM_ptr + offs_n, norm, mask=mask_n)
    # masked-off lanes divide by 1, not 0 (no 0/0 outside the tensor)
    tl.store(GSCALE_ptr + offs_n, mag / tl.where(mask_n, norm, 1.0), mask=mask_n)


@triton.jit
def dora_scale_kernel(
    # pointers: U (M, N); BASE (M, N) or a dummy; GSCALE (N,) fp32; BIAS (N,) or a dummy; OUT (M, N)
    U_ptr, BASE_ptr, GSCALE_ptr, BIAS_ptr, OUT_ptr,
    # sizes
    M, N,
    # strides
    stride_um, stride_un, stride_bm, stride_bn, stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """OUT = BASE? + (GSCALE - 1) ⊙ (U - BIAS?), GSCALE and BIAS broadcast over rows, in fp32, one rounding.
    Without dropout U = BASE = Y0 = x W^T + b + s S B (the LoRA GEMM's output): OUT = Y0 + (g - 1) ⊙ (Y0 - b),
    PEFT's own order, so the result is within a rounding of Y0's when g ~ 1; with dropout BASE = Y0 and U =
    x_d W^T + s S B (no bias): OUT = Y0 + (g - 1) ⊙ U. OUT may be BASE (in place)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    u = tl.load(U_ptr + rows * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u -= tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    g = tl.load(GSCALE_ptr + offs_n, mask=mask_n, other=0.0)
    out = (g - 1.0)[None, :] * u
    if HAS_BASE:
        out += tl.load(BASE_ptr + rows * stride_bm + cols * stride_bn, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + rows * stride_om + cols * stride_on, out.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dora_grad_kernel(
    # pointers: DY, U (M, N); GSCALE, INV_NORM (N,) fp32; BIAS (N,) or a dummy; DYG, DYG1 (M, N) outputs (DYG1
    # may be a dummy); PARTIAL (SPLITS, N) fp32 output (a dummy without HAS_DM)
    DY_ptr, U_ptr, GSCALE_ptr, INV_NORM_ptr, BIAS_ptr, DYG_ptr, DYG1_ptr, PARTIAL_ptr,
    # sizes (ROWS_PER_SPLIT: a multiple of BLOCK_M)
    M, N, ROWS_PER_SPLIT,
    # strides (DYG and DYG1 share theirs)
    stride_dm, stride_dn, stride_um, stride_un, stride_gm, stride_gn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DM: tl.constexpr, WRITE_G1: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One pass over dY: DYG = g ⊙ dY (the gradient every low-rank and dX product takes), DYG1 = (g - 1) ⊙ dY
    (dropout's second GEMM), and PARTIAL[split, n] = sum over the split's rows of dY ⊙ (U - BIAS?), times
    1 / norm[n]: the magnitude's gradient dm = colsum(dY ⊙ (x_d W^T + s S B)) / norm, finished by
    sum_partials_kernel (fixed order). Without dropout U holds x W^T + b + s S B (HAS_BIAS takes b off)."""
    pid_s = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n[None, :].to(tl.int64)
    g = tl.load(GSCALE_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_n[None, :]
        rows = offs_m[:, None].to(tl.int64)
        dy = tl.load(DY_ptr + rows * stride_dm + cols * stride_dn, mask=mask, other=0.0).to(tl.float32)
        tl.store(DYG_ptr + rows * stride_gm + cols * stride_gn, (g * dy).to(DYG_ptr.dtype.element_ty), mask=mask)
        if WRITE_G1:
            tl.store(DYG1_ptr + rows * stride_gm + cols * stride_gn, ((g - 1.0) * dy).to(DYG1_ptr.dtype.element_ty),
                     mask=mask)
        if HAS_DM:
            u = tl.load(U_ptr + rows * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                u = tl.where(mask, u - bias, 0.0)
            acc += dy * u
    if HAS_DM:
        inv = tl.load(INV_NORM_ptr + offs_n, mask=mask_n, other=0.0)
        tl.store(PARTIAL_ptr + pid_s.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0) * inv, mask=mask_n)


@triton.jit
def dropout_combine_kernel(
    # pointers: T (M, K); BASE (M, K) or a dummy; OUT (M, K); SEED (int64, one element)
    T_ptr, BASE_ptr, OUT_ptr, SEED_ptr,
    # sizes
    M, K,
    # strides
    stride_tm, stride_tk, stride_bm, stride_bk, stride_om, stride_ok,
    # scalars
    keep_scale, dropout_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BASE: tl.constexpr,
):
    """OUT = BASE? + keep_scale * keep ⊙ T, keep the fused kernels' Philox keep-mask of an (M, K) input (rng.py).
    Forward: x_d = dropout(x) (no BASE); backward: dX = dY W + keep/(1-p) ⊙ ((g-1) ⊙ dY) W (BASE, in place)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_k[None, :].to(tl.int64)
    t = tl.load(T_ptr + rows * stride_tm + cols * stride_tk, mask=mask, other=0.0).to(tl.float32)
    keep = keep_mask(SEED_ptr, offs_m, k0, K, dropout_p, BLOCK_K)
    out = tl.where(keep, t * keep_scale, 0.0)
    if HAS_BASE:
        out += tl.load(BASE_ptr + rows * stride_bm + cols * stride_bk, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + rows * stride_om + cols * stride_ok, out.to(OUT_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- configs
# Memory-bound elementwise and narrow kernels: one config each, nothing to tune. 32 x 128 tiles with 4 warps
# are 32 elements per thread (eight 16-byte loads in 16-bit), the usual size for an elementwise pass; the norm
# kernel's BLOCK_N 32 keeps its three (BLOCK_N, BLOCK_R) fp32 tiles at rank 64 within 4 warps' registers (with
# an fp32 dot for (A^T A) B inside, it spilled 268 B at rank 64 on sm_90: compile report, triton 3.9).
ELEMENTWISE_BLOCK = dict(BLOCK_M=32, BLOCK_N=128)
NORM_BLOCK_N = 32
SUMSQ_BLOCK = dict(BLOCK_N=32, BLOCK_K=128)
# under the interpreter: small blocks, so that the odd test shapes cross block edges
INTERP_ELEMENTWISE_BLOCK = dict(BLOCK_M=16, BLOCK_N=32)
INTERP_SUMSQ_BLOCK = dict(BLOCK_N=16, BLOCK_K=32)


def elementwise_configs(capability, dtype: torch.dtype) -> list:
    """The one config of the DoRA elementwise kernels (scale, backward prologue, dropout combine)."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


def norm_configs(capability, dtype: torch.dtype) -> list:
    """The one config of ``dora_norm_kernel`` and ``row_sumsq_kernel``."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


_one = dict(num_warps=4, num_stages=1)
_sumsq = _Launcher(row_sumsq_kernel, norm_configs, [], _one, pointers=2, scalars=0)
_norm = _Launcher(dora_norm_kernel, norm_configs, [], _one, pointers=7, scalars=1)
_scale = _Launcher(dora_scale_kernel, elementwise_configs, [], _one, pointers=5, scalars=0)
_grad = _Launcher(dora_grad_kernel, elementwise_configs, [], _one, pointers=8, scalars=0)
_combine = _Launcher(dropout_combine_kernel, elementwise_configs, [], _one, pointers=4, scalars=2)


def _eblock():
    return INTERP_ELEMENTWISE_BLOCK if _INTERPRETED else ELEMENTWISE_BLOCK


# ---------------------------------------------------------------------------------------------- launchers


def row_sumsq(weight: torch.Tensor) -> torch.Tensor:
    """||W_n||^2 for every row of weight (N, K): (N,) fp32, one pass over W."""
    N, K = weight.shape
    out = torch.empty(N, dtype=torch.float32, device=weight.device)
    block = INTERP_SUMSQ_BLOCK if _INTERPRETED else SUMSQ_BLOCK
    if N:
        _sumsq((_cdiv(N, block["BLOCK_N"]),), weight, out, N, K, weight.stride(0), weight.stride(1), **block,
               device=weight.device, dtype=weight.dtype)
    return out


def dora_norm(weight, A, B, magnitude, scale: float, wsq):
    """(norm, g): the detached DoRA norm ||W_n + scale (A B)^T_n|| per output feature and g = magnitude / norm,
    both (N,) fp32, from wsq = ||W_n||^2 (N,) fp32, W A (the narrow projection with W as its input, N x K x R)
    and (A^T A) B (R x N): no N x K matrix is formed. weight (N, K), A (K, R), B (R, N), magnitude (N,)."""
    N = weight.shape[0]
    R = A.shape[1]
    WA, _ = lowrank_project(_along_k(weight, 1), A, A.stride(0), A.stride(1), R)
    A32 = A.float()
    # (A^T A) B: K R^2 + R^2 N multiply-adds in fp32 torch matmuls, against N K R for W A; in fp32 under
    # torch.autocast too (which would run them in 16 bits)
    with torch.autocast(weight.device.type, enabled=False):
        GB = (A32.t() @ A32) @ B.float()
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    gscale = torch.empty(N, dtype=torch.float32, device=weight.device)
    _norm((_cdiv(N, NORM_BLOCK_N),), wsq, WA, B, GB, magnitude, norm, gscale, N, R,
          WA.stride(0), WA.stride(1), B.stride(0), B.stride(1), GB.stride(0), GB.stride(1), float(scale),
          BLOCK_N=NORM_BLOCK_N, BLOCK_R=configs.block_r(R), device=weight.device, dtype=weight.dtype)
    return norm, gscale


def column_scale(U, gscale, *, bias=None, base=None, out=None):
    """OUT (M, N) = base? + (gscale - 1) ⊙ (U - bias?), one launch (``out`` may be ``base``)."""
    M, N = U.shape
    if out is None:
        out = torch.empty_like(U)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    blk = _eblock()
    b = base if base is not None else out
    _scale((_cdiv(M, blk["BLOCK_M"]), _cdiv(N, blk["BLOCK_N"])), U, b, gscale, bias if bias is not None else out,
           out, M, N, U.stride(0), U.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
           **blk, HAS_BASE=base is not None, HAS_BIAS=bias is not None, device=U.device, dtype=U.dtype)
    return out


def dropout_combine(T, keep_scale: float, dropout_p: float, seed, *, base=None, out=None):
    """OUT (M, K) = base? + keep_scale * keep ⊙ T with the kernels' keep-mask of an (M, K) input under ``seed``."""
    M, K = T.shape
    if out is None:
        out = torch.empty((M, K), dtype=T.dtype, device=T.device)
    blk = _eblock()
    b = base if base is not None else out
    _combine((_cdiv(M, blk["BLOCK_M"]), _cdiv(K, blk["BLOCK_N"])), T, b, out, seed, M, K,
             T.stride(0), T.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
             float(keep_scale), float(dropout_p), BLOCK_M=blk["BLOCK_M"], BLOCK_K=blk["BLOCK_N"],
             HAS_BASE=base is not None, device=T.device, dtype=T.dtype)
    return out


def dora_forward(x, weight, bias, A, B, gscale, scale: float, dropout_p: float = 0.0, seed=None, *, out=None,
                 keep_u: bool = True):
    """Forward of the fused DoRA linear: (y, S, U). x (M, K), weight (N, K), bias (N,) or None, A (K, R),
    B (R, N), gscale (N,) fp32 = m / norm (``dora_norm``). S = dropout(x) A (M, R) fp32.

    Both paths start with the fused LoRA GEMM Y0 = x W^T + b + scale S B (M, N) in x's dtype, then one
    column-scale pass (PEFT's order of operations):
      without dropout  y = Y0 + (g - 1) ⊙ (Y0 - b); U = Y0 is kept (a separate y) when ``keep_u``, else y is
                       written over Y0 in place and U is None;
      with dropout     x_d = dropout(x) materialised, U = x_d W^T + scale S B (a second GEMM, as PEFT's), and
                       y = Y0 + (g - 1) ⊙ U in place; U is returned when ``keep_u``.
    """
    M, _ = x.shape
    N = weight.shape[0]
    x, weight = _along_k(x, 1), _along_k(weight, 1)
    S, dropout_p, keep_scale = project_input(x, A, dropout_p, seed)
    w_t = (weight.stride(1), weight.stride(0))   # Q = W^T: element (k, n) is weight[n, k]
    b_strides = (B.stride(0), B.stride(1))
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if dropout_p == 0:
        Y0 = gemm_lowrank(x, weight, w_t, N, bias, S, B, b_strides, scale, out=None if keep_u else out)
        column_scale(Y0, gscale, bias=bias, base=Y0, out=out)
        return out, S, (Y0 if keep_u else None)
    gemm_lowrank(x, weight, w_t, N, bias, S, B, b_strides, scale, out=out)
    x_d = dropout_combine(x, keep_scale, dropout_p, seed)
    U = gemm_lowrank(x_d, weight, w_t, N, None, S, B, b_strides, scale)
    del x_d
    column_scale(U, gscale, base=out, out=out)
    return out, S, (U if keep_u else None)


def dora_backward(dy, x, weight, A, B, S, U, gscale, norm, scale: float, dropout_p: float = 0.0, seed=None, *,
                  bias=None, need_dx=True, need_dA=True, need_dB=True, need_dm=True, need_g1=False):
    """Backward of the fused DoRA linear: (dx, dA, dB, dm, dyg, dyg1), each None when not needed.

    One prologue pass over dY writes dYg = g ⊙ dY (and (g - 1) ⊙ dY with dropout, when dX or a trainable W
    needs it) and the per-split partials of dm = colsum(dY ⊙ (U - bias)) / norm (``bias``: the bias U holds,
    without dropout; see dora_forward). Then LoRA's backward runs on dYg:
    dS = dYg B^T with the dB partials in one pass; dA = scale/(1-p) (keep ⊙ x)^T dS; without dropout
    dX = dYg W + scale dS A^T in one GEMM; with dropout dX = dY W + keep/(1-p) ⊙ (((g-1) ⊙ dY) W + scale dS A^T):
    two GEMMs (as PEFT's two) and one masked add. dyg and dyg1 are returned for the caller's dW.
    """
    M, N = dy.shape
    R = A.shape[1]
    K = x.shape[1]
    dy, x, weight = _along_k(dy, 1), _along_k(x, 1), _along_k(weight, 0)
    dropout_p = philox.quantize(dropout_p)
    dx = dA = dB = dm = dyg1 = None
    blk = _eblock()
    splits = _splits(M, N, blk["BLOCK_M"], blk["BLOCK_N"], dy.device)
    rows_per_split = _cdiv(_cdiv(M, blk["BLOCK_M"]), splits) * blk["BLOCK_M"]
    splits = _cdiv(M, rows_per_split)
    dyg = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    write_g1 = dropout_p > 0 and need_g1
    if write_g1:
        dyg1 = torch.empty_like(dyg)
    partial = torch.empty((splits, N), dtype=torch.float32, device=dy.device) if need_dm else None
    inv_norm = 1.0 / norm if need_dm else gscale
    has_bias = need_dm and bias is not None
    if has_bias and bias.stride(0) != 1:
        bias = bias.contiguous()
    u = U if need_dm else dy
    _grad((splits, _cdiv(N, blk["BLOCK_N"])), dy, u, gscale, inv_norm, bias if has_bias else gscale, dyg,
          dyg1 if write_g1 else dyg, partial if need_dm else gscale, M, N, rows_per_split,
          dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), dyg.stride(0), dyg.stride(1), **blk,
          HAS_DM=need_dm, WRITE_G1=write_g1, HAS_BIAS=has_bias, device=dy.device, dtype=dy.dtype)
    if need_dm:
        dm = torch.empty(N, dtype=torch.float32, device=dy.device)
        finish(partial.view(splits, 1, N), 1.0, dm.view(1, N))
    if not (need_dx or need_dA or need_dB):
        return dx, dA, dB, dm, dyg, dyg1
    if need_dB:
        dB = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    fused_dB = need_dB and 4 * R < _proj_block_m()   # as ops.lora_backward
    dS, _ = lowrank_project(dyg, B, B.stride(1), B.stride(0), R, partial_of=S if fused_dB else None,
                            grad=dB if fused_dB else None, grad_scale=scale)
    if need_dB and not fused_dB:
        reduce_rows(dyg, S, scale, dB, transpose=True)
    keep_scale = 1.0 / (1.0 - dropout_p)
    a_t = (A.stride(1), A.stride(0))   # RM = A^T: element (r, k) is A[k, r]
    w = (weight.stride(0), weight.stride(1))
    if need_dx and dropout_p == 0:
        dx = gemm_lowrank(dyg, weight, w, K, None, dS, A, a_t, scale, backward=True)
    elif need_dx:
        dx = gemm_lowrank(dy, weight, w, K, None, dS, A, a_t, 0.0, backward=True)
        inner = gemm_lowrank(dyg1, weight, w, K, None, dS, A, a_t, scale, backward=True)
        dropout_combine(inner, keep_scale, dropout_p, seed, base=dx, out=dx)
    if need_dA:
        dA = reduce_rows(x, dS, scale * keep_scale, torch.empty(A.shape, dtype=A.dtype, device=A.device),
                         dropout_p=dropout_p, seed=seed)
    return dx, dA, dB, dm, dyg, dyg1
