"""The fused LoRA GEMM for Hopper (sm_90 and newer): persistent, TMA tensor descriptors for the loads and the store.

    OUT[M, N] = P[M, K] @ Q[K, N] (+ bias[N]) + lowrank_scale * (keep? ⊙ (L[M, R] @ RM[R, N]))

The same maths and operands as gemm.py's cp.async kernel (forward y: P = x, Q = W^T read from W's (N, K) rows;
dX: P = dY, Q = W read as its (N, K) rows), built after Triton's tutorial 09 (persistent matmul): one program per
SM walks the output tiles in grouped order; P, Q and the output move through tensor descriptors (TMA: bulk
asynchronous copies, out-of-range rows and columns zero-filled on load and clipped on store, so the main loop has no
masks), built by each program on the device (the default) or, with HOST_DESC (opt-in LORA_FAST_TMA_DESC=host),
by the launch on the host and passed as arguments (kernels/descriptors.py: no scratch, no tensor-map creation here).

The tile loop is flattened with the K loop (``tl.range(..., flatten=True)``) where the low-rank term comes after
the K loop (bf16 without dropout): the software pipeline runs across tile boundaries, so the next tile's first
TMA loads are issued before this tile's epilogue, instead of the pipeline draining after each tile. The
epilogue recomputes its own tile from a second counter (``tile_c``), as the tutorial does, so that nothing of the
prologue's tile indices stays live across the loop. The output leaves
in SUBTILE column slices of BLOCK_M x BLOCK_N / SUBTILE through a shared buffer of that size (not the whole
tile): at 128 x 256 x 64 bf16 a 4th pipeline stage then fits in the 227 KB of shared memory (compile report).

The low-rank term is accumulated after the main loop in bf16, so it does not delay the first loads; with dropout
(dX) or in fp16 it starts the accumulator, as in gemm.py, since its masked or rescaled product needs a tile of
its own (after the loop it spilled: compile report). dX's keep-mask is read from the bits the forward's S pass
stored (rng.load_keep_bits: BLOCK_M x BLOCK_N / 8 bytes per tile), with no Philox in this kernel (issue 28).
16-bit inputs only: fp32 has no tensor-core path here (IEEE) and spilled kilobytes at these tiles. Descriptors
need a 16-byte aligned base, unit stride along the rows and row strides that are multiples of 16 bytes:
ops.tma_eligible checks that before launch and takes the cp.async kernel otherwise.
"""

import triton
import triton.language as tl

from .gemm import grouped_tile, lowrank_init_bits
from .rng import load_keep_bits


@triton.jit
def _lowrank_operands(L_ptr, RM_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
                      BLOCK_R: tl.constexpr):
    """The (BLOCK_M, BLOCK_R) rows of L (fp32) and (BLOCK_R, BLOCK_N) columns of RM of one output tile."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    lo = tl.load(L_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
                 mask=(offs_m < M)[:, None] & mask_r[None, :], other=0.0)
    rm = tl.load(RM_ptr + offs_r[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn,
                 mask=mask_r[:, None] & (offs_n < N)[None, :], other=0.0)
    return lo.to(tl.float32), rm


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """The left and right (BLOCK_M, WIDTH // 2) halves of a (BLOCK_M, WIDTH) tile (registers only)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _store_tile(out_desc, acc, BIAS_ptr, bias_desc, off_m, off_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SUBTILE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (+ bias) stored at (off_m, off_n) in SUBTILE (1, 2 or 4) column slices, each cast and sent by TMA through
    a BLOCK_M x BLOCK_N / SUBTILE shared buffer. The bias is added to the whole tile, before the split: per slice
    its load lost its vector width (64 LDG instead of 4, compile report). The bias by TMA when ``bias_desc`` is
    given (a 1-D descriptor, columns past N zero-filled), else by a pointer load."""
    if HAS_BIAS:
        if bias_desc is not None:
            bias = bias_desc.load([off_n])
        else:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            bias = tl.load(BIAS_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    dtype: tl.constexpr = out_desc.dtype
    if SUBTILE == 1:
        out_desc.store([off_m, off_n], acc.to(dtype))
    elif SUBTILE == 2:
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        out_desc.store([off_m, off_n], a0.to(dtype))
        out_desc.store([off_m, off_n + BLOCK_N // 2], a1.to(dtype))
    else:
        tl.static_assert(SUBTILE == 4, "SUBTILE must be 1, 2 or 4")
        h0, h1 = _halves(acc, BLOCK_M, BLOCK_N)
        a0, a1 = _halves(h0, BLOCK_M, BLOCK_N // 2)
        out_desc.store([off_m, off_n], a0.to(dtype))
        out_desc.store([off_m, off_n + BLOCK_N // 4], a1.to(dtype))
        a2, a3 = _halves(h1, BLOCK_M, BLOCK_N // 2)
        out_desc.store([off_m, off_n + BLOCK_N // 2], a2.to(dtype))
        out_desc.store([off_m, off_n + 3 * BLOCK_N // 4], a3.to(dtype))


@triton.jit
def _lowrank_tiles(l_desc, rm_desc, off_m, off_n, RM_ROWS_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_R) tile of the low-rank term's left operand (the S pass's rounded copy) and the
    (BLOCK_R, BLOCK_N) tile of RM, both by TMA (ranks >= R and rows or columns past the edge zero-filled).
    RM_ROWS_N: RM is stored as (N, R) rows (dX's A^T read from A's (K, R) rows) and its tile is transposed."""
    lo = l_desc.load([off_m, 0])
    if RM_ROWS_N:
        rm = tl.trans(rm_desc.load([off_n, 0]))
    else:
        rm = rm_desc.load([0, off_n])
    return lo, rm


@triton.jit
def _lowrank_first_tma(l_desc, rm_desc, f_desc, MASK_ptr, mask_desc, off_m, off_n, M, N, stride_mask,
                       lowrank_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RM_ROWS_N: tl.constexpr,
                       MASK_TMA: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """gemm.lowrank_init_bits with its operands by TMA: L is the S pass's copy, already rounded to the dot dtype
    (lowrank.py's TERM: with fp16 divided by its power-of-two row factor F, a 1-D fp32 descriptor; without dropout
    the scale folded in before the rounding), so the arithmetic after the loads is that of lowrank_init_bits, bit
    for bit. The keep-mask's bytes come by TMA too with MASK_TMA (rows past the edge read as dropped)."""
    lo, rm = _lowrank_tiles(l_desc, rm_desc, off_m, off_n, RM_ROWS_N)
    acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    if DOT_DTYPE == tl.float16:
        row_f = f_desc.load([off_m])[:, None]
    if HAS_DROPOUT:
        if DOT_DTYPE == tl.float16:
            row_scale = row_f * lowrank_scale
        else:
            row_scale = lowrank_scale
        if MASK_TMA:
            packed = mask_desc.load([off_m, off_n // 8])
            bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            keep = tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0
        else:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            keep = load_keep_bits(MASK_ptr, offs_m, offs_m < M, off_n, N, stride_mask, BLOCK_N)
        acc = tl.where(keep, acc, 0.0) * row_scale
    elif DOT_DTYPE == tl.float16:
        acc = acc * row_f
    return acc


@triton.jit
def gemm_lowrank_tma_kernel(
    # pointers (MASK: the forward's bit-packed keep-mask, uint8 rows of stride_mask bytes, read with HAS_DROPOUT;
    # with LOWRANK_TMA, L is the S pass's copy of the term's left operand in the dot dtype (lowrank.py's TERM) and
    # F its fp32 power-of-two row factors (fp16 only))
    P_ptr, Q_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr, MASK_ptr, F_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, R, M_BUCKET,
    # strides (P and OUT by rows; Q by the rows of the tensor it points to: W's (N, K) rows in forward and dX)
    stride_pm, stride_qrow, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_mask,
    # scalars (with dropout lowrank_scale includes 1 / (1 - p))
    lowrank_scale,
    # meta-parameters (Q_TRANSPOSED: Q[k, n] is element (n, k) of the stored rows, the forward's W^T; SUBTILE:
    # column slices of the epilogue's store; LOWRANK_TMA: the term's operands by TMA (L the S pass's rounded copy,
    # RM by a descriptor: RM_ROWS_N when it is stored as (N, R) rows), else by pointer loads (L fp32, the scale and
    # rounding here); MASK_TMA: the keep-mask's bytes by TMA where a tile row's bytes (BLOCK_N / 8) reach the 16 a
    # descriptor's box needs; BIAS_TMA: the bias by a 1-D descriptor (an aligned base); HOST_DESC: every operand
    # read or written by TMA is given as a host-side tensor descriptor (kernels/descriptors.py) in its pointer's
    # place, else the descriptors are built here, in global scratch from Triton's allocator)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, NUM_SMS: tl.constexpr, Q_TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LOWRANK_TMA: tl.constexpr, RM_ROWS_N: tl.constexpr, MASK_TMA: tl.constexpr, BIAS_TMA: tl.constexpr,
    HOST_DESC: tl.constexpr,
):
    if HOST_DESC:
        # the launch's host-side descriptors in the arguments' places (kernels/descriptors.py: the same shapes,
        # strides and block shapes as below), passed by value: no tensor map is created or fenced here
        p_desc = P_ptr
        q_desc = Q_ptr
        out_desc = OUT_ptr
        bias_desc = None
        if HAS_BIAS and BIAS_TMA:
            bias_desc = BIAS_ptr
        l_desc = None
        rm_desc = None
        f_desc = None
        mask_desc = None
        if LOWRANK_TMA:
            l_desc = L_ptr
            rm_desc = RM_ptr
            if DOT_DTYPE == tl.float16:
                f_desc = F_ptr
            if MASK_TMA and BLOCK_N >= 128:
                mask_desc = MASK_ptr
    else:
        p_desc = tl.make_tensor_descriptor(P_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
        if Q_TRANSPOSED:
            q_desc = tl.make_tensor_descriptor(Q_ptr, shape=[N, K], strides=[stride_qrow, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            q_desc = tl.make_tensor_descriptor(Q_ptr, shape=[K, N], strides=[stride_qrow, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        out_desc = tl.make_tensor_descriptor(OUT_ptr, shape=[M, N], strides=[stride_om, 1],
                                             block_shape=[BLOCK_M, BLOCK_N // SUBTILE])
        bias_desc = None
        if HAS_BIAS and BIAS_TMA:
            bias_desc = tl.make_tensor_descriptor(BIAS_ptr, shape=[N], strides=[1], block_shape=[BLOCK_N])
        l_desc = None
        rm_desc = None
        f_desc = None
        mask_desc = None
        if LOWRANK_TMA:
            l_desc = tl.make_tensor_descriptor(L_ptr, shape=[M, R], strides=[stride_lm, 1],
                                               block_shape=[BLOCK_M, BLOCK_R])
            if RM_ROWS_N:
                rm_desc = tl.make_tensor_descriptor(RM_ptr, shape=[N, R], strides=[stride_rn, 1],
                                                    block_shape=[BLOCK_N, BLOCK_R])
            else:
                rm_desc = tl.make_tensor_descriptor(RM_ptr, shape=[R, N], strides=[stride_rr, 1],
                                                    block_shape=[BLOCK_R, BLOCK_N])
            if DOT_DTYPE == tl.float16:
                f_desc = tl.make_tensor_descriptor(F_ptr, shape=[M], strides=[1], block_shape=[BLOCK_M])
            if MASK_TMA and BLOCK_N >= 128:
                mask_desc = tl.make_tensor_descriptor(MASK_ptr, shape=[M, tl.cdiv(N, 8)], strides=[stride_mask, 1],
                                                      block_shape=[BLOCK_M, BLOCK_N // 8])
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # the low-rank term starts the accumulator when it needs a tile of its own (dX's keep-mask; fp16's range guard,
    # fp16.py, scales the product after the dot): after the loop it would spill. Then the loops stay apart: with a
    # dot before the K loop, flattening left the loads unpipelined (2 UTMALDG instead of 8 at 4 stages, compile
    # report, triton 3.6 and 3.9)
    LOWRANK_FIRST: tl.constexpr = HAS_DROPOUT or DOT_DTYPE == tl.float16
    # the epilogue's own tile counter (tutorial 09): it trails the prologue's by the flattened pipeline
    tile_c = tl.program_id(0) - NUM_SMS
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=not LOWRANK_FIRST):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if LOWRANK_FIRST:
            if LOWRANK_TMA:
                acc = _lowrank_first_tma(l_desc, rm_desc, f_desc, MASK_ptr, mask_desc, pid_m * BLOCK_M,
                                         pid_n * BLOCK_N, M, N, stride_mask, lowrank_scale, BLOCK_M, BLOCK_N,
                                         RM_ROWS_N, MASK_TMA and BLOCK_N >= 128, HAS_DROPOUT, DOT_DTYPE,
                                         INPUT_PRECISION)
            else:
                offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_r = tl.arange(0, BLOCK_R)
                acc = lowrank_init_bits(L_ptr, RM_ptr, MASK_ptr, offs_m, offs_n, pid_n, offs_m < M, offs_n < N,
                                        offs_r < R, offs_r, N, stride_lm, stride_lr, stride_rr, stride_rn,
                                        stride_mask, lowrank_scale, BLOCK_N, HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            p = p_desc.load([pid_m * BLOCK_M, k0])
            if Q_TRANSPOSED:
                q = tl.trans(q_desc.load([pid_n * BLOCK_N, k0]))
            else:
                q = q_desc.load([k0, pid_n * BLOCK_N])
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

        tile_c += NUM_SMS
        pid_m, pid_n = grouped_tile(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if not LOWRANK_FIRST:
            # the low-rank term accumulated into the same registers after the main loop, so it does not delay the
            # first loads; its scale folded into L (fp32) before L's one rounding (by the S pass with LOWRANK_TMA)
            if LOWRANK_TMA:
                lo, rm = _lowrank_tiles(l_desc, rm_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, RM_ROWS_N)
                acc = tl.dot(lo.to(DOT_DTYPE), rm.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                             out_dtype=tl.float32)
            else:
                lo, rm = _lowrank_operands(L_ptr, RM_ptr, pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
                                           pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, R, stride_lm, stride_lr,
                                           stride_rr, stride_rn, BLOCK_R)
                acc = tl.dot((lo * lowrank_scale).to(DOT_DTYPE), rm.to(DOT_DTYPE), acc,
                             input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        _store_tile(out_desc, acc, BIAS_ptr, bias_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, BLOCK_M, BLOCK_N, SUBTILE,
                    HAS_BIAS)
