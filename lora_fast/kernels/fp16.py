"""fp16 range guard for the low-rank dots: an fp32 tile is split into a power-of-two factor per row and a
remainder in [0.5, 1], so that rounding it to fp16 (largest finite value 65504) cannot overflow.

S = dropout(x) A and dS = dY B^T are kept in fp32; the rank-r dots that use them (the low-rank term of the GEMM,
the dB partials, the dA reduction) run on fp16 tensor cores for an fp16 base. Massive activations (|x| ~ 1e3 in
7B models) and large LoRA scales push S, scale * S or dS past fp16's range although the result is finite; with
the factor taken out before the cast and put back in fp32 after the dot, they stay finite wherever the
reference is. Scaling by a power of two is exact, so nothing else changes. bf16 and fp32 share fp32's range
and skip this.
"""

import triton
import triton.language as tl


@triton.jit
def pow2_split(t, AXIS: tl.constexpr):
    """(t / f, f) with f = 2**ceil(log2(max |t| along AXIS)) broadcastable against t (kept dims: size 1 on AXIS);
    all-zero slices get f = 1."""
    peak = tl.max(tl.abs(t), axis=AXIS, keep_dims=True)
    # 2**-100: clear of fp32's subnormals (exp2 flushes them to zero); an all-zero slice then divides 0 by it
    f = tl.exp2(tl.ceil(tl.log2(tl.maximum(peak, 7.888609052210118e-31))))
    return t / f, f
