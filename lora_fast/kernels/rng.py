"""Dropout keep-mask of the fused kernels: Triton's counter-based Philox RNG, several uniforms per word.

Each Philox4x32-10 call (``tl.randint4x``) gives four 32-bit words; each word is cut into 32 / UNIFORM_BITS
integers uniform in [0, 2**UNIFORM_BITS), one per element, so one call serves 128 / UNIFORM_BITS elements
(``PER_COUNTER``): element (m, k) of an (M, K) input takes field ``j % (32 / UNIFORM_BITS)`` (from the low bits up) of
word ``j // (32 / UNIFORM_BITS)``, j = k % PER_COUNTER, of counter ``m * ceil(K / PER_COUNTER) + k // PER_COUNTER``, and
is kept when that integer is >= p * 2**UNIFORM_BITS. The drop probability is therefore quantised to a multiple
of 2**-UNIFORM_BITS (``lora_fast.philox.quantize``: the op applies the quantised p and scales kept elements by
exactly 1 / (1 - p_quantised)). The mask depends only on the seed and the element's logical position, so every
kernel that draws it draws the same mask, whatever its tile shape. The S = dropout(x) A passes draw it once per
step and store it bit-packed (``store_keep_bits``); the dX GEMMs and dA passes read those bits
(``load_keep_bits``), with no Philox in the backward (issue 28).

UNIFORM_BITS = 8 (16 elements per Philox call, p within 2**-9 of the requested value) was chosen over 16 bits
(8 per call, p within 2**-17) and the earlier one float per word (4 per call) on the compile report's SASS
counts: the figures are beside UNIFORM_BITS in lora_fast/philox.py.
"""

import torch
import triton
import triton.language as tl

from .. import philox

# the mask's definition lives in lora_fast.philox (its torch mirror): bits per uniform, elements per randint4x
# call (four 32-bit words)
UNIFORM_BITS = tl.constexpr(philox.UNIFORM_BITS)
PER_COUNTER = tl.constexpr(philox.PER_COUNTER)
FIELDS = tl.constexpr(philox.FIELDS)
LEVELS = tl.constexpr(float(2**philox.UNIFORM_BITS))
LEVELS_INT = tl.constexpr(2**philox.UNIFORM_BITS)


@triton.jit
def _philox_words(seed_ptr, offs_m, k0, K, BLOCK_K: tl.constexpr):
    """The four (BM, BLOCK_K / PER_COUNTER) uint32 words of the Philox calls of rows ``offs_m`` and columns
    k0 .. k0 + BLOCK_K: word w of call c serves columns k0 + PER_COUNTER * c + FIELDS * w + (0 .. FIELDS - 1)."""
    seed = tl.load(seed_ptr)
    groups = (K + PER_COUNTER - 1) // PER_COUNTER
    counters = (offs_m[:, None].to(tl.int64) * groups
                + (tl.arange(0, BLOCK_K // PER_COUNTER) + k0 // PER_COUNTER)[None, :])
    return tl.randint4x(seed, counters)


@triton.jit
def _uniform_tile(r0, r1, r2, r3, BM: tl.constexpr, BLOCK_K: tl.constexpr):
    # words in position order: join(join(r0, r2), join(r1, r3))[m, c, a, b] = r_(2a + b); then each word's
    # FIELDS fields along a new last axis, low bits first: column PER_COUNTER * c + FIELDS * w + f holds field f
    # of word w
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    shifts = (tl.arange(0, FIELDS) * UNIFORM_BITS).to(tl.uint32)
    u = (words[:, :, :, :, None] >> shifts[None, None, None, None, :]) & (LEVELS_INT - 1)
    return tl.reshape(u, (BM, BLOCK_K))


@triton.jit
def uniforms(seed_ptr, offs_m, k0, K, BLOCK_K: tl.constexpr):
    """The uniform integers in [0, 2**UNIFORM_BITS) of rows ``offs_m`` (BM,) and columns k0 .. k0 + BLOCK_K: a
    (BM, BLOCK_K) uint32 tile. ``k0`` and BLOCK_K are multiples of PER_COUNTER; ``K`` is the logical row length
    of the input (in_features), not a memory stride."""
    r0, r1, r2, r3 = _philox_words(seed_ptr, offs_m, k0, K, BLOCK_K)
    return _uniform_tile(r0, r1, r2, r3, offs_m.shape[0], BLOCK_K)


@triton.jit
def _keep_nibble(word, threshold):
    """The keeps of a word's FIELDS (4) uniform integers as the low 4 bits of an int32, field f in bit f."""
    n = ((word & (LEVELS_INT - 1)) >= threshold).to(tl.int32)
    for f in tl.static_range(1, FIELDS):
        n = n | ((((word >> (f * UNIFORM_BITS)) & (LEVELS_INT - 1)) >= threshold).to(tl.int32) << f)
    return n


@triton.jit
def _keep_bits(seed_ptr, offs_m, k0, K, k_end, threshold, BLOCK_K: tl.constexpr):
    """``keep_mask_bits`` against a uint32 ``threshold`` (a scalar, or one per row broadcastable against (BM, 1))."""
    tl.static_assert(FIELDS == 4, "two words' fields per byte: 8-bit uniforms")
    r0, r1, r2, r3 = _philox_words(seed_ptr, offs_m, k0, K, BLOCK_K)
    keep = _uniform_tile(r0, r1, r2, r3, offs_m.shape[0], BLOCK_K) >= threshold
    low = _keep_nibble(r0, threshold) | (_keep_nibble(r1, threshold) << 4)
    high = _keep_nibble(r2, threshold) | (_keep_nibble(r3, threshold) << 4)
    bits = tl.reshape(tl.join(low, high), (offs_m.shape[0], BLOCK_K // 8))
    valid = tl.minimum(tl.maximum(k_end - (k0 + 8 * tl.arange(0, BLOCK_K // 8)), 0), 8)
    return keep, bits & ((1 << valid) - 1)[None, :]


@triton.jit
def keep_mask_bits(seed_ptr, offs_m, k0, K, k_end, dropout_p, BLOCK_K: tl.constexpr):
    """``keep_mask``'s tile (BM, BLOCK_K) and the same keeps bit-packed, (BM, BLOCK_K / 8) int32 bytes in
    ``lora_fast.philox.pack_keep_mask``'s layout (bit j of byte b: column k0 + 8 b + j), bits of columns >=
    ``k_end`` 0. The bytes come from the Philox words directly (8 columns are two words' fields: columns
    8 h .. 8 h + 7 of a call are the fields of words 2 h and 2 h + 1), not from the keep tile: packing that tile
    (a reshape and a sum over bits) cost 1,200 SASS instructions and 70 registers more in S = dropout(x) A
    (compile report, sm_90, bf16, rank 16)."""
    threshold = (tl.full((), dropout_p, tl.float32) * LEVELS).to(tl.uint32)
    return _keep_bits(seed_ptr, offs_m, k0, K, k_end, threshold, BLOCK_K)


@triton.jit
def keep_mask_bits_rows(seed_ptr, offs_m, k0, K, k_end, p_rows, BLOCK_K: tl.constexpr):
    """``keep_mask_bits`` with a drop probability per row: ``p_rows`` an fp32 tensor broadcastable against
    (BM, 1), each already quantised (the multi-adapter S pass: one p per adapter; 0 on rows without one, whose
    keeps are then all 1)."""
    threshold = (p_rows * LEVELS).to(tl.uint32)
    return _keep_bits(seed_ptr, offs_m, k0, K, k_end, threshold, BLOCK_K)


@triton.jit
def keep_mask(seed_ptr, offs_m, k0, K, dropout_p, BLOCK_K: tl.constexpr):
    """Keep-mask tile (BM, BLOCK_K) for rows ``offs_m`` (BM,) and columns k0 .. k0 + BLOCK_K.

    ``k0`` and BLOCK_K are multiples of PER_COUNTER; ``K`` is the logical row length of the input
    (in_features), not a memory stride; ``dropout_p`` is already quantised (a multiple of 2**-UNIFORM_BITS).
    """
    # exact: p is a multiple of 1 / LEVELS (tl.full: dropout_p is a Python float under the interpreter)
    threshold = (tl.full((), dropout_p, tl.float32) * LEVELS).to(tl.uint32)
    return uniforms(seed_ptr, offs_m, k0, K, BLOCK_K) >= threshold


@triton.jit
def _keep_mask_kernel(
    # pointers: seed (int64 scalar), out (M, K) int8
    SEED_ptr, OUT_ptr,
    # sizes
    M, K,
    # scalars
    dropout_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(SEED_ptr, offs_m, tl.program_id(1) * BLOCK_K, K, dropout_p, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(OUT_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the fused kernels use for ``seed`` on an (M, K) input, as a bool tensor (M, K).

    A test helper: hand it to ``lora_fast.reference.lora_linear(..., dropout_mask=...)`` (with
    ``dropout_p=lora_fast.philox.quantize(p)``, the probability the op applies) to compare the two paths
    exactly. ``seed`` is the one-element int64 tensor the op draws (on the input's device); ``dropout_p`` is
    quantised here as the op quantises it.
    """
    dropout_p = philox.quantize(dropout_p)
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    if M * K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _keep_mask_kernel[grid](seed, out, M, K, float(dropout_p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()


@triton.jit
def store_keep_bits(MASK_ptr, bits, offs_m, mask_m, k0, k_end, stride_mask, BLOCK_K: tl.constexpr):
    """Store the bit-packed keeps ``bits`` ((BM, BLOCK_K / 8) bytes, ``keep_mask_bits``) of rows ``offs_m`` and
    columns k0 .. k0 + BLOCK_K at byte k0 / 8 of rows of ``stride_mask`` bytes: the bytes of columns below
    ``k_end``, of the rows in ``mask_m``. ``k0`` is a multiple of 8."""
    offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    tl.store(MASK_ptr + offs_m[:, None].to(tl.int64) * stride_mask + offs_b[None, :], bits.to(tl.uint8),
             mask=mask_m[:, None] & (offs_b * 8 < k_end)[None, :])


@triton.jit
def load_keep_bits(MASK_ptr, offs_m, mask_m, c0, C, stride_mask, BLOCK_C: tl.constexpr):
    """The keep tile (BM, BLOCK_C), bool, of rows ``offs_m`` and columns c0 .. c0 + BLOCK_C from the bit-packed
    mask (``store_keep_bits``) of an input with C columns, rows of ``stride_mask`` bytes: one (BM, BLOCK_C / 8)
    byte tile, each byte's 8 bits spread along a new last axis (low bit first). ``c0`` is a multiple of 8;
    columns >= C and rows outside ``mask_m`` read as dropped."""
    offs_b = c0 // 8 + tl.arange(0, BLOCK_C // 8)
    packed = tl.load(MASK_ptr + offs_m[:, None].to(tl.int64) * stride_mask + offs_b[None, :],
                     mask=mask_m[:, None] & (offs_b * 8 < C)[None, :], other=0)
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (offs_m.shape[0], BLOCK_C)) != 0


@triton.jit
def _packed_keep_mask_kernel(
    # pointers: seed (int64 scalar), out (M, stride_mask) uint8
    SEED_ptr, OUT_ptr,
    # sizes and the row stride of OUT in bytes
    M, K, stride_mask,
    # scalars
    dropout_p,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    _, bits = keep_mask_bits(SEED_ptr, offs_m, k0, K, K, dropout_p, BLOCK_K)
    store_keep_bits(OUT_ptr, bits, offs_m, offs_m < M, k0, K, stride_mask, BLOCK_K)


def packed_keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask of ``seed`` on an (M, K) input, drawn by Philox and bit-packed as the forward's S pass stores
    it: uint8 (M, ``philox.mask_row_bytes(K)``), ``philox.pack_keep_mask``'s layout. One launch: for a backward
    that has the seed but no saved mask (the multi-adapter op's one-adapter path, the 4-bit op's dequantized
    path), so that its dX GEMM and dA pass read bits. ``dropout_p`` is quantised here as the op quantises it."""
    dropout_p = philox.quantize(dropout_p)
    row_bytes = philox.mask_row_bytes(K)
    out = torch.empty((M, row_bytes), dtype=torch.uint8, device=seed.device)
    if M * K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 128))
        _packed_keep_mask_kernel[grid](seed, out, M, K, row_bytes, float(dropout_p), BLOCK_M=32, BLOCK_K=128)
    return out
