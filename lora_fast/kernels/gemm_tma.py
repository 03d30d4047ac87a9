"""The fused LoRA GEMM for Hopper (sm_90 and newer): persistent, TMA tensor descriptors for the loads and the store.

    OUT[M, N] = P[M, K] @ Q[K, N] (+ bias[N]) + lowrank_scale * (keep? ⊙ (L[M, R] @ RM[R, N]))

The same maths and operands as gemm.py's cp.async kernel (forward y: P = x, Q = W^T read from W's (N, K) rows;
dX: P = dY, Q = W read as its (N, K) rows), built after Triton's tutorial 09 (persistent matmul): one program per
SM walks the output tiles in grouped order; P, Q and the output move through device-side tensor descriptors
(TMA: bulk asynchronous copies, out-of-range rows and columns zero-filled on load and clipped on store, so the
main loop has no masks).

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
def _store_tile(out_desc, acc, BIAS_ptr, off_m, off_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SUBTILE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (+ bias) stored at (off_m, off_n) in SUBTILE (1, 2 or 4) column slices, each cast and sent by TMA through
    a BLOCK_M x BLOCK_N / SUBTILE shared buffer. The bias is added to the whole tile, before the split: per slice
    its load lost its vector width (64 LDG instead of 4, compile report)."""
    if HAS_BIAS:
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
def gemm_lowrank_tma_kernel(
    # pointers (MASK: the forward's bit-packed keep-mask, uint8 rows of stride_mask bytes, read with HAS_DROPOUT)
    P_ptr, Q_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr, MASK_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, R, M_BUCKET,
    # strides (P and OUT by rows; Q by the rows of the tensor it points to: W's (N, K) rows in forward and dX)
    stride_pm, stride_qrow, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_mask,
    # scalars (with dropout lowrank_scale includes 1 / (1 - p))
    lowrank_scale,
    # meta-parameters (Q_TRANSPOSED: Q[k, n] is element (n, k) of the stored rows, the forward's W^T; SUBTILE:
    # column slices of the epilogue's store)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, NUM_SMS: tl.constexpr, Q_TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    p_desc = tl.make_tensor_descriptor(P_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if Q_TRANSPOSED:
        q_desc = tl.make_tensor_descriptor(Q_ptr, shape=[N, K], strides=[stride_qrow, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        q_desc = tl.make_tensor_descriptor(Q_ptr, shape=[K, N], strides=[stride_qrow, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(OUT_ptr, shape=[M, N], strides=[stride_om, 1],
                                         block_shape=[BLOCK_M, BLOCK_N // SUBTILE])
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
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = tl.arange(0, BLOCK_R)
            acc = lowrank_init_bits(L_ptr, RM_ptr, MASK_ptr, offs_m, offs_n, pid_n, offs_m < M, offs_n < N,
                                    offs_r < R, offs_r, N, stride_lm, stride_lr, stride_rr, stride_rn, stride_mask,
                                    lowrank_scale, BLOCK_N, HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION)
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
            # first loads; its scale folded into L (fp32) before L's one rounding
            lo, rm = _lowrank_operands(L_ptr, RM_ptr, pid_m * BLOCK_M + tl.arange(0, BLOCK_M),
                                       pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, R, stride_lm, stride_lr,
                                       stride_rr, stride_rn, BLOCK_R)
            acc = tl.dot((lo * lowrank_scale).to(DOT_DTYPE), rm.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=tl.float32)
        _store_tile(out_desc, acc, BIAS_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, BLOCK_M, BLOCK_N, SUBTILE, HAS_BIAS)
