"""Plain-PyTorch LoRA linear: the ground truth of the tests and a baseline of the benchmarks.

The book's arithmetic (Raschka, "Build a Large Language Model (From Scratch)", appendix E): linear(x) plus
scale * (x @ A @ B), with dropout on the LoRA input as PEFT applies it. Autograd does the backward.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_lora_linear, check_training


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True,
                dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b + scale * (dropout(x) @ A) @ B (LoRA, Hu et al. 2021, eq. 3), unfused.

    Args:
        x: (..., in_features), float16/bfloat16/float32/float64.
        weight: (out_features, in_features), x's dtype, as nn.Linear stores it.
        bias: (out_features,) or None.
        A: (in_features, rank); B: (rank, out_features); x's dtype or float32. The low-rank path runs in A's
            dtype (x is cast to it, as PEFT does) and is added before the cast back to x's dtype.
        scale: the LoRA scale (alpha, alpha/rank or alpha/sqrt(rank)), finite.
        dropout_p: probability of zeroing an element of the LoRA input, in [0, 1); active when ``training``.
        dropout_mask: optional bool keep-mask of x's shape: used instead of drawing one (tests pass the
            fused kernels' mask here to compare the two paths exactly). Kept elements are scaled by 1/(1-p).

    Returns: (..., out_features) in x's dtype.
    Raises: TypeError / ValueError for bad shapes, dtypes, devices, scale or dropout_p (see lora_fast.lora_linear).
    """
    scale, dropout_p = check_lora_linear(x, weight, bias, A, B, scale, dropout_p)
    check_training(training)
    y = F.linear(x, weight, bias)
    x_lora = x.to(A.dtype)
    if training and dropout_p > 0:
        if dropout_mask is not None:
            if dropout_mask.shape != x.shape:
                raise ValueError(f"dropout_mask: expected x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
            x_lora = x_lora * dropout_mask.to(x_lora.dtype) / (1.0 - dropout_p)
        else:
            x_lora = F.dropout(x_lora, dropout_p, training=True)
    return (y + scale * (x_lora @ A @ B)).to(x.dtype)
