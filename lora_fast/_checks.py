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


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _real(value, name: str) -> float:
    """A Python float from a real number or a one-element tensor that needs no gradient."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.requires_grad:
            raise ValueError(f"{name}: a tensor that requires grad is not supported (it is used as a constant)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_scale(scale, name: str = "scale") -> float:
    """``scale`` as a finite Python float within float32's range (the kernels multiply in fp32); a one-element
    tensor is accepted. Errors name ``name``: TypeError for a non-real, ValueError for a non-finite value."""
    scale = _real(scale, name)
    if not math.isfinite(scale) or abs(scale) > _FLOAT32_MAX:
        raise ValueError(f"{name}: expected a finite number within float32's range, got {scale}")
    return scale


def check_dropout(p, name: str = "dropout_p") -> float:
    """A dropout probability in [0, 1], as nn.Dropout takes it (1: everything dropped): TypeError for a
    non-real, ValueError outside the range."""
    p = _real(p, name)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p!r}")
    return p


def check_training(training) -> bool:
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    return training


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
    return int(rank)


def _check_bias_devices_dtypes(x, weight, bias, A, B, out_features: int) -> None:
    """The checks lora_linear and lora_linear_multi share: bias (out_features,), every tensor on x's device,
    weight in x's dtype, bias in weight's, A and B alike in x's dtype or float32."""
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    device = x.device
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on x's device {device}, got {t.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype} (as nn.Linear does; use torch.autocast to mix), "
                        f"got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias: expected weight's dtype {weight.dtype}, got {bias.dtype}")
    if A.dtype != B.dtype:
        raise TypeError(f"B: expected A's dtype {A.dtype}, got {B.dtype}")
    if A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"A: expected x's dtype {x.dtype}" + (" or float32" if x.dtype != torch.float32 else "")
                        + f", got {A.dtype}")


def check_lora_linear(x, weight, bias, A, B, scale, dropout_p):
    """Validate the arguments of lora_linear; returns (scale, dropout_p) as floats. Raises TypeError/ValueError."""
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    _tensor("weight", weight, 2)
    _tensor("A", A, 2)
    _tensor("B", B, 2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dim in_features={in_features} (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if A.shape[1] < 1:
        raise ValueError(f"A: expected shape (in_features, rank) with rank >= 1, got {tuple(A.shape)}")
    if A.shape[0] != in_features:
        raise ValueError(f"A: expected shape (in_features={in_features}, rank), got {tuple(A.shape)}")
    if B.shape[0] != A.shape[1] or B.shape[1] != out_features:   # ints: no torch.Size comparison (host time)
        raise ValueError(f"B: expected shape (rank={A.shape[1]}, out_features={out_features}), got {tuple(B.shape)}")
    _check_bias_devices_dtypes(x, weight, bias, A, B, out_features)
    return check_scale(scale), check_dropout(dropout_p)


def check_lora_delta(x, A, B, scale, dropout_p):
    """Validate the arguments of lora_delta (the low-rank term alone); returns (scale, dropout_p) as floats."""
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    _tensor("A", A, 2)
    _tensor("B", B, 2)
    if A.shape[1] < 1:
        raise ValueError(f"A: expected shape (in_features, rank) with rank >= 1, got {tuple(A.shape)}")
    if A.shape[0] != x.shape[-1]:
        raise ValueError(f"A: expected shape (in_features={x.shape[-1]}, rank), got {tuple(A.shape)}")
    if B.shape[0] != A.shape[1]:
        raise ValueError(f"B: expected shape (rank={A.shape[1]}, out_features), got {tuple(B.shape)}")
    for name, t in (("A", A), ("B", B)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    if A.dtype != B.dtype:
        raise TypeError(f"B: expected A's dtype {A.dtype}, got {B.dtype}")
    return check_scale(scale), check_dropout(dropout_p)


def check_dora_linear(x, weight, bias, A, B, magnitude, scale, dropout_p):
    """Validate the arguments of dora_linear (lora_linear's, plus the magnitude (out_features,) in A's dtype or
    float32 on x's device); returns (scale, dropout_p) as floats. Raises TypeError/ValueError."""
    scale, dropout_p = check_lora_linear(x, weight, bias, A, B, scale, dropout_p)
    _tensor("magnitude", magnitude, 1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude: expected shape (out_features={weight.shape[0]},), got {tuple(magnitude.shape)}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude: expected a tensor on x's device {x.device}, got {magnitude.device}")
    if magnitude.dtype not in (A.dtype, torch.float32):
        raise TypeError(f"magnitude: expected A's dtype {A.dtype} or float32, got {magnitude.dtype}")
    return scale, dropout_p


def _per_adapter(value, n: int, name: str, check) -> list:
    """A real number (one for every adapter), or a sequence / 1-D tensor of ``n`` of them, checked one by one
    by ``check(value, name)``; a list of ``n`` floats."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [check(value, name)] * n
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name}: expected a number or one per adapter (shape ({n},)), got shape "
                             f"{tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name}: a tensor that requires grad is not supported (it is used as a constant)")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected real numbers, got dtype {value.dtype}")
        value = value.detach().cpu().tolist()
    elif isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value per adapter ({n}), got {len(value)}")
    else:
        return [check(value, name)] * n
    return [check(v, f"{name}[{i}]") for i, v in enumerate(value)]


def check_index_range(adapter_index: torch.Tensor, n: int) -> None:
    """Raise ValueError unless every value of the int64 ``adapter_index`` lies in [-1, n): its minimum and
    maximum read to the host (one device sync; none for an empty index)."""
    if adapter_index.numel():
        low, high = (int(v) for v in torch.aminmax(adapter_index.detach()))
        if low < -1 or high >= n:
            raise ValueError(f"adapter_index: expected values in [-1, {n}) (-1: no adapter), got values in "
                             f"[{low}, {high}]")


def _check_adapter_sequences(x, A, B, in_features: int, out_features: int) -> int:
    """Unstacked adapters of lora_linear_multi: A and B sequences (list or tuple) of n >= 1 tensors, A[a]
    (in_features, r_a) and B[a] (r_a, out_features) with r_a >= 1, every factor of A[0]'s dtype and on x's device
    (A[0]'s dtype itself is checked with the stacked rules). Returns n; errors name the factor by position."""
    for name, seq in (("A", A), ("B", B)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}: expected a sequence (list or tuple) of per-adapter tensors like "
                            f"{'B' if name == 'A' else 'A'}, or both stacked tensors; got {type(seq).__name__}")
    n = len(A)
    if n < 1:
        raise ValueError("A: expected at least one adapter, got an empty sequence")
    if len(B) != n:
        raise ValueError(f"B: expected one factor per adapter of A ({n}), got {len(B)}")
    for a in range(n):
        _tensor(f"A[{a}]", A[a], 2)
        _tensor(f"B[{a}]", B[a], 2)
    dtype = A[0].dtype
    for a in range(n):
        Aa, Ba = A[a], B[a]
        rank = Aa.shape[1]
        if Aa.shape[0] != in_features or rank < 1:
            raise ValueError(f"A[{a}]: expected shape (in_features={in_features}, rank >= 1), got {tuple(Aa.shape)}")
        if tuple(Ba.shape) != (rank, out_features):
            raise ValueError(f"B[{a}]: expected shape (rank={rank} as A[{a}], out_features={out_features}), got "
                             f"{tuple(Ba.shape)}")
        for name, t in ((f"A[{a}]", Aa), (f"B[{a}]", Ba)):
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected the adapters' one dtype {dtype} (A[0]'s), got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    return n


def check_lora_linear_multi(x, weight, bias, A, B, scale, adapter_index, dropout_p, *, check_range: bool = True):
    """Validate the arguments of lora_linear_multi: x (..., in), weight (out, in), bias (out,) or None, A (n, in,
    r), B (n, r, out) (or sequences of n factors A[a] (in, r_a), B[a] (r_a, out): ``_check_adapter_sequences``),
    scale and dropout_p one number or one per adapter, adapter_index int64 of x.shape[:-1]
    with values in [-1, n) (read on the host: one device sync; skipped when ``check_range`` is False, for an
    index whose range was checked already, ``multi.AdapterRows``). Returns (scales, dropout_ps) as lists of n
    floats. Raises TypeError/ValueError naming the argument."""
    _tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    _tensor("weight", weight, 2)
    out_features, in_features = weight.shape
    if isinstance(A, (list, tuple)) or isinstance(B, (list, tuple)):
        if x.shape[-1] != in_features:
            raise ValueError(f"x: expected last dim in_features={in_features} (weight is "
                             f"{tuple(weight.shape)}), got shape {tuple(x.shape)}")
        n = _check_adapter_sequences(x, A, B, in_features, out_features)
        A, B = A[0], B[0]   # the rest as for one adapter: each factor's dtype and device are A[0]'s
    else:
        _tensor("A", A, 3)
        _tensor("B", B, 3)
        if x.shape[-1] != in_features:
            raise ValueError(f"x: expected last dim in_features={in_features} (weight is "
                             f"{tuple(weight.shape)}), got shape {tuple(x.shape)}")
    if A.dim() == 3:
        n, a_in, rank = A.shape
        if n < 1 or rank < 1 or a_in != in_features:
            raise ValueError(f"A: expected shape (adapters >= 1, in_features={in_features}, rank >= 1), got "
                             f"{tuple(A.shape)}")
        if tuple(B.shape) != (n, rank, out_features):
            raise ValueError(f"B: expected shape (adapters={n}, rank={rank}, out_features={out_features}), got "
                             f"{tuple(B.shape)}")
    _check_bias_devices_dtypes(x, weight, bias, A, B, out_features)
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index: expected dtype torch.int64, got {adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_index: expected x's leading shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(adapter_index.shape)}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected a tensor on x's device {x.device}, got {adapter_index.device}")
    if check_range:
        check_index_range(adapter_index, n)
    return _per_adapter(scale, n, "scale", check_scale), _per_adapter(dropout_p, n, "dropout_p", check_dropout)
