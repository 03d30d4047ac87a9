"""Launchers of the fused LoRA linear: forward (2 launches) and backward (3 launches, plus torch sums).

Shapes: x (M, K), weight (N, K) as nn.Linear stores it, bias (N,), A (K, R), B (R, N), dy (M, N).
Maths: LoRA, Hu et al. 2021, eq. 3, y = x W^T + b + scale * dropout(x) A B, with dropout on the LoRA input
as PEFT applies it. Every tensor is passed with its strides; nothing is copied or transposed.
"""

import functools
import os

import torch
import triton

from . import configs
from .gemm import gemm_lowrank_kernel
from .lowrank import lowrank_proj_kernel, reduce_m_kernel


def _autotuning() -> bool:
    """LORA_FAST_AUTOTUNE=0 launches each kernel's first config without tuning (test runs with many shapes)."""
    return os.environ.get("LORA_FAST_AUTOTUNE", "1") != "0"


class _Launcher:
    """A kernel with one fixed config under the interpreter and per-architecture autotuning on a GPU."""

    def __init__(self, kernel, configs_fn, key, interp_config):
        self.kernel = kernel
        self.configs_fn = configs_fn
        self.key = key
        self.interp_config = interp_config
        self._tuners = {}

    def __call__(self, grid, *args, device: torch.device, dtype: torch.dtype, **kwargs):
        if configs.interpreting():
            return self.kernel[grid](*args, **kwargs, **self.interp_config)
        capability = torch.cuda.get_device_capability(device)
        if not _autotuning():
            config = self.configs_fn(capability, dtype)[0]
            return self.kernel[grid](*args, **kwargs, **config.all_kwargs())
        tuner_key = (capability, dtype == torch.float32)
        tuner = self._tuners.get(tuner_key)
        if tuner is None:
            tuner = triton.autotune(configs=self.configs_fn(capability, dtype), key=self.key)(self.kernel)
            self._tuners[tuner_key] = tuner
        return tuner[grid](*args, **kwargs)


_gemm = _Launcher(gemm_lowrank_kernel, configs.gemm_configs, ["M_BUCKET", "N", "K", "R"],
                  dict(configs.INTERP_GEMM, num_warps=4, num_stages=1))
# dX with dropout: the same kernel with smaller tiles (configs.gemm_configs(dropout=True): no spills)
_gemm_dropout = _Launcher(gemm_lowrank_kernel, functools.partial(configs.gemm_configs, dropout=True),
                          ["M_BUCKET", "N", "K", "R"], dict(configs.INTERP_GEMM, num_warps=4, num_stages=1))
_proj = _Launcher(lowrank_proj_kernel, configs.proj_configs, ["M_BUCKET", "K", "R"],
                  dict(BLOCK_K=configs.INTERP_PROJ_BLOCK["BLOCK_K"], num_warps=4, num_stages=1))
_reduce = _Launcher(reduce_m_kernel, configs.reduce_configs, ["M_BUCKET", "K", "R"], dict(num_warps=4, num_stages=1))


def _m_bucket(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


def _proj_block_m() -> int:
    return configs.INTERP_PROJ_BLOCK["BLOCK_M"] if configs.interpreting() else configs.PROJ_BLOCK_M


def _reduce_blocks(dtype):
    if configs.interpreting():
        return configs.INTERP_REDUCE_BLOCK["BLOCK_M"], configs.INTERP_REDUCE_BLOCK["BLOCK_K"]
    return configs.reduce_blocks(dtype)


def _splits(M: int, K: int, block_m: int, block_k: int, device: torch.device) -> int:
    """Row splits of a reduction over M: enough programs for two waves of the GPU (two splits interpreted)."""
    row_blocks = triton.cdiv(M, block_m)
    if configs.interpreting():
        return min(2, row_blocks)
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, triton.cdiv(programs, triton.cdiv(K, block_k))))


def lowrank_project(P, Q, stride_qk, stride_qr, R, *, out_scale=1.0, dropout_p=0.0, seed=None, partial_of=None):
    """OUT (M, R) fp32 = out_scale * (keep ⊙ P) @ Q, Q given by (pointer tensor, strides) of shape (K, R).

    With ``partial_of=L`` (M, R) also returns the per-row-block partials L^T P, (cdiv(M, BLOCK_M), R, K) fp32.
    """
    M, K = P.shape
    out = torch.empty((M, R), dtype=torch.float32, device=P.device)
    block_m = _proj_block_m()
    grid = (triton.cdiv(M, block_m),)
    partial = None
    L = out
    if partial_of is not None:
        L = partial_of
        partial = torch.empty((grid[0], R, K), dtype=torch.float32, device=P.device)
    _proj(grid, P, Q, out, L, partial if partial is not None else out, seed if seed is not None else out,
          M, K, R, _m_bucket(M),
          P.stride(0), P.stride(1), stride_qk, stride_qr, out.stride(0), out.stride(1), L.stride(0), L.stride(1),
          float(out_scale), float(dropout_p),
          BLOCK_M=block_m, BLOCK_R=configs.block_r(R), HAS_DROPOUT=dropout_p > 0, WRITE_PARTIAL=partial is not None,
          DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
          device=P.device, dtype=P.dtype)
    return out, partial


def reduce_rows(P, L, *, dropout_p=0.0, seed=None):
    """(keep ⊙ P)^T @ L summed over all M rows: (K, R) fp32, from P (M, K) and L (M, R), deterministic."""
    M, K = P.shape
    R = L.shape[1]
    block_m, block_k = _reduce_blocks(P.dtype)
    splits = _splits(M, K, block_m, block_k, P.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, block_m), splits) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, K, R), dtype=torch.float32, device=P.device)
    _reduce((triton.cdiv(K, block_k), splits), P, L, partial, seed if seed is not None else partial,
            M, K, R, rows_per_split, _m_bucket(M),
            P.stride(0), P.stride(1), L.stride(0), L.stride(1),
            float(dropout_p),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=configs.block_r(R), HAS_DROPOUT=dropout_p > 0,
            DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
            device=P.device, dtype=P.dtype)
    return partial.sum(0) if splits > 1 else partial[0]


def gemm_lowrank(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, *, dropout_p=0.0, seed=None,
                 out=None):
    """OUT (M, N) in P's dtype = P @ Q (+ bias) + lowrank_scale * (keep ⊙ (L @ RM)).

    Q (K, N) and RM (R, N) are given as (pointer tensor, strides) so transposed weights need no copy.
    ``out``: an optional (M, N) tensor to write into (a view of the caller's N-D output).
    """
    M, K = P.shape
    R = L.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=P.dtype, device=P.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()   # N elements; the kernel reads the bias with unit stride
    launch = _gemm_dropout if dropout_p > 0 else _gemm
    launch(grid, P, Q, bias if bias is not None else out, L, RM, out, seed if seed is not None else out,
           M, N, K, R, _m_bucket(M),
           P.stride(0), P.stride(1), q_strides[0], q_strides[1], L.stride(0), L.stride(1),
           rm_strides[0], rm_strides[1], out.stride(0), out.stride(1),
           float(lowrank_scale), float(dropout_p),
           BLOCK_R=configs.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
           DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
           device=P.device, dtype=P.dtype)
    return out


def lora_forward(x, weight, bias, A, B, scale, dropout_p=0.0, seed=None, out=None):
    """Forward of the fused LoRA linear. x (M, K), weight (N, K), bias (N,) or None, A (K, R), B (R, N).

    Returns y (M, N) in x's dtype (written into ``out`` when given) and S = dropout(x) @ A (M, R) in fp32,
    which backward needs (with x). The keep-mask comes from ``seed`` (int64, one element) when dropout_p > 0.
    """
    N = weight.shape[0]
    keep_scale = 1.0 / (1.0 - dropout_p)
    S, _ = lowrank_project(x, A, A.stride(0), A.stride(1), A.shape[1], out_scale=keep_scale,
                           dropout_p=dropout_p, seed=seed)
    # Q = W^T: element (k, n) of W^T is weight[n, k]
    y = gemm_lowrank(x, weight, (weight.stride(1), weight.stride(0)), N, bias, S, B, (B.stride(0), B.stride(1)),
                     scale, dropout_p=0.0, out=out)
    return y, S


def lora_backward(dy, x, weight, A, B, S, scale, dropout_p=0.0, seed=None, *, need_dx=True, need_dA=True,
                  need_dB=True):
    """Backward of the fused LoRA linear: (dx, dA, dB), each None when not needed.

    dS = dY B^T and dB = scale S^T dY in one pass over dY (or two when the partials of a large rank would
    cost more than re-reading dY); dX = dY W + scale * keep/(1-p) ⊙ (dS A^T) in one GEMM with the low-rank
    term fused in; dA = scale/(1-p) * (keep ⊙ x)^T dS.
    """
    R = A.shape[1]
    K = x.shape[1]
    dx = dA = dB = None
    fused_dB = need_dB and 4 * R < _proj_block_m()
    dS, partial = lowrank_project(dy, B, B.stride(1), B.stride(0), R, partial_of=S if fused_dB else None)
    if need_dB:
        dB_t = partial.sum(0) if fused_dB else reduce_rows(dy, S).t()
        dB = (dB_t * scale).to(B.dtype)
    keep_scale = 1.0 / (1.0 - dropout_p)
    if need_dx:
        # Q = W as (N, K); RM = A^T: element (r, k) is A[k, r]
        dx = gemm_lowrank(dy, weight, (weight.stride(0), weight.stride(1)), K, None, dS, A,
                          (A.stride(1), A.stride(0)), scale * keep_scale, dropout_p=dropout_p, seed=seed)
    if need_dA:
        dA = (reduce_rows(x, dS, dropout_p=dropout_p, seed=seed) * (scale * keep_scale)).to(A.dtype)
    return dx, dA, dB
