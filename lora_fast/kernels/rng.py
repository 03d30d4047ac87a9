"""Dropout keep-mask of the fused kernels: Triton's counter-based Philox RNG.

Element (m, k) of an (M, K) input is kept when uniform number ``k % 4`` of Philox counter
``m * ceil(K / 4) + k // 4`` (``tl.randint4x``: four numbers per counter, a quarter of the Philox rounds of one
number per element) is >= p. The mask depends only on the seed and the element's logical position, so every
kernel that needs it (the x @ A projection in forward, the dX GEMM and the dA reduction in backward)
regenerates the same mask, whatever its tile shape, without storing it.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed_ptr, offs_m, k0, K, dropout_p, BLOCK_K: tl.constexpr):
    """Keep-mask tile (BM, BLOCK_K) for rows ``offs_m`` (BM,) and columns k0 .. k0 + BLOCK_K (k0 % 4 == 0).

    ``K`` is the logical row length of the input (in_features), not a memory stride.
    """
    seed = tl.load(seed_ptr)
    counters = offs_m[:, None].to(tl.int64) * ((K + 3) // 4) + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    # join(join(u0, u2), join(u1, u3))[m, j, i, o] = u_(2i + o): row-major, column 4j + s holds u_s
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(u, (offs_m.shape[0], BLOCK_K)) >= dropout_p


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

    A test helper: hand it to ``lora_fast.reference.lora_linear(..., dropout_mask=...)`` to compare the
    two paths exactly. ``seed`` is the one-element int64 tensor the op draws (on the input's device).
    """
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    if M * K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _keep_mask_kernel[grid](seed, out, M, K, float(dropout_p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
