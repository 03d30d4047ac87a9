"""Bytes an implementation keeps alive for backward, counted with torch.autograd.graph.saved_tensors_hooks.

Counted: every tensor autograd saves during the forward that is not a parameter (weight, bias, A, B), each
storage once (views of one storage -- x and x^T -- count once). x is counted when saved: saving it keeps it
alive until backward. The bytes of a saved tensor depend on its shape and dtype, not its values, so on a
machine without a GPU the real-model shapes run on the 'meta' device (no memory, no arithmetic); the test
suite and every CPU run check meta against real tensors on a small shape.

lora-fast's kernels cannot run on 'meta': there ``meta_kernels`` runs its real autograd.Function with the
kernel launch replaced by the allocation of the kernel's outputs (y (M, N) in x's dtype, S (M, r) fp32), so
the saved set is the one its forward declares; the run checks it against the Triton interpreter on a small
shape (``check_meta_against_real``).
"""

import contextlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple
from unittest import mock

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import impls


def _storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def saved_bytes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                params: Iterable[Optional[torch.Tensor]]) -> Tuple[int, List[Tuple[tuple, str]], torch.Tensor]:
    """(bytes, [(shape, dtype) of each counted storage], y) for one forward of ``forward(x)``.

    The caller must keep y alive while it uses the result (the graph holds the saved storages).
    """
    excluded = {_storage_key(p) for p in params if p is not None}
    counted: Dict[int, Tuple[int, tuple, str]] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in excluded and key not in counted:
            counted[key] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    total = sum(v[0] for v in counted.values())
    return total, sorted((v[1], v[2]) for v in counted.values()), y


def _meta_lora_forward(x, weight, bias, A, B, scale, dropout_p=0.0, seed=None, out=None, keep_out=None):
    # the outputs of lora_fast.kernels.lora_forward: y (M, N) in x's dtype (into ``out``) and S (M, r) in fp32
    # (the bit-packed keep-mask goes into ``keep_out``, which the caller allocated)
    y = out if out is not None else x.new_empty((x.shape[0], weight.shape[0]))
    return y, torch.empty((x.shape[0], A.shape[1]), dtype=torch.float32, device=x.device)


def _meta_dora_norm(weight, A, B, magnitude, scale):
    # the outputs of lora_fast.kernels.dora.dora_norm: norm and g = m / norm, (N,) fp32 each
    N = weight.shape[0]
    return (torch.empty(N, dtype=torch.float32, device=weight.device),
            torch.empty(N, dtype=torch.float32, device=weight.device))


def _meta_dora_forward(x, weight, bias, A, B, gscale, norm, scale, dropout_p=0.0, seed=None, *, out=None,
                       keep_v=True, base_gemm=None, keep_out=None):
    # the outputs of lora_fast.kernels.dora.dora_forward: y (into ``out``), S (M, r) fp32, V (M, N) in x's dtype
    # (the bit-packed keep-mask goes into ``keep_out``, which the caller allocated)
    y, S = _meta_lora_forward(x, weight, bias, A, B, scale, out=out)
    return y, S, (x.new_empty((x.shape[0], B.shape[1])) if keep_v else None)


@contextlib.contextmanager
def meta_kernels():
    """Within: lora_fast's forward kernel launches (LoRA's and DoRA's) allocate their outputs instead of
    computing (for 'meta')."""
    import lora_fast.kernels
    import lora_fast.kernels.dora

    with mock.patch.object(lora_fast.kernels, "lora_forward", _meta_lora_forward), \
            mock.patch.object(lora_fast.kernels.dora, "dora_norm", _meta_dora_norm), \
            mock.patch.object(lora_fast.kernels.dora, "dora_forward", _meta_dora_forward):
        yield


def lora_fast_meta_forward(weight, bias, A, B, scale, dropout_p) -> Callable[[torch.Tensor], torch.Tensor]:
    """lora-fast's autograd.Function on meta tensors (use inside ``meta_kernels``). It is called directly:
    lora_fast.lora_linear sends meta tensors to the reference backend."""
    from lora_fast.functional import _LoRALinearFunction

    def forward(x):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if dropout_p > 0 else None
        return _LoRALinearFunction.apply(x, weight, bias, A, B, scale, dropout_p, seed)

    return forward


def lora_fast_dora_meta_forward(weight, bias, A, B, m, scale, dropout_p) -> Callable[[torch.Tensor], torch.Tensor]:
    """lora-fast's DoRA autograd.Function on meta tensors (use inside ``meta_kernels``), as
    ``lora_fast_meta_forward``."""
    from lora_fast.dora import _DoRALinearFunction

    def forward(x):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if dropout_p > 0 else None
        return _DoRALinearFunction.apply(x, weight, bias, A, B, m, scale, dropout_p, seed)

    return forward


def measure(impl: str, M: int, K: int, N: int, rank: int, dtype: torch.dtype, dropout_p: float, bias: bool,
            device="meta") -> Tuple[int, List[Tuple[tuple, str]]]:
    """Saved bytes of ``impl`` at this shape on ``device`` ('meta' for any shape; real devices run the op).

    On 'meta', lora-fast runs through ``meta_kernels``; on CPU it needs TRITON_INTERPRET=1 (set by bench).
    Raises ValueError for "compile" on 'meta' (torch.compile cannot trace meta inputs to the same kernels).
    """
    x, weight, b, A, B = impls.make_tensors(M, K, N, rank, dtype, device, bias=bias)
    scale = 2.0
    if impl == "compile" and torch.device(device).type == "meta":
        raise ValueError("compile: saved bytes need a real device")
    if impl == "lora-fast" and torch.device(device).type == "meta":
        with meta_kernels():
            total, tensors, _y = saved_bytes(lora_fast_meta_forward(weight, b, A, B, scale, dropout_p), x,
                                             (weight, b, A, B))
        return total, tensors
    if impl == "lora-fast-dora" and torch.device(device).type == "meta":
        m = torch.empty(weight.shape[0], dtype=A.dtype, device=device).requires_grad_()
        with meta_kernels():
            total, tensors, _y = saved_bytes(lora_fast_dora_meta_forward(weight, b, A, B, m, scale, dropout_p), x,
                                             (weight, b, A, B, m))
        return total, tensors
    forward = impls.build(impl, weight, b, A, B, scale, dropout_p)
    # the parameters (a DoRA row's magnitude too) are excluded
    total, tensors, _y = saved_bytes(forward, x, (weight, b, A, B, *forward.params))
    return total, tensors


def check_meta_against_real(names, device="cpu", shape=(64, 96, 80, 8)) -> List[str]:
    """Per implementation and dropout (0, 0.1), the saved set on 'meta' and on ``device`` at a small shape;
    returns a list of disagreements (empty when meta is exact)."""
    M, K, N, r = shape
    problems = []
    for name in names:
        for p in (0.0, 0.1):
            for bias in (False, True):
                meta = measure(name, M, K, N, r, torch.bfloat16, p, bias, device="meta")
                real = measure(name, M, K, N, r, torch.bfloat16, p, bias, device=device)
                if meta != real:
                    problems.append(f"{name} p={p} bias={bias}: meta {meta} != {device} {real}")
    return problems
