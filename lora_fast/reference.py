"""Plain-PyTorch LoRA linear: the ground truth of the tests and a baseline of the benchmarks.

The book's arithmetic (Raschka, "Build a Large Language Model (From Scratch)", appendix E): linear(x) plus
scale * (x @ A @ B), with dropout on the LoRA input as PEFT applies it. Autograd does the backward.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import philox
from ._checks import check_dora_linear, check_lora_delta, check_lora_linear, check_lora_linear_multi, check_training

DROPOUT_RNGS = ("philox", "torch")


def draw_seed(device) -> torch.Tensor:
    """The dropout seed of one call: an int64 tensor of one element in [0, 2**62), drawn from torch's generator
    for ``device`` (so torch.manual_seed governs it; on CUDA without a host sync). Both backends draw it the
    same way, so one torch seed gives one mask on either."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True,
                dropout_mask: Optional[torch.Tensor] = None, dropout_rng: str = "philox") -> torch.Tensor:
    """y = x W^T + b + scale * (dropout(x) @ A) @ B (LoRA, Hu et al. 2021, eq. 3), unfused.

    Args:
        x: (..., in_features), float16/bfloat16/float32/float64.
        weight: (out_features, in_features), x's dtype, as nn.Linear stores it.
        bias: (out_features,) or None.
        A: (in_features, rank); B: (rank, out_features); x's dtype or float32. The low-rank path runs in A's
            dtype (x is cast to it, as PEFT does) and is added before the cast back to x's dtype.
        scale: the LoRA scale (alpha, alpha/rank or alpha/sqrt(rank)), finite.
        dropout_p: probability of zeroing an element of the LoRA input, in [0, 1] (1: the LoRA term is zero);
            active when ``training``. Kept elements are scaled by 1/(1-p); with the "philox" generator p is
            first rounded to a multiple of 1/256 as the kernels round it (``philox.quantize``).
        dropout_mask: optional bool keep-mask of x's shape, used instead of drawing one (kept elements scaled
            by 1/(1-dropout_p) with dropout_p as given).
        dropout_rng: where a mask comes from when none is given. "philox" (default): the fused kernels'
            counter-based generator (``lora_fast.philox``) under a seed drawn as the fused op draws it, so the
            same ``torch.manual_seed`` drops the same elements on both backends. "torch": ``F.dropout`` (the
            book's and PEFT's nn.Dropout; faster on CPU, but another mask than the kernels').

    Returns: (..., out_features) in x's dtype.
    Raises: TypeError / ValueError for bad shapes, dtypes, devices, scale or dropout_p (see lora_fast.lora_linear),
        for a dropout_mask of another shape, or an unknown dropout_rng.
    """
    scale, dropout_p = check_lora_linear(x, weight, bias, A, B, scale, dropout_p)
    check_training(training)
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout_rng: expected one of {DROPOUT_RNGS}, got {dropout_rng!r}")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask: expected x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
    y = F.linear(x, weight, bias)
    return (y + _delta(x, A, B, scale, dropout_p, training, dropout_mask, dropout_rng)).to(x.dtype)


def _dropped(x_lora, dropout_p: float, training: bool, dropout_mask, dropout_rng: str):
    """dropout(x_lora) as the fused kernels draw it (one seed per call), or the given mask, or F.dropout."""
    if training and dropout_p > 0:
        if dropout_mask is not None:
            return torch.zeros_like(x_lora) if dropout_p >= 1.0 else \
                x_lora * dropout_mask.to(x_lora.dtype) / (1.0 - dropout_p)
        if dropout_rng == "torch":
            return F.dropout(x_lora, dropout_p, training=True)
        # the fused op's generator: the seed drawn as the op draws it (also when nothing is kept, so the
        # generator advances alike), p quantised as the kernels apply it
        seed = draw_seed(x_lora.device)
        p = philox.quantize(dropout_p)
        if p >= 1.0:
            return torch.zeros_like(x_lora)
        if p > 0:
            K = x_lora.shape[-1]
            mask = philox.keep_mask(seed, x_lora.numel() // K if K else 0, K, p).view(x_lora.shape)
            return x_lora * mask.to(x_lora.dtype) / (1.0 - p)
    return x_lora


def _delta(x, A, B, scale: float, dropout_p: float, training: bool, dropout_mask, dropout_rng: str):
    x_lora = _dropped(x.to(A.dtype), dropout_p, training, dropout_mask, dropout_rng)
    return scale * (x_lora @ A @ B)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
               training: bool = True) -> torch.Tensor:
    """The low-rank term alone, scale * (dropout(x) @ A) @ B (LoRA, Hu et al. 2021, eq. 3), in A's dtype (x is
    cast to it, as PEFT does): what a LinearWithLoRA adds beside a wrapped layer it cannot fuse (own forward,
    hooks). x: (..., in_features); A: (in_features, rank); B: (rank, out_features). Dropout as lora_linear's
    (the kernels' Philox mask, p in [0, 1]). Returns (..., out_features).

    Raises: TypeError / ValueError for bad shapes, dtypes, devices, scale or dropout_p (as lora_linear).
    """
    scale, dropout_p = check_lora_delta(x, A, B, scale, dropout_p)
    check_training(training)
    return _delta(x, A, B, scale, dropout_p, training, None, "philox")


# --- several adapters in one batch (issue 30) ---------------------------------------------------------------


def multi_keep_mask(seed: torch.Tensor, x: torch.Tensor, adapter_index: torch.Tensor, dropout_ps) -> torch.Tensor:
    """The keep-mask of lora_linear_multi's kernels for one call: bool of x's shape, row m drawn as lora_linear
    draws it (``philox.keep_mask`` under the call's one ``seed``, the same counters) against the quantised
    drop probability of its adapter ``dropout_ps[adapter_index[m]]``; rows of adapter -1 all kept (unused).
    x: (..., K); adapter_index: x.shape[:-1] int64; dropout_ps: n probabilities in [0, 1]."""
    K = x.shape[-1]
    idx = adapter_index.reshape(-1)
    M = idx.numel()
    keep = torch.ones((M, K), dtype=torch.bool, device=x.device)
    for p in sorted({philox.quantize(p) for p in dropout_ps if philox.quantize(p) > 0}):
        rows = torch.zeros(M, dtype=torch.bool, device=x.device)
        for a, pa in enumerate(dropout_ps):
            if philox.quantize(pa) == p:
                rows |= idx == a
        keep = torch.where(rows[:, None], philox.keep_mask(seed, M, K, p), keep)
    return keep.view(x.shape)


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                      B: torch.Tensor, scale, adapter_index: torch.Tensor, *, dropout_p=0.0, training: bool = True,
                      dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Several LoRA adapters in one batch, unfused: row m of x gets
    y_m = x_m W^T + b + scale[a] * (dropout_a(x_m) @ A[a]) @ B[a] with a = adapter_index[m], and the base layer
    alone where a = -1 (LoRA, Hu et al. 2021, eq. 3, per row; PEFT's ``adapter_names`` mixed batches).

    Args:
        x: (..., in_features), float16/bfloat16/float32/float64.
        weight: (out_features, in_features) in x's dtype; bias: (out_features,) or None.
        A: (n, in_features, rank); B: (n, rank, out_features); x's dtype or float32 (adapters of different
            ranks padded with zeros to the largest: exact); or sequences of n factors A[a] (in_features, rank_a),
            B[a] (rank_a, out_features) of one dtype. The low-rank path runs in A's dtype, as lora_linear's.
        scale: one finite number, or n of them (a sequence or a (n,) tensor).
        adapter_index: int64 of shape x.shape[:-1], values in [-1, n).
        dropout_p: one probability in [0, 1] or n of them, active when ``training``; the mask is the kernels'
            (one seed per call drawn as lora_linear draws it, p quantised per adapter: ``multi_keep_mask``).
        dropout_mask: optional bool keep-mask of x's shape used instead (kept elements of adapter a scaled by
            1 / (1 - dropout_p[a]) with dropout_p as given).

    Each adapter's rows go through lora_linear's own arithmetic (a row gather, the two matmuls, a scatter), so a
    batch of one adapter gives bit for bit what ``lora_linear`` gives. Returns (..., out_features) in x's dtype.
    Raises: TypeError / ValueError naming the argument (see ``lora_fast.lora_linear_multi``).
    """
    scales, dropout_ps = check_lora_linear_multi(x, weight, bias, A, B, scale, adapter_index, dropout_p)
    check_training(training)
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask: expected x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
    y = F.linear(x, weight, bias)
    return (y + _multi_delta(x, A, B, scales, adapter_index, dropout_ps, training, dropout_mask)).to(x.dtype)


def _multi_delta(x, A, B, scales, adapter_index, dropout_ps, training, dropout_mask):
    """The low-rank terms (..., out_features) in A's dtype (promoted with x's), zero on rows of adapter -1."""
    K = x.shape[-1]
    idx = adapter_index.reshape(-1)
    M = idx.numel()
    # A, B stacked (n, in, r), (n, r, out), or sequences of n factors (in, r_a), (r_a, out): indexed alike
    x_lora = x.to(A[0].dtype).reshape(M, K)
    ps = dropout_ps
    if training and dropout_mask is None and any(p > 0 for p in dropout_ps):
        # one seed per call, drawn as lora_linear draws it; p quantised as the kernels apply it
        ps = [philox.quantize(p) for p in dropout_ps]
        dropout_mask = multi_keep_mask(draw_seed(x.device), x, adapter_index, dropout_ps)
    mask = dropout_mask.reshape(M, K) if dropout_mask is not None else None
    delta = torch.zeros((M, B[0].shape[-1]), dtype=torch.promote_types(A[0].dtype, x.dtype), device=x.device)
    for a in range(len(A)):
        # an adapter without rows still takes part (an empty matmul): its gradients are zeros, not None
        rows = (idx == a).nonzero().squeeze(1)
        # all rows: no gather (lora_linear's very operands, so one adapter matches it bit for bit)
        every = rows.numel() == M
        xa = x_lora if every else x_lora.index_select(0, rows)
        if training and ps[a] > 0:
            if ps[a] >= 1.0:
                xa = torch.zeros_like(xa)
            else:
                ma = mask if every else mask.index_select(0, rows)
                xa = xa * ma.to(xa.dtype) / (1.0 - ps[a])
        da = scales[a] * (xa @ A[a] @ B[a])
        delta = da.to(delta.dtype) if every else delta.index_copy(0, rows, da.to(delta.dtype))
    return delta.view(*x.shape[:-1], B[0].shape[-1])


# --- DoRA (Liu et al. 2024) ------------------------------------------------------------------------------------


def dora_weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W_n + scale (A B)^T_n|| per output feature n: (out_features,), detached (DoRA, Liu et al. 2024, sec. 4.3:
    the norm is a constant in backward), computed in float32 (float64 when W or A is float64) on the N x K
    matrix itself (the ground truth of the kernels' expansion). weight (out, in), A (in, r), B (r, out).
    Each row is scaled by a power of two near its largest entry before its squares are summed (LAPACK's nrm2
    scales likewise), so that rows past ~1.8e19 (squares beyond fp32's range) or near 1e-30 (squares below it)
    keep their norm; powers of two scale exactly, so other rows are unchanged bit for bit."""
    acc = torch.promote_types(torch.promote_types(torch.float32, weight.dtype), A.dtype)
    with torch.no_grad():
        merged = weight.detach().to(acc) + scale * (A.detach().to(acc) @ B.detach().to(acc)).t()
        _, exponent = torch.frexp(merged.abs().amax(dim=1))   # max |row| < 2**exponent
        exponent = exponent.clamp(max=math.frexp(torch.finfo(acc).max)[1] - 1)   # 2**exponent finite
        unit = torch.ldexp(torch.ones_like(exponent, dtype=acc), exponent)
        return torch.linalg.vector_norm(merged / unit[:, None], dim=1) * unit


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, magnitude: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                training: bool = True, dropout_mask: Optional[torch.Tensor] = None, dropout_rng: str = "philox",
                base_result: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA linear, unfused, as PEFT computes it (``LoraConfig(use_dora=True)``, peft.tuners.lora.dora):
    g = magnitude / ||W + scale (A B)^T||_row (detached, Liu et al. 2024, eq. 5 and sec. 4.3; g = 1 on rows of
    norm 0, see ``dora_scale``), and

        no dropout (or eval):  y = g ⊙ (base - b + scale x A B) + b = g ⊙ (x W^T + scale x A B) + b
        dropout active:        y = (base - x_d W^T) + g ⊙ (x_d W^T + scale x_d A B)
                                 = base + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B,   x_d = dropout(x)

    with base = x W^T + b (or ``base_result``: the wrapped layer's own output, as PEFT takes it). The low-rank
    path and x_d run in A's dtype (x is cast to it, as PEFT does); the sum is cast to x's dtype once.

    Args: as ``lora_linear``, plus magnitude: (out_features,) in A's dtype or float32 (PEFT's
        lora_magnitude_vector); dropout_mask / dropout_rng as ``lora_linear`` (one mask serves both terms).
    Returns: (..., out_features) in x's dtype.
    Raises: TypeError / ValueError as lora_linear, and for a magnitude of another shape, dtype or device.
    """
    scale, dropout_p = check_dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p)
    check_training(training)
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout_rng: expected one of {DROPOUT_RNGS}, got {dropout_rng!r}")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask: expected x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
    g = dora_scale(magnitude, dora_weight_norm(weight, A, B, scale))
    result = F.linear(x, weight, bias) if base_result is None else base_result
    x_lora = x.to(A.dtype)
    active = training and dropout_p > 0
    x_d = _dropped(x_lora, dropout_p, training, dropout_mask, dropout_rng)
    # the low-rank term and the sums in g's dtype (fp32, or fp64), so that a term beyond 16-bit range at a large
    # scale is scaled back by g before the one rounding to x's dtype (PEFT sums in its fp32 adapters' dtype)
    acc = g.dtype
    lora = scale * (x_d.to(acc) @ A.to(acc) @ B.to(acc))
    if active:
        # PEFT's result + (g - 1) ⊙ x_d W^T + g ⊙ lora, grouped so that no g-scaled term cancels another
        base_d = F.linear(x_d, weight.to(x_d.dtype)).to(acc)
        return ((result.to(acc) - base_d) + g * (base_d + lora)).to(x.dtype)
    # PEFT's g ⊙ (base + lora) + b: the sum scaled by g directly
    base = (result - bias if bias is not None else result).to(acc)
    y = g * (base + lora)
    return (y + bias.to(acc) if bias is not None else y).to(x.dtype)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = magnitude / norm per output feature, and 1 where norm is 0 (a row with W_n + scale (A B)^T_n = 0 has
    no direction for the magnitude to scale: its output is the plain LoRA output, finite, where PEFT's 0/0 gives
    NaN); in the wider of the two dtypes. The magnitude's gradient is 0 on such rows."""
    dtype = torch.promote_types(magnitude.dtype, norm.dtype)
    zero = norm == 0
    return torch.where(zero, torch.ones((), dtype=dtype, device=norm.device),
                       magnitude.to(dtype) / torch.where(zero, torch.ones_like(norm), norm).to(dtype))
