"""Input checks shared by the fused op and the reference path: clear errors before any launch."""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, value, ndim=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype (float16, bfloat16, float32, float64), "
                        f"got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")


def check_scale(scale, name: str = "scale") -> float:
    """``scale`` as a finite Python float (a one-element tensor is accepted); errors name ``name``."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{name}: expected a finite number, got {scale}")
    return scale


def check_dropout(p, name: str = "dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
    return float(p)


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
    return int(rank)


def check_lora_linear(x, weight, bias, A, B, scale, dropout_p):
    """Validate the arguments of lora_linear; returns (scale, dropout_p) as floats. Raises TypeError/ValueError."""
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    _tensor("weight", weight, 2)
    _tensor("A", A, 2)
    _tensor("B", B, 2)
    out_features, in_features = weight.shape
    if in_features < 1:
        raise ValueError(f"weight: expected in_features >= 1, got shape {tuple(weight.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dim in_features={in_features} (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if A.shape[1] < 1:
        raise ValueError(f"A: expected shape (in_features, rank) with rank >= 1, got {tuple(A.shape)}")
    if A.shape[0] != in_features:
        raise ValueError(f"A: expected shape (in_features={in_features}, rank), got {tuple(A.shape)}")
    if B.shape != (A.shape[1], out_features):
        raise ValueError(f"B: expected shape (rank={A.shape[1]}, out_features={out_features}), got {tuple(B.shape)}")
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype} (as nn.Linear does; use torch.autocast to mix), "
                        f"got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias: expected weight's dtype {weight.dtype}, got {bias.dtype}")
    if A.dtype != B.dtype:
        raise TypeError(f"B: expected A's dtype {A.dtype}, got {B.dtype}")
    if A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"A: expected x's dtype {x.dtype} or float32, got {A.dtype}")
    return check_scale(scale), check_dropout(dropout_p)
