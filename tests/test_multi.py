"""lora_linear_multi (issue 30): several adapters in one batch, on the reference backend (the default) and on the
opt-in kernels (LORA_FAST_MULTI=triton; the interpreter on CPU), against float64."""

import pytest
import torch

from lora_fast import lora_linear, lora_linear_multi, philox, reference
from lora_fast.multi import multi_backend
from tests.utils import assert_close, tolerance

BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, device):
    monkeypatch.setenv("LORA_FAST_MULTI", request.param)
    assert multi_backend(torch.empty(1, device=device)) == request.param
    return request.param


def multi_inputs(lead, K, N, ranks, dtype, device, *, adapter_dtype=None, bias=True):
    """x, weight, bias and adapters of the given ranks padded with zeros to the largest (as a layer pads them):
    A (n, K, R), B (n, R, N), the LoRA term comparable in size to the base term."""
    n, R = len(ranks), max(ranks)
    x = torch.randn(*lead, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    A = torch.zeros(n, K, R, device=device)
    B = torch.zeros(n, R, N, device=device)
    for a, r in enumerate(ranks):
        A[a, :, :r] = torch.randn(K, r, device=device) / K**0.5
        B[a, :r] = torch.randn(r, N, device=device) / r**0.5
    adapter_dtype = adapter_dtype or dtype
    return x, weight, b, A.to(adapter_dtype), B.to(adapter_dtype)


def adapter_index(lead, n, device, *, base=True, empty=()):
    """Random adapter per row in [-1, n) (without -1 unless ``base``), never one of ``empty``."""
    choices = torch.tensor([a for a in range(-1 if base else 0, n) if a not in empty], device=device)
    return choices[torch.randint(0, len(choices), lead, device=device)]


def _run(op_inputs, scales, idx, dropout_p, seed, dy=None, *, f=lambda t: t, scale_f=lambda s: s, op=None):
    """(y, grads of x, weight, bias, A, B) of ``op`` (default: the reference) after torch.manual_seed(seed)."""
    leaves = [None if t is None else f(t).detach().clone().requires_grad_() for t in op_inputs]
    torch.manual_seed(seed)
    y = (op or reference.lora_linear_multi)(*leaves, [scale_f(s) for s in scales], idx, dropout_p=dropout_p)
    if dy is None:
        dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    y.backward(f(dy))
    return y.detach(), [None if t is None else t.grad for t in leaves], dy


def check_multi(inputs, scales, idx, *, dropout_p=0.0, dtype=None):
    """The op (forward and backward) against the float64 reference under the same dropout seed; the bound of
    tests/utils.py (a few roundings of the data dtype plus fp32 accumulation over the reduction length) scaled by
    the reference on |inputs|, which draws the same mask."""
    x, weight = inputs[0], inputs[1]
    dtype = dtype or x.dtype
    y, grads, dy = _run(inputs, scales, idx, dropout_p, 1234, op=lora_linear_multi)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    ref, ref_grads, _ = _run(inputs, scales, idx, dropout_p, 1234, dy, f=lambda t: t.double())
    mag, mag_grads, _ = _run(inputs, scales, idx, dropout_p, 1234, dy, f=lambda t: t.double().abs(), scale_f=abs)
    K, N, R = weight.shape[1], weight.shape[0], inputs[3].shape[2]
    M = max(1, x.numel() // K)
    assert_close(y, ref, mag, dtype, K + R, "multi forward")
    for name, leaf, g, gr, gm, n in zip(("dx", "dW", "dbias", "dA", "dB"), inputs, grads, ref_grads, mag_grads,
                                        (N + R, M, M, M, M)):
        if leaf is None:
            continue
        assert g is not None and g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert_close(g, gr, gm, dtype, n, f"multi {name}")


# (leading dims, in_features, out_features, ranks, dtype, adapter dtype, bias, adapters without rows)
CASES = [
    ((37,), 45, 29, (1, 3, 8), torch.float32, None, True, ()),               # mixed ranks, padded
    ((2, 19), 40, 24, (1, 2, 3, 4, 5, 6, 7, 8), torch.float16, None, True, (5,)),   # n = 8, one adapter empty
    ((33,), 48, 20, (4, 2, 4), torch.bfloat16, torch.float32, False, ()),    # fp32 adapters on bf16
    ((21,), 36, 40, (8, 8), torch.float16, torch.float32, True, (0,)),       # fp32 adapters on fp16
    ((30,), 40, 24, (6,), torch.float32, None, True, ()),                    # n = 1 with rows of adapter -1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[3])}-{str(c[4])[6:]}")
def test_matches_float64(case, backend, device):
    lead, K, N, ranks, dtype, adapter_dtype, bias, empty = case
    inputs = multi_inputs(lead, K, N, ranks, dtype, device, adapter_dtype=adapter_dtype, bias=bias)
    idx = adapter_index(lead, len(ranks), device, empty=empty)
    scales = [0.5 + a for a in range(len(ranks))]
    scales[-1] = -scales[-1]
    check_multi(inputs, scales, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_per_adapter(dtype, backend, device):
    """One drop probability per adapter (one of them 1: no LoRA term, zero gradients), the kernels' Philox mask
    on both backends, compared with the float64 reference under the same seed; a scale given as a tensor."""
    inputs = multi_inputs((41,), 40, 24, (4, 8, 2, 3), dtype, device)
    idx = adapter_index((41,), 4, device)
    ps = [0.3, 0.0, 0.5, 1.0]
    check_multi(inputs, [2.0, 1.0, -0.5, 3.0], idx, dropout_p=ps)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = lora_linear_multi(*leaves, torch.tensor([2.0, 1.0, -0.5, 3.0]), idx, dropout_p=ps)
    y.sum().backward()
    assert not leaves[3].grad[3].any() and not leaves[4].grad[3].any()


def test_mask_of_each_row_is_lora_linears(device):
    """Row m's keep-mask is the one lora_linear draws for that row under the same seed with its adapter's p."""
    x = torch.randn(50, 37, device=device)
    idx = adapter_index((50,), 3, device)
    seed = reference.draw_seed(device)
    ps = [0.25, 0.5, 0.1]
    keep = reference.multi_keep_mask(seed, x, idx, ps)
    for a, p in enumerate(ps):
        rows = idx == a
        assert torch.equal(keep[rows], philox.keep_mask(seed, 50, 37, p)[rows])
    assert keep[idx < 0].all()


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_adapter_is_lora_linear_bit_for_bit(dtype, dropout_p, backend, monkeypatch, device):
    """A batch of one adapter gives exactly what lora_linear gives (forward and every gradient), lora_linear on
    the same backend (the reference path, or the kernels)."""
    if backend == "reference":
        monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    x, weight, b, A, B = multi_inputs((3, 13), 40, 24, (8,), dtype, device)
    idx = torch.zeros((3, 13), dtype=torch.int64, device=device)

    def single(x_, w_, b_, A_, B_, scales, idx_, dropout_p):
        return lora_linear(x_, w_, b_, A_[0], B_[0], scales[0], dropout_p=dropout_p)

    y1, g1, dy = _run((x, weight, b, A, B), [1.5], idx, dropout_p, 77, op=lora_linear_multi)
    y2, g2, _ = _run((x, weight, b, A, B), [1.5], idx, dropout_p, 77, dy, op=single)
    assert torch.equal(y1, y2)
    for name, t1, t2 in zip(("dx", "dW", "dbias", "dA", "dB"), g1, g2):
        assert torch.equal(t1, t2), name


def test_rows_of_the_base_alone(backend, device):
    """Every row on adapter -1: the base layer's output, and zero adapter gradients."""
    inputs = multi_inputs((29,), 40, 24, (4, 4, 4), torch.float32, device)
    x, weight, b, A, B = [t.detach().clone().requires_grad_() for t in inputs]
    idx = torch.full((29,), -1, dtype=torch.int64, device=device)
    y = lora_linear_multi(x, weight, b, A, B, 2.0, idx, dropout_p=0.5)
    y.square().sum().backward()
    truth = x.double() @ weight.double().t() + b.double()
    mag = x.double().abs() @ weight.double().abs().t() + b.double().abs()
    assert_close(y.detach(), truth, mag, torch.float32, 40, "base rows", record=False)
    assert not A.grad.any() and not B.grad.any()


def test_eval_and_empty_batch(backend, device):
    inputs = multi_inputs((17,), 32, 24, (4, 2), torch.float32, device)
    idx = adapter_index((17,), 2, device)
    y_eval = lora_linear_multi(*inputs, [1.0, 2.0], idx, dropout_p=0.5, training=False)
    y_plain = lora_linear_multi(*inputs, [1.0, 2.0], idx)
    assert torch.equal(y_eval, y_plain)
    x, weight, b, A, B = [t.detach().clone().requires_grad_() for t in
                          multi_inputs((0,), 32, 24, (4, 2), torch.float32, device)]
    y = lora_linear_multi(x, weight, b, A, B, 1.0, torch.zeros(0, dtype=torch.int64, device=device))
    assert y.shape == (0, 24)
    y.sum().backward()
    for t in (x, weight, b, A, B):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_tolerance_catches_a_wrong_adapter(monkeypatch, device):
    """The bound fails an op that gives one row another adapter."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    inputs = multi_inputs((37,), 40, 24, (4, 4, 4), torch.float32, device)
    idx = adapter_index((37,), 3, device, base=False)
    wrong = idx.clone()
    wrong[5] = (wrong[5] + 1) % 3

    def op(*args, **kwargs):
        return lora_linear_multi(*args[:6], wrong, **kwargs)

    y = op(*inputs, [1.0, 2.0, 3.0], idx)
    ref = reference.lora_linear_multi(*[t.double() for t in inputs], [1.0, 2.0, 3.0], idx)
    mag = reference.lora_linear_multi(*[t.double().abs() for t in inputs], [1.0, 2.0, 3.0], idx)
    with pytest.raises(AssertionError, match="forward"):
        assert_close(y, ref, mag, torch.float32, 44, "forward", record=False)


class _CountLaunches:
    """A kernel whose launches (kernel[grid](...)) are counted."""

    def __init__(self, kernel, counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(self.kernel)
        return self.kernel[grid]


def test_launches_and_saved_bytes_do_not_grow_with_n(monkeypatch, device):
    """Kernels: 2 launches forward, 3 backward whatever n; saved for backward beyond the inputs: S (M, R) fp32,
    the index, the (5, n) fp32 table of per-adapter constants; gradients deterministic."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    from lora_fast.kernels import multi

    launches = []
    for name in ("multi_proj_kernel", "multi_gemm_kernel", "multi_reduce_kernel"):
        monkeypatch.setattr(multi, name, _CountLaunches(getattr(multi, name), launches))
    M, K, N, R = 40, 32, 24, 8
    for n in (2, 8):
        inputs = multi_inputs((M,), K, N, [R] * n, torch.float32, device)
        idx = adapter_index((M,), n, device)
        results = []
        for _ in range(2):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            given = {t.data_ptr() for t in leaves}
            saved = []

            def pack(t, given=given, saved=saved):
                if t.data_ptr() not in given:
                    saved.append(t.numel() * t.element_size())
                return t

            launches.clear()
            torch.manual_seed(0)   # the same dropout seed in both runs
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = lora_linear_multi(*leaves, [0.5] * n, idx, dropout_p=0.25)
            assert len(launches) == 2
            y.square().sum().backward()
            assert len(launches) == 5, n
            assert sum(saved) == M * R * 4 + idx.numel() * 8 + 5 * n * 4 + 8   # S, index, table, seed
            results.append([t.grad for t in leaves])
        for g1, g2 in zip(*results):
            assert torch.equal(g1, g2)


def test_argument_errors(device):
    x, weight, b, A, B = multi_inputs((6,), 8, 5, (2, 2), torch.float32, device)
    idx = torch.zeros(6, dtype=torch.int64, device=device)
    cases = [
        (dict(A=A[0]), ValueError, "A: expected a 3-D tensor"),
        (dict(B=B[:, :1]), ValueError, r"B: expected shape \(adapters=2, rank=2, out_features=5\)"),
        (dict(adapter_index=idx.int()), TypeError, "adapter_index: expected dtype torch.int64"),
        (dict(adapter_index=idx[:5]), ValueError, r"adapter_index: expected x's leading shape \(6,\)"),
        (dict(adapter_index=idx + 2), ValueError, r"adapter_index: expected values in \[-1, 2\)"),
        (dict(adapter_index=idx - 2), ValueError, r"adapter_index: expected values in \[-1, 2\)"),
        (dict(scale=[1.0]), ValueError, r"scale: expected one value per adapter \(2\)"),
        (dict(scale=[1.0, float("nan")]), ValueError, r"scale\[1\]: expected a finite number"),
        (dict(scale=torch.ones(3)), ValueError, r"scale: expected a number or one per adapter"),
        (dict(dropout_p=[0.1, 1.5]), ValueError, r"dropout_p\[1\]: expected a probability in \[0, 1\]"),
        (dict(A=A.double(), B=B.double()), TypeError, "A: expected x's dtype"),
        (dict(weight=weight[:, :7]), ValueError, "x: expected last dim in_features=7"),
    ]
    for change, error, match in cases:
        args = dict(x=x, weight=weight, bias=b, A=A, B=B, scale=1.0, adapter_index=idx)
        args.update(change)
        dropout_p = args.pop("dropout_p", 0.0)
        with pytest.raises(error, match=match):
            lora_linear_multi(**args, dropout_p=dropout_p)
        with pytest.raises(error, match=match):
            reference.lora_linear_multi(**args, dropout_p=dropout_p)


def test_unknown_or_unservable_multi_backend(monkeypatch):
    monkeypatch.setenv("LORA_FAST_MULTI", "cuda")
    with pytest.raises(ValueError, match="LORA_FAST_MULTI"):
        multi_backend(torch.empty(1))
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    with pytest.raises(RuntimeError, match="LORA_FAST_MULTI=triton"):
        multi_backend(torch.empty(1, dtype=torch.float64))


def test_reference_is_the_per_adapter_loop():
    """The float64 reference against the formula written out row by row (PEFT's adapter_names loop)."""
    x, weight, b, A, B = multi_inputs((12,), 10, 7, (3, 2), torch.float64, "cpu")
    idx = adapter_index((12,), 2, "cpu")
    y = reference.lora_linear_multi(x, weight, b, A, B, [2.0, -1.0], idx)
    for m in range(12):
        a = int(idx[m])
        expected = x[m] @ weight.t() + b + ((2.0, -1.0)[a] * (x[m] @ A[a] @ B[a]) if a >= 0 else 0)
        mag = x[m].abs() @ weight.abs().t() + b.abs() + (2.0 * (x[m].abs() @ A[a].abs() @ B[a].abs())
                                                         if a >= 0 else 0)
        assert ((y[m] - expected).abs() <= tolerance(torch.float64, 20) * mag).all()
