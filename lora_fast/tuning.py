"""lora_fast.warmup: every measurement a model's LoRA layers need, made before training (and before a CUDA graph)."""

from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn


def _bucket(M: int) -> int:
    return max(16, 1 << (M - 1).bit_length())   # ops._m_bucket: M rounded up to a power of two, at least 16


def bucket_rows(M: int) -> List[int]:
    """The row counts ``warmup`` runs for the M bucket of ``M`` (largest first): the bucket's top (b, a multiple of
    16) and b - 1, b - 2, b - 4, b - 8 (every power-of-two divisor an M and M x rank can have below 16: Triton
    compiles one kernel per divisibility-by-16 pattern of its integer arguments), both ends and the middle of the
    bucket (the narrow passes' split counts follow M), and 1 in the first bucket (Triton makes an argument equal
    to 1 a constant)."""
    b = _bucket(M)
    low = 1 if b == 16 else b // 2 + 1
    rows = {b, b - 1, b - 2, b - 4, b - 8, low, (low + b) // 2, (3 * low + b) // 4}
    if b == 16:
        rows.add(1)
    return sorted((m for m in rows if low <= m <= b), reverse=True)


def _is_lora_module(module: nn.Module) -> bool:
    from .layers import LinearWithLoRA
    from .peft_interop import _is_patched

    return isinstance(module, LinearWithLoRA) or _is_patched(module)


def _signature(module: nn.Module, K: int, dtype, device, needs_dx: bool) -> tuple:
    """What decides the kernels a layer launches: its type, input width, dtype, device, whether dX is needed, its
    tensors' shapes, dtypes and trainability (rank, bias, 4-bit packing) and its scalar settings (dropout, scale)."""
    tensors = tuple((name, tuple(t.shape), t.dtype, t.requires_grad)
                    for name, t in list(module.named_parameters()) + list(module.named_buffers()))
    scalars = tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str))))
    return type(module), K, dtype, device, needs_dx, tensors, scalars


def _call(example_inputs, model):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def warmup(model: nn.Module, example_inputs: Any, *, tokens: Optional[Iterable[int]] = None,
           backward: bool = True) -> Dict[str, Any]:
    """Run every path choice, tile-config tuning and compilation that ``model``'s LoRA layers need, now.

    After it, training steps whose layers see row counts M (tokens per forward: batch x sequence) in the warmed
    buckets (M rounded up to a power of two, at least 16) time nothing, tune nothing, synchronise nothing: they
    can be captured in a CUDA graph (``torch.cuda.graph``, or ``torch.compile(mode="reduce-overhead")``).

    How: ``model`` is called once on ``example_inputs`` (grad enabled, no backward), recording each LoRA layer
    (``LinearWithLoRA``, ``LinearWithDoRA``, 4-bit bases, PEFT layers under ``patch_peft``), its input width,
    dtype, device, training mode and whether its input requires grad. Each distinct layer is then called on random
    inputs of ``bucket_rows(M)`` rows for every M of ``tokens`` (default: the row counts the example produced),
    forward and, with ``backward``, backward (dX only where the example's input required grad). Each key is
    measured once per machine (kept on disk, kernels/choice.py) and agreed across the ranks of a
    ``torch.distributed`` job, so call it on every rank, on the model before DDP / FSDP wrapping.

    Leaves the model as it was: parameters' ``.grad`` (restored objects), buffers (restored values), the CPU and
    CUDA random generators (``torch.random.fork_rng``) and training modes are unchanged.

    Args:
        model: an ``nn.Module`` containing lora-fast layers.
        example_inputs: one tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
        tokens: the row counts M the run will see (e.g. ``[b * s for s in sequence_lengths]``); None: the
            example's.
        backward: warm the backward kernels too (training); False for inference only.

    Returns: {"layers": distinct layers warmed, "calls": layer calls made, "buckets": sorted M buckets,
        "rows": sorted row counts run, "timed": GEMM-path keys measured, "tuned": tile-config keys tuned}
        (the last two count this process's measurements: 0 when the disk or another rank already had them).

    Raises: TypeError when ``model`` is not an ``nn.Module``; ValueError for a token count below 1 or a model in
        which no lora-fast layer ran.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"warmup: model must be an nn.Module, got {type(model).__name__}")
    wanted = None if tokens is None else sorted({int(m) for m in tokens})
    if wanted is not None and (not wanted or wanted[0] < 1):
        raise ValueError(f"warmup: tokens must be row counts >= 1, got {tokens!r}")
    from .kernels import choice

    seen: Dict[tuple, dict] = {}

    def record(module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return
        needs_dx = x.requires_grad and torch.is_grad_enabled()
        key = _signature(module, x.shape[-1], x.dtype, x.device, needs_dx)
        entry = seen.setdefault(key, dict(module=module, K=x.shape[-1], dtype=x.dtype, device=x.device,
                                          needs_dx=needs_dx, rows=set()))
        entry["rows"].add(x.numel() // max(1, x.shape[-1]))

    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    timed, tuned = choice.GEMM.timed + choice.GEMM_4BIT.timed, choice.TUNING.tuned
    calls = 0
    rows_run = set()
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if _is_lora_module(m)]
    try:
        with torch.random.fork_rng(devices=devices):
            try:
                with torch.enable_grad():
                    _call(example_inputs, model)
            finally:
                for h in hooks:
                    h.remove()
            if not seen:
                raise ValueError("warmup: no lora-fast layer ran on example_inputs (replace_linear_with_lora or "
                                 "patch_peft first)")
            for p in params:
                p.grad = None
            for entry in seen.values():
                module = entry["module"]
                for M in sorted({r for m in (wanted or sorted(entry["rows"])) for r in bucket_rows(m)}, reverse=True):
                    x = torch.randn(M, entry["K"], dtype=entry["dtype"], device=entry["device"],
                                    requires_grad=entry["needs_dx"] and backward)
                    with torch.enable_grad():
                        y = module(x)
                        if backward and y.requires_grad:
                            y.backward(torch.randn_like(y))
                    calls += 1
                    rows_run.add(M)
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return dict(layers=len(seen), calls=calls, buckets=sorted({_bucket(m) for m in rows_run}), rows=sorted(rows_run),
                timed=choice.GEMM.timed + choice.GEMM_4BIT.timed - timed, tuned=choice.TUNING.tuned - tuned)
