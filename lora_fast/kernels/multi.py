"""Kernels of ``lora_linear_multi``: several LoRA adapters in one batch, each row with its own adapter (issue 30).

Row m of x (M, K) uses adapter a = IDX[m] in [-1, n) (-1: the base layer alone), A[a] (K, r_a), B[a] (r_a, N),
read where they live through a small int64 adapter table (``adapter_table``: addresses, strides and ranks of
stacked factors or of per-adapter ones, issue 30; columns of A[a] / rows of B[a] >= r_a read as zero):

    forward:  S = keep_scale[a] * (keep ⊙ x) A[a]                     multi_proj_kernel   (M, R) fp32
              y = x W^T + b + scale[a] * S B[a]                         multi_gemm_kernel
    backward: dS = dY B[a]^T                                            multi_proj_kernel   (M, R) fp32
              dX = dY W + scale[a] keep_scale[a] * keep ⊙ (dS A[a]^T)   multi_gemm_kernel
              dA[a] = scale[a] keep_scale[a] * sum over rows of a of (keep ⊙ x)^T dS
              dB[a] = scale[a] * sum over rows of a of S^T dY          multi_reduce_kernel (one launch for both)

Design (UNMEASURED on any GPU, see docs/multi-adapter.md). Rows are visited in one of two orders:
"sorted" (the default, LORA_FAST_MULTI_ORDER): in adapter order through PERM, a stable sort of the index computed
with torch (``sort_rows``) once per call, or once per ``AdapterRows`` shared by many calls, reused by the
backward; a tile of BLOCK_M sorted positions reads and writes the rows PERM[pos] in place (x, y, dx are never
copied) and holds one adapter but at segment edges, and each adapter's gradient programs walk its own segment
only. "unsorted": rows in their own order. Either way a tile of rows reads each adapter present in it once: the
kernels loop over the adapters from the tile's smallest to its largest index, skip those with no row in the tile,
and add ``dot(rows of a, operand of a)`` into one fp32 accumulator with the other rows zeroed, so each row receives
exactly its own adapter's products (the others add exact zeros). A batch grouped by adapter (PEFT's
``adapter_names`` batches usually are) costs about one dot per tile like lora_linear; a fully mixed tile costs
one narrow dot per adapter present. The per-adapter gradients are reduced by one program per (block of columns,
adapter), which walks every row block in order and skips blocks without its adapter (unsorted), or its segment of
sorted positions from its start (sorted): deterministic (no atomics, no scratch) either way; its parallelism is
(columns / BLOCK) x n programs. Per row, y, S, dS and dx are the same products in the same order in both orders;
dA and dB sum the same rows in the same order but in other fp32 blocks (sorted blocks start at the segment).
Five launches per step (2 forward, 3 backward), as lora_linear at ranks below 32, whatever n.

Each kernel keeps the numerics of its single-adapter counterpart (kernels/gemm.py, kernels/lowrank.py): fp32
accumulation, the fp16 range guard of fp16.py, the Philox keep-mask of rng.py (per-row drop probabilities).
The keep-mask is drawn once per step (issue 28 item 3): the forward's S pass draws it with each row's p and
stores it bit-packed, (M, philox.mask_row_bytes(K)) uint8 in x's row order (lora_linear's layout, rng.store_keep_bits;
rows without an adapter or of an adapter with p = 0 all kept); the dX GEMM and the dA pass read those bits
(rng.load_keep_bits), with no Philox in the backward.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .fp16 import pow2_split
from .gemm import grouped_tile
from .rng import keep_mask_bits_rows, load_keep_bits, store_keep_bits


@triton.jit
def _tile_rows(PERM_ptr, pos, mask_m, SORTED: tl.constexpr):
    """The rows of x a tile visits at positions ``pos`` (BM,) int32: ``pos`` itself, or PERM[pos] when the rows
    are visited in adapter order (SORTED; masked positions give row 0, never stored)."""
    if SORTED:
        return tl.load(PERM_ptr + pos, mask=mask_m, other=0).to(tl.int32)
    return pos


@triton.jit
def _tile_adapters(IDX_ptr, offs_m, mask_m, N_ADAPTERS):
    """(idx (BM,) int32 with -1 on masked rows, smallest and largest adapter of the tile's rows; an empty range,
    lo > hi, when no row has one). ``offs_m``: positions in IDX (sorted positions when the rows are sorted)."""
    idx = tl.load(IDX_ptr + offs_m, mask=mask_m, other=-1).to(tl.int32)
    valid = idx >= 0
    lo = tl.min(tl.where(valid, idx, N_ADAPTERS), axis=0)
    hi = tl.max(tl.where(valid, idx, -1), axis=0)
    return idx, valid, lo, hi


@triton.jit
def _table_entry(T_ptr, RANK_ptr, a, n):
    """Adapter a's entry of the adapter table (``adapter_table``, int64, ``n`` adapters per row): (the value at
    row T_ptr, an address or an element offset; the next two rows', the strides along the operand's long dim and
    its rank dim; its rank), int64 (int32 strides were tried: two fp32 sm_90 rows then spilled 4-20 B at 72-96
    registers, compile report, triton 3.9; none with int64)."""
    return tl.load(T_ptr + a), tl.load(T_ptr + n + a), tl.load(T_ptr + 2 * n + a), tl.load(RANK_ptr + a)


@triton.jit
def _operand(T_ptr, RANK_ptr, a, n, LIKE_ptr):
    """``_table_entry`` of an operand read where it lives: its address as a pointer of LIKE_ptr's type (the int64
    address of element (0, 0) cast to a pointer: accepted by the interpreter and by the sm_80 / sm_90 compiler)."""
    address, stride_long, stride_rank, rank = _table_entry(T_ptr, RANK_ptr, a, n)
    return address.to(LIKE_ptr.dtype), stride_long, stride_rank, rank


@triton.jit
def multi_proj_kernel(
    # pointers: P (M, K); Q: any adapter's factor (only its element type is read: the factors' one dtype);
    # IDX (M,) int64 (sorted when SORTED); PERM (M,) int64, the rows in adapter order (read when SORTED); ROW_SCALE,
    # DROP_P: (n,) fp32 per adapter; SEED int64 (one element); OUT (M, R) fp32
    P_ptr, Q_ptr, IDX_ptr, PERM_ptr, ROW_SCALE_ptr, DROP_P_ptr, SEED_ptr, OUT_ptr,
    # sizes
    M, K, R, N_ADAPTERS,
    # strides
    stride_pm, stride_pk, stride_om, stride_or,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SORTED: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # the keep-mask drawn (HAS_DROPOUT), stored bit-packed: MASK uint8 (M, >= ceil(K / 8)), rows of stride_mask bytes
    MASK_ptr, stride_mask,
    # the adapter table (``adapter_table``, int64): QT at the row of the (K, R) operand's addresses, its strides
    # along K and R in the next two rows (N_ADAPTERS apart); RANK: the row of the adapters' ranks
    QT_ptr, RANK_ptr,
):
    """OUT[m] = ROW_SCALE[a] * (keep? ⊙ P[m]) @ Q[a], a = IDX[m]; 0 on rows of adapter -1. The forward's
    S = dropout(x) A[a] (ROW_SCALE = 1 / (1 - p[a])) and the backward's dS = dY B[a]^T (ROW_SCALE = 1).
    Q[a] is read where it lives, through the table; its columns >= RANK[a] read as zero (OUT's too).
    HAS_DROPOUT: row m's keeps drawn with its adapter's p (0, all kept, on rows of adapter -1) and stored in
    MASK's row m (x's row order), bit-packed, for the backward. SORTED: the program's tile holds the rows PERM[pos]
    (IDX then holds their adapters in that order)."""
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = pos < M
    mask_r = offs_r < R
    offs_m = _tile_rows(PERM_ptr, pos, mask_m, SORTED)
    idx, valid, a_lo, a_hi = _tile_adapters(IDX_ptr, pos, mask_m, N_ADAPTERS)
    if HAS_DROPOUT:
        p_rows = tl.load(DROP_P_ptr + idx, mask=valid, other=0.0)[:, None]
    rows_p = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_f = tl.full((1, BLOCK_R), 1.0, tl.float32)   # acc's power-of-two unit per rank column (fp32 Q on fp16)
    zero64 = tl.full((), 0, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        if HAS_DROPOUT:
            # drawn once per step: the bits stored here are what the backward reads (before P's block is loaded,
            # as lowrank.py does it: fewer registers live)
            keep, bits = keep_mask_bits_rows(SEED_ptr, offs_m, k0, K, K, p_rows, BLOCK_K)
            store_keep_bits(MASK_ptr, bits, offs_m, mask_m, k0, K, stride_mask, BLOCK_K)
        p = tl.load(rows_p + (k0 + zero64) * stride_pk + offs_k[None, :] * stride_pk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            p = tl.where(keep, p, 0.0).to(DOT_DTYPE)
        for a in range(a_lo, a_hi + 1):
            sel = idx == a
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                pa = tl.where(sel[:, None], p, 0.0).to(DOT_DTYPE)
                q_a, stride_qk, stride_qr, rank_a = _operand(QT_ptr, RANK_ptr, a, N_ADAPTERS, Q_ptr)
                q = tl.load(q_a + (k0 + offs_k)[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                            mask=mask_k[:, None] & (offs_r < rank_a)[None, :], other=0.0)
                if DOT_DTYPE == tl.float16 and Q_ptr.dtype.element_ty == tl.float32:
                    # fp32 adapters on an fp16 base: kernels/lowrank.py's power-of-two factor per rank column of
                    # the Q tile, acc kept in units of the current factors (a power-of-two rescale: exact)
                    q, col_f = pow2_split(q.to(tl.float32), 0)
                    acc = tl.dot(pa, q.to(DOT_DTYPE), acc * (acc_f / col_f), input_precision=INPUT_PRECISION,
                                 out_dtype=tl.float32)
                    acc_f = col_f
                else:
                    acc = tl.dot(pa, q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    if DOT_DTYPE == tl.float16 and Q_ptr.dtype.element_ty == tl.float32:
        acc = acc * acc_f
    row_scale = tl.load(ROW_SCALE_ptr + idx, mask=valid, other=0.0)
    tl.store(OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
             acc * row_scale[:, None], mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def multi_gemm_kernel(
    # pointers: P (M, K); Q (K, N) through strides; BIAS (N,); L (M, R) fp32; RM: any adapter's factor (its element
    # type: the factors' one dtype); IDX (M,) int64 (sorted when SORTED); PERM (M,) int64 (read when SORTED);
    # ROW_SCALE (n,) fp32; OUT (M, N)
    P_ptr, Q_ptr, BIAS_ptr, L_ptr, RM_ptr, IDX_ptr, PERM_ptr, ROW_SCALE_ptr, OUT_ptr,
    # sizes
    M, N, K, R, N_ADAPTERS,
    # strides
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr,
    stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SORTED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # the forward's bit-packed keep-mask of x (read with HAS_DROPOUT): MASK uint8 rows of stride_mask bytes
    MASK_ptr, stride_mask,
    # the adapter table (``adapter_table``, int64): RMT at the row of adapter a's (R, N) operand's addresses (read
    # as its transpose, (N, R)), its strides along N and R in the next two rows; RANK: the adapters' ranks
    RMT_ptr, RANK_ptr,
):
    """OUT = P @ Q (+ bias) + ROW_SCALE[a] * (keep? ⊙ (L[m] @ RM[a])) per row, a = IDX[m] (no term on rows of
    adapter -1): kernels/gemm.py's GEMM with each row's own low-rank operand and scale. Forward: P = x,
    Q = W^T, L = S, RM = B, ROW_SCALE = scale. dX: P = dY, Q = W, L = dS, RM = A^T, ROW_SCALE = scale / (1 - p),
    the keep-mask of x read from the bits the forward's S pass stored (no Philox). RM[a] is read where it lives,
    through the table, its rows >= RANK[a] as zero. SORTED: the tile's rows are PERM[pos], read and written in
    place (x and y are never copied)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = pos < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    offs_m = _tile_rows(PERM_ptr, pos, mask_m, SORTED)
    idx, valid, a_lo, a_hi = _tile_adapters(IDX_ptr, pos, mask_m, N_ADAPTERS)
    row_scale = tl.load(ROW_SCALE_ptr + idx, mask=valid, other=0.0)[:, None]

    # the low-rank term initialises the accumulator, as in kernels/gemm.py; the scale is folded into L (fp32)
    # before its rounding to the dot dtype without dropout, applied after the mask with it
    lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    if not HAS_DROPOUT:
        lo = lo * row_scale
    if DOT_DTYPE == tl.float16:
        # fp16 range (fp16.py): a power-of-two factor per row taken out before the cast, put back after
        lo, row_f = pow2_split(lo, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a in range(a_lo, a_hi + 1):
        sel = idx == a
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            rm_a, stride_rn, stride_rr, rank_a = _operand(RMT_ptr, RANK_ptr, a, N_ADAPTERS, RM_ptr)
            rm = tl.load(rm_a + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                         mask=(offs_r < rank_a)[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(tl.where(sel[:, None], lo, 0.0).to(DOT_DTYPE), rm.to(DOT_DTYPE), acc,
                         input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    if DOT_DTYPE == tl.float16:
        acc = acc * row_f
    if HAS_DROPOUT:
        keep = load_keep_bits(MASK_ptr, offs_m, mask_m, pid_n * BLOCK_N, N, stride_mask, BLOCK_N)
        acc = tl.where(keep, acc, 0.0) * row_scale

    rows_p = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm
    cols_q = Q_ptr + offs_n[None, :].to(tl.int64) * stride_qn
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


@triton.jit
def _reduce_block(P_ptr, L_ptr, rows, sel, acc, MASK_ptr, stride_mask, pid_c, offs_c, mask_c, offs_r, mask_r,
                  C, stride_pm, stride_pc, stride_lm, stride_lr, BLOCK_C: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc (BLOCK_C, BLOCK_R) fp32 += (keep? ⊙ P)[rows, cols]^T L[rows] over the rows with ``sel``; the keeps
    read from the forward's bits (MASK, x's row order)."""
    p_t = tl.load(P_ptr + rows[None, :].to(tl.int64) * stride_pm + offs_c[:, None] * stride_pc,
                  mask=mask_c[:, None] & sel[None, :], other=0.0).to(DOT_DTYPE)
    if HAS_DROPOUT:
        keep = tl.trans(load_keep_bits(MASK_ptr, rows, sel, pid_c * BLOCK_C, C, stride_mask, BLOCK_C))
        p_t = tl.where(keep, p_t, 0.0).to(DOT_DTYPE)
    lo = tl.load(L_ptr + rows[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                 mask=sel[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    if DOT_DTYPE == tl.float16:
        # fp16 range (fp16.py): a power-of-two factor per rank column of L, put back after the dot
        lo, rank_f = pow2_split(lo, 0)
        acc += tl.dot(p_t, lo.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32) * rank_f
    else:
        acc = tl.dot(p_t, lo.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _segment_reduce(P_ptr, L_ptr, OUT_ptr, IDX_ptr, PERM_ptr, SEG_ptr, MASK_ptr, a, scale, pid_c,
                    M, C, R, stride_pm, stride_pc, stride_lm, stride_lr, stride_oc, stride_or, stride_mask,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, SORTED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, rank_a):
    """OUT[c, r] = scale * sum over the rows m with IDX[m] == a of (keep? ⊙ P)[m, c] L[m, r], for the columns c
    of block ``pid_c`` and r < ``rank_a`` (P (M, C), L (M, R) fp32, OUT (C, rank_a) through its strides; keeps:
    MASK's bits). Unsorted: every row block in row order, those without a row of a skipped. SORTED: only a's
    segment SEG[a] .. SEG[a + 1] of the sorted positions, in blocks of BLOCK_M from its start (its rows in row
    order: the sort is stable), each block a's rows alone."""
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    if SORTED:
        start = tl.load(SEG_ptr + a).to(tl.int32)
        end = tl.load(SEG_ptr + a + 1).to(tl.int32)
        for m0 in range(start, end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            sel = pos < end
            rows = tl.load(PERM_ptr + pos, mask=sel, other=0).to(tl.int32)
            acc = _reduce_block(P_ptr, L_ptr, rows, sel, acc, MASK_ptr, stride_mask, pid_c, offs_c, mask_c,
                                offs_r, mask_r, C, stride_pm, stride_pc, stride_lm, stride_lr, BLOCK_C, HAS_DROPOUT,
                                DOT_DTYPE, INPUT_PRECISION)
    else:
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            idx = tl.load(IDX_ptr + offs_m, mask=mask_m, other=-1).to(tl.int32)
            sel = idx == a
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                acc = _reduce_block(P_ptr, L_ptr, offs_m, sel, acc, MASK_ptr, stride_mask, pid_c, offs_c,
                                    mask_c, offs_r, mask_r, C, stride_pm, stride_pc, stride_lm, stride_lr, BLOCK_C,
                                    HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION)
    tl.store(OUT_ptr + offs_c[:, None].to(tl.int64) * stride_oc + offs_r[None, :] * stride_or,
             (acc * scale).to(OUT_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_r < rank_a)[None, :])


@triton.jit
def multi_reduce_kernel(
    # pointers: X (M, K), DS (M, R) fp32, DA: the buffer of the dA's; DY (M, N), S (M, R) fp32, DB: the buffer of
    # the dB's (DA's or another, in the adapters' dtype); IDX (M,) int64;
    # PERM (M,) int64 and SEG (n + 1,) int64 (read when SORTED: the rows in adapter order, adapter a's at sorted
    # positions SEG[a] .. SEG[a + 1]); DA_SCALE, DB_SCALE (n,) fp32
    X_ptr, DS_ptr, DA_ptr, DY_ptr, S_ptr, DB_ptr, IDX_ptr, PERM_ptr, SEG_ptr, DA_SCALE_ptr, DB_SCALE_ptr,
    # sizes (K_BLOCKS: programs along dim 0 that compute dA; the others compute dB)
    M, K, N, R, K_BLOCKS,
    # strides
    stride_xm, stride_xk, stride_dsm, stride_dsr,
    stride_dym, stride_dyn, stride_sm, stride_sr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SORTED: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # the forward's bit-packed keep-mask of x (read by dA with HAS_DROPOUT): MASK uint8 rows of stride_mask bytes
    MASK_ptr, stride_mask,
    # the adapter table (``adapter_table``, int64): DAT at the row of dA[a]'s element offsets in DA, its strides
    # along K and R in the next two rows; DBT likewise for dB[a] in DB (as its transpose: strides along N, R);
    # RANK: the adapters' ranks (each gradient written on its own rank's columns only)
    DAT_ptr, DBT_ptr, RANK_ptr,
):
    """Program (c, a): for c < K_BLOCKS, block c of dA[a] = DA_SCALE[a] * (keep ⊙ x)^T dS over a's rows; else
    block c - K_BLOCKS of dB[a]^T = DB_SCALE[a] * dY^T S over a's rows, each written where the table puts it
    (its offset and strides). One launch for both per-adapter gradients; each program owns its output block
    (deterministic)."""
    pid_c = tl.program_id(0)
    a = tl.program_id(1)
    n = tl.num_programs(1)
    if pid_c < K_BLOCKS:
        offset, stride_dak, stride_dar, rank_a = _table_entry(DAT_ptr, RANK_ptr, a, n)
        _segment_reduce(X_ptr, DS_ptr, DA_ptr + offset, IDX_ptr, PERM_ptr, SEG_ptr,
                        MASK_ptr, a, tl.load(DA_SCALE_ptr + a), pid_c, M, K, R, stride_xm, stride_xk,
                        stride_dsm, stride_dsr, stride_dak, stride_dar, stride_mask, BLOCK_M, BLOCK_C, BLOCK_R,
                        HAS_DROPOUT, SORTED, DOT_DTYPE, INPUT_PRECISION, rank_a)
    else:
        offset, stride_dbn, stride_dbr, rank_a = _table_entry(DBT_ptr, RANK_ptr, a, n)
        _segment_reduce(DY_ptr, S_ptr, DB_ptr + offset, IDX_ptr, PERM_ptr, SEG_ptr,
                        MASK_ptr, a, tl.load(DB_SCALE_ptr + a), pid_c - K_BLOCKS, M, N, R, stride_dym,
                        stride_dyn, stride_sm, stride_sr, stride_dbn, stride_dbr, 0, BLOCK_M, BLOCK_C, BLOCK_R,
                        False, SORTED, DOT_DTYPE, INPUT_PRECISION, rank_a)


# --- launchers ---------------------------------------------------------------------------------------------------
# One fixed config per kernel, no autotuning: the family has not run on a GPU yet (opt-in, LORA_FAST_MULTI=triton).
# GPU tiles: kernels/configs.py's first GEMM and narrow-pass configs' sizes, picked by analogy, UNMEASURED.
# Interpreted: 32-wide blocks, so that the tests' small odd shapes cross block edges.
# Triton decides at decoration time (when this module was imported) whether kernels are interpreted
_INTERPRETED = configs.interpreting()


def _interpreted() -> bool:
    return _INTERPRETED


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# each config function: the GPU tile, or the interpreter's (``gpu=None``: as this process runs the kernels; the
# compile report asks for the GPU's from a process that interprets them)
def _proj_config(dtype, dropout: bool = False, block_r: int = 16, q_fp32: bool = False, *, gpu=None):
    if not (gpu if gpu is not None else not _interpreted()):
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype != torch.float32 and dropout and q_fp32 and block_r >= 64:
        # fp32 adapters on a 16-bit base, dropout, rank 64: BK64 spilled 32 B at sm_80 fp16 sorted on triton 3.6
        # with the adapter table's runtime strides (255 registers; compile report)
        return dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        # fp32 (IEEE, no tensor cores) at rank 64 with dropout: 64 x BK64 with 4 warps spilled 704 B on sm_80
        # (compile report, triton 3.9). Since the S pass stores the mask's bits, 32 x BK32 with 4 warps spilled 4 B
        # (sm_90, rank 16, dropout; 8 warps: 4 B without dropout; 64 x BK32: 8-20 B at rank 64); 16 x BK32 with 4
        # warps spills nowhere (sm_80 and sm_90, ranks 16 and 64, every flag set; triton 3.6 and 3.9)
        # (triton 3.6 with the adapter table and the bits: 8 B spilled at rank 16, sm_80 with dropout and sm_90
        # without, at 64-72 registers, with 1 or 2 stages: a local-memory slot, not register pressure; 3.9: none)
        return dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2)


def _gemm_config(dtype, dropout: bool = False, block_r: int = 16, *, gpu=None):
    if not (gpu if gpu is not None else not _interpreted()):
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # fp32 (IEEE, no tensor cores): 64x64 with 4 warps spilled 4-620 B at rank 64, and sorted at rank 16 (sm_80,
        # sm_90; compile report, triton 3.9). 32x32x32, 3 stages: no spill on 3.9; on 3.6 4 B at sm_80 rank 64 sorted
        # (the least of the tiles tried: 32x64, 64x32, BLOCK_K 16, 2 warps, 2 and 4 stages). With the adapter table
        # and the mask's bits, 3 and 2 stages spilled 8 B at sm_80 rank 16 dropout+sorted (3.9); 1 stage spills
        # nowhere (an fp32 IEEE dot has no tensor-core MMA for the pipeline to overlap)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    if block_r >= 64:
        # dX with dropout at rank 64: 128x128 with 8 warps spilled 8-40 B regenerating the keep-mask (compile
        # report, triton 3.9, sm_80 bf16/fp16 and sm_90 fp16, fp32 adapters, both row orders), and still spills 4 B
        # reading its bits (sm_90 fp16, fp32 adapters, sorted; 255 registers in 8 of 16 rows); 64x128 does not.
        # The forward at rank 64 too: with the adapter table, 128x128 spilled 8-24 B at sm_80 bf16/fp16 on triton
        # 3.6 (255 registers)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def _reduce_config(dtype, *, gpu=None):
    if not (gpu if gpu is not None else not _interpreted()):
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 64 x BLOCK_C 64 with 4 warps spilled at rank 64 with dropout (19 KB on sm_80, 16 B on sm_90; compile
        # report, triton 3.9). One stage: with the adapter table's runtime strides (issue 30) two stages spilled
        # 68-80 B at sm_80 rank 64 sorted (255 registers); one stage does not (compile report, triton 3.9, sm_80
        # and sm_90); the fp32 reduction has no tensor-core MMA to pipeline for
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4, num_stages=1)
    # triton 3.6, sm_80 bf16 rank 16 with dropout: 8 B spilled at 72 registers (also with 1 stage or 8 warps; 3.9:
    # none); left as it is
    return dict(BLOCK_M=64, BLOCK_C=64, num_warps=4, num_stages=2)


# rows of the per-adapter parameter table (PARAM_ROWS, n) fp32 that the launches read
ONES, KEEP_SCALE, SCALE, DX_SCALE, DROP_P = range(5)
PARAM_ROWS = 5


def adapter_params(scales, dropout_ps, device) -> torch.Tensor:
    """The (PARAM_ROWS, n) fp32 table of per-adapter constants on ``device``, in one host-to-device copy: ones
    (dS), keep_scale = 1 / (1 - p), scale, scale * keep_scale (computed in float64, rounded once to fp32 as
    lora_linear rounds its scalar), p (quantised: exact in fp32). ``dropout_ps`` already quantised, each < 1."""
    keep = [1.0 / (1.0 - p) for p in dropout_ps]
    rows = [[1.0] * len(scales), keep, list(scales), [s * k for s, k in zip(scales, keep)], list(dropout_ps)]
    return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)


# rows of the adapter table (TABLE_ROWS, n) int64 (``adapter_table``): per adapter, A (K, r_a) and B read as its
# transpose (N, r_a): the address of element (0, 0) and the strides along the long dim and the rank dim (elements);
# dA and dB likewise, the address an element offset into the gradient buffer the backward passes; the rank r_a
A_ADDR, A_SL, A_SR, B_ADDR, B_SL, B_SR, DA_OFF, DA_SL, DA_SR, DB_OFF, DB_SL, DB_SR, RANK = range(13)
TABLE_ROWS = 13


class AdapterTable:
    """Where the multi-adapter kernels find each adapter (issue 30): the factors are read where they live, so n
    adapters cost no stack, no padding and no copy per call.

    Attributes:
        table: (TABLE_ROWS, n) int64 on the factors' device (rows ``A_ADDR`` .. ``RANK``); read-only once built.
        rows: its rows as views (made once: the launches pass them).
        key: what the table encodes (each factor's address, shape and strides, the dtype and device); a table is
            a pure function of its key, so two equal keys give equal tables.
        n, rank: the number of adapters and the largest rank (the width of S).
        stacked: True for stacked factors A (n, K, R), B (n, R, N): gradients dA, dB of those shapes, contiguous;
            False for sequences: every gradient a view of one buffer (``grad_numel`` elements), ``grad_views``.
        grad_views: per gradient (dA_0 .. dA_{n-1}, dB_0 .. dB_{n-1}) its (shape, strides, offset) in the buffer.

    The table holds addresses: it is valid while the factors it was built from are alive and keep their storage
    (the op passes and saves them, and the backward rebuilds a table whose key no longer matches its saved
    factors). It reads the factors' current values at each launch, so a write through ``.data`` or a raw pointer
    is seen at once: a kept table, unlike a kept copy, is never stale."""

    __slots__ = ("table", "rows", "key", "n", "rank", "stacked", "grad_numel", "grad_views")


def table_key(A, B) -> tuple:
    """The key of ``adapter_table(A, B)``: stacked tensors or sequences of per-adapter factors."""
    factors = (A, B) if isinstance(A, torch.Tensor) else (*A, *B)
    return (isinstance(A, torch.Tensor), factors[0].dtype, factors[0].device,
            *((t.data_ptr(), tuple(t.shape), t.stride()) for t in factors))


def _grad_strides(t: torch.Tensor) -> tuple:
    """The strides of a gradient for the 2-D factor ``t``: its own layout when it is dense (row-major, or
    column-major as PEFT's ``lora_A.weight.t()``), so that autograd hands it to ``.grad`` (or through the view's
    backward to the parameter) without a copy; row-major otherwise."""
    rows, cols = t.shape
    if not t.is_contiguous() and t.t().is_contiguous():
        return (1, rows)
    return (cols, 1)


def adapter_table(A, B, key=None) -> AdapterTable:
    """The ``AdapterTable`` of adapters given stacked (A (n, K, R), B (n, R, N), as ``lora_linear_multi`` takes
    them) or as sequences of n factors A_a (K, r_a), B_a (r_a, N), all of one dtype on one device; ``key``:
    ``table_key(A, B)`` when the caller has it. The table is made on the host and copied to the device without a
    sync (one host-to-device copy, as ``adapter_params``).

    Gradients: stacked, dA and dB contiguous of A's and B's shapes; sequences, every dA_a (K, r_a) and dB_a
    (r_a, N) a view of one buffer, each in its factor's layout (``_grad_strides``): one allocation per backward,
    and the table (built once, kept by the layers) holds their offsets, so a backward uploads nothing."""
    t = AdapterTable()
    t.key = key if key is not None else table_key(A, B)
    t.stacked = isinstance(A, torch.Tensor)
    if t.stacked:
        n, K, R = A.shape
        N = B.shape[2]
        size = A.element_size()
        columns = [[A.data_ptr() + a * A.stride(0) * size, A.stride(1), A.stride(2),
                    B.data_ptr() + a * B.stride(0) * size, B.stride(2), B.stride(1),
                    a * K * R, R, 1, a * R * N, 1, N, R] for a in range(n)]
        t.rank, t.grad_numel, t.grad_views = R, None, None
        device = A.device
    else:
        n, K, N = len(A), A[0].shape[0], B[0].shape[1]
        views, offset, columns = [], 0, []
        for factor, shape in [(f, (K, f.shape[1])) for f in A] + [(f, (f.shape[0], N)) for f in B]:
            strides = _grad_strides(factor)
            views.append((shape, strides, offset))
            offset += shape[0] * shape[1]
        for a in range(n):
            Aa, Ba = A[a], B[a]
            (_, da_strides, da_off), (_, db_strides, db_off) = views[a], views[n + a]
            # B_a and dB_a (r_a, N) read and written as their transposes (N, r_a)
            columns.append([Aa.data_ptr(), Aa.stride(0), Aa.stride(1), Ba.data_ptr(), Ba.stride(1), Ba.stride(0),
                            da_off, da_strides[0], da_strides[1], db_off, db_strides[1], db_strides[0],
                            Aa.shape[1]])
        t.rank, t.grad_numel, t.grad_views = max(f.shape[1] for f in A), offset, tuple(views)
        device = A[0].device
    t.n = n
    rows = [list(r) for r in zip(*columns)]
    t.table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    t.rows = t.table.unbind(0)
    return t


def grad_buffers(table: AdapterTable, A, B, need_dA: bool, need_dB: bool):
    """(DA, DB, dA, dB): the buffers the gradient launch writes (DA, DB) and the gradients it returns (None where
    not needed): stacked, dA and dB themselves; sequences, one buffer and tuples of its views."""
    if table.stacked:
        dA = torch.empty(A.shape, dtype=A.dtype, device=A.device)
        dB = torch.empty(B.shape, dtype=B.dtype, device=B.device)
        return dA, dB, dA if need_dA else None, dB if need_dB else None
    buf = torch.empty(table.grad_numel, dtype=A[0].dtype, device=A[0].device)
    views = [buf.as_strided(shape, strides, offset) for shape, strides, offset in table.grad_views]
    n = table.n
    return buf, buf, tuple(views[:n]) if need_dA else None, tuple(views[n:]) if need_dB else None


def _dot(dtype):
    return dict(DOT_DTYPE=configs.dot_dtype(dtype), INPUT_PRECISION=configs.input_precision(dtype))


def sort_rows(idx: torch.Tensor, n: int):
    """The rows in adapter order, for the sorted variant: (sorted_idx, perm, seg), computed with torch on idx's
    device (no host sync): once per call for a raw index, once per ``multi.AdapterRows`` (shared by the layers
    of a model forward); reused by the backward. idx (M,) int64 in [-1, n); perm (M,) int64
    a stable sort of idx (rows of one adapter keep their order), sorted_idx = idx[perm]; seg (n + 1,) int64,
    adapter a's rows at sorted positions seg[a] .. seg[a + 1] (the rows of -1 come first, before seg[0]).
    Three small torch launches (sort, arange, searchsorted; not bincount, which reads idx's min and max to the
    host on CUDA: two syncs)."""
    sorted_idx, perm = torch.sort(idx, stable=True)
    # seg[a] = the number of rows with idx < a: where a's segment starts in the sorted index
    seg = torch.searchsorted(sorted_idx, torch.arange(n + 1, dtype=idx.dtype, device=idx.device))
    return sorted_idx, perm, seg


def _order(idx, order):
    """(IDX, PERM, SEG, SORTED) for a launch: the row index itself, or the sorted one with its permutation."""
    if order is None:
        return idx, idx, idx, False
    sorted_idx, perm, seg = order
    return sorted_idx, perm, seg, True


def _project(P, Q, q_table, R, idx, row_scale, drop_p, seed, has_dropout, order=None, keep_out=None):
    """OUT (M, R) fp32 = row_scale[a] * (keep? ⊙ P) Q[a] per row (multi_proj_kernel); Q: any adapter's factor (its
    dtype), ``q_table``: (the adapter table's row of the operand's addresses, its row of ranks, n); ``order``:
    None, or ``sort_rows``' tuple (the rows visited in adapter order). With dropout the mask drawn is stored
    bit-packed into ``keep_out`` (``new_keep_mask(M, K)``)."""
    M, K = P.shape
    if has_dropout and keep_out is None:
        raise ValueError("multi._project: dropout needs keep_out, the bit-packed keep-mask to fill")
    out = torch.empty((M, R), dtype=torch.float32, device=P.device)
    cfg = _proj_config(P.dtype, has_dropout, configs.block_r(R), Q.dtype == torch.float32)
    idx_k, perm, _, sorted_ = _order(idx, order)
    qt, ranks, n = q_table
    multi_proj_kernel[(_cdiv(M, cfg["BLOCK_M"]),)](
        P, Q, idx_k, perm, row_scale, drop_p, seed if seed is not None else out, out,
        M, K, R, n,
        P.stride(0), P.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=configs.block_r(R), HAS_DROPOUT=has_dropout, SORTED=sorted_, **_dot(P.dtype), **cfg,
        MASK_ptr=keep_out if has_dropout else out, stride_mask=keep_out.stride(0) if has_dropout else 0,
        QT_ptr=qt, RANK_ptr=ranks)
    return out


def _gemm(P, Q, q_strides, N, bias, L, RM, rm_table, n, idx, row_scale, keep, out, order=None):
    """out (M, N) = P Q (+ bias) + row_scale[a] * (keep? ⊙ (L RM[a])) per row (multi_gemm_kernel); RM: any
    adapter's factor (its dtype), ``rm_table``: (the adapter table's row of RM[a]'s addresses, its row of ranks);
    ``keep``: None, or the forward's bit-packed keep-mask of the (M, N) output's columns; ``order`` as
    ``_project``'s."""
    M, K = P.shape
    R = L.shape[1]
    has_dropout = keep is not None
    cfg = _gemm_config(P.dtype, has_dropout, configs.block_r(R))
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    idx_k, perm, _, sorted_ = _order(idx, order)
    multi_gemm_kernel[grid](
        P, Q, bias if bias is not None else out, L, RM, idx_k, perm, row_scale, out,
        M, N, K, R, n,
        P.stride(0), P.stride(1), *q_strides, L.stride(0), L.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=configs.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, SORTED=sorted_,
        **_dot(P.dtype), **cfg, MASK_ptr=keep if has_dropout else out,
        stride_mask=keep.stride(0) if has_dropout else 0, RMT_ptr=rm_table[0], RANK_ptr=rm_table[1])
    return out


def multi_forward(x, weight, bias, A, B, idx, params, has_dropout, seed, out, order=None, keep_out=None, table=None):
    """Forward of lora_linear_multi, two launches. x (M, K), weight (N, K), bias (N,) or None; the adapters A
    (n, K, R) and B (n, R, N) stacked, or sequences of n factors A_a (K, r_a), B_a (r_a, N) (one dtype), read
    where they live through ``table`` (``adapter_table(A, B)``, built here when None); idx (M,) int64 in
    [-1, n), params: ``adapter_params``; ``seed`` int64 (one element) when ``has_dropout``; ``order``: None (rows
    in their order, each tile looping over the adapters present in it) or ``sort_rows(idx, n)`` (rows visited in
    adapter order through the permutation, x and y read and written in place). Writes y (M, N) into ``out``;
    returns S = keep_scale[a] * dropout(x) A[a] (M, R) fp32 in x's row order (R: the largest rank; columns
    >= r_a zero), zero on rows of adapter -1 (with x, idx, ``order``, the table and the mask's bits, what backward
    needs). With ``has_dropout`` the S pass also stores the keep-mask it drew into ``keep_out``
    (``new_keep_mask(M, K)``, required then): bit-packed in x's row order, row m drawn with its adapter's p (rows
    of adapter -1 or of an adapter with p = 0: all kept), ``philox.pack_keep_mask(reference.multi_keep_mask(seed,
    x, idx, ps))`` bit for bit in its first ceil(K / 8) bytes per row (the padding bytes are not written). Raises
    ValueError for dropout without ``keep_out``."""
    from .ops import _along_k

    table = table if table is not None else adapter_table(A, B)
    rows, n, R = table.rows, table.n, table.rank
    N = weight.shape[0]
    x, weight = _along_k(x, 1), _along_k(weight, 1)
    S = _project(x, A[0], (rows[A_ADDR], rows[RANK], n), R, idx, params[KEEP_SCALE], params[DROP_P], seed,
                 has_dropout, order, keep_out)
    # Q = W^T: element (k, n) is weight[n, k]; RM = B[a] (read through the table as its transpose (N, r_a))
    _gemm(x, weight, (weight.stride(1), weight.stride(0)), N, bias, S, B[0], (rows[B_ADDR], rows[RANK]),
          n, idx, params[SCALE], None, out, order)
    return S


def multi_backward(dy, x, weight, A, B, S, idx, params, keep, *, need_dx=True, need_dA=True, need_dB=True,
                   order=None, table=None):
    """Backward of lora_linear_multi, three launches: dS = dY B[a]^T (multi_proj_kernel), dX = dY W +
    scale[a] keep_scale[a] keep ⊙ (dS A[a]^T) (multi_gemm_kernel), dA and dB per adapter over its own rows
    (multi_reduce_kernel). ``keep``: None without dropout, else the forward's bit-packed keep-mask
    (``multi_forward(keep_out=)``), read by dX and dA (no Philox here). dy (M, N), x (M, K), A, B and ``table``
    as ``multi_forward``'s; returns (dx, dA, dB), None where not needed: stacked, dA (n, K, R) and dB (n, R, N);
    sequences, tuples of n gradients of each factor's shape and dtype (views of one buffer, ``grad_buffers``); in
    A's dtype, zero for an adapter without rows. ``order``: the forward's (None or ``sort_rows``' tuple). Sorted,
    each adapter's gradient programs walk its own segment only (M rows read in all instead of M per adapter), in
    blocks that start at the segment's start: dA and dB are summed in another grouping than unsorted (the same
    rows, in the same order, but other fp32 partial sums)."""
    from .ops import _along_k

    table = table if table is not None else adapter_table(A, B)
    rows, n, R = table.rows, table.n, table.rank
    M, N = dy.shape
    K = x.shape[1]
    dy, x, weight = _along_k(dy, 1), _along_k(x, 1), _along_k(weight, 0)
    # B[a]^T as (N, r_a), through the table
    has_dropout = keep is not None
    dS = _project(dy, B[0], (rows[B_ADDR], rows[RANK], n), R, idx, params[ONES], params[DROP_P], None,
                  False, order)
    dx = dA = dB = None
    if need_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        # Q = W as (N, K); RM = A[a]^T (r_a, K), through the table as A[a] (K, r_a)
        _gemm(dy, weight, (weight.stride(0), weight.stride(1)), K, None, dS, A[0], (rows[A_ADDR], rows[RANK]),
              n, idx, params[DX_SCALE], keep, dx, order)
    if need_dA or need_dB:
        DA, DB, dA, dB = grad_buffers(table, A, B, need_dA, need_dB)
        cfg = _reduce_config(x.dtype)
        k_blocks = _cdiv(K, cfg["BLOCK_C"]) if need_dA else 0
        n_blocks = _cdiv(N, cfg["BLOCK_C"]) if need_dB else 0
        idx_k, perm, seg, sorted_ = _order(idx, order)
        multi_reduce_kernel[(k_blocks + n_blocks, n)](
            x, dS, DA, dy, S, DB, idx_k, perm, seg, params[DX_SCALE], params[SCALE],
            M, K, N, R, k_blocks,
            x.stride(0), x.stride(1), dS.stride(0), dS.stride(1),
            dy.stride(0), dy.stride(1), S.stride(0), S.stride(1),
            BLOCK_R=configs.block_r(R), HAS_DROPOUT=has_dropout, SORTED=sorted_, **_dot(x.dtype), **cfg,
            MASK_ptr=keep if has_dropout else dS, stride_mask=keep.stride(0) if has_dropout else 0,
            DAT_ptr=rows[DA_OFF], DBT_ptr=rows[DB_OFF], RANK_ptr=rows[RANK])
    return dx, dA, dB
