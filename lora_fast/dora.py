"""dora_linear: the fused DoRA linear with autograd, beside lora_linear (same backend choice).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML, eq. 5), with PEFT's formula
(``use_dora=True``, including its second GEMM on the dropped input when lora_dropout is active) and the norm
detached as the paper's section 4.3 suggests. The norm per output feature is expanded as
||W_n + s (A B)^T_n||^2 = ||W_n||^2 + 2 s (W A)_n . B_n + s^2 B_n^T (A^T A) B_n (B_n the n-th column of B), with
||W_n||^2 cached while W is unchanged, so no N x K matrix is formed (PEFT forms W + s B A on every forward).
"""

import weakref
from typing import Optional

import torch

from . import philox, reference
from ._checks import check_dora_linear, check_training
from .functional import _autocast_enabled, _autocast_inputs, dropout_mask, graph_gradients, select_backend

# ||W_n||^2 (fp32) per weight tensor (the view's base for a transposed view), valid while the tensor keeps its
# storage, layout and version counter: an in-place update (optimizer step, merge, copy_) bumps the version.
# Keyed by id() with a weak reference whose callback drops the entry when the weight is freed (a
# WeakKeyDictionary would compare tensors with ==, which is elementwise).
_WSQ_CACHE: dict = {}


def _wsq_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype, weight.device)


def weight_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_n||^2 per row of weight (N, K) as (N,) float32 from the kernels, cached while W is unchanged: the key
    is the tensor (or the base of a view), its data pointer, shape, strides and torch's version counter
    ``weight._version``, which every in-place update through autograd-visible ops bumps. Writes through
    ``weight.data`` (which has its own version counter) are not seen: replace the tensor or call
    ``clear_weight_cache()`` after them."""
    from .kernels import dora as kernels

    owner = weight._base if weight._base is not None else weight
    key = _wsq_key(weight)
    hit = _WSQ_CACHE.get(id(owner))
    if hit is not None and hit[0]() is owner and hit[1] == key:
        return hit[2]
    wsq = kernels.row_sumsq(weight.detach())
    ident = id(owner)

    def forget(_ref, ident=ident):
        entry = _WSQ_CACHE.get(ident)
        if entry is not None and entry[0] is _ref:
            del _WSQ_CACHE[ident]

    _WSQ_CACHE[ident] = (weakref.ref(owner, forget), key, wsq)
    return wsq


def clear_weight_cache() -> None:
    """Forget every cached ||W_n||^2 (see ``weight_sq_norms``)."""
    _WSQ_CACHE.clear()


class _DoRALinearFunction(torch.autograd.Function):
    """Fused DoRA forward/backward on x (..., K); see ``_save`` for what is kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, scale, dropout_p, seed):
        from .kernels import dora as kernels

        N = weight.shape[0]
        y = x.new_empty((*x.shape[:-1], N))
        x2d = x.reshape(-1, x.shape[-1])
        norm, gscale = kernels.dora_norm(weight, A, B, magnitude, scale, weight_sq_norms(weight))
        need_dm = ctx.needs_input_grad[5]
        if x2d.shape[0] == 0:
            S = torch.zeros((0, A.shape[1]), dtype=torch.float32, device=x.device)
            U = x2d.new_empty((0, N)) if need_dm else None
        else:
            _, S, U = kernels.dora_forward(x2d, weight, bias, A, B, gscale, scale, dropout_p, seed,
                                           out=y.view(-1, N), keep_u=need_dm)
        # saved: x, S = dropout(x) A (M x r fp32), the seed, g and norm (N fp32), parameters (no new memory), and
        # U (M x N, x's dtype: x W^T + b + s S B without dropout, x_d W^T + s S B with) only when the magnitude
        # needs a gradient: PEFT keeps more (its base_result in x's dtype and lora_result in the adapters' dtype,
        # both M x N, and x in the adapters' dtype). No mask, no dropped copy of x.
        u_bias = bias if (U is not None and dropout_p == 0) else None
        ctx.save_for_backward(x, weight, A, B, S, U, gscale, norm, seed, u_bias, magnitude)
        ctx.scale, ctx.dropout_p, ctx.has_bias, ctx.mag_dtype = scale, dropout_p, bias is not None, magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import dora as kernels

        x, weight, A, B, S, U, gscale, norm, seed, u_bias, magnitude = ctx.saved_tensors
        need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            return _backward_graph(ctx, dy, x, weight, A, B, magnitude, seed)
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
                dy2d, x2d, weight, A, B, S, U, gscale, norm, ctx.scale, p, seed, bias=u_bias, need_dx=need_dx,
                need_dA=need_dA,
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


def _backward_graph(ctx, dy, x, weight, A, B, magnitude, seed):
    """The backward when autograd records it (create_graph=True): the reference maths (``reference.dora_linear``,
    norm detached) on the saved inputs, the dropout mask regenerated from the seed, differentiated in torch ops
    that autograd can differentiate again (``functional.graph_gradients``). The bias only shifts y: db = colsum(dy)."""
    mask = dropout_mask(seed, x, ctx.dropout_p)

    def f(x_, weight_, A_, B_, magnitude_):
        return reference.dora_linear(x_, weight_, None, A_, B_, magnitude_, ctx.scale, dropout_p=ctx.dropout_p,
                                     training=mask is not None, dropout_mask=mask)

    need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
    dx, dW, dA, dB, dm = graph_gradients(f, (x, weight, A, B, magnitude), (need_dx, need_dW, need_dA, need_dB, need_dm),
                                         dy)
    db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype) if need_db and ctx.has_bias \
        else None
    return dx, dW, db, dA, dB, dm, None, None, None


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, magnitude: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                training: bool = True) -> torch.Tensor:
    """Fused DoRA linear with autograd (PEFT's DoRA, ``LoraConfig(use_dora=True)``):

        g = magnitude / ||W + scale (A B)^T||_row      (per output feature, detached: Liu et al. 2024, sec. 4.3)
        no dropout:  y = g ⊙ (x W^T + scale x A B) + b                       (Liu et al. 2024, eq. 5, plus bias)
        dropout:     y = x W^T + b + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B,  x_d = dropout(x)  (PEFT's formula)

    Args:
        x: (..., in_features), float16/bfloat16/float32 (float64 on the reference backend); may be strided.
        weight: (out_features, in_features) in x's dtype; may be a transposed view. bias: (out_features,) or None.
        A: (in_features, rank); B: (rank, out_features); x's dtype or float32 (PEFT's fp32 adapters on a 16-bit
            base). magnitude: (out_features,) in A's dtype or float32 (PEFT's lora_magnitude_vector).
        scale: finite LoRA scale. dropout_p: in [0, 1], on the LoRA input as lora_linear (the same Philox mask,
            drawn once per call, serves both dropped terms); applied when ``training``.

    The norm is computed in fp32 without forming the N x K matrix: ||W_n||^2 (cached while W is unchanged, see
    ``weight_sq_norms``) + 2 scale (W A)_n . B_n + scale^2 B_n^T (A^T A) B_n. Saved for backward: x, S (M x r
    fp32), g and the norm (N fp32), the seed, and, when the magnitude requires grad, U (M x N in x's dtype:
    x W^T + b + scale S B, the LoRA GEMM's output, without dropout; x_d W^T + scale S B with) for
    dm = colsum(dY ⊙ (x_d W^T + scale x_d A B)) / norm. Gradients are deterministic (no atomics).
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
