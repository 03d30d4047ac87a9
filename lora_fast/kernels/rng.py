"""Dropout keep-mask of the fused kernels: Triton's counter-based Philox RNG.

The mask of element (m, k) of a (M, K) input is ``rand(seed, m * K + k) >= p``: it depends only on the seed
and the element's logical position, so every kernel that needs it (the x @ A projection in forward, the dX
epilogue and the dA reduction in backward) regenerates the same mask without storing it.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed_ptr, offs_m, offs_k, K, dropout_p):
    """Keep-mask tile for rows ``offs_m`` (a column block, shape (BM, 1) or (1, BM)) and columns ``offs_k``.

    ``K`` is the logical row length of the input (in_features), not a memory stride.
    """
    seed = tl.load(seed_ptr)
    offsets = offs_m.to(tl.int64) * K + offs_k
    return tl.rand(seed, offsets) >= dropout_p


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
    keep = keep_mask(SEED_ptr, offs_m[:, None], offs_k[None, :], K, dropout_p)
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
