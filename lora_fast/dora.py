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

from . import philox, reference
from ._checks import check_dora_linear, check_training
from .functional import _autocast_enabled, _autocast_inputs, graph_gradients, select_backend


class _DoRALinearFunction(torch.autograd.Function):
    """Fused DoRA forward/backward on x (..., K); see ``_save`` for what is kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, scale, dropout_p, seed):
        from .kernels import dora as kernels
        from .kernels import ops

        N = weight.shape[0]
        y = x.new_empty((*x.shape[:-1], N))
        x2d = x.reshape(-1, x.shape[-1])
        norm, gscale = kernels.dora_norm(weight, A, B, magnitude, scale)
        need_dm = ctx.needs_input_grad[5]
        keep = ops.new_keep_mask(x2d.shape[0], x2d.shape[1], x.device) if dropout_p > 0 else None
        if x2d.shape[0] == 0:
            S = torch.zeros((0, A.shape[1]), dtype=torch.float32, device=x.device)
            V = x2d.new_empty((0, N)) if need_dm else None
        else:
            _, S, V = kernels.dora_forward(x2d, weight, bias, A, B, gscale, norm, scale, dropout_p, seed,
                                           out=y.view(-1, N), keep_v=need_dm, keep_out=keep)
        # saved: x, S = dropout(x) A (M x r fp32), with dropout the keep-mask's bits the S pass stored (M x K / 8
        # bytes, rows padded to 16: the forward's x_d, the backward's masked add and dA pass read them; no seed),
        # g (N fp32), parameters (no new memory), and V (M x N, x's dtype: (x_d W^T + s S B) / norm, x_d = x
        # without dropout) only when the magnitude needs a gradient: PEFT keeps more (its base_result in x's
        # dtype and lora_result in the adapters' dtype, both M x N, and x in the adapters' dtype). No dropped
        # copy of x.
        # a weight made under torch.inference_mode (frozen: it cannot require grad) cannot be saved; it is kept on
        # ctx instead (no version check, as for any frozen weight read again in backward)
        ctx.inference_weight = weight if weight.is_inference() else None
        # the magnitude (a parameter, no new memory) for a differentiable backward (create_graph)
        ctx.save_for_backward(x, None if weight.is_inference() else weight, A, B, S, V, gscale, keep, magnitude)
        ctx.scale, ctx.dropout_p, ctx.has_bias, ctx.mag_dtype = scale, dropout_p, bias is not None, magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import dora as kernels

        x, weight, A, B, S, V, gscale, keep, magnitude = ctx.saved_tensors
        weight = ctx.inference_weight if weight is None else weight
        need_dx, need_dW, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            return _backward_graph(ctx, dy, x, weight, A, B, magnitude, keep)
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
                dy2d, x2d, weight, A, B, S, V, gscale, ctx.scale, p, keep, need_dx=need_dx, need_dA=need_dA,
                need_dB=need_dB, need_dm=need_dm, need_g1=need_dx or need_dW, need_g=need_dW)
            if dx is not None:
                dx = dx.view(x.shape)
            if need_dW:
                # the frozen layer's gradient, when asked for (the book leaves W trainable): torch matmuls
                if p == 0:
                    dW = dyg.t() @ x2d
                else:
                    x_d = kernels.dropout_combine(x2d, 1.0 / (1.0 - p), keep)
                    dW = dy2d.t() @ x2d + dyg1.t() @ x_d
                dW = dW.to(weight.dtype)
        if need_db and ctx.has_bias:
            db = dy2d.sum(0, dtype=torch.float32).to(weight.dtype)
        if dm is not None:
            dm = dm.to(ctx.mag_dtype)
        return dx, dW, db, dA, dB, dm, None, None, None


def _keep_mask(keep, x, dropout_p: float):
    """The bool keep-mask (x's shape) of the forward's bits (``philox.unpack_keep_mask``), or None without dropout:
    the mask of the differentiable backwards."""
    return philox.unpack_keep_mask(keep, x.shape[-1]).view(x.shape) if dropout_p > 0 else None


def _backward_graph(ctx, dy, x, weight, A, B, magnitude, keep):
    """The backward when autograd records it (create_graph=True): the reference maths (``reference.dora_linear``,
    norm detached) on the saved inputs, the dropout mask unpacked from the forward's bits, differentiated in torch
    ops that autograd can differentiate again (``functional.graph_gradients``). The bias only shifts y:
    db = colsum(dy)."""
    mask = _keep_mask(keep, x, ctx.dropout_p)

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
    (N fp32), with dropout the keep-mask's bits (M x in_features / 8 bytes: drawn once, by the x A pass, and
    read by every later pass), and, when the magnitude requires grad, V (M x N in x's dtype) = (x_d W^T + scale S B) /
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


class _DoRALinear4bitFunction(torch.autograd.Function):
    """Fused DoRA forward/backward on a frozen 4-bit base (QDoRA), x (..., K): the 16-bit op's passes with the
    4-bit GEMM (each weight tile dequantized in registers) and the 4-bit norm pass. Saved for backward: as the
    16-bit op (x, S, g, the keep-mask's bits with dropout, V when the magnitude trains); the packed weight is read
    again."""

    @staticmethod
    def forward(ctx, x, bias, A, B, magnitude, packed, scale, dropout_p, seed, sources):
        from . import qlora
        from .kernels import dora as kernels
        from .kernels import ops, ops_4bit

        N = packed.shape[0]
        y = x.new_empty((*x.shape[:-1], N))
        x2d = x.reshape(-1, x.shape[-1])
        keep = ops.new_keep_mask(x2d.shape[0], x2d.shape[1], x.device) if dropout_p > 0 else None
        norm, gscale = kernels.dora_norm_4bit(packed, A, B, magnitude, scale, x.dtype)
        need_dm = ctx.needs_input_grad[4]
        b_strides = (B.stride(0), B.stride(1))

        def base_gemm(P, bias_, L, lowrank_scale, out):
            return ops_4bit.gemm_4bit_lowrank(P, packed, True, bias_, L, B, b_strides, lowrank_scale, out=out)

        _, S, V = kernels.dora_forward(x2d, None, bias, A, B, gscale, norm, scale, dropout_p, seed,
                                       out=y.view(-1, N), keep_v=need_dm, base_gemm=base_gemm, keep_out=keep)
        # the magnitude (a parameter, no new memory) for a differentiable backward (create_graph); the keep-mask's
        # bits with dropout (no seed)
        ctx.save_for_backward(x, A, B, S, V, gscale, keep, magnitude)
        # the packed weight is read again in backward, not saved: its version counters are (as lora_linear_4bit)
        ctx.versions = qlora._versions(packed, sources)
        ctx.packed, ctx.scale, ctx.dropout_p, ctx.has_bias = packed, scale, dropout_p, bias is not None
        ctx.mag_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from . import qlora
        from .kernels import dora as kernels
        from .kernels import ops_4bit

        x, A, B, S, V, gscale, keep, magnitude = ctx.saved_tensors
        qlora._check_versions(ctx.versions)
        need_dx, need_db, need_dA, need_dB, need_dm = ctx.needs_input_grad[:5]
        dx = dA = dB = dm = db = None
        dy2d = dy.reshape(-1, dy.shape[-1])
        packed = ctx.packed
        if torch.is_grad_enabled():
            # autograd records the backward (create_graph=True): the reference maths in torch ops on deq(W) from
            # the kernels' dequantization (a constant: the 4-bit weight gets no gradient), as lora_linear_4bit
            weight = ops_4bit.dequantize(packed, x.dtype)
            mask = _keep_mask(keep, x, ctx.dropout_p)

            def f(x_, A_, B_, magnitude_):
                return reference.dora_linear(x_, weight, None, A_, B_, magnitude_, ctx.scale,
                                             dropout_p=ctx.dropout_p, training=mask is not None, dropout_mask=mask)

            dx, dA, dB, dm = graph_gradients(f, (x, A, B, magnitude), (need_dx, need_dA, need_dB, need_dm), dy)
            if need_db and ctx.has_bias:
                db = dy2d.sum(0, dtype=torch.float32).to(dy.dtype)
            return dx, db, dA, dB, dm, None, None, None, None, None
        a_t = (A.stride(1), A.stride(0))

        def dx_gemm(P, L, lowrank_scale):
            return ops_4bit.gemm_4bit_lowrank(P, packed, False, None, L, A, a_t, lowrank_scale)

        if need_dx or need_dA or need_dB or need_dm:
            dx, dA, dB, dm, _, _ = kernels.dora_backward(
                dy2d, x.reshape(-1, x.shape[-1]), None, A, B, S, V, gscale, ctx.scale, ctx.dropout_p, keep,
                need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, need_dm=need_dm, need_g1=need_dx,
                dx_gemm=dx_gemm)
            dx = dx.view(x.shape) if dx is not None else None
        if need_db and ctx.has_bias:
            db = dy2d.sum(0, dtype=torch.float32).to(dy.dtype)
        if dm is not None:
            dm = dm.to(ctx.mag_dtype)
        return dx, db, dA, dB, dm, None, None, None, None, None


def dora_linear_4bit(x: torch.Tensor, qweight: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                     A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float, *,
                     dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """Fused DoRA linear on a frozen 4-bit base (QDoRA; PEFT's DoRA on a bitsandbytes Linear4bit): ``dora_linear``
    with W = deq(W), the 4-bit layout's definition (``reference_4bit.dequantize``: bitsandbytes' nf4 / fp4, any
    power-of-two blocksize, nested or not: QLoRA, Dettmers et al. 2023)
    rounded to the quantized dtype and then to x's dtype, as bitsandbytes' matmul_4bit and
    PEFT's DoRA (``dequantize_module_weight(...).to(x.dtype)``) read it:

        g = magnitude / ||deq(W) + scale (A B)^T||_row (detached; 1 on rows of norm 0)
        y = g ⊙ (x deq(W)^T + scale x A B) + b   (with dropout, PEFT's formula as ``dora_linear``)

    The kernels dequantize each weight tile in registers (the norm pass and the GEMMs read the packed weight;
    no N x K copy is made or kept); the reference backend dequantizes (``reference_4bit.dequantize``) and runs
    ``reference.dora_linear``.

    Args: x (..., in_features) in the compute dtype; qweight, quant_state as ``lora_linear_4bit``; bias, A, B,
        magnitude, scale, dropout_p, training as ``dora_linear``.
    Returns: (..., out_features) in x's dtype; gradients for x, bias, A, B and magnitude (none for the weight).
    Raises: ImportError without bitsandbytes; TypeError / ValueError as ``lora_linear_4bit`` and ``dora_linear``.
    """
    from . import qlora, reference_4bit

    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        x, _, bias, A, B = _autocast_inputs(x, None, bias, A, B)
        if isinstance(magnitude, torch.Tensor) and magnitude.dtype not in (A.dtype, torch.float32):
            magnitude = magnitude.to(A.dtype)
    packed = qlora.Packed4bit.from_bitsandbytes(qweight, quant_state)
    if qweight.requires_grad:
        raise ValueError("qweight: the 4-bit base weight is frozen; it must not require grad")
    if isinstance(x, torch.Tensor) and packed.data.device != x.device:
        raise ValueError(f"qweight: expected a tensor on x's device {x.device}, got {packed.data.device}")
    stand_in = x.new_empty(()).expand(packed.shape) if isinstance(x, torch.Tensor) else None
    scale, dropout_p = check_dora_linear(x, stand_in, bias, A, B, magnitude, scale, dropout_p)
    check_training(training)
    N, K = packed.shape
    if select_backend(x) == "reference" or x.numel() == 0 or N == 0 or K == 0 \
            or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        weight = reference_4bit.dequantize(qweight, quant_state).to(x.dtype)
        return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=dropout_p,
                                     training=training)
    p = dropout_p if training else 0.0
    seed = reference.draw_seed(x.device) if p > 0 else None
    p = philox.quantize(p)
    if p >= 1.0:
        weight = reference_4bit.dequantize(qweight, quant_state).to(x.dtype)
        return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=1.0, training=True,
                                     dropout_mask=torch.zeros_like(x, dtype=torch.bool))
    return _DoRALinear4bitFunction.apply(x, bias, A, B, magnitude, packed, scale, p, seed,
                                         qlora._weight_sources(qweight, quant_state))


def dequantize_4bit_weight(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes 4-bit weight in its quantized dtype (``quant_state.dtype``), by the
    layout's definition: code_table[code] * absmax (QLoRA, Dettmers et al. 2023; kernels/nf4.py) on the kernels'
    backend, ``reference_4bit.dequantize`` on the reference backend. A temporary tensor (DoRA's magnitude
    initialisation and the unfused path read it; the fused op never forms it)."""
    from . import qlora, reference_4bit

    packed = qlora.Packed4bit.from_bitsandbytes(qweight, quant_state)
    probe = torch.empty(0, dtype=packed.dtype, device=packed.data.device)
    if select_backend(probe) == "triton":
        from .kernels import ops_4bit

        return ops_4bit.dequantize(packed, packed.dtype)
    return reference_4bit.dequantize(qweight, quant_state)


def dora_unfused(x: torch.Tensor, base_result: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                 training: bool = True) -> torch.Tensor:
    """DoRA around a layer's own output ``base_result`` (a layer with hooks or its own forward), unfused, as
    PEFT computes it (``reference.dora_linear(..., base_result=...)``)."""
    return reference.dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p=dropout_p, training=training,
                                 base_result=base_result)
