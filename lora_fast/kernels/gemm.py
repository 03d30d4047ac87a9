"""The base GEMM with the low-rank term fused in (it initialises the accumulator; one store of the output):
forward y and backward dX share it.

    OUT[M, N] = P[M, K] @ Q[K, N] (+ bias[N]) + lowrank_scale * (keep? ⊙ (L[M, R] @ RM[R, N]))

Forward (LoRA, Hu et al. 2021, eq. 3): P = x, Q = W^T (strides swapped, no copy), L = S = dropout(x) @ A,
RM = B. Backward: P = dY, Q = W, L = dS = dY @ B^T, RM = A^T, and with dropout the low-rank term is masked
elementwise by the keep-mask of x (PEFT's dropout on the LoRA input), read from the bits the forward's
S = dropout(x) A pass stored (rng.load_keep_bits): no Philox here (issue 28).
"""

import triton
import triton.language as tl

from .fp16 import pow2_split
from .rng import load_keep_bits


@triton.jit
def grouped_tile(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile_id`` in grouped order: GROUP_M row blocks in turn share their column
    block of the second operand in L2 (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def lowrank_init_bits(L_ptr, RM_ptr, MASK_ptr, offs_m, offs_n, pid_n, mask_m, mask_n, mask_r, offs_r, N,
                      stride_lm, stride_lr, stride_rr, stride_rn, stride_mask, lowrank_scale,
                      BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 low-rank term lowrank_scale * (keep? ⊙ (L @ RM)) that initialises a GEMM's
    accumulator (the TMA GEMM of gemm_tma.py, the 4-bit GEMMs of nf4.py): fp16's range guard of fp16.py, a
    power-of-two factor per row put back after the dot; the keep-mask read from the forward's bits (MASK: uint8
    rows of ``stride_mask`` bytes, rng.store_keep_bits; no Philox); without dropout the scale is folded into L
    (fp32) before its one rounding to the dot dtype."""
    lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    rm = tl.load(RM_ptr + offs_r[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lo = lo.to(tl.float32)
    if HAS_DROPOUT:
        if DOT_DTYPE == tl.float16:
            lo, row_f = pow2_split(lo, 1)
            row_scale = row_f * lowrank_scale
        else:
            row_scale = lowrank_scale
        acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        keep = load_keep_bits(MASK_ptr, offs_m, mask_m, pid_n * BLOCK_N, N, stride_mask, BLOCK_N)
        acc = tl.where(keep, acc, 0.0) * row_scale
    else:
        lo = lo * lowrank_scale
        if DOT_DTYPE == tl.float16:
            lo, row_f = pow2_split(lo, 1)
            acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                         out_dtype=tl.float32) * row_f
        else:
            acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def gemm_lowrank_kernel(
    # pointers (MASK: the forward's bit-packed keep-mask, uint8 rows of stride_mask bytes, read with HAS_DROPOUT)
    P_ptr, Q_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr, MASK_ptr,
    # sizes (M_BUCKET only keys the autotuner: M rounded up to a power of two)
    M, N, K, R, M_BUCKET,
    # strides
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_mask,
    # scalars (with dropout lowrank_scale includes 1 / (1 - p))
    lowrank_scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    # int64 row/column offsets: M * stride may pass 2**31 on large batches
    rows_p = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm
    cols_q = Q_ptr + offs_n[None, :].to(tl.int64) * stride_qn

    # The low-rank term comes first and initialises the accumulator, so no second (BLOCK_M, BLOCK_N) tile, nor
    # the keep-mask, is live beside the finished accumulator (as an epilogue had them: spills, compile report).
    # The maths of lowrank_init_bits, written out here: through the helper call ptxas allocated otherwise and dX in
    # fp16 at rank 64 spilled 20 B at 128x128x32 w4 s4 on sm_80 (compile report, triton 3.9)
    lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    rm = tl.load(RM_ptr + offs_r[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lo = lo.to(tl.float32)
    if HAS_DROPOUT:
        # fp16 range (fp16.py): a power-of-two factor per row of dS, put back with the scale after the mask
        if DOT_DTYPE == tl.float16:
            lo, row_f = pow2_split(lo, 1)
            row_scale = row_f * lowrank_scale
        else:
            row_scale = lowrank_scale
        acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        keep = load_keep_bits(MASK_ptr, offs_m, mask_m, pid_n * BLOCK_N, N, stride_mask, BLOCK_N)
        acc = tl.where(keep, acc, 0.0) * row_scale
    else:
        # scale folded into L (fp32) before its one rounding to the dot dtype
        lo = lo * lowrank_scale
        if DOT_DTYPE == tl.float16:
            # fp16 range (fp16.py): a power-of-two factor per row taken out before the cast, put back after
            lo, row_f = pow2_split(lo, 1)
            acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                         out_dtype=tl.float32) * row_f
        else:
            acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    # pointers advance by BLOCK_K along K each step; the step is int64 (dX reads W as (N, K): k * stride_qk =
    # n * in_features passes 2**31 on large layers, a 128k-vocabulary head), the offsets within a block are
    # int32 (the launcher copies the rare operand whose stride along K reaches 2**24)
    p_ptrs = rows_p + offs_k[None, :] * stride_pk
    q_ptrs = cols_q + offs_k[:, None] * stride_qk
    step = tl.full((), BLOCK_K, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        p_ptrs += step * stride_pk
        q_ptrs += step * stride_qk

    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    out = OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
