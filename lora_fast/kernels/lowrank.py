"""Narrow kernels of the low-rank path: the (M, R) projections and the reductions over M.

``lowrank_proj_kernel``: OUT[M, R] = out_scale * (keep? ⊙ P[M, K]) @ Q[K, R], in one pass over P, its programs
over groups of rows and (when the groups alone would leave SMs idle) splits of K; with WRITE_PARTIAL it also
writes, per row group, PARTIAL[group] = L[group rows, :]^T @ P[group rows, :] (R, K) and finishes
GRAD = grad_scale * sum over groups of PARTIAL (R, K).
  forward:  S = dropout(x) @ A                         (P = x, Q = A, out_scale = 1 / (1 - p)); with WRITE_MASK
            it also stores the keep-mask it drew, bit-packed (rng.store_keep_bits), for the backward
  backward: dS = dY @ B^T and dB = scale S^T dY        (P = dY, Q = B^T, L = S), one pass over dY.
  On the TMA GEMM's path (WRITE_TERM) it also writes the GEMM's rounded copy of OUT, and with fp32 adapters on a
  16-bit base (COPY_RM) its programs past the row groups cast the GEMM's other operand, B or A's rows, to the dot
  dtype: the GEMM then loads the whole low-rank term by TMA, with no launch or torch op added (issue 28). With
  WRITE_TERM2 it writes a second rounded copy of another scale (TERM2, F2) for a second GEMM of the same L and RM
  (DoRA's dY W with dropout, scale 0).
``reduce_m_kernel``: OUT = scale * (keep? ⊙ P)^T @ L (K, R), its programs over blocks of K and splits of M.
  backward: dA = scale / (1 - p) * (keep ⊙ x)^T dS      (P = x, L = dS); dB of a large rank (P = dY, L = S).
  The keep-mask is read from the bits the forward's S pass stored (every op: LoRA, DoRA, 4-bit; issue 28).
``sum_partials_kernel``: OUT = (scale * sum over splits of PARTIAL).to(dtype) (DoRA's dm).

Each pass finishes its own reductions in the same launch (issue 26: five launches per layer and step). The
programs that share an output write their fp32 partials to scratch, then each takes a ticket from an int32
counter (``tl.atomic_add``, acq_rel); the program that draws the last ticket reads every partial back in a fixed
order (split 0, 1, ...), writes the result and puts the counter back to 0 for the next launch. No float atomics:
the gradients are bitwise deterministic, whatever the order in which the programs ran.
"""

import triton
import triton.language as tl

from .fp16 import pow2_split
from .rng import keep_mask, keep_mask_bits, load_keep_bits, store_keep_bits


@triton.jit
def _store_term(TERM_ptr, F_ptr, s, offs_m, mask_m, offs_r, mask_r, stride_tm, term_scale, DOT_DTYPE: tl.constexpr):
    """The TMA GEMM's copy of the low-rank term's left operand (gemm_tma.py, LOWRANK_TMA), from ``s``, the fp32
    (BLOCK_M, BLOCK_R) block of OUT just stored: term_scale * s rounded to the dot dtype, as gemm.lowrank_init_bits
    rounds it (fp16: divided first by its power-of-two row factor, fp16.py, stored to F); ranks >= R not written."""
    t = s * term_scale
    if DOT_DTYPE == tl.float16:
        t, f = pow2_split(t, 1)
        tl.store(F_ptr + offs_m[:, None], f, mask=mask_m[:, None])
    tl.store(TERM_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :], t.to(DOT_DTYPE),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _store_term_again(out, TERM_ptr, F_ptr, offs_m, mask_m, offs_r, mask_r, stride_tm, term_scale,
                      DOT_DTYPE: tl.constexpr):
    """``_store_term`` of the fp32 OUT block at pointers ``out`` (BLOCK_M, BLOCK_R) that this program has stored, read
    back after a barrier (every thread's stores seen; the same bits, OUT being fp32): the second copy (WRITE_TERM2),
    kept apart from the first, which would otherwise be live at once (fp16 at rank 64 spilled 16 B with both made
    from one block in registers: compile report, sm_90, 4 warps, triton 3.9)."""
    tl.debug_barrier()
    s = tl.load(out, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    _store_term(TERM_ptr, F_ptr, s, offs_m, mask_m, offs_r, mask_r, stride_tm, term_scale, DOT_DTYPE)


@triton.jit
def _copy_rm(SRC_ptr, DST_ptr, chunk, N, R, stride_sr, stride_sn, stride_dr, stride_dn, BLOCK_R: tl.constexpr,
             COPY_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Columns chunk * COPY_N .. + COPY_N of the TMA GEMM's copy of RM (R, N): fp32 RM (B, or A's rows as A^T) cast to
    the dot dtype, the cast gemm.lowrank_init_bits applies to its RM tile (round to nearest even), so that the GEMM
    reading the copy by TMA computes what it computes from fp32 RM by pointer loads, bit for bit."""
    offs_n = chunk * COPY_N + tl.arange(0, COPY_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_r < R)[:, None] & (offs_n < N)[None, :]
    rm = tl.load(SRC_ptr + offs_r[:, None] * stride_sr + offs_n[None, :].to(tl.int64) * stride_sn, mask=mask,
                 other=0.0)
    tl.store(DST_ptr + offs_r[:, None] * stride_dr + offs_n[None, :].to(tl.int64) * stride_dn, rm.to(DOT_DTYPE),
             mask=mask)


@triton.jit
def _proj_row_block(
    P_ptr, Q_ptr, OUT_ptr, L_ptr, partial, SEED_ptr, MASK_ptr, TERM_ptr, F_ptr, TERM2_ptr, F2_ptr,
    m0, row_end, first, k_start, k_end, K, R, pid_k,
    stride_pm, stride_pk, stride_qk, stride_qr, stride_om, stride_or, stride_os, stride_lm, stride_lr, stride_mask,
    stride_tm, out_scale, dropout_p, term_scale, term2_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_PARTIAL: tl.constexpr, WRITE_TERM: tl.constexpr,
    WRITE_TERM2: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Rows m0 .. m0 + BLOCK_M (below row_end) over columns k_start .. k_end: OUT's block, and with WRITE_PARTIAL
    the group's (R, K) slice of partials written (``first``) or added to."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < row_end
    mask_r = offs_r < R
    rows_p = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm
    if WRITE_PARTIAL:
        lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        lo_t = tl.trans(lo.to(tl.float32))
        if DOT_DTYPE == tl.float16:
            # fp16 range (see fp16.py): a power-of-two factor per rank row, put back after each partial dot
            lo_t, rank_f = pow2_split(lo_t, 1)
        lo_t = lo_t.to(DOT_DTYPE)
        # the group's first row block writes its slice, the next ones add to it (an all-false mask loads
        # nothing; a (BLOCK_R, 1) tile, since the interpreter takes no scalar mask)
        add_to = ((offs_r * 0 + first) == 0)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_f = tl.full((1, BLOCK_R), 1.0, tl.float32)   # acc's power-of-two unit per rank column (fp32 Q on fp16)
    zero64 = tl.full((), 0, tl.int64)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        if HAS_DROPOUT:
            # the mask's bits stored before the block of P is loaded (fewer registers live: with P loaded first,
            # fp16 with fp32 adapters at rank 64 spilled ~110 B on sm_80, compile report, triton 3.9)
            if WRITE_MASK:
                keep, bits = keep_mask_bits(SEED_ptr, offs_m, k0, K, k_end, dropout_p, BLOCK_K)
                store_keep_bits(MASK_ptr, bits, offs_m, mask_m, k0, k_end, stride_mask, BLOCK_K)
            else:
                keep = keep_mask(SEED_ptr, offs_m, k0, K, dropout_p, BLOCK_K)
        # the block's offset along K in int64 (a column-major x, stride_pk = M, passes 2**31 on large inputs)
        p = tl.load(rows_p + (k0 + zero64) * stride_pk + offs_k[None, :] * stride_pk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        p = p.to(DOT_DTYPE)
        if HAS_DROPOUT:
            p = tl.where(keep, p, 0.0).to(DOT_DTYPE)
        q = tl.load(Q_ptr + (k0 + offs_k)[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_DTYPE == tl.float16 and Q_ptr.dtype.element_ty == tl.float32:
            # fp32 adapters on an fp16 base: a power-of-two factor per rank column of the Q tile (fp16.py) taken
            # out before its cast to fp16, so that a tiny adapter (|B| ~ 5e-7 after a few steps lies in fp16's
            # subnormals, 1e-9 below them) is not flushed; acc is kept in units of the current factors (rescaled
            # by a power of two when they change, exact) and multiplied by them once at the end
            q, col_f = pow2_split(q.to(tl.float32), 0)
            acc = tl.dot(p, q.to(DOT_DTYPE), acc * (acc_f / col_f), input_precision=INPUT_PRECISION,
                         out_dtype=tl.float32)
            acc_f = col_f
        else:
            acc = tl.dot(p, q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        if WRITE_PARTIAL:
            part = tl.dot(lo_t, p, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            if DOT_DTYPE == tl.float16:
                part = part * rank_f
            mask_part = mask_r[:, None] & mask_k[None, :]
            part += tl.load(partial + (k0 + offs_k)[None, :], mask=mask_part & add_to, other=0.0)
            tl.store(partial + (k0 + offs_k)[None, :], part, mask=mask_part)

    out = (OUT_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om
           + offs_r[None, :] * stride_or)
    if DOT_DTYPE == tl.float16 and Q_ptr.dtype.element_ty == tl.float32:
        acc = acc * acc_f
    acc = acc * out_scale
    tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_TERM:
        _store_term(TERM_ptr, F_ptr, acc.to(OUT_ptr.dtype.element_ty).to(tl.float32), offs_m, mask_m, offs_r, mask_r,
                    stride_tm, term_scale, DOT_DTYPE)
        if WRITE_TERM2:
            _store_term_again(out, TERM2_ptr, F2_ptr, offs_m, mask_m, offs_r, mask_r, stride_tm, term2_scale,
                              DOT_DTYPE)


@triton.jit
def _last_ticket(COUNTER_ptr, index, tickets):
    """True in the program that draws the last of ``tickets`` tickets of counter ``index``. The barrier orders
    every thread's stores of this program before the release; acq_rel makes the other programs' stores visible
    to the winner (read back with .cg loads: from L2, never a stale L1 line)."""
    tl.debug_barrier()
    return tl.atomic_add(COUNTER_ptr + index, 1, sem="acq_rel") == tickets - 1


@triton.jit
def _finish_rows(SPLIT_ptr, OUT_ptr, TERM_ptr, F_ptr, TERM2_ptr, F2_ptr, row_start, row_end, M, R, splits,
                 stride_om, stride_or, stride_tm, out_scale, term_scale, term2_scale, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, WRITE_TERM: tl.constexpr, WRITE_TERM2: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):
    """OUT[rows] = out_scale * sum over splits (in order) of SPLIT[split, rows] ((splits, M, R) fp32, contiguous);
    with WRITE_TERM also the TMA GEMM's rounded copy (``_store_term``), with WRITE_TERM2 a second one of term2_scale."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_r[None, :]
        at = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        split = SPLIT_ptr
        for _ in range(0, splits):
            acc += tl.load(split + at, mask=mask, other=0.0, cache_modifier=".cg")
            split += M * R
        acc = acc * out_scale
        tl.store(OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
                 acc.to(OUT_ptr.dtype.element_ty), mask=mask)
        if WRITE_TERM:
            _store_term(TERM_ptr, F_ptr, acc.to(OUT_ptr.dtype.element_ty).to(tl.float32), offs_m, offs_m < row_end,
                        offs_r, mask_r, stride_tm, term_scale, DOT_DTYPE)
    if WRITE_TERM and WRITE_TERM2:
        # a second pass over the rows this program finished (``_store_term_again``)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            _store_term_again(OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or,
                              TERM2_ptr, F2_ptr, offs_m, offs_m < row_end, offs_r, mask_r, stride_tm, term2_scale,
                              DOT_DTYPE)


@triton.jit
def _finish_columns(PARTIAL_ptr, GRAD_ptr, k_start, k_end, K, R, groups, stride_gr, stride_gk, grad_scale,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """GRAD[:, k_start:k_end] = grad_scale * sum over groups (in order) of PARTIAL[group] ((groups, R, K) fp32)."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < k_end)[None, :]
        at = offs_r[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        group = PARTIAL_ptr
        for _ in range(0, groups):
            acc += tl.load(group + at, mask=mask, other=0.0, cache_modifier=".cg")
            group += R * K
        tl.store(GRAD_ptr + offs_r[:, None] * stride_gr + offs_k[None, :] * stride_gk,
                 (acc * grad_scale).to(GRAD_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lowrank_proj_kernel(
    # pointers (OUT: the (M, R) result; SPLIT: (splits, M, R) fp32 scratch for the raw sum of each K split, read
    # only with SPLIT_K; PARTIAL: (groups, R, K) fp32 scratch and GRAD (R, K): only with WRITE_PARTIAL; COUNTER:
    # int32, zero on entry and on exit: one per row group (SPLIT_K), then one per K split (WRITE_PARTIAL); MASK:
    # the bit-packed keep-mask written with WRITE_MASK, uint8 rows of stride_mask bytes)
    P_ptr, Q_ptr, OUT_ptr, L_ptr, PARTIAL_ptr, SEED_ptr, SPLIT_ptr, GRAD_ptr, COUNTER_ptr, MASK_ptr, TERM_ptr, F_ptr,
    RMS_ptr, RMC_ptr, TERM2_ptr, F2_ptr,
    # sizes (M_BUCKET only keys the autotuner; ROWS_PER_PROGRAM: a multiple of BLOCK_M, BLOCK_M itself without
    # WRITE_PARTIAL; K_PER_SPLIT: the K range of one program, a multiple of BLOCK_K; N_RM: RM's columns, COPY_RM)
    M, K, R, M_BUCKET, ROWS_PER_PROGRAM, K_PER_SPLIT, N_RM,
    # strides (stride_s*: RMS (R, N_RM), stride_c*: RMC (R, N_RM), element (r, n) at r * stride_*r + n * stride_*n)
    stride_pm, stride_pk, stride_qk, stride_qr, stride_om, stride_or, stride_lm, stride_lr, stride_gr, stride_gk,
    stride_mask, stride_tm, stride_sr, stride_sn, stride_cr, stride_cn,
    # scalars
    out_scale, grad_scale, dropout_p, term_scale, term2_scale,
    # meta-parameters (WRITE_MASK: with HAS_DROPOUT, also store the keep-mask drawn; WRITE_TERM: also store
    # TERM (M, R) in the dot dtype, rows of stride_tm, = term_scale * OUT rounded as the GEMM's low-rank term rounds
    # it, fp16 divided by its power-of-two row factor F (M,) fp32: the TMA GEMM's operand, gemm_tma.py; COPY_RM:
    # the programs past the row groups along axis 0 write RMC = RMS (fp32 adapters: B, or A's rows) cast to the dot
    # dtype, COPY_N columns each, the TMA GEMM's other operand of the term; WRITE_TERM2, with WRITE_TERM: also
    # TERM2 (M, R), rows of stride_tm, and F2 (M,) = term2_scale * OUT rounded the same way, for a second GEMM of the
    # same term with another scale: DoRA's dY W with dropout, scale 0)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_PARTIAL: tl.constexpr, SPLIT_K: tl.constexpr,
    WRITE_TERM: tl.constexpr, WRITE_TERM2: tl.constexpr, COPY_RM: tl.constexpr, COPY_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # a program covers ROWS_PER_PROGRAM rows and K_PER_SPLIT columns (program_id 1). With several K splits
    # (SPLIT_K) each writes the raw sum of its split to SPLIT, and the last of a row group's splits to finish adds
    # them up (and scales) into OUT. With WRITE_PARTIAL the rows are a group of row blocks walked in turn, whose
    # dB partials accumulate in one (R, K) slice per group in place (the slice stays in L2: it is this program's
    # own), so their size is set by the number of groups, not of row blocks; the last group to finish a K split
    # sums that split's columns over the groups into GRAD. Without it a program is one row block, with no loop
    # around it (fewer registers)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # the row groups' programs; with COPY_RM the programs past them copy RM (a chunk of columns each) and stop
    row_programs = tl.cdiv(M, ROWS_PER_PROGRAM)
    if COPY_RM:
        if pid_m >= row_programs:
            _copy_rm(RMS_ptr, RMC_ptr, (pid_m - row_programs) * tl.num_programs(1) + pid_k, N_RM, R, stride_sr,
                     stride_sn, stride_cr, stride_cn, BLOCK_R, COPY_N, DOT_DTYPE)
            return
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    row_start = pid_m * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    if SPLIT_K:
        target, stride_om_t, stride_or_t, scale = SPLIT_ptr, R, 1, 1.0
    else:
        target, stride_om_t, stride_or_t, scale = OUT_ptr, stride_om, stride_or, out_scale
    if WRITE_PARTIAL:
        partial = PARTIAL_ptr + pid_m.to(tl.int64) * R * K + tl.arange(0, BLOCK_R)[:, None] * K
        for m0 in range(row_start, row_end, BLOCK_M):
            # orders the previous block's stores to the slice before this block's loads of it across the CTA's
            # threads (an element may be stored and loaded by different threads)
            tl.debug_barrier()
            _proj_row_block(P_ptr, Q_ptr, target, L_ptr, partial, SEED_ptr, MASK_ptr, TERM_ptr, F_ptr, TERM2_ptr,
                            F2_ptr, m0, row_end, m0 == row_start, k_start, k_end, K, R, pid_k,
                            stride_pm, stride_pk, stride_qk, stride_qr, stride_om_t, stride_or_t, M * R,
                            stride_lm, stride_lr, stride_mask, stride_tm, scale, dropout_p, term_scale, term2_scale,
                            BLOCK_M, BLOCK_K, BLOCK_R, HAS_DROPOUT, WRITE_MASK, WRITE_PARTIAL,
                            WRITE_TERM and not SPLIT_K, WRITE_TERM2, DOT_DTYPE, INPUT_PRECISION)
    else:
        _proj_row_block(P_ptr, Q_ptr, target, L_ptr, PARTIAL_ptr, SEED_ptr, MASK_ptr, TERM_ptr, F_ptr, TERM2_ptr,
                        F2_ptr, row_start, row_end, True, k_start, k_end, K, R, pid_k,
                        stride_pm, stride_pk, stride_qk, stride_qr, stride_om_t, stride_or_t, M * R,
                        stride_lm, stride_lr, stride_mask, stride_tm, scale, dropout_p, term_scale, term2_scale,
                        BLOCK_M, BLOCK_K, BLOCK_R, HAS_DROPOUT, WRITE_MASK, WRITE_PARTIAL,
                        WRITE_TERM and not SPLIT_K, WRITE_TERM2, DOT_DTYPE, INPUT_PRECISION)
    if SPLIT_K:
        if _last_ticket(COUNTER_ptr, pid_m, tl.num_programs(1)):
            _finish_rows(SPLIT_ptr, OUT_ptr, TERM_ptr, F_ptr, TERM2_ptr, F2_ptr, row_start, row_end, M, R,
                         tl.num_programs(1), stride_om, stride_or, stride_tm, out_scale, term_scale, term2_scale,
                         BLOCK_M, BLOCK_R, WRITE_TERM, WRITE_TERM2, DOT_DTYPE)
            tl.atomic_xchg(COUNTER_ptr + pid_m, 0)
    if WRITE_PARTIAL:
        column_counter = COUNTER_ptr
        if SPLIT_K:
            column_counter += row_programs
        if _last_ticket(column_counter, pid_k, row_programs):
            _finish_columns(PARTIAL_ptr, GRAD_ptr, k_start, k_end, K, R, row_programs, stride_gr, stride_gk,
                            grad_scale, BLOCK_K, BLOCK_R)
            tl.atomic_xchg(column_counter + pid_k, 0)


@triton.jit
def reduce_m_kernel(
    # pointers (PARTIAL: (splits, K, R) fp32 scratch, only with SPLIT_M; COUNTER: int32, one per block of K, zero
    # on entry and on exit; OUT (K, R) through its strides; MASK: the forward's bit-packed keep-mask, uint8 rows
    # of stride_mask bytes, read with HAS_DROPOUT)
    P_ptr, L_ptr, PARTIAL_ptr, OUT_ptr, COUNTER_ptr, MASK_ptr,
    # sizes (ROWS_PER_SPLIT: a multiple of BLOCK_M; M_BUCKET only keys the autotuner)
    M, K, R, ROWS_PER_SPLIT, M_BUCKET,
    # strides
    stride_pm, stride_pk, stride_lm, stride_lr, stride_ok, stride_or, stride_mask,
    # scalars
    scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SPLIT_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # programs over (blocks of K, splits of M); with SPLIT_M each split writes its (BLOCK_K, R) partial and the last
    # split of a block of K to finish sums them in split order into OUT
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, M)

    # int64 column offsets (loop-invariant here): a column-major x passes 2**31 elements on large inputs
    cols_p = offs_k.to(tl.int64)[:, None] * stride_pk
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        p_t = tl.load(P_ptr + offs_m[None, :].to(tl.int64) * stride_pm + cols_p,
                      mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        p_t = p_t.to(DOT_DTYPE)
        if HAS_DROPOUT:
            keep = tl.trans(load_keep_bits(MASK_ptr, offs_m, mask_m, pid_k * BLOCK_K, K, stride_mask, BLOCK_K))
            p_t = tl.where(keep, p_t, 0.0).to(DOT_DTYPE)
        lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if DOT_DTYPE == tl.float16:
            # fp16 range (see fp16.py): a power-of-two factor per rank column of this block of dS
            lo, rank_f = pow2_split(lo.to(tl.float32), 0)
            acc += tl.dot(p_t, lo.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32) * rank_f
        else:
            acc = tl.dot(p_t, lo.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    mask = mask_k[:, None] & mask_r[None, :]
    out = OUT_ptr + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or
    if SPLIT_M:
        at = offs_k[:, None] * R + offs_r[None, :]
        tl.store(PARTIAL_ptr + pid_s.to(tl.int64) * K * R + at, acc, mask=mask)
        if _last_ticket(COUNTER_ptr, pid_k, tl.num_programs(1)):
            total = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
            split = PARTIAL_ptr
            for _ in range(0, tl.num_programs(1)):
                total += tl.load(split + at, mask=mask, other=0.0, cache_modifier=".cg")
                split += K * R
            tl.store(out, (total * scale).to(OUT_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(COUNTER_ptr + pid_k, 0)
    else:
        tl.store(out, (acc * scale).to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_partials_kernel(
    # pointers: PARTIAL (SPLITS, ROWS, COLS) fp32 contiguous; OUT (ROWS, COLS) through its strides
    PARTIAL_ptr, OUT_ptr,
    # sizes (NUMEL = ROWS * COLS, from the host: int64 when it needs to be)
    SPLITS, ROWS, COLS, NUMEL,
    # strides of OUT
    stride_or, stride_oc,
    # scalars
    scale,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """OUT = (scale * sum over splits of PARTIAL).to(OUT's dtype), summed in a fixed order (deterministic): the
    last step of dA and dB, in one launch instead of torch's sum, multiply and cast."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    split = PARTIAL_ptr
    for _ in range(0, SPLITS):
        acc += tl.load(split + offs, mask=mask, other=0.0)
        split += NUMEL
    rows = offs // COLS
    cols = offs % COLS
    tl.store(OUT_ptr + rows * stride_or + cols * stride_oc, (acc * scale).to(OUT_ptr.dtype.element_ty), mask=mask)
