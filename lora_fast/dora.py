"""dora_linear: the fused DoRA linear with autograd, beside lora_linear (same backend choice).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML, eq. 5), with PEFT's formula
(``use_dora=True``, including its second GEMM on the dropped input when lora_dropout is active) and the norm
detached as the paper's section 4.3 suggests. The norm ||W_n + s (A B)^T_n|| per output feature is computed
exactly on every call by one pass over W that forms the rows of W + s (A B)^T tile by tile in fp32 and reduces
their squares (kernels/dora.py ``dora_norm``): nothing is cached (so no write to W can leave it stale) and no
N x K matrix is stored (PEFT forms W + s B A on every forward). Rows whose norm is 0 get g = 1 (see
``dora_linear``).
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import philox, reference
from ._checks import check_dora_linear, check_training
from .functional import _autocast_enabled, _autocast_inputs, select_backend


class _DoRALinearFunction(torch.autograd.Function):
    """Fused DoRA forward/backward on x (..., K); see ``_save`` for what is kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, scale, dropout_p, seed):
        from .kernels import dora as kernels

        N = weight.shape[0]
        y = x.new_empty((*x.shape[:-1], N))
        x2d = x.reshape(-1, x.shape[-1])
        norm, gscale = kernels.dora_norm(weight, A, B, magnitude, scale)
        need_dm = ctx.needs_input_grad[5]
        if x2d.shape[0] == 0:
            S = torch.zeros((0, A.shape[1]), dtype=torch.float32, device=x.device)
            V = x2d.new_empty((0, N)) if need_dm else None
        else:
            _, S, V = kernels.dora_forward(x2d, weight, bias, A, B, gscale, norm, scale, dropout_p, seed,
                                           out=y.view(-1, N), keep_v=need_dm)
        # saved: x, S = dropout(x) A (M x r fp32), the seed, g (N fp32), parameters (no new memory), and V (M x N,
        # x's dtype: (x_d W^T + s S B) / norm, x_d = x without dropout) only when the magnitude needs a gradient:
        # PEFT keeps more (its base_result in x's dtype and lora_result in the adapters' dtype, both M x N, and x
        # in the adapters' dtype). No mask, no dropped copy of x.
        # a weight made under torch.inference_mode (frozen: it cannot require grad) cannot be saved; it is kept on
        # ctx instead (no version check, as for any frozen weight read again in backward)
        ctx.inference_weight = weight if weight.is_inference() else None
        ctx.save_for_backward(x, None if weight.is_inference() else weight, A, B, S, V, gscale, seed)
        ctx.scale, ctx.dropout_p, ctx.has_bias, ctx.mag_dtype = scale, dropout_p, bias is not None, magnitude.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from .kernels import dora as kernels

        x, weight, A, B, S, V, gscale, seed = ctx.saved_tensors
        weight = ctx.inference_weight if weight is None else weight
        need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
        p = ctx.dropout_p
        dx = dW = db = dA = dB = dm = None
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] == 0:
            zeros = [torch.zeros_like(t) if need else None
                     for t, need in ((x, need_dx), (weight, need_dW), (A, need_dA), (B, need_dB))]
            dm = torch.zeros_like(gscale) if need_dm else None
            db = dy2d.sum(0).to(weight.dtype) if need_db and ctx.has_bias else None
            return zeros[0], zeros[1], db, zeros[2], zeros[3], (dm.to(ctx.mag_dtype) if dm is not None else None), \
                None, None, None
        if need_dx or need_dA or need_dB or need_dm or need_dW:
            dx, dA, dB, dm, dyg, dyg1 = kernels.dora_backward(
                dy2d, x2d, weight, A, B, S, V, gscale, ctx.scale, p, seed, need_dx=need_dx, need_dA=need_dA,
                need_dB=need_dB, need_dm=need_dm, need_g1=need_dx or need_dW)
            if dx is not None:
                dx = dx.view(x.shape)
            if need_dW:
                # the frozen layer's gradient, when asked for (the book leaves W trainable): torch matmuls
                if p == 0:
                    dW = dyg.t() @ x2d
                else:
                    x_d = kernels.dropout_combine(x2d, 1.0 / (1.0 - p), p, seed)
                    dW = dy2d.t() @ x2d + dyg1.t() @ x_d
                dW = dW.to(weight.dtype)
        if need_db and ctx.has_bias:
            db = dy2d.sum(0, dtype=torch.float32).to(weight.dtype)
        if dm is not None:
            dm = dm.to(ctx.mag_dtype)
        return dx, dW, db, dA, dB, dm, None, None, None


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, magnitude: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                training: bool = True) -> torch.Tensor:
    """Fused DoRA linear with autograd (PEFT's DoRA, ``LoraConfig(use_dora=True)``):

        norm = ||W + scale (A B)^T||_row   (per output feature, detached: Liu et al. 2024, sec. 4.3)
        g = magnitude / norm, and g = 1 on rows where norm = 0 (W_n + scale (A B)^T_n = 0: no direction to scale;
            the row's output is then the plain LoRA output, finite; PEFT gives 0/0 = NaN there)
        no dropout:  y = g ⊙ (x W^T + scale x A B) + b                       (Liu et al. 2024, eq. 5, plus bias)
        dropout:     y = x W^T + b + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B,  x_d = dropout(x)  (PEFT's formula)

    Args:
        x: (..., in_features), float16/bfloat16/float32 (float64 on the reference backend); may be strided.
        weight: (out_features, in_features) in x's dtype; may be a transposed view. bias: (out_features,) or None.
        A: (in_features, rank); B: (rank, out_features); x's dtype or float32 (PEFT's fp32 adapters on a 16-bit
            base). magnitude: (out_features,) in A's dtype or float32 (PEFT's lora_magnitude_vector).
        scale: finite LoRA scale. dropout_p: in [0, 1], on the LoRA input as lora_linear (the same Philox mask,
            drawn once per call, serves both dropped terms); applied when ``training``.

    The norm is computed exactly on every call, in fp32, by one pass over W that forms the rows of
    W + scale (A B)^T tile by tile (no cache, no expansion into ||W_n||^2 and cross terms, nothing of size N x K
    stored). The unscaled sum x W^T + scale S B is kept in fp32 until g scales it (so a LoRA term beyond
    16-bit range at a large scale still gives the in-range output). Saved for backward: x, S (M x r fp32), g
    (N fp32), the seed, and, when the magnitude requires grad, V (M x N in x's dtype) = (x_d W^T + scale S B) /
    norm (x_d = x without dropout; 0 on zero-norm rows) for dm = colsum(dY ⊙ V): the magnitude gets no gradient
    on zero-norm rows, where g does not depend on it. Gradients are deterministic (no atomics).
    Under torch.compile or torch.func transforms the op runs the reference path (``reference.dora_linear``).

    Returns: (..., out_features) in x's dtype.
    Raises: TypeError / ValueError / RuntimeError as lora_linear, and for a magnitude of another shape
        (expected (out_features,)), dtype or device.
    """
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        x, weight, bias, A, B = _autocast_inputs(x, weight, bias, A, B)
        if isinstance(magnitude, torch.Tensor) and magnitude.dtype not in (A.dtype, torch.float32):
            magnitude = magnitude.to(A.dtype)
    scale, dropout_p = check_dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p)
    check_training(training)
    if select_backend(x) == "reference" or x.shape[-1] == 0 or weight.shape[0] == 0 \
            or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=dropout_p, training=training)
    p = dropout_p if training else 0.0
    seed = reference.draw_seed(x.device) if p > 0 else None
    p = philox.quantize(p)   # what the kernels' 8-bit uniforms apply (as lora_linear)
    if p >= 1.0:
        # every element dropped: x_d = 0, so y = x W^T + b exactly and A, B get zero gradients; the reference
        # computes that (the seed is drawn above, so the generator advances as on the reference path)
        return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=1.0, training=True,
                                     dropout_mask=torch.zeros_like(x, dtype=torch.bool))
    return _DoRALinearFunction.apply(x, weight, bias, A, B, magnitude, scale, p, seed)


def dora_unfused(x: torch.Tensor, base_result: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                 training: bool = True) -> torch.Tensor:
    """DoRA around a layer's own output ``base_result`` (a layer with hooks or its own forward), unfused, as
    PEFT computes it (``reference.dora_linear(..., base_result=...)``)."""
    return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=dropout_p, training=training,
                                 base_result=base_result)
