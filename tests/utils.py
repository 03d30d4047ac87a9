"""Tolerances and float64 references shared by the tests.

Error model: every compared value is a sum of products. Its float64 magnitude bound |terms| is the same
multilinear function evaluated on absolute values, so ``magnitudes`` runs the reference (and its backward) on
|inputs|. Against it, the kernels' error is at most a few unit roundoffs of the data dtype (rounding of the
output, of S or dS into the dot dtype, of fp32 adapters into a 16-bit dot) plus fp32 accumulation over the
reduction length n (Higham's gamma_n ~ n * 2**-24). No absolute tolerance is added.
"""

import collections

import torch

from lora_fast import philox, reference

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# roundings of the data dtype on the way: output, the low-rank intermediate, an fp32 adapter cast, a scale product
ROUNDINGS = 4

# worst relative error seen per (dtype, pass): printed at the end of the session (see conftest)
WORST = collections.defaultdict(float)


def tolerance(dtype: torch.dtype, reduction: int) -> float:
    """Relative bound, against the magnitude, for a value reduced over ``reduction`` terms in ``dtype``."""
    return ROUNDINGS * UNIT_ROUNDOFF[dtype] + reduction * UNIT_ROUNDOFF[torch.float32]


def assert_close(actual, expected, magnitude, dtype, reduction, name, record=True):
    """|actual - expected| <= tolerance * magnitude elementwise; expected and magnitude are float64."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected).abs()
    bound = tolerance(dtype, reduction) * magnitude
    if err.numel():
        ratio = (err / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
        rel = (err.max() / expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).item()
        assert ratio <= 1.0, (f"{name} ({dtype}): error {err.max().item():.3e} is {ratio:.2f}x the bound "
                              f"{tolerance(dtype, reduction):.2e} * magnitude")
        key = (str(dtype).replace("torch.", ""), name)
        if record:
            WORST[key] = max(WORST[key], rel)


def linear_magnitude(x, weight, bias=None):
    """float64 |x| @ |weight|^T + |bias|: the magnitude bound of a linear layer's output (weight (out, in))."""
    y = x.detach().double().abs() @ weight.detach().double().abs().t()
    return y + bias.detach().double().abs() if bias is not None else y


def make_inputs(M_shape, K, N, R, dtype, device, *, bias=True, adapter_dtype=None, lora_weight=1.0):
    """Random inputs with the LoRA term comparable in size to the base term (B is not zero here)."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*M_shape, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = (torch.randn(K, R, device=device) / K**0.5).to(adapter_dtype)
    B = (torch.randn(R, N, device=device) * lora_weight / R**0.5).to(adapter_dtype)
    return x, weight, b, A, B


def reference_grads(x, weight, bias, A, B, scale, dy, *, dropout_p=0.0, mask=None, absolute=False):
    """float64 output and gradients (x, weight, bias, A, B) of the reference; with ``absolute`` on |inputs|."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    leaves = [None if t is None else f(t).detach().requires_grad_() for t in (x, weight, bias, A, B)]
    if mask is not None:
        # a mask of the kernels' generator: scale kept elements as the op does, by 1 / (1 - quantize(p))
        dropout_p = philox.quantize(dropout_p)
    y = reference.lora_linear(*leaves, abs(scale) if absolute else scale, dropout_p=dropout_p,
                              training=dropout_p > 0, dropout_mask=mask)
    y.backward(f(dy))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check_op(op, x, weight, bias, A, B, scale, *, dropout_p=0.0, mask=None, dtype=None, grads=True):
    """Run ``op`` (lora_linear-like, already bound to its dropout) forward and backward; compare with float64."""
    dtype = dtype or x.dtype
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, A, B)]
    y = op(*leaves, scale)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    ref, ref_grads = reference_grads(x, weight, bias, A, B, scale, dy, dropout_p=dropout_p, mask=mask)
    mag, mag_grads = reference_grads(x, weight, bias, A, B, scale, dy, dropout_p=dropout_p, mask=mask,
                                     absolute=True)
    assert y.dtype == x.dtype
    K, N, R = weight.shape[1], weight.shape[0], A.shape[1]
    M = max(1, x.numel() // K)
    assert_close(y, ref, mag, dtype, K + R, "forward")
    if not grads:
        return
    y.backward(dy)
    names = ("dx", "dW", "dbias", "dA", "dB")
    reductions = (N + R, M, M, M, M)
    for name, leaf, g, gm, n in zip(names, leaves, ref_grads, mag_grads, reductions):
        if leaf is None:
            continue
        assert leaf.grad is not None, f"{name}: no gradient"
        assert leaf.grad.dtype == leaf.dtype, f"{name}: dtype {leaf.grad.dtype} != {leaf.dtype}"
        assert_close(leaf.grad, g, gm, dtype, n, name)


def spawn_gloo_ranks(worker, args, nprocs, results):
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes (torch.multiprocessing.spawn).

    A rank killed by a signal after every path in ``results`` exists is reported as a warning, not an error:
    gloo's teardown at process exit aborted once on a loaded CI machine (SIGABRT, "terminate called without an
    active exception") after both ranks had finished and written their results, which the caller still checks.
    Workers should write their results atomically (``write_atomically``) and end with ``end_gloo_rank()``. Any
    other failure, or a signal before the results exist, raises.
    """
    import os
    import warnings

    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if not (e.signal_name and all(os.path.exists(p) for p in results)):
            raise
        warnings.warn(f"a gloo rank died in its teardown after the results were written: {e}", stacklevel=2)


def write_atomically(obj, path, write):
    """``write(obj, tmp)`` then rename to ``path``, so a reader never sees half a file."""
    import os

    write(obj, path + ".part")
    os.replace(path + ".part", path)


def end_gloo_rank():
    """Barrier, destroy the process group, and leave the process at once (no interpreter teardown, where gloo's
    threads have aborted): the last call of a ``spawn_gloo_ranks`` worker."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def saved_bits_and_grads(forward, inputs, dy, flip_at=None, seed=5, edit=None):
    """Run ``forward(*leaves)`` (leaves: fresh copies of ``inputs`` requiring grad) after ``torch.manual_seed(seed)``
    and backward with ``dy``, under saved-tensor hooks that keep every uint8 tensor saved (the keep-mask's bits) and,
    with ``flip_at = (m, k)``, flip bit k of row m in it when backward unpacks it. Returns (the saved uint8 tensors,
    the leaves' gradients)."""
    saved = []

    def pack(t):
        if t.dtype == torch.uint8:
            saved.append(t)
        return t

    def unpack(t):
        if (flip_at is not None or edit is not None) and t.dtype == torch.uint8:
            t = t.clone()
            if flip_at is not None:
                m, k = flip_at
                t[m, k // 8] ^= 1 << (k % 8)
            if edit is not None:
                edit(t)
        return t

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = forward(*leaves)
    y.backward(dy)
    return saved, [t.grad for t in leaves]
