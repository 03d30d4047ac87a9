"""The fused kernels' dropout keep-mask, computed with torch operations (no kernel, any device, any backend).

The kernels draw their mask from Triton's counter-based Philox4x32-10 (``tl.randint4x``; Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3", SC'11): element (m, k) of an (M, K) input is kept when uniform
number ``k % 4`` of counter ``m * ceil(K / 4) + k // 4`` under the 64-bit ``seed`` is >= p (lora_fast/kernels/
rng.py). This module evaluates the same function bit for bit in int64 torch arithmetic, so the reference path
drops exactly the elements the kernels drop for the same seed: a run on CPU (reference) and on GPU (kernels)
from the same ``torch.manual_seed`` draws the same masks.
"""

import torch

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011, as in triton.language.random.philox_impl)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
# triton's uint_to_uniform_float for 32 bits: the largest float32 scale with (2**31 - 1) * scale < 1
_UNIFORM_SCALE = 4.6566127342e-10


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


def uniform(r: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1) from uint32 values held in int64: triton's ``uint_to_uniform_float`` (the bits read as
    int32, negatives folded by bitwise not, times a float32 scale)."""
    folded = torch.where(r >= 2**31, _MASK32 - r, r)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=r.device)


def keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The kernels' keep-mask for an (M, K) input: bool (M, K) on ``seed``'s device, True where kept.

    Args: seed: int64 tensor of one element in [0, 2**63) (the op draws it with torch.randint on x's device).
        M, K: rows and row length (in_features) of the input viewed as 2-D. dropout_p: in [0, 1], compared in
        float32 as the kernels do.
    Memory: about ten int64 temporaries of M * ceil(K / 4) elements (no more than twice x in float32).
    """
    quads = (K + 3) // 4
    counters = torch.arange(M * quads, dtype=torch.int64, device=seed.device)
    streams = [uniform(r) for r in randint4x(seed, counters)]
    u = torch.stack(streams, dim=-1).view(M, 4 * quads)[:, :K]
    return u >= torch.tensor(dropout_p, dtype=torch.float32, device=seed.device)
