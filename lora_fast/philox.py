"""The fused kernels' dropout keep-mask, computed with torch operations (no kernel, any device, any backend).

The kernels draw their mask from Triton's counter-based Philox4x32-10 (``tl.randint4x``; Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3", SC'11), each 32-bit word cut into 32 / UNIFORM_BITS uniform
integers: element (m, k) of an (M, K) input takes field ``j % FIELDS`` (low bits first) of word ``j // FIELDS``,
j = k % PER_COUNTER, of counter ``m * ceil(K / PER_COUNTER) + k // PER_COUNTER`` under the 64-bit ``seed``, and is
kept when that integer is >= p * 2**UNIFORM_BITS, p quantised by ``quantize`` (lora_fast/kernels/rng.py). This
module evaluates the same function bit for bit in int64 torch arithmetic, so the reference path drops exactly
the elements the kernels drop for the same seed: a run on CPU (reference) and on GPU (kernels) from the same
``torch.manual_seed`` draws the same masks.
"""

import torch

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011, as in triton.language.random.philox_impl)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
# bits per uniform integer. Compile report, sm_90, bf16, rank 16, SASS instructions that dropout adds (with
# minus without) to S = dropout(x) A / dX / dA, first config each: one float per 32-bit word (4 elements per
# Philox call) 1568 / 3768 / 752; 16-bit fields (8 per call) 1008 / 2472 / 440; 8-bit fields (16 per call)
# 680 / 1392 / 336, i.e. about 10.6 instead of 24.5 per element in the S pass. 8 bits: a drop probability
# within 2**-9 of the requested one (0.1 is applied as 26/256 = 0.1016), with an exact expectation
UNIFORM_BITS = 8
FIELDS = 32 // UNIFORM_BITS          # uniform integers per 32-bit word
PER_COUNTER = 4 * FIELDS             # elements per randint4x call (four words)
_LEVELS = 1 << UNIFORM_BITS


def quantize(dropout_p: float) -> float:
    """The drop probability the kernels apply for a requested ``dropout_p`` in [0, 1]: the nearest multiple of
    2**-UNIFORM_BITS = 1/256 (within 2**-9 of it: 0.05 -> 13/256 = 0.0508, 0.1 -> 26/256 = 0.1016; exact for
    0, 0.25, 0.5, 1 and every multiple of 1/256). An element is dropped when its uniform integer in [0, 256) is
    below ``quantize(p) * 256``, so exactly that fraction of the integers drops it; kept elements are scaled by
    1 / (1 - quantize(p)), which keeps the expectation of the LoRA input exact. A p below 2**-9 rounds to 0
    (no dropout); one within 2**-9 of 1 rounds to 1 (all dropped)."""
    return round(float(dropout_p) * _LEVELS) / _LEVELS


def _mul32(a: int, b: torch.Tensor):
    """(high, low) 32-bit halves of the 64-bit product of the constant ``a`` < 2**32 and ``b`` (int64 holding
    values < 2**32), without int64 overflow: b is split into 16-bit halves (each partial product < 2**48)."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def randint4x(seed: torch.Tensor, counters: torch.Tensor):
    """Four uint32 streams (as int64 tensors) of Philox4x32-10 at int64 ``counters`` under ``seed`` (an int64
    tensor of one element, >= 0): ``tl.randint4x(seed, counters)``."""
    seed = seed.reshape(()).to(torch.int64)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counters)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The kernels' keep-mask for an (M, K) input: bool (M, K) on ``seed``'s device, True where kept.

    Args: seed: int64 tensor of one element in [0, 2**63) (the op draws it with torch.randint on x's device).
        M, K: rows and row length (in_features) of the input viewed as 2-D. dropout_p: in [0, 1], quantised
        as the op quantises it (``quantize``).
    Memory: about ten int64 temporaries of M * ceil(K / 8) elements (no more than x in float32).
    """
    groups = (K + PER_COUNTER - 1) // PER_COUNTER
    counters = torch.arange(M * groups, dtype=torch.int64, device=seed.device)
    fields = [(word >> (UNIFORM_BITS * f)) & (_LEVELS - 1) for word in randint4x(seed, counters)
              for f in range(FIELDS)]
    u = torch.stack(fields, dim=-1).view(M, PER_COUNTER * groups)[:, :K]
    return u >= int(round(quantize(dropout_p) * _LEVELS))


# The keep-mask as the fused op saves it for backward (issue 28): one bit per element, drawn once by the forward's
# S = dropout(x) A pass and read by the dX GEMM and the dA pass instead of running Philox again. Row m is
# ``mask_row_bytes(K)`` bytes; bit j (least significant first) of byte b is the keep of column 8 b + j; bits of
# columns >= K in the last byte are 0, and the row's padding bytes (past ceil(K / 8)) are never written nor read
# by the kernels (``pack_keep_mask`` sets them to 0). Bytes rather than 32-bit words: every tile width of the
# kernels (16 to 256 columns) is a whole number of bytes, so each pass reads or writes just its own columns, and a
# tile's bytes load as one vector per row. Rows are padded to a multiple of MASK_ROW_ALIGN bytes, so that every
# row starts 16-byte aligned (vector loads; Triton specialises the row stride on divisibility by 16).
MASK_ROW_ALIGN = 16


def mask_row_bytes(K: int) -> int:
    """Bytes per row of the packed keep-mask of an (M, K) input: ceil(K / 8) rounded up to MASK_ROW_ALIGN."""
    return -(-K // (8 * MASK_ROW_ALIGN)) * MASK_ROW_ALIGN


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool (M, K) keep-mask packed as the kernels store it: uint8 (M, mask_row_bytes(K)), bit j of byte b the
    keep of column 8 b + j, padding bits 0."""
    M, K = keep.shape
    padded = torch.zeros((M, 8 * mask_row_bytes(K)), dtype=torch.int64, device=keep.device)
    padded[:, :K] = keep
    weights = 1 << torch.arange(8, device=keep.device)
    return (padded.view(M, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_keep_mask(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The bool (M, K) keep-mask of a packed one (uint8 (M, >= ceil(K / 8)), ``pack_keep_mask``'s layout)."""
    bits = (packed.to(torch.int64)[:, :, None] >> torch.arange(8, device=packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :K].bool()
