"""4-bit base weights (bitsandbytes' NF4 / FP4 layout) read inside the kernels: a dequantization kernel and the
base GEMM of the fused LoRA linear with the weight dequantized per tile (QLoRA, Dettmers et al. 2023).

The layout is bitsandbytes' (``bitsandbytes.functional.quantize_4bit``; checked bit for bit by tests/test_qlora.py
against its definition in torch ops, ``lora_fast.reference_4bit.dequantize``, and against bitsandbytes'
``dequantize_4bit`` on the layouts where that is right on every CPU): the (N, K) weight is flattened
row-major; element i is the 4-bit code ``byte[i // 2] >> 4`` for even i and ``byte[i // 2] & 15`` for odd i; its
value is ``code_table[code] * absmax[i // QBLOCK]`` in fp32, rounded to the quantization dtype. Blocks run over
the flat index, so a block may straddle two rows when K is not a multiple of QBLOCK. Double quantization
(``compress_statistics``) stores absmax as uint8 codes of bitsandbytes' 8-bit dynamic map, in blocks of
QBLOCK2 (256) with one fp32 absmax each, around a mean ``offset``:
``absmax[j] = code2[qabsmax[j]] * absmax2[j // QBLOCK2] + offset`` (a product then a sum, each rounded in
fp32: the kernels are compiled without FP contraction, ``enable_fp_fusion=False``, so no FMA merges them).

    gemm_4bit_lowrank_kernel: OUT[M, N'] = P[M, K'] @ Q[K', N'] (+ bias) + s * (keep? ⊙ (L @ RM))
      forward: P = x,  Q = deq(W)^T,  L = S = dropout(x) A,  RM = B
      dX:      P = dY, Q = deq(W),    L = dS = dY B^T,       RM = A^T, keep-mask of x read from the bits the
               forward's S = dropout(x) A pass stored (rng.load_keep_bits: no Philox here, issue 28)
    gemm_4bit_lowrank_tma_kernel: the same GEMM for Hopper (opt-in, LORA_FAST_GEMM_4BIT=tma): persistent, P's
      tiles, the packed weight's byte tiles and (where its rows are 16-byte multiples) the absmax loaded by TMA
      (device-side tensor descriptors), the code table held in registers; rows of whole blocks only
      (ops_4bit.tma_eligible_4bit and absmax_box check the operands before launch).
    dequant_4bit_kernel: OUT (N, K) = deq(W), for the dequantize-then-GEMM path.

In the GEMM each weight tile is dequantized in registers just before the MMA. When the weight's rows hold whole
quantization blocks (in_features % blocksize == 0: every real layer) the codes come in as a tile of bytes split
into nibbles and the absmax as one value per tile row (or per block of columns): ``dequant_tile``. Other shapes
(blocks across rows, odd in_features) gather one byte and one absmax per element: ``dequant_values``.
"""

import triton
import triton.language as tl

from .gemm import grouped_tile, lowrank_init_bits


@triton.jit
def absmax_values(ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, block, mask, NESTED: tl.constexpr,
                  QBLOCK2: tl.constexpr):
    """fp32 absmax of the quantization blocks ``block`` (int64), undoing double quantization when NESTED."""
    if NESTED:
        q = tl.load(ABSMAX_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(CODE2_ptr + q) * tl.load(ABSMAX2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        absmax = absmax + tl.load(OFFSET_ptr)
    else:
        absmax = tl.load(ABSMAX_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return absmax


@triton.jit
def dequant_values(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, flat, mask,
                   QBLOCK: tl.constexpr, NESTED: tl.constexpr, QBLOCK2: tl.constexpr):
    """fp32 code_table[code] * absmax of the elements at flat (int64) indices ``flat`` of the (N, K) weight: any
    shape (a block may straddle rows, K may be odd), one byte and one absmax gathered per element."""
    byte = tl.load(W_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    # even flat index: the high nibble (bitsandbytes packs element 2j in bits 4-7 of byte j)
    code = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(CODE_ptr + code)
    return value * absmax_values(ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, flat // QBLOCK, mask, NESTED,
                                 QBLOCK2)


@triton.jit
def dequant_tile(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, rows, row_mask, c0, W_COLS,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
                 QBLOCK2: tl.constexpr):
    """fp32 W[rows, c0 : c0 + BLOCK_COLS] (BLOCK_ROWS, BLOCK_COLS) of an (N, W_COLS) weight whose rows hold whole
    quantization blocks (W_COLS % QBLOCK == 0, so W_COLS is even and every row starts on a byte); c0 is a
    multiple of BLOCK_COLS. The codes come in as a (BLOCK_ROWS, BLOCK_COLS / 2) byte tile (masked loads), then
    ``dequant_bytes``."""
    rows64 = rows.to(tl.int64)
    half = c0 // 2 + tl.arange(0, BLOCK_COLS // 2)
    byte = tl.load(W_ptr + rows64[:, None] * (W_COLS // 2) + half[None, :],
                   mask=row_mask[:, None] & (half < W_COLS // 2)[None, :], other=0)
    return dequant_bytes(byte, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, rows, row_mask, c0, W_COLS,
                         BLOCK_ROWS, BLOCK_COLS, QBLOCK, NESTED, QBLOCK2)


@triton.jit
def dequant_bytes(byte, CODE, ABSMAX, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, rows, row_mask, c0, W_COLS,
                  BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
                  QBLOCK2: tl.constexpr, CODE_IN_REGISTERS: tl.constexpr = False, ABSMAX_BOX: tl.constexpr = 0):
    """fp32 W[rows, c0 : c0 + BLOCK_COLS] from ``byte``, its packed codes as a (BLOCK_ROWS, BLOCK_COLS / 2) uint8
    tile (however loaded: masked loads, or a TMA descriptor that zero-fills outside the weight), split into its
    two nibbles; the absmax as one value per row (BLOCK_COLS <= QBLOCK) or per QBLOCK columns: no per-element
    index is kept in registers. Rows outside ``row_mask`` get absmax 0 (their value 0, whatever their bytes).
    ``CODE``: the code table's pointer (a gather from global memory per element), or with CODE_IN_REGISTERS its
    16 values as a tensor (``tl.gather``: the table goes through shared memory once, not a tile per step).
    ``ABSMAX``: the absmax's pointer (loads), or with ABSMAX_BOX > 0 a (BLOCK_ROWS, ABSMAX_BOX) box of the
    (rows, W_COLS / QBLOCK) absmax matrix that a TMA descriptor loaded at column
    ``absmax_box_column(c0, ...)`` (``absmax_from_box``)."""
    rows64 = rows.to(tl.int64)
    byte = byte.to(tl.int32)
    # join(hi, lo)[r, j] = (byte >> 4, byte & 15): row-major, column 2j is the high nibble (the even element)
    code = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_ROWS, BLOCK_COLS))
    if CODE_IN_REGISTERS:
        value = tl.reshape(tl.gather(CODE, tl.reshape(code, (BLOCK_ROWS * BLOCK_COLS,)), 0), (BLOCK_ROWS, BLOCK_COLS))
    else:
        value = tl.load(CODE + code)
    blocks_per_row = W_COLS // QBLOCK
    if ABSMAX_BOX > 0:
        absmax = absmax_from_box(ABSMAX, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, rows, row_mask, c0, W_COLS,
                                 BLOCK_ROWS, BLOCK_COLS, QBLOCK, NESTED, QBLOCK2, ABSMAX_BOX)
        if BLOCK_COLS <= QBLOCK:
            return value * absmax
        else:
            GROUPS_BOX: tl.constexpr = BLOCK_COLS // QBLOCK
            value = tl.reshape(value, (BLOCK_ROWS, GROUPS_BOX, QBLOCK)) * absmax[:, :, None]
            return tl.reshape(value, (BLOCK_ROWS, BLOCK_COLS))
    else:
        ABSMAX_ptr = ABSMAX
        if BLOCK_COLS <= QBLOCK:
            # QBLOCK % BLOCK_COLS == 0 (powers of two): the tile's columns lie in one block per row (c0 < W_COLS:
            # the callers' tiles start inside the row)
            block = rows64 * blocks_per_row + c0 // QBLOCK
            absmax = absmax_values(ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, block, row_mask, NESTED, QBLOCK2)
            return value * absmax[:, None]
        else:
            GROUPS: tl.constexpr = BLOCK_COLS // QBLOCK
            group = c0 // QBLOCK + tl.arange(0, GROUPS)
            block = rows64[:, None] * blocks_per_row + group[None, :]
            absmax = absmax_values(ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, block,
                                   row_mask[:, None] & (group < blocks_per_row)[None, :], NESTED, QBLOCK2)
            value = tl.reshape(value, (BLOCK_ROWS, GROUPS, QBLOCK)) * absmax[:, :, None]
            return tl.reshape(value, (BLOCK_ROWS, BLOCK_COLS))


@triton.jit
def absmax_box_column(c0, QBLOCK: tl.constexpr, ABSMAX_BOX: tl.constexpr):
    """The first absmax column of the ABSMAX_BOX-wide box that holds the blocks of a tile starting at column c0
    (a box starts on a 16-byte multiple: Triton's interpreter asserts it of descriptor loads)."""
    return (c0 // QBLOCK) // ABSMAX_BOX * ABSMAX_BOX


@triton.jit
def _half(x, right, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The right (``right`` true) or left (ROWS, WIDTH // 2) half of a (ROWS, WIDTH) tile (registers only)."""
    left, other = tl.split(tl.permute(tl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))
    return tl.where(right, other, left)


@triton.jit
def absmax_from_box(box, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, rows, row_mask, c0, W_COLS,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
                    QBLOCK2: tl.constexpr, ABSMAX_BOX: tl.constexpr):
    """fp32 absmax (BLOCK_ROWS, GROUPS) of the tile W[rows, c0 : c0 + BLOCK_COLS] (GROUPS = BLOCK_COLS / QBLOCK,
    at least 1) from ``box``, the (BLOCK_ROWS, ABSMAX_BOX) absmax (fp32, or uint8 codes when NESTED) at column
    ``absmax_box_column(c0)``: a TMA box is 16 bytes wide at least, so it holds 4 fp32 or 16 codes per row, and
    the tile's GROUPS columns are picked by halving the box in registers, left or right by the bits of their
    offset in it. Rows and columns the descriptor zero-filled give what the masked loads of ``absmax_values``
    give (0, or the offset when NESTED)."""
    GROUPS: tl.constexpr = BLOCK_COLS // QBLOCK if BLOCK_COLS > QBLOCK else 1
    tl.static_assert(ABSMAX_BOX % GROUPS == 0, "an absmax box must hold whole groups of a tile")
    # GROUPS divides the tile's first column (c0 % BLOCK_COLS == 0) and the box's (ABSMAX_BOX % GROUPS == 0)
    offset = c0 // QBLOCK - absmax_box_column(c0, QBLOCK, ABSMAX_BOX)
    x = box
    if ABSMAX_BOX // GROUPS >= 2:
        x = _half(x, (offset & (ABSMAX_BOX // 2)) != 0, BLOCK_ROWS, ABSMAX_BOX)
    if ABSMAX_BOX // GROUPS >= 4:
        x = _half(x, (offset & (ABSMAX_BOX // 4)) != 0, BLOCK_ROWS, ABSMAX_BOX // 2)
    if ABSMAX_BOX // GROUPS >= 8:
        x = _half(x, (offset & (ABSMAX_BOX // 8)) != 0, BLOCK_ROWS, ABSMAX_BOX // 4)
    if ABSMAX_BOX // GROUPS >= 16:
        x = _half(x, (offset & (ABSMAX_BOX // 16)) != 0, BLOCK_ROWS, ABSMAX_BOX // 8)
    x = tl.reshape(x, (BLOCK_ROWS, GROUPS))
    if NESTED:
        group = c0 // QBLOCK + tl.arange(0, GROUPS)
        block = rows.to(tl.int64)[:, None] * (W_COLS // QBLOCK) + group[None, :]
        mask = row_mask[:, None] & (group < W_COLS // QBLOCK)[None, :]
        absmax = tl.load(CODE2_ptr + x.to(tl.int32)) * tl.load(ABSMAX2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        return absmax + tl.load(OFFSET_ptr)
    else:
        return x.to(tl.float32)


@triton.jit
def _nearest_bf16(w):
    """fp32 -> the fp32 value of the nearest bfloat16 (ties to even), by integer rounding of the bits (finite
    inputs): the interpreter's fp32 -> bf16 cast truncates, a GPU's rounds to nearest (cvt.rn)."""
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + ((bits >> 16) & 1) + 0x7FFF) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_weight(w, W_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, NEAREST_BF16: tl.constexpr):
    """fp32 dequantized values rounded as bitsandbytes rounds them: to the quantized tensor's dtype, then to
    the compute dtype. ``NEAREST_BF16`` (set under the interpreter only) rounds to bf16 by hand."""
    if NEAREST_BF16 and W_DTYPE == tl.bfloat16:
        w = _nearest_bf16(w)
    w = w.to(W_DTYPE)
    if NEAREST_BF16 and OUT_DTYPE == tl.bfloat16 and W_DTYPE != tl.bfloat16:
        w = _nearest_bf16(w.to(tl.float32))
    return w.to(OUT_DTYPE)


@triton.jit
def dequant_4bit_kernel(
    # pointers: W packed uint8; the code table (16 fp32); absmax (fp32, or uint8 when NESTED); the nested
    # code table (256 fp32), its absmax (fp32) and offset (one fp32); OUT (NUMEL,) contiguous
    W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, OUT_ptr,
    # sizes
    NUMEL,
    # meta-parameters: QBLOCK / QBLOCK2 the (nested) quantization block sizes; W_DTYPE the quantized tensor's
    # dtype (bitsandbytes rounds to it before any cast to OUT's dtype)
    BLOCK: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr, QBLOCK2: tl.constexpr,
    W_DTYPE: tl.constexpr, NEAREST_BF16: tl.constexpr,
):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < NUMEL
    w = dequant_values(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, flat, mask,
                       QBLOCK, NESTED, QBLOCK2)
    tl.store(OUT_ptr + flat, round_weight(w, W_DTYPE, OUT_ptr.dtype.element_ty, NEAREST_BF16), mask=mask)


@triton.jit
def gemm_4bit_lowrank_kernel(
    # pointers: P (M, K) in the compute dtype; the 4-bit weight (W packed uint8, CODE, ABSMAX, CODE2, ABSMAX2,
    # OFFSET: see dequant_4bit_kernel); BIAS (N,); L (M, R) fp32; RM (R, N); OUT (M, N); MASK: the forward's
    # bit-packed keep-mask (uint8 rows of stride_mask bytes), read with HAS_DROPOUT
    P_ptr, W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr,
    MASK_ptr,
    # sizes (M_BUCKET only keys the autotuner: M rounded up to a power of two; W_COLS: the weight's row length,
    # in_features: K in the forward, N in dX)
    M, N, K, R, M_BUCKET, W_COLS,
    # strides
    stride_pm, stride_pk, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_mask,
    # scalars (with dropout lowrank_scale includes 1 / (1 - p))
    lowrank_scale,
    # meta-parameters: TRANSPOSE_W: Q = deq(W)^T (forward), else Q = deq(W) (dX); ALIGNED: W_COLS % QBLOCK == 0
    # (every real layer): tiles of bytes and per-row absmax, else one gather per element (any shape)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    TRANSPOSE_W: tl.constexpr, ALIGNED: tl.constexpr,
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, QBLOCK2: tl.constexpr, W_DTYPE: tl.constexpr,
    NEAREST_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    # the low-rank term first: it initialises the accumulator (as in gemm.py, so no second output tile is live)
    acc = lowrank_init_bits(L_ptr, RM_ptr, MASK_ptr, offs_m, offs_n, pid_n, mask_m, mask_n, mask_r, offs_r, N,
                            stride_lm, stride_lr, stride_rr, stride_rn, stride_mask, lowrank_scale,
                            BLOCK_N, HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION)

    p_ptrs = P_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_k[None, :] * stride_pk
    step_p = tl.full((), BLOCK_K, tl.int64) * stride_pk
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if ALIGNED:
            if TRANSPOSE_W:   # Q[k, n] = W[n, k]: the tile W[offs_n, k0 : k0 + BLOCK_K], transposed
                w = tl.trans(dequant_tile(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, offs_n,
                                          mask_n, k0, W_COLS, BLOCK_N, BLOCK_K, QBLOCK, NESTED, QBLOCK2))
            else:             # Q[k, n] = W[k, n]: the tile W[k0 + offs_k, pid_n * BLOCK_N : ...]
                w = dequant_tile(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, k0 + offs_k,
                                 mask_k, pid_n * BLOCK_N, W_COLS, BLOCK_K, BLOCK_N, QBLOCK, NESTED, QBLOCK2)
        else:
            # flat element indices of the Q tile (BLOCK_K, BLOCK_N) in the row-major (., W_COLS) weight, int64
            if TRANSPOSE_W:
                flat = offs_n[None, :].to(tl.int64) * W_COLS + (k0 + offs_k)[:, None]
            else:
                flat = (k0 + offs_k)[:, None].to(tl.int64) * W_COLS + offs_n[None, :]
            w = dequant_values(W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, flat,
                               mask_k[:, None] & mask_n[None, :], QBLOCK, NESTED, QBLOCK2)
        # bitsandbytes' roundings: to the quantized tensor's dtype, then to the compute dtype (P's)
        q = round_weight(w, W_DTYPE, P_ptr.dtype.element_ty, NEAREST_BF16)
        acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        p_ptrs += step_p

    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    out = OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gemm_4bit_lowrank_tma_kernel(
    # pointers: as gemm_4bit_lowrank_kernel (W: the packed codes, contiguous, 16-byte aligned; P 16-byte aligned)
    P_ptr, W_ptr, CODE_ptr, ABSMAX_ptr, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr,
    MASK_ptr,
    # sizes (M_BUCKET only keys the autotuner; W_COLS: the weight's row length, in_features, a multiple of QBLOCK
    # and of 32: its rows of W_COLS / 2 bytes are 16-byte aligned)
    M, N, K, R, M_BUCKET, W_COLS,
    # strides (P by rows, unit stride along K)
    stride_pm, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_mask,
    # scalars (with dropout lowrank_scale includes 1 / (1 - p))
    lowrank_scale,
    # meta-parameters: as gemm_4bit_lowrank_kernel (rows of whole blocks only: ALIGNED); NUM_SMS programs walk
    # the output tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    TRANSPOSE_W: tl.constexpr, ABSMAX_BOX: tl.constexpr,
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, QBLOCK2: tl.constexpr, W_DTYPE: tl.constexpr,
    NEAREST_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The maths of gemm_4bit_lowrank_kernel (ALIGNED) for Hopper: persistent (one program per SM walks the
    output tiles in grouped order, as gemm_tma.py), P's tiles and the packed weight's byte tiles loaded by TMA
    (device-side tensor descriptors; rows and columns outside the tensors zero-filled). The absmax, seen as a
    (rows, W_COLS / QBLOCK) matrix, by TMA too where its rows are 16-byte multiples (ABSMAX_BOX = 4 fp32 or 16
    uint8 codes per box row, the narrowest box TMA takes; ops_4bit checks the layout): a tile needs 1 or
    BLOCK_COLS / QBLOCK values per row, picked from the box in registers. Otherwise (ABSMAX_BOX = 0) by loads,
    which Triton pipelines as cp.async (3 LDGSTS per thread, 6 when nested). The 16 code values are
    loaded once per program and looked up with ``tl.gather``: the cp.async kernel's per-element gather from
    global memory is pipelined by Triton as one more staged fp32 tile (32 KB at 128 x 64) per K step."""
    p_desc = tl.make_tensor_descriptor(P_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    # the packed weight as a (rows, W_COLS / 2) byte matrix: forward tiles are BLOCK_N rows of BLOCK_K / 2 bytes,
    # dX tiles BLOCK_K rows of BLOCK_N / 2 bytes
    if TRANSPOSE_W:
        w_desc = tl.make_tensor_descriptor(W_ptr, shape=[N, W_COLS // 2], strides=[W_COLS // 2, 1],
                                           block_shape=[BLOCK_N, BLOCK_K // 2])
    else:
        w_desc = tl.make_tensor_descriptor(W_ptr, shape=[K, W_COLS // 2], strides=[W_COLS // 2, 1],
                                           block_shape=[BLOCK_K, BLOCK_N // 2])
    if ABSMAX_BOX > 0:
        if TRANSPOSE_W:
            a_desc = tl.make_tensor_descriptor(ABSMAX_ptr, shape=[N, W_COLS // QBLOCK], strides=[W_COLS // QBLOCK, 1],
                                               block_shape=[BLOCK_N, ABSMAX_BOX])
        else:
            a_desc = tl.make_tensor_descriptor(ABSMAX_ptr, shape=[K, W_COLS // QBLOCK], strides=[W_COLS // QBLOCK, 1],
                                               block_shape=[BLOCK_K, ABSMAX_BOX])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # the 16 code values held once (the cp.async kernel gathers a (BLOCK, BLOCK) fp32 tile of them from global
    # memory per K step, which Triton pipelines as one more cp.async stage)
    code_table = tl.load(CODE_ptr + tl.arange(0, 16))
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # the low-rank term starts the accumulator (as gemm_4bit_lowrank_kernel)
        acc = lowrank_init_bits(L_ptr, RM_ptr, MASK_ptr, offs_m, offs_n, pid_n, mask_m, mask_n, mask_r, offs_r, N,
                                stride_lm, stride_lr, stride_rr, stride_rn, stride_mask, lowrank_scale,
                                BLOCK_N, HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION)
        for k0 in range(0, K, BLOCK_K):
            p = p_desc.load([pid_m * BLOCK_M, k0])
            if TRANSPOSE_W:   # Q[k, n] = W[n, k]: the tile W[offs_n, k0 : k0 + BLOCK_K], transposed
                byte = w_desc.load([pid_n * BLOCK_N, k0 // 2])
                if ABSMAX_BOX > 0:
                    absmax = a_desc.load([pid_n * BLOCK_N, absmax_box_column(k0, QBLOCK, ABSMAX_BOX)])
                else:
                    absmax = ABSMAX_ptr
                w = tl.trans(dequant_bytes(byte, code_table, absmax, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, offs_n,
                                           mask_n, k0, W_COLS, BLOCK_N, BLOCK_K, QBLOCK, NESTED, QBLOCK2, True,
                                           ABSMAX_BOX))
            else:             # Q[k, n] = W[k, n]: the tile W[k0 + offs_k, pid_n * BLOCK_N : ...]
                byte = w_desc.load([k0, pid_n * (BLOCK_N // 2)])
                if ABSMAX_BOX > 0:
                    absmax = a_desc.load([k0, absmax_box_column(pid_n * BLOCK_N, QBLOCK, ABSMAX_BOX)])
                else:
                    absmax = ABSMAX_ptr
                w = dequant_bytes(byte, code_table, absmax, CODE2_ptr, ABSMAX2_ptr, OFFSET_ptr, k0 + offs_k,
                                  (k0 + offs_k) < K, pid_n * BLOCK_N, W_COLS, BLOCK_K, BLOCK_N, QBLOCK, NESTED,
                                  QBLOCK2, True, ABSMAX_BOX)
            q = round_weight(w, W_DTYPE, P_ptr.dtype.element_ty, NEAREST_BF16)
            acc = tl.dot(p.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                         out_dtype=tl.float32)

        if HAS_BIAS:
            bias = tl.load(BIAS_ptr + offs_n, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out = OUT_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
        tl.store(out, acc.to(OUT_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
