"""lora_linear: the fused LoRA linear with autograd, and the choice of backend (triton | reference)."""

import os
from typing import Optional

import torch

from . import reference
from ._checks import check_lora_linear

BACKENDS = ("triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(x: torch.Tensor) -> str:
    """The backend that serves ``x``: "triton" for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1),
    "reference" otherwise. ``LORA_FAST_BACKEND=triton|reference`` forces one.

    Raises: ValueError for an unknown LORA_FAST_BACKEND; RuntimeError when the forced triton backend cannot
    serve x (CPU tensor without the interpreter, float64, or triton not installed). Never falls back silently.
    """
    forced = os.environ.get("LORA_FAST_BACKEND", "").strip().lower()
    if forced not in ("",) + BACKENDS:
        raise ValueError(f"LORA_FAST_BACKEND: expected one of {BACKENDS}, got {forced!r}")
    if forced == "reference":
        return "reference"
    reasons = []
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        reasons.append(f"x is on {x.device} (triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU)")
    if x.dtype not in _TRITON_DTYPES:
        reasons.append(f"x has dtype {x.dtype} (triton kernels take float16, bfloat16, float32)")
    if not reasons and not _triton_available():
        reasons.append("the triton package is not installed")
    if forced == "triton" and reasons:
        raise RuntimeError("LORA_FAST_BACKEND=triton cannot serve these inputs: " + "; ".join(reasons))
    return "reference" if reasons else "triton"


class _LoRALinearFunction(torch.autograd.Function):
    """Fused forward/backward on 2-D x. Saved for backward: x, S = dropout(x) A (M x r, fp32), the seed
    and the parameters (weight, A, B); nothing of size M x out_features, no mask, no dropped copy of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout_p, seed):
        from . import kernels

        M, R = x.shape[0], A.shape[1]
        if M == 0:
            y = x.new_empty((0, weight.shape[0]))
            S = torch.empty((0, R), dtype=torch.float32, device=x.device)
        else:
            y, S = kernels.lora_forward(x, weight, bias, A, B, scale, dropout_p, seed)
        ctx.save_for_backward(x, weight, A, B, S, seed)
        ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from . import kernels

        x, weight, A, B, S, seed = ctx.saved_tensors
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        dx = dW = db = dA = dB = None
        if x.shape[0] == 0:
            dx = torch.zeros_like(x) if need_dx else None
            dA = torch.zeros_like(A) if need_dA else None
            dB = torch.zeros_like(B) if need_dB else None
        elif need_dx or need_dA or need_dB:
            dx, dA, dB = kernels.lora_backward(dy, x, weight, A, B, S, ctx.scale, ctx.dropout_p,
                                               seed if ctx.dropout_p > 0 else None,
                                               need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)
        # the frozen-layer gradients, when asked for (the book's code leaves W trainable): torch matmuls
        if need_dW:
            dW = (dy.t() @ x).to(weight.dtype) if x.shape[0] else torch.zeros_like(weight)
        if need_db and ctx.has_bias:
            db = dy.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dW, db, dA, dB, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """Fused LoRA linear with autograd: y = x W^T + b + scale * (dropout(x) @ A) @ B.

    Maths: LoRA, Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models"), eq. 3, with dropout
    on the LoRA input as PEFT applies it (kept elements scaled by 1 / (1 - dropout_p)).

    Args:
        x: (..., in_features), any number of leading dims, float16/bfloat16/float32 (float64 on the reference
            backend); may be non-contiguous.
        weight: (out_features, in_features) in x's dtype, as nn.Linear stores it; may be a transposed view.
        bias: (out_features,) in weight's dtype, or None.
        A: (in_features, rank), rank >= 1; B: (rank, out_features); both x's dtype or float32 (PEFT keeps
            adapters in float32 on a 16-bit base). The kernels compute in x's dtype with fp32 accumulation.
        scale: finite real LoRA scale (alpha, alpha/rank, or alpha/sqrt(rank) for rsLoRA).
        dropout_p: probability in [0, 1) of dropping an element of the LoRA input; applied when ``training``.
        training: False (eval) applies no dropout.

    Returns: (..., out_features) in x's dtype. Gradients flow to every input that requires one (x, weight,
        bias, A, B); with dropout the kernels regenerate the mask from a seed drawn from torch's generator for
        x's device, so ``torch.manual_seed`` makes runs reproducible.

    Raises:
        TypeError: a non-tensor, an integer dtype, weight not in x's dtype, A/B dtypes that differ or are
            neither x's dtype nor float32, a non-real scale.
        ValueError: mismatched in/out dims, rank < 1, tensors on another device than x, a non-finite scale,
            dropout_p outside [0, 1), an unknown LORA_FAST_BACKEND.
        RuntimeError: LORA_FAST_BACKEND=triton with inputs the kernels cannot serve.
    """
    scale, dropout_p = check_lora_linear(x, weight, bias, A, B, scale, dropout_p)
    if select_backend(x) == "reference":
        return reference.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, training=training)
    p = dropout_p if training else 0.0
    # drawn on x's device: no host sync, and torch.manual_seed / CUDA-graph RNG state govern it
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if p > 0 else None
    x2d = x.reshape(-1, x.shape[-1])
    y = _LoRALinearFunction.apply(x2d, weight, bias, A, B, scale, p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])
