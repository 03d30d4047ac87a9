"""lora_linear_multi (issue 30): several adapters in one batch, on the reference backend (the default) and on the
opt-in kernels (LORA_FAST_MULTI=triton; the interpreter on CPU), against float64."""

import collections

import pytest
import torch

from lora_fast import lora_linear, lora_linear_multi, philox, reference
from lora_fast.multi import multi_backend, multi_order
from tests.utils import assert_close, saved_bits_and_grads, tolerance

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


def test_strided_operands(backend, device):
    """Non-contiguous x, a transposed weight view, a strided index: read through their strides."""
    x_full, _, b, A, B = multi_inputs((30,), 2 * 36, 20, (4, 8, 2), torch.float32, device)
    x = x_full[:, ::2]
    weight = (torch.randn(36, 20, device=device) / 6).t()
    A = A[:, ::2]
    idx = adapter_index((60,), 3, device)[::2]
    assert not x.is_contiguous() and not weight.is_contiguous() and not idx.is_contiguous()
    check_multi((x, weight, b, A, B), [1.0, -2.0, 0.5], idx)


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


# the kernels' two row orders (LORA_FAST_MULTI_ORDER): the tests above run the default ("sorted": rows visited in
# adapter order through a permutation); these run the other one on the cases with n >= 2 (n = 1 runs lora_linear's
# kernels in either order), and per-adapter dropout with an adapter whose every element drops; rows of -1 in each
OTHER_ORDER = "unsorted"
ORDER_CASES = [c for c in CASES if len(c[3]) >= 2]


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: f"n{len(c[3])}-{str(c[4])[6:]}")
def test_other_row_order_matches_float64(case, monkeypatch, device):
    """Each row its own adapter's products, each adapter's gradients from its rows only, against float64 in
    the order the tests above do not run (the bound of check_multi; the two orders sum dA and dB in other fp32
    blocks, which the accumulation term of the bound covers)."""
    assert OTHER_ORDER != multi_order()
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", OTHER_ORDER)
    lead, K, N, ranks, dtype, adapter_dtype, bias, empty = case
    inputs = multi_inputs(lead, K, N, ranks, dtype, device, adapter_dtype=adapter_dtype, bias=bias)
    idx = adapter_index(lead, len(ranks), device, empty=empty)
    scales = [0.5 + a for a in range(len(ranks))]
    scales[-1] = -scales[-1]
    check_multi(inputs, scales, idx)


@pytest.mark.parametrize("order", ["unsorted", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_orders_with_dropout_per_adapter(dtype, order, monkeypatch, device):
    """Either order keeps each row's own keep-mask (Philox on the row's original position, read through the
    permutation when sorted): against float64 under the same seed, fp32 adapters on a 16-bit base; an adapter
    with p = 1 gets zero gradients."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
    inputs = multi_inputs((45,), 40, 24, (4, 8, 2, 3), dtype, device, adapter_dtype=torch.float32)
    idx = adapter_index((45,), 4, device)
    ps = [0.3, 0.0, 0.5, 1.0]
    check_multi(inputs, [2.0, 1.0, -0.5, 3.0], idx, dropout_p=ps)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = lora_linear_multi(*leaves, [2.0, 1.0, -0.5, 3.0], idx, dropout_p=ps)
    y.sum().backward()
    assert not leaves[3].grad[3].any() and not leaves[4].grad[3].any()


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_sorted_is_unsorted_bit_for_bit_where_tiles_agree(dropout_p, monkeypatch, device):
    """A batch already grouped by adapter (rows of -1 first, as the stable sort puts them), each group a whole
    number of the kernels' row blocks, one adapter empty: the permutation is the identity and every tile holds
    the same rows in both variants, so y and all five gradients are bit for bit the unsorted variant's. (On a
    mixed batch the per-row results y, dx are the same products in the same order, but the interpreter's dot
    is the CPU's BLAS, whose rounding may depend on a row's position in the tile: not asserted there.)"""
    from lora_fast.kernels import multi

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    dtype = torch.float16 if device == "cuda" else torch.float32
    blk = max(multi._proj_config(dtype)["BLOCK_M"], multi._gemm_config(dtype)["BLOCK_M"],
              multi._reduce_config(dtype)["BLOCK_M"])
    sizes = {-1: blk, 0: 2 * blk, 1: 0, 2: blk}   # adapter 1 empty
    idx = torch.cat([torch.full((m,), a, dtype=torch.int64) for a, m in sizes.items()]).to(device)
    inputs = multi_inputs(idx.shape, 40, 24, (4, 8, 2), dtype, device)
    results = {}
    for order in ("unsorted", "sorted"):
        monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
        results[order] = _run(inputs, [1.5, -0.5, 2.0], idx, [dropout_p] * 3, 99, op=lora_linear_multi,
                              dy=results["unsorted"][2] if results else None)
    (y1, g1, _), (y2, g2, _) = results["unsorted"], results["sorted"]
    assert torch.equal(y1, y2)
    for name, t1, t2 in zip(("dx", "dW", "dbias", "dA", "dB"), g1, g2):
        assert torch.equal(t1, t2), name


def test_sort_rows_segments():
    """sort_rows: a stable sort (rows of one adapter in their order), the segment starts of each adapter."""
    from lora_fast.kernels import multi

    idx = torch.tensor([2, -1, 0, 2, 0, -1, 2, 3])
    sorted_idx, perm, seg = multi.sort_rows(idx, 5)
    assert perm.tolist() == [1, 5, 2, 4, 0, 3, 6, 7]
    assert sorted_idx.tolist() == [-1, -1, 0, 0, 2, 2, 2, 3]
    assert seg.tolist() == [2, 4, 4, 7, 8, 8]   # adapter a at sorted positions seg[a] .. seg[a + 1]
    for M, n in ((0, 2), (1, 3), (37, 4), (60, 1)):
        idx = torch.randint(-1, n, (M,))
        idx[: M // 3] = -1 if n > 1 else idx[: M // 3]
        sorted_idx, perm, seg = multi.sort_rows(idx, n)
        assert torch.equal(sorted_idx, idx[perm]) and seg.dtype == torch.int64
        assert torch.equal(seg, torch.cumsum(torch.bincount(idx + 1, minlength=n + 1), 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on CUDA only")
def test_sort_rows_does_not_sync():
    """sort_rows runs without a host sync (the op's one sync is the index range check)."""
    from lora_fast.kernels import multi

    idx = torch.randint(-1, 3, (100,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi.sort_rows(idx, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_unknown_multi_order(backend, monkeypatch, device):
    """A wrong LORA_FAST_MULTI_ORDER raises on either backend (never ignored)."""
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "gathered")
    inputs = multi_inputs((4,), 8, 5, (2, 2), torch.float32, device)
    with pytest.raises(ValueError, match="LORA_FAST_MULTI_ORDER"):
        lora_linear_multi(*inputs, 1.0, torch.zeros(4, dtype=torch.int64, device=device))


@pytest.mark.parametrize("n", [1, 3])
def test_second_order(n, monkeypatch, device):
    """A differentiable backward (create_graph=True) on the kernels' path is the reference maths on the saved
    inputs: the same second-order gradients as the reference backend, bit for bit."""
    inputs = multi_inputs((2, 9), 24, 16, [4] * n, torch.float32, device)
    idx = adapter_index((2, 9), n, device)
    # a loss linear in y: the first-order gradients then depend on the inputs only, not on y's rounding
    c = torch.randn(2, 9, 16, device=device)
    results = []
    for backend in BACKENDS:
        monkeypatch.setenv("LORA_FAST_MULTI", backend)
        x, w, b, A, B = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(3)
        y = lora_linear_multi(x, w, b, A, B, [1.5] * n, idx, dropout_p=0.25)
        gx, gA = torch.autograd.grad((y * c).sum(), (x, A), create_graph=True)
        (gx.square().sum() + gA.square().sum()).backward()
        results.append([t.grad for t in (x, A, B)])
    for name, t1, t2 in zip(("x", "A", "B"), *results):
        assert torch.equal(t1, t2), name


@pytest.mark.parametrize("order", ["unsorted", "sorted"])
def test_torch_compile_runs_the_reference(order, monkeypatch, device):
    """Under torch.compile the op runs the reference path on either backend (as dora and the 4-bit ops do): with
    LORA_FAST_MULTI=triton the compiled forward and backward are the reference backend's, bit for bit (the
    kernels' autograd.Function was traced into and failed under the interpreter)."""
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
    inputs = multi_inputs((2, 9), 24, 16, (4, 2), torch.float32, device)
    idx = adapter_index((2, 9), 2, device)
    results = []
    for backend, compiled in (("reference", False), ("triton", True)):
        monkeypatch.setenv("LORA_FAST_MULTI", backend)
        torch._dynamo.reset()
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        f = lambda *a: lora_linear_multi(*a, [1.5, 0.5], idx)  # noqa: E731
        y = (torch.compile(f, backend="eager") if compiled else f)(*leaves)
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, t1, t2 in zip(("y", "x", "W", "bias", "A", "B"), *results):
        assert torch.equal(t1, t2), name


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


@pytest.mark.parametrize("order", ["unsorted", "sorted"])
def test_launches_and_saved_bytes_do_not_grow_with_n(order, monkeypatch, device):
    """Kernels: 2 launches forward, 3 backward whatever n; saved for backward beyond the inputs: S (M, R) fp32,
    the index, the (5, n) fp32 table of per-adapter constants, the keep-mask's bits (sorted: also the sorted index,
    the permutation and the (n + 1,) segment starts, int64); gradients deterministic."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
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
            rows = 2 * M * 8 + (n + 1) * 8 if order == "sorted" else 0
            # S, index, table, the keep-mask's bits (M x 16 bytes: K = 32 bits a row, rows padded to 16 bytes)
            assert sum(saved) == M * R * 4 + idx.numel() * 8 + 5 * n * 4 + M * philox.mask_row_bytes(K) + rows
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


# --- LinearWithLoRA with several named adapters (PEFT's API) ----------------------------------------------------


def _layer_with_adapters(device, dtype=torch.float32):
    """A LinearWithLoRA (default: rank 4, alpha 2) plus adapters "b" (rank 8, alpha/rank) and "c" (rank 2),
    every B random so that each term is non-zero."""
    from lora_fast import LinearWithLoRA

    layer = LinearWithLoRA(torch.nn.Linear(24, 20), 4, 2.0).to(device)
    layer.add_adapter("b", 8, 4.0, scaling="alpha/rank")
    layer.add_adapter("c", 2, -1.5)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    return layer.eval()


def _truth(layer, x, names, absolute=False):
    """float64 output of ``layer`` with sample i on adapter names[i] (a list: their terms summed; "__base__":
    none), and the float64 leaves (A, B per adapter) for gradients."""
    f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
    leaves = {n: (f(layer.adapter(n).A).requires_grad_(), f(layer.adapter(n).B).requires_grad_())
              for n in layer.adapters}
    w, b = f(layer.linear.weight), f(layer.linear.bias)
    rows = []
    for i, sample in enumerate(names):
        y = f(x[i]) @ w.t() + b
        for n in ([sample] if isinstance(sample, str) else sample):
            if n != "__base__":
                scale = layer.adapter(n).scale
                y = y + (abs(scale) if absolute else scale) * (f(x[i]) @ leaves[n][0] @ leaves[n][1])
        rows.append(y)
    return torch.stack(rows), leaves


def test_layer_adapter_names_per_sample(backend, device):
    """forward(x, adapter_names=...) gives each sample its own adapter (mixed ranks, "__base__", an adapter
    unused), forward and the gradients of every adapter's A and B against float64."""
    layer = _layer_with_adapters(device)
    x = torch.randn(5, 3, 24, device=device)
    _check_layer_against_float64(layer, x, torch.float32, 15, "layer")


def _check_layer_against_float64(layer, x, dtype, grad_reduction, what):
    """layer(x, adapter_names=...) over mixed samples: forward and every adapter's A and B gradients (each in its
    factor's dtype) against float64, with ``dtype``'s bound (forward reduction 24 + 8, gradients ``grad_reduction``)."""
    names = ["b", "__base__", "default", "b", "c"]
    y = layer(x, adapter_names=names)
    dy = torch.randn_like(y)
    y.backward(dy)
    truth, leaves = _truth(layer, x, names)
    mag, mag_leaves = _truth(layer, x, names, absolute=True)
    assert_close(y.detach(), truth, mag, dtype, 24 + 8, f"{what} forward", record=False)
    (truth * dy.double()).sum().backward()
    (mag * dy.double().abs()).sum().backward()
    for n in layer.adapters:
        for p, t, m in zip((layer.adapter(n).A, layer.adapter(n).B), leaves[n], mag_leaves[n]):
            assert p.grad.dtype == p.dtype
            assert_close(p.grad, t.grad, m.grad, dtype, grad_reduction, f"{what} d{n}", record=False)


def test_layer_adapter_names_with_adapters_of_two_dtypes(backend, device):
    """A bf16 layer whose adapter "b" is kept in float32 beside bf16 ones (PEFT's autocast_adapter_dtype habit): an
    adapter_names batch works as each adapter alone does (the op takes one adapter dtype: all read in float32),
    forward and every adapter's gradients, each in its factor's dtype, against float64 (review4: a TypeError)."""
    layer = _layer_with_adapters(device).to(torch.bfloat16)
    layer.adapter("b").float()
    x = torch.randn(5, 3, 24, device=device).to(torch.bfloat16)
    # every product rounded to bf16 at most once per operand before fp32 accumulation: bf16's bound
    _check_layer_against_float64(layer, x, torch.bfloat16, 15 + 20, "two-dtype layer")


def test_layer_set_adapter_and_keys(device):
    """The default adapter keeps the book's keys; added adapters get their own; set_adapter with one name or
    several (summed on every row, as PEFT); delete_adapter removes the keys and leaves the active set."""
    layer = _layer_with_adapters(device)
    assert list(layer.state_dict()) == ["linear.weight", "linear.bias", "lora.A", "lora.B", "loras.b.A",
                                        "loras.b.B", "loras.c.A", "loras.c.B"]
    x = torch.randn(4, 24, device=device)
    with torch.no_grad():
        for active in ("b", ["default", "c"], ["b", "c", "default"]):
            layer.set_adapter(active)
            truth, _ = _truth(layer, x, [active] * 4)
            mag, _ = _truth(layer, x, [active] * 4, absolute=True)
            assert_close(layer(x), truth, mag, torch.float32, 24 + 8, f"active {active}", record=False)
        layer.delete_adapter("b")
        assert layer.active_adapters == ["c", "default"] and layer.adapters == ["default", "c"]
        assert "loras.b.A" not in layer.state_dict()
        layer.delete_adapter("c")
        assert layer.active_adapters == ["default"]


def test_layer_errors_and_merge_refused_by_name(device):
    from lora_fast import merge_lora, replace_linear_with_lora

    layer = _layer_with_adapters(device)
    x = torch.randn(3, 24, device=device)
    with pytest.raises(ValueError, match="name: expected a new adapter name"):
        layer.add_adapter("b", 2, 1.0)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        layer.set_adapter(["b", "zz"])
    with pytest.raises(TypeError, match="adapter_name: expected an adapter name .str. or a list of them, got int"):
        layer.set_adapter(3)
    with pytest.raises(ValueError, match="adapter_name: expected an adapter name or a non-empty list"):
        layer.set_adapter([])
    with pytest.raises(ValueError, match="'default' adapter is the layer's own"):
        layer.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        layer(x, adapter_names=["b", "zz", "c"])
    with pytest.raises(ValueError, match="one name per sample"):
        layer(x, adapter_names=["b", "c"])
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).to(device)
    replace_linear_with_lora(model, 4, 2.0)
    model[2].add_adapter("b", 2, 1.0)
    model[2].set_adapter(["default", "b"])
    with pytest.raises(ValueError, match=r"several active adapters.*2 \(active: default, b\)"):
        merge_lora(model)
    model[2].set_adapter("default")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        model[2].set_adapter("b")


def test_use_adapter_names_through_a_model(device):
    """use_adapter_names passes the per-sample names to every wrapped layer of a model's forward (PEFT's
    pre-forward hooks): the same as calling each layer with them (the per-sample semantics are checked above);
    the hooks are gone afterwards."""
    from lora_fast import replace_linear_with_lora, use_adapter_names

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)).to(device)
    replace_linear_with_lora(model, 4, 2.0)
    for layer in (model[0], model[2]):
        layer.add_adapter("b", 2, 3.0)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.normal_(0, 0.3)
    model.eval()
    x = torch.randn(3, 16, device=device)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        with use_adapter_names(model, names):
            y = model(x)
        assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
        expected = model[2](torch.tanh(model[0](x, adapter_names=names)), adapter_names=names)
        assert torch.equal(y, expected)
        assert not torch.equal(model(x), y)   # without the names: the default adapter on every sample


def test_patch_peft_fuses_adapter_names(monkeypatch, device):
    """With the opt-in kernels on, a patched PEFT layer runs PEFT's adapter_names batches (mixed ranks, "__base__")
    on lora_linear_multi, equal to PEFT's own forward within rounding; without them, PEFT's loop."""
    peft = pytest.importorskip("peft")
    from lora_fast import patch_peft, unpatch_peft

    model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in ("default", "other"):
            layer.lora_B[name].weight.normal_(0, 0.3)
    model.eval()
    x = torch.randn(5, 3, 24, device=device)
    names = ["other", "__base__", "default", "default", "other"]
    calls = []
    from lora_fast.multi import _lora_linear_multi

    monkeypatch.setattr("lora_fast.peft_interop._lora_linear_multi",
                        lambda *a, **k: calls.append(1) or _lora_linear_multi(*a, **k))
    with torch.no_grad():
        peft_y = model(x, adapter_names=names)
        patch_peft(model, warn=False)
        assert torch.equal(model(x, adapter_names=names), peft_y) and not calls   # opt-in off: PEFT's loop
        monkeypatch.setenv("LORA_FAST_MULTI", "triton")
        y = model(x, adapter_names=names)
        unpatch_peft(model)
    assert calls == [1]
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    truth, mag = [], []
    for i, name in enumerate(names):
        t, m = x[i].double() @ w.t() + b, x[i].double().abs() @ w.abs().t() + b.abs()
        if name in ("default", "other"):
            A, B = layer.lora_A[name].weight.double().t(), layer.lora_B[name].weight.double().t()
            t = t + layer.scaling[name] * (x[i].double() @ A @ B)
            m = m + abs(layer.scaling[name]) * (x[i].double().abs() @ A.abs() @ B.abs())
        truth.append(t)
        mag.append(m)
    assert_close(y, torch.stack(truth), torch.stack(mag), torch.float32, 24 + 4, "patched adapter_names",
                 record=False)
    # PEFT's own result against the same truth (it rounds the base and each term apart: two roundings more)
    assert_close(peft_y, torch.stack(truth), torch.stack(mag), torch.float32, 24 + 4, "PEFT adapter_names",
                 record=False)


def test_layer_adapter_names_with_a_hooked_linear(device):
    """A wrapped layer with a forward hook keeps its own call: the per-sample terms are added beside it (the
    unfused path), within rounding of the fused path."""
    layer = _layer_with_adapters(device)
    x = torch.randn(4, 24, device=device)
    names = ["c", "__base__", "b", "default"]
    with torch.no_grad():
        fused = layer(x, adapter_names=names)
        seen = []
        layer.linear.register_forward_hook(lambda module, args, out: seen.append(1))
        assert not layer.fused()
        unfused = layer(x, adapter_names=names)
    assert seen == [1]
    truth, _ = _truth(layer, x, names)
    mag, _ = _truth(layer, x, names, absolute=True)
    assert_close(unfused, truth, mag, torch.float32, 24 + 8, "hooked layer", record=False)
    assert_close(fused, truth, mag, torch.float32, 24 + 8, "fused layer", record=False)


def test_layer_adapter_names_on_conv1d(backend, device):
    """transformers' Conv1D (GPT-2's layer, weight (in, out)) with per-sample adapters: its transposed view."""
    from transformers.pytorch_utils import Conv1D

    from lora_fast import LinearWithLoRA

    conv = Conv1D(20, 24).to(device)
    with torch.no_grad():
        conv.bias.normal_()
    layer = LinearWithLoRA(conv, 4, 2.0)
    layer.add_adapter("b", 2, -1.0)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 7, 24, device=device)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        y = layer(x, adapter_names=names)
    w, b = conv.weight.double(), conv.bias.double()
    for i, name in enumerate(names):
        truth, mag = x[i].double() @ w + b, x[i].double().abs() @ w.abs() + b.abs()
        if name != "__base__":
            lora = layer.adapter(name)
            truth = truth + lora.scale * (x[i].double() @ lora.A.double() @ lora.B.double())
            mag = mag + abs(lora.scale) * (x[i].double().abs() @ lora.A.double().abs() @ lora.B.double().abs())
        assert_close(y[i], truth, mag, torch.float32, 24 + 4, f"Conv1D {name}", record=False)


def test_patch_peft_adapter_names_keep_peft_loop_where_the_kernels_cannot_serve(monkeypatch):
    """LORA_FAST_MULTI=triton with a CPU tensor and no interpreter (a model moved to the CPU for evaluation): the
    patched layer runs PEFT's own loop, as without the switch, instead of raising."""
    peft = pytest.importorskip("peft")
    from lora_fast import patch_peft

    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    with torch.no_grad():
        for name in ("default", "other"):
            model.base_model.model[0].lora_B[name].weight.normal_(0, 0.3)
    model.eval()
    x = torch.randn(3, 2, 12)
    names = ["other", "__base__", "default"]
    calls = []
    monkeypatch.setattr("lora_fast.peft_interop._lora_linear_multi", lambda *a, **k: calls.append(1))
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setattr("lora_fast._env.interpreting", lambda: False)
    with torch.no_grad():
        peft_y = model(x, adapter_names=names)
        patch_peft(model, warn=False)
        y = model(x, adapter_names=names)
    assert not calls and torch.equal(y, peft_y)


def test_dora_layers_refuse_per_sample_adapters():
    """A DoRA layer holds one adapter: adapter_names on it, or use_adapter_names on a model that has one, raise
    by name instead of running its adapter on every sample."""
    from lora_fast import LinearWithDoRA, replace_linear_with_lora, use_adapter_names

    model = replace_linear_with_lora(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), 2, 1.0,
                                     use_dora=True)
    assert isinstance(model[0], LinearWithDoRA)
    x = torch.randn(2, 8)
    with pytest.raises(NotImplementedError, match="adapter_names"):
        model[0](x, adapter_names=["default", "__base__"])
    with pytest.raises(NotImplementedError, match="DoRA layers \\(0, 1\\)"):
        with use_adapter_names(model, ["default", "__base__"]):
            model(x)
    assert not model[0]._forward_pre_hooks


def _model_with_adapters():
    """(base, model): a frozen 16 -> 16 -> 6 MLP wrapped with the default adapter (rank 4, alpha 2), adapter "b"
    (rank 2, alpha/rank, dropout 0.1) on both layers and "c" (rank 8, rslora) on the last one, every A and B
    random and trainable."""
    import copy

    from lora_fast import mark_only_lora_as_trainable, replace_linear_with_lora

    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    model = replace_linear_with_lora(copy.deepcopy(base), 4, 2.0)
    for layer in (model[0], model[2]):
        layer.add_adapter("b", 2, 3.0, scaling="alpha/rank", dropout=0.1)
    model[2].add_adapter("c", 8, 1.5, scaling="rslora")
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return base, model.eval()


def _saved_adapter_b(tmp_path):
    """``_model_with_adapters()``'s (base, model), with its adapter "b" saved as tmp_path/b.safetensors (save_lora)
    and as PEFT's folder tmp_path/peft/b (save_peft_adapter)."""
    from lora_fast import save_lora, save_peft_adapter

    base, ours = _model_with_adapters()
    save_lora(ours, tmp_path / "b.safetensors", adapter_name="b")
    save_peft_adapter(ours, tmp_path / "peft", selected_adapters=["b"])
    return base, ours


def _same_adapters(ours, theirs, x, *, peft=False):
    """Each adapter of ``ours`` (rank, alpha, scaling, scale, dropout) is in ``theirs`` with the same settings (through
    PEFT's format: the same rank and scale, "alpha" scaling written as PEFT's alpha/rank), and the two models'
    outputs are equal bit for bit with each adapter active and with a mixed batch."""
    for a, b in ((ours[0], theirs[0]), (ours[2], theirs[2])):
        assert b.adapters == a.adapters
        for name in a.adapters:
            la, lb = a.adapter(name), b.adapter(name)
            fields = ("rank", "scale") if peft else ("rank", "alpha", "scaling", "scale")
            assert [getattr(lb, f) for f in fields] == [getattr(la, f) for f in fields], name
            assert b._adapter_dropout(name) == a._adapter_dropout(name), name
    with torch.no_grad():
        for name in ("default", "b", "c"):
            for model in (ours, theirs):
                for layer in (model[0], model[2]):
                    layer.set_adapter(name if name in layer.adapters else "default")
            assert torch.equal(ours(x), theirs(x)), name
        names = ["c", "b", "__base__", "default", "c"]
        assert torch.equal(ours[2](x, adapter_names=names), theirs[2](x, adapter_names=names))


def test_save_and_load_each_adapter(tmp_path):
    """save_lora / load_lora per adapter: the default adapter's file keeps the book's keys (and, unless asked for
    by name, warns that the trained added adapters are not in it); each named one is saved under the same keys
    and loaded into a fresh model, where it is created with the file's rank, alpha, scaling and dropout; outputs
    bit for bit. Errors name the adapter and the layer."""
    import copy
    import warnings

    from lora_fast import load_lora, load_lora_state_dict, lora_state_dict, save_lora

    base, ours = _model_with_adapters()
    with pytest.warns(UserWarning, match=r"trainable adapters b, c \(added with add_adapter\).*adapter_name"):
        assert set(lora_state_dict(ours)) == {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B"}
        save_lora(ours, tmp_path / "default.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(lora_state_dict(ours, adapter_name="default")) == {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B"}
        state = lora_state_dict(ours, adapter_name="c")
        assert list(state) == ["2.lora.A", "2.lora.B"] and state["2.lora.A"] is not ours[2].adapter("c").A
        assert torch.equal(state["2.lora.A"], ours[2].adapter("c").A)
        for name in ("b", "c"):
            save_lora(ours, tmp_path / f"{name}.safetensors", adapter_name=name)
        theirs = copy.deepcopy(base)
        load_lora(theirs, tmp_path / "default.safetensors")        # wraps the plain layers
        for name in ("b", "c"):
            load_lora(theirs, tmp_path / f"{name}.safetensors", adapter_name=name)   # creates the adapter
    _same_adapters(ours, theirs.eval(), torch.randn(5, 16))
    # into an adapter that exists: the settings must agree (named), and a state dict loads into existing ones
    with pytest.raises(ValueError, match=r"2: rank 8 in the file, 2 in the model's adapter 'b'"):
        load_lora(theirs, tmp_path / "c.safetensors", adapter_name="b")
    with torch.no_grad():
        theirs[2].adapter("c").A.zero_()
    load_lora_state_dict(theirs, state, adapter_name="c")
    assert torch.equal(theirs[2].adapter("c").A, ours[2].adapter("c").A)
    with pytest.raises(ValueError, match=r"layers without an adapter named 'c'.*: 0"):
        load_lora_state_dict(theirs, lora_state_dict(ours, adapter_name="b"), adapter_name="c")
    with pytest.raises(ValueError, match=r"^save_lora: adapter_name: no layer of the model holds an adapter named "
                                         r"'zz'; its adapters: \['default', 'b', 'c'\]"):
        save_lora(ours, tmp_path / "zz.safetensors", adapter_name="zz")
    with pytest.raises(ValueError, match="adapter_name: expected an adapter name"):
        lora_state_dict(ours, adapter_name="__base__")


def test_peft_format_per_adapter_both_ways(tmp_path):
    """save_peft_adapter writes every adapter as PEFT's save_pretrained does (default in the folder, the others in
    subfolders), which PEFT's own classes load with the same weights, scalings and dropouts; PEFT's
    save_pretrained of that model loads back into a fresh lora-fast model (load_peft_adapter with adapter_name
    creating each adapter) with outputs equal bit for bit."""
    import copy

    peft = pytest.importorskip("peft")
    from lora_fast import load_peft_adapter, save_peft_adapter

    base, ours = _model_with_adapters()
    save_peft_adapter(ours, tmp_path / "ours")
    assert {p.relative_to(tmp_path / "ours").as_posix() for p in (tmp_path / "ours").rglob("*")} == {
        "adapter_config.json", "adapter_model.safetensors", "b", "b/adapter_config.json",
        "b/adapter_model.safetensors", "c", "c/adapter_config.json", "c/adapter_model.safetensors"}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for name in ("b", "c"):
        peft_model.load_adapter(tmp_path / "ours" / name, adapter_name=name)
    for i in (0, 2):
        layer = peft_model.base_model.model[i]
        assert sorted(layer.lora_A) == sorted(ours[i].adapters)
        for name in ours[i].adapters:
            lora = ours[i].adapter(name)
            assert torch.equal(layer.lora_A[name].weight, lora.A.t()) and torch.equal(layer.lora_B[name].weight,
                                                                                      lora.B.t())
            assert layer.scaling[name] == pytest.approx(lora.scale, rel=1e-12)
            dropout = layer.lora_dropout[name]
            assert (dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0) == ours[i]._adapter_dropout(name)
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    for name in ("b", "c"):
        load_peft_adapter(theirs, tmp_path / "peft" / name, adapter_name=name)
    _same_adapters(ours, theirs.eval(), torch.randn(5, 16), peft=True)
    with pytest.raises(ValueError, match=r"module '2' \(adapter 'b'\) has rank 8, model's LinearWithLoRA has rank 2"):
        load_peft_adapter(theirs, tmp_path / "peft" / "c", adapter_name="b")
    with pytest.raises(ValueError, match=r"selected_adapters: expected names of the model's adapters"):
        save_peft_adapter(ours, tmp_path / "x", selected_adapters=["b", "zz"])


def test_peft_format_with_trained_biases_loads_every_adapter_in_peft(tmp_path):
    """Trained biases are the model's, shared by its adapters: written once, into the default adapter's folder, the
    others' configs saying bias "none", so that PEFT (one adapter with a bias at most) loads every folder; the
    PEFT model then gives lora-fast's outputs for each adapter, biases included."""
    import copy
    import json

    peft = pytest.importorskip("peft")
    from lora_fast import mark_only_lora_as_trainable, replace_linear_with_lora, save_peft_adapter

    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ours = replace_linear_with_lora(copy.deepcopy(base), rank=4, alpha=8, scaling="alpha/rank")
    for layer in (ours[0], ours[2]):
        layer.add_adapter("b", rank=8, alpha=16)
    mark_only_lora_as_trainable(ours, bias="all")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".B" in name or name.endswith("bias"):   # B starts at zero; random biases make the check see them
                p.normal_()
    save_peft_adapter(ours, tmp_path / "f")
    configs = {name: json.loads((tmp_path / "f" / sub / "adapter_config.json").read_text())
               for name, sub in (("default", ""), ("b", "b"))}
    assert configs["default"]["bias"] == "lora_only" and configs["b"]["bias"] == "none"   # every bias is a LoRA layer's
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "f")
    peft_model.load_adapter(tmp_path / "f" / "b", adapter_name="b")   # refused when both carried a bias
    x = torch.randn(5, 16)
    truth_model = copy.deepcopy(ours).double()   # lora-fast's maths in float64 (CPU: its reference path)
    for name in ("default", "b"):
        peft_model.set_adapter(name)
        for layer in (truth_model[0], truth_model[2]):
            layer.set_adapter(name)
        with torch.no_grad():
            want, got = truth_model.eval()(x.double()), peft_model.eval()(x)
        # two 16-long reductions (plus the rank) and a tanh in fp32, bounded by the largest output
        mag = want.abs().max()
        assert (got.double() - want).abs().max() <= 64 * torch.finfo(torch.float32).eps * mag, name


def test_named_adapter_load_wraps_plain_layers(tmp_path):
    """load_lora / load_peft_adapter of a named adapter into a model whose layers are plain nn.Linear: the layers
    the file names are wrapped (PEFT's load_adapter wraps the layers it names), their default adapter untrained
    (B = 0: the model computes what it did, bit for bit on this CPU's reference path), the named adapter created
    with the file's weights and settings, not activated; set_adapter gives the saving model's outputs. A failed
    load (a mis-shaped tensor on the second layer) leaves the plain model as it was."""
    import copy

    from safetensors.torch import load_file, save_file

    from lora_fast import (
        LinearWithLoRA,
        load_lora,
        load_peft_adapter,
        replace_linear_with_lora,
        save_lora,
        save_peft_adapter,
    )

    base, ours = _saved_adapter_b(tmp_path)
    x = torch.randn(5, 16)
    for load in (lambda m: load_lora(m, tmp_path / "b.safetensors", adapter_name="b"),
                 lambda m: load_peft_adapter(m, tmp_path / "peft" / "b", adapter_name="b")):
        theirs = copy.deepcopy(base)
        load(theirs)
        for i in (0, 2):
            layer = theirs[i]
            assert isinstance(layer, LinearWithLoRA) and layer.linear is not base[i]
            assert layer.adapters == ["default", "b"] and layer.active_adapters == ["default"]
            assert not layer.lora.B.any()
            want, got = ours[i].adapter("b"), layer.adapter("b")
            assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
            assert got.rank == want.rank and got.scale == pytest.approx(want.scale, rel=1e-12)
            assert layer._adapter_dropout("b") == ours[i]._adapter_dropout("b") and layer.dropout == 0.0
        with torch.no_grad():
            # what replace_linear_with_lora's wrapping computes (a zero LoRA term), bit for bit, and the plain
            # model's function within fp32 rounding (two 16-long reductions and a tanh)
            assert torch.equal(theirs.eval()(x), replace_linear_with_lora(copy.deepcopy(base), 4, 2.0).eval()(x))
            want = copy.deepcopy(base).double()(x.double())
            assert (theirs(x).double() - want).abs().max() <= 64 * torch.finfo(torch.float32).eps * want.abs().max()
            for model in (ours, theirs):
                for i in (0, 2):
                    model[i].set_adapter("b")
            assert torch.equal(theirs(x), ours(x))
            for i in (0, 2):
                ours[i].set_adapter("default")
    # a failed load: the second layer's tensor mis-shaped; nothing wrapped, nothing changed
    lora_file = load_file(tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        metadata = f.metadata()
    lora_file["2.lora.B"] = torch.zeros(2, 5)
    save_file(lora_file, tmp_path / "bad.safetensors", metadata=metadata)
    peft_file = tmp_path / "peft" / "b" / "adapter_model.safetensors"
    tensors = load_file(peft_file)
    tensors["base_model.model.2.lora_B.weight"] = torch.zeros(5, 2)
    save_file(tensors, peft_file)
    plain = copy.deepcopy(base)
    before = _snapshot_adapters(plain)
    with pytest.raises(ValueError, match=r"mis-shaped keys: 2\.lora\.B"):
        load_lora(plain, tmp_path / "bad.safetensors", adapter_name="b")
    with pytest.raises(ValueError, match=r"module '2' has \(in, out\) = \(16, 6\)"):
        load_peft_adapter(plain, tmp_path / "peft" / "b", adapter_name="b")
    after = _snapshot_adapters(plain)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert all(type(m) is type(b) for m, b in zip(plain, base))
    # a DoRA file is a layer's one adapter: refused by name as a named adapter, the plain model untouched
    dora = replace_linear_with_lora(copy.deepcopy(base), 4, 2.0, use_dora=True)
    save_lora(dora, tmp_path / "dora.safetensors")
    save_peft_adapter(dora, tmp_path / "dora_peft")
    with pytest.raises(ValueError, match=r"0: a DoRA file holds one adapter, so it cannot take adapter 'b'"):
        load_lora(plain, tmp_path / "dora.safetensors", adapter_name="b")
    with pytest.raises(ValueError, match=r"module '0' \(adapter 'b'\): a DoRA adapter"):
        load_peft_adapter(plain, tmp_path / "dora_peft", adapter_name="b")
    after = _snapshot_adapters(plain)
    assert after[1:] == before[1:] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


def _snapshot_adapters(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), list(m._modules)) for n, m in model.named_modules()],
            {n: dict(m.__dict__.get("_dropouts", {})) for n, m in model.named_modules()})


def test_failed_adapter_load_leaves_the_model_as_it_was(tmp_path):
    """A file whose tensor for one layer has the wrong shape: load_lora and load_peft_adapter into a new named
    adapter raise naming that layer, and the model is as it was: no half-created adapter on the other layer."""
    import copy

    from safetensors.torch import load_file, save_file

    from lora_fast import (
        load_lora,
        load_peft_adapter,
        lora_state_dict,
        replace_linear_with_lora,
    )

    base, ours = _saved_adapter_b(tmp_path)
    # the target holds the default adapter only, so "b" would be created by the load
    target = replace_linear_with_lora(copy.deepcopy(base), 4, 2.0)
    from safetensors import safe_open

    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        metadata = f.metadata()
    bad = {k: v.clone() for k, v in lora_state_dict(ours, adapter_name="b").items()}
    bad["2.lora.B"] = torch.zeros(2, 5)
    save_file(bad, tmp_path / "bad.safetensors", metadata=metadata)
    peft_file = tmp_path / "peft" / "b" / "adapter_model.safetensors"
    tensors = load_file(peft_file)
    tensors["base_model.model.2.lora_B.weight"] = torch.zeros(5, 2)
    save_file(tensors, peft_file)
    before = _snapshot_adapters(target)
    with pytest.raises(ValueError, match=r"mis-shaped keys: 2\.lora\.B \(given \(2, 5\), model \(2, 6\)\)"):
        load_lora(target, tmp_path / "bad.safetensors", adapter_name="b")
    with pytest.raises(ValueError, match=r"module '2' has \(in, out\) = \(16, 6\), the adapter's lora_A/lora_B give "
                                         r"\(16, 5\)"):
        load_peft_adapter(target, tmp_path / "peft" / "b", adapter_name="b")
    after = _snapshot_adapters(target)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert all(layer.adapters == ["default"] and "loras" not in layer._modules for layer in (target[0], target[2]))


def test_gpu_check_runs_the_multi_adapter_bench_with_valid_arguments():
    """bench/gpu_check.sh (no GPU here to run it) is valid bash, and its bench.multi_adapter command line parses
    with the bench's own parser into the short mode."""
    import pathlib
    import shlex
    import subprocess

    from bench import multi_adapter

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "python -m bench.multi_adapter" in line]
    assert len(lines) == 1
    words = shlex.split(lines[0].split("python -m bench.multi_adapter", 1)[1].split("2>&1")[0])
    args = multi_adapter.parser().parse_args([w.replace("$OUT", "/tmp/out") for w in words])
    assert args.short and not args.dry_run and args.out == "/tmp/out"


# --- a prepared selection, shared by the layers of one forward (issue 30: the sort once per selection) ----------


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_adapter_rows_bit_for_bit_as_the_raw_index(order, monkeypatch, device):
    """lora_linear_multi with an AdapterRows gives bit for bit the result and every gradient of the raw index,
    with dropout per adapter, on the kernels in both row orders (a non-contiguous 2-D index, rows of -1, n = 3)
    and on the reference; one AdapterRows serves several calls and their backward (sorted once)."""
    from lora_fast import adapter_rows
    from lora_fast.kernels import multi

    inputs = multi_inputs((2, 13), 24, 16, (2, 4, 3), torch.float32, device)
    idx = adapter_index((2, 26), 3, device)[:, ::2]   # non-contiguous: the kernels get a unit-stride copy
    dropout_p = [0.3, 0.0, 0.5]
    sorts = []
    monkeypatch.setattr(multi, "sort_rows", lambda i, n, f=multi.sort_rows: sorts.append(n) or f(i, n))
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
    for backend in ("triton", "reference") if order == "sorted" else ("triton",):
        monkeypatch.setenv("LORA_FAST_MULTI", backend)
        rows = adapter_rows(idx, 3)
        raw, raw_grads, dy = _run(inputs, [0.5, -1.25, 2.0], idx, dropout_p, 7, op=lora_linear_multi)
        sorts.clear()
        for _ in range(2):
            got, grads, _ = _run(inputs, [0.5, -1.25, 2.0], rows, dropout_p, 7, dy, op=lora_linear_multi)
            assert torch.equal(got, raw), backend
            for g, r in zip(grads, raw_grads):
                assert torch.equal(g, r), backend
        assert len(sorts) == (1 if backend == "triton" and order == "sorted" else 0), backend


def test_adapter_rows_across_inference_mode(monkeypatch, device):
    """torch.inference_mode: a use_adapter_names forward runs (its per-forward selection's index keeps a version
    counter) and equals the torch.no_grad one bit for bit; an AdapterRows first used under inference mode (its
    lazy copy and sort made there) then serves a call with autograd, bit for bit the raw index's result and
    gradients; adapter_rows of an inference tensor works inside inference mode (on a copy of its values); a
    scope's per-adapter table made under inference mode serves a later call with autograd."""
    from lora_fast import adapter_rows, use_adapter_names

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    _, model = _model_with_adapters()
    model.to(device)
    x = torch.randn(3, 5, 16, device=device)
    with use_adapter_names(model, ["b", "__base__", "default"]):
        with torch.no_grad():
            want = model(x)
        with torch.inference_mode():
            got = model(x)
    assert torch.equal(got, want)
    inputs = multi_inputs((2, 3), 8, 5, (2, 2), torch.float32, device)
    idx = adapter_index((3, 2), 2, device).t()   # non-contiguous: flat() copies
    scales = [0.5, -1.5]
    raw, raw_grads, dy = _run(inputs, scales, idx, [0.0, 0.0], 7, op=lora_linear_multi)
    rows = adapter_rows(idx, 2)
    with torch.inference_mode():
        lora_linear_multi(*inputs, scales, rows)
    got, grads, _ = _run(inputs, scales, rows, [0.0, 0.0], 7, dy, op=lora_linear_multi)
    assert torch.equal(got, raw) and all(torch.equal(g, r) for g, r in zip(grads, raw_grads))
    with torch.inference_mode():
        frozen = idx.clone()
        rows = adapter_rows(frozen, 2)
        assert torch.equal(lora_linear_multi(*inputs, scales, rows), lora_linear_multi(*inputs, scales, idx))
    # a scope left open (a forward interrupted by KeyboardInterrupt skips its closing hook) keeps the per-adapter
    # table made under inference mode: a later call with autograd saves it for its backward
    from lora_fast import multi

    before = multi.current_rows_scope()
    multi.open_rows_scope()
    try:
        with torch.inference_mode():
            lora_linear_multi(*inputs, scales, idx)
        got, grads, _ = _run(inputs, scales, idx, [0.0, 0.0], 7, dy, op=lora_linear_multi)
        assert torch.equal(got, raw) and all(torch.equal(g, r) for g, r in zip(grads, raw_grads))
    finally:
        multi.restore_rows_scope(before)


def test_adapter_rows_errors(device):
    """adapter_rows checks its index once (dtype, range, n); a call refuses an AdapterRows built for another n,
    shape or device, and one whose index was modified in place since (never a stale sort); it is immutable, and
    copy, deepcopy and pickle build it again through adapter_rows."""
    import copy
    import pickle

    from lora_fast import AdapterRows, adapter_rows

    x, weight, b, A, B = multi_inputs((6,), 8, 5, (2, 2), torch.float32, device)
    idx = torch.tensor([0, 1, -1, 1, 0, 0], device=device)
    with pytest.raises(TypeError, match="int64"):
        adapter_rows(idx.int(), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        adapter_rows([0, 1], 2)
    with pytest.raises(TypeError, match="n: expected an int"):
        adapter_rows(idx, 2.0)
    with pytest.raises(ValueError, match="at least one adapter"):
        adapter_rows(idx, 0)
    with pytest.raises(ValueError, match=r"values in \[-1, 1\)"):
        adapter_rows(idx, 1)
    with pytest.raises(TypeError, match="adapter_rows"):
        AdapterRows(idx, 2)
    rows = adapter_rows(idx, 2)
    with pytest.raises(AttributeError, match="immutable"):
        rows.n = 3
    for copied in (copy.copy(rows), copy.deepcopy(rows), pickle.loads(pickle.dumps(rows))):   # built again
        assert type(copied) is AdapterRows and copied.n == 2 and torch.equal(copied.index, idx)
    assert rows.shape == (6,) and rows.n == 2 and torch.equal(rows.index, idx)
    y = lora_linear_multi(x, weight, b, A, B, 0.5, rows)
    assert torch.equal(y, lora_linear_multi(x, weight, b, A, B, 0.5, idx))
    with pytest.raises(ValueError, match="n=2 adapters, but A holds 3"):
        lora_linear_multi(x, weight, b, torch.cat([A, A[:1]]), torch.cat([B, B[:1]]), 0.5, rows)
    with pytest.raises(ValueError, match=r"leading shape \(3,\)"):
        lora_linear_multi(x[:3], weight, b, A, B, 0.5, adapter_rows(idx[:4], 2))
    idx[2] = 1   # in place: the selection built before is stale
    with pytest.raises(ValueError, match="modified in place"):
        lora_linear_multi(x, weight, b, A, B, 0.5, rows)
    if torch.device(device).type != "cpu":
        with pytest.raises(ValueError, match="device"):
            lora_linear_multi(x, weight, b, A, B, 0.5, adapter_rows(idx.cpu(), 2))


def _three_layer_model(device):
    from lora_fast import replace_linear_with_lora

    model = torch.nn.Sequential(torch.nn.Linear(16, 20), torch.nn.Tanh(), torch.nn.Linear(20, 20), torch.nn.Tanh(),
                                torch.nn.Linear(20, 6)).to(device)
    replace_linear_with_lora(model, 4, 2.0)
    for layer in model[::2]:
        layer.add_adapter("b", 2, 3.0)
        layer.add_adapter("c", 4, 1.0, dropout=0.25)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.normal_(0, 0.3)
    return model


def test_model_forward_sorts_once_and_reads_no_range(monkeypatch, device):
    """Under use_adapter_names on the sorted kernels, a training step of a model with three wrapped layers sorts
    the rows once (not once per layer), reads no index range from the device (the names are checked on the host),
    uploads one table of per-adapter constants for layers whose adapters have the same scales, and gives bit for
    bit the result and gradients of each layer called with the names alone (one selection each); nothing
    outlives the forward."""
    from lora_fast import multi as multi_mod
    from lora_fast import use_adapter_names
    from lora_fast.kernels import multi

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "sorted")
    sorts, ranges, tables = [], [], []
    monkeypatch.setattr(multi, "sort_rows", lambda i, n, f=multi.sort_rows: sorts.append(n) or f(i, n))
    monkeypatch.setattr(multi, "adapter_params", lambda *a, f=multi.adapter_params: tables.append(1) or f(*a))
    monkeypatch.setattr("lora_fast._checks.check_index_range", lambda *a: ranges.append(1))
    model = _three_layer_model(device)
    x = torch.randn(5, 3, 16, device=device)
    names = ["c", "__base__", "b", "default", "c"]
    results = []
    for shared in (True, False):
        for p in model.parameters():
            p.grad = None
        sorts.clear()
        tables.clear()
        torch.manual_seed(11)   # the same dropout seeds, drawn in the same order
        if shared:
            with use_adapter_names(model, names):
                y = model(x)
                assert multi_mod._SCOPE.get() is None   # closed with the forward
        else:
            h = x
            for i, m in enumerate(model):
                h = m(h, adapter_names=names) if i % 2 == 0 else m(h)
            y = h
        assert len(sorts) == (1 if shared else 3)
        assert len(tables) == (1 if shared else 3)   # the layers' adapters have the same scales and dropouts
        y.square().sum().backward()
        assert len(sorts) == (1 if shared else 3)   # the backward reuses the forward's sort
        results.append((y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert not ranges
    with use_adapter_names(model, names[:2]):   # a forward that raises closes its scope too
        with pytest.raises(ValueError, match="one name per sample"):
            model(x)
        assert multi_mod._SCOPE.get() is None
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2) and len(g1) == len(g2) >= 3 * 6   # every adapter of every layer
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_selection_ops_bench_counts_one_sort_per_forward(monkeypatch):
    """bench.selection_ops (torch.profiler's aten events): a training step of a 2-layer model under
    use_adapter_names on the sorted kernels sorts once in its forward, reads no index range, uploads one table,
    and its backward none of these; bare calls with a raw index sort and check per call, with an AdapterRows once."""
    from bench import selection_ops

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "sorted")
    step = selection_ops.model_step(layers=2, batch=4, seq=2, width=16)
    assert step["forward"] == {"aten::sort": 1, "aten::arange": 1, "aten::searchsorted": 1, "aten::aminmax": 0,
                               "aten::item": 0, "aten::stack": 0, "tables": 1}
    assert not any(step["backward"].values())
    ops = selection_ops.op_calls(calls=2, M=12, K=16, N=8)
    assert ops["raw"]["aten::sort"] == ops["raw"]["aten::aminmax"] == 2
    assert ops["adapter_rows build"]["aten::aminmax"] == 1 and ops["adapter_rows build"]["aten::sort"] == 0
    assert ops["AdapterRows"]["aten::sort"] == 1 and ops["AdapterRows"]["aten::aminmax"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on CUDA only")
def test_model_forward_on_the_kernels_does_not_sync(monkeypatch):
    """A model forward under use_adapter_names on the sorted kernels makes no host sync: the names are checked
    on the host, the index uploaded without waiting, sorted on the device (before issue 30's sharing: three per
    layer, the index upload and the range check's two reads)."""
    from lora_fast import use_adapter_names

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "sorted")
    model = _three_layer_model("cuda").eval()
    x = torch.randn(5, 3, 16, device="cuda")
    with torch.no_grad(), use_adapter_names(model, ["c", "__base__", "b", "default", "c"]):
        model(x)   # compiles the kernels outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_sample_rows_shared_by_slot_mapping_within_a_scope(monkeypatch):
    """sample_rows: within a scope (a model forward) one object per (slots, shape, n, device); another slot
    mapping (a layer without an adapter, adapters in another order) or shape gets its own; outside a scope, and
    after it closes, nothing is kept."""
    from lora_fast import multi

    assert multi._SCOPE.get() is None
    outside = multi.sample_rows([0, -1, 1], (3, 4), 2, torch.device("cpu"))
    assert multi.sample_rows([0, -1, 1], (3, 4), 2, torch.device("cpu")) is not outside
    assert torch.equal(outside.index, torch.tensor([[0] * 4, [-1] * 4, [1] * 4]))
    multi.open_rows_scope()
    try:
        first = multi.sample_rows([0, -1, 1], (3, 4), 2, torch.device("cpu"))
        multi.open_rows_scope()   # a nested model forward joins the scope
        assert multi.sample_rows((0, -1, 1), torch.Size([3, 4]), 2, torch.device("cpu")) is first
        multi.close_rows_scope()
        assert multi.sample_rows([1, -1, 0], (3, 4), 2, torch.device("cpu")) is not first
        assert multi.sample_rows([0, -1, 1], (3,), 2, torch.device("cpu")) is not first
        assert multi.sample_rows([0, -1, 1], (3, 4), 3, torch.device("cpu")) is not first
        with pytest.raises(ValueError, match="outside"):
            multi.sample_rows([0, 2], (2,), 2, torch.device("cpu"))
    finally:
        multi.close_rows_scope()
    assert multi._SCOPE.get() is None
    # a scope left open (its closing hook skipped) is emptied past _SCOPE_ENTRIES, and by use_adapter_names' exit
    monkeypatch.setattr(multi, "_SCOPE_ENTRIES", 3)
    before = multi.current_rows_scope()
    multi.open_rows_scope()
    left = multi.current_rows_scope()
    for b in range(5):
        multi.sample_rows([0] * (b + 1), (b + 1,), 1, torch.device("cpu"))
        assert len(left.cache) <= 3
    multi.restore_rows_scope(before)
    assert multi.current_rows_scope() is None and not left.cache


def test_rows_scope_after_an_interrupted_forward():
    """A model forward interrupted past its closing hook (KeyboardInterrupt: torch runs always-called hooks on an
    Exception only) leaves its scope open; the model's next forward starts a new one, closed at its end, instead
    of sharing the left one with every later forward. A nested model's forward still joins the scope open."""
    from lora_fast import multi

    inner = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(inner)
    for m in (model, inner):
        m.register_forward_pre_hook(multi.open_rows_scope)
        m.register_forward_hook(multi.close_rows_scope, always_call=True)
    seen = []
    inner.register_forward_pre_hook(lambda m, a: seen.append((multi.current_rows_scope(),
                                                                 multi.current_rows_scope().depth)))
    x = torch.randn(2, 4)
    model(x)
    assert multi.current_rows_scope() is None and seen[0][1] == 2
    handle = inner.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with pytest.raises(KeyboardInterrupt):
            model(x)
        left = multi.current_rows_scope()
        assert left is not None   # what torch leaves: the closing hooks did not run
        left.put("stale", 1)
        handle.remove()
        model(x)
        assert seen[-1][0] is not left and seen[-1][1] == 2
        assert multi.current_rows_scope() is None and not left.cache and not seen[-1][0].cache
    finally:
        multi.restore_rows_scope(None)


def test_patch_peft_adapter_names_share_one_selection_per_slot_mapping(monkeypatch, device):
    """patch_peft's adapter_names batches: one sort per forward for the layers that map the names alike, one more
    for a layer that lacks an adapter (PEFT runs its samples on the base layer); bit for bit what each layer
    computes with a selection of its own (the scope hooks removed), and unpatch_peft removes the hooks."""
    peft = pytest.importorskip("peft")
    from lora_fast import patch_peft, unpatch_peft
    from lora_fast.kernels import multi
    from lora_fast.peft_interop import _remove_rows_scope

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "sorted")
    base = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4", "6"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2", "4"]))
    model.add_adapter("third", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["4", "6"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    sorts = []
    monkeypatch.setattr(multi, "sort_rows", lambda i, n, f=multi.sort_rows: sorts.append(n) or f(i, n))
    x = torch.randn(5, 3, 12, device=device)
    names = ["other", "__base__", "default", "third", "other"]
    patch_peft(model, warn=False)
    with torch.no_grad():
        y = model(x, adapter_names=names)
        # layers 0 and 2 map (other, default) to slots (0, 1) alike: one sort; layer 4 (other, default, third) and
        # layer 6 (default, third; "other" runs on its base layer) one each
        assert sorted(sorts) == [2, 2, 3]
        _remove_rows_scope(model)
        sorts.clear()
        alone = model(x, adapter_names=names)
        assert sorted(sorts) == [2, 2, 2, 3]
    assert torch.equal(y, alone)
    patch_peft(model, warn=False)
    patch_peft(model, warn=False)   # the hooks are added once
    from lora_fast import multi as multi_mod

    def hooked(m):
        return sum(h is multi_mod.open_rows_scope for h in m._forward_pre_hooks.values()) \
            + sum(h is multi_mod.close_rows_scope for h in m._forward_hooks.values())

    assert hooked(model) == hooked(model.get_base_model()) == 2
    unpatch_peft(model)
    assert hooked(model) == hooked(model.get_base_model()) == 0
    # one adapter per layer: no hook (plain forwards pay none) until a mixed batch uses several
    single = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 8)).to(device),
                                 peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    patch_peft(single, warn=False)
    assert hooked(single) == 0
    single.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    single.eval()   # PEFT takes adapter_names in eval mode only
    with torch.no_grad():
        single(x[:2, :, :], adapter_names=["default", "__base__"])
        assert hooked(single) == 0   # one adapter in the batch: nothing to sort
        single(x[:2, :, :], adapter_names=["default", "other"])
    assert hooked(single) == 2


def test_unpatch_peft_leaves_no_scope_hook(device):
    """unpatch_peft removes the selection-scope hooks wherever patch_peft put them: a patch of the PeftModel and
    one of its inner LoraModel, undone on the PeftModel (or on the inner model alone); a deep copy likewise."""
    import copy

    peft = pytest.importorskip("peft")
    from lora_fast import multi, patch_peft, unpatch_peft

    def hooked(m):
        return sum(h in (multi.open_rows_scope, multi.close_rows_scope) for mod in m.modules()
                   for h in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()))

    base = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]))
    patch_peft(model, warn=False)
    patch_peft(model.base_model, warn=False)   # the LoraModel itself: hooks there too
    assert hooked(model) == 6
    copied = copy.deepcopy(model)
    assert unpatch_peft(copied) == 2 and hooked(copied) == 0
    assert unpatch_peft(model.base_model) == 2 and hooked(model) == 0   # the PeftModel holds no patched layer


# --- unstacked adapters: the kernels read each adapter where it lives (issue 30, the adapter table) ---------------
# (leading dims, in, out, ranks, dtype, adapter dtype, PEFT's layout (A, B transposed views), dropout, empty)
UNSTACKED_CASES = [
    ((23,), 40, 20, (3,), torch.float32, None, False, 0.0, ()),
    ((2, 11), 36, 24, (2, 5), torch.float16, torch.float32, True, 0.25, ()),
    ((27,), 32, 20, (1, 4, 8), torch.bfloat16, None, False, 0.0, (1,)),
    ((25,), 40, 28, (4, 2, 8, 3), torch.float32, None, True, (0.0, 0.5, 0.25, 0.0), (2,)),
]


def _stored_factors(K, N, ranks, dtype, device, peft):
    """Per adapter the stored tensors (the autograd leaves) and the factors A (K, r), B (r, N) the op gets: PEFT's
    layout stores lora_A.weight (r, K) and lora_B.weight (N, r) and passes their transposes (strided views)."""
    stored, As, Bs = [], [], []
    for r in ranks:
        a = torch.randn(r, K, device=device) if peft else torch.randn(K, r, device=device)
        b = torch.randn(N, r, device=device) if peft else torch.randn(r, N, device=device)
        stored.append(((a / K**0.5).to(dtype).requires_grad_(), (b / r**0.5).to(dtype).requires_grad_()))
    for a, b in stored:
        As.append(a.t() if peft else a)
        Bs.append(b.t() if peft else b)
    return stored, As, Bs


def _padded_stack(factors, rank, dim):
    """The factors padded with zeros to ``rank`` along ``dim`` and stacked: what the layers did before issue 30."""
    pad = [(0, rank - f.shape[1]) if dim == 1 else (0, 0, 0, rank - f.shape[0]) for f in factors]
    return torch.stack([torch.nn.functional.pad(f, p) for f, p in zip(factors, pad)])


@pytest.mark.parametrize("case", UNSTACKED_CASES, ids=lambda c: f"n{len(c[3])}-{str(c[4])[6:]}-peft{int(c[6])}")
def test_unstacked_adapters_equal_the_stacked_path(case, backend, device):
    """lora_linear_multi on per-adapter factors (lists, mixed ranks, PEFT's transposed views, fp32 adapters on a
    16-bit base, rows of -1, an adapter without rows, dropout per adapter) against the stacked, padded adapters:
    on the kernels bit for bit (the same products: columns >= r_a read as zero instead of padded zeros), forward,
    dx, dW, db and every adapter's dA and dB; on the reference path within the float64 bound (its matmuls run over
    r_a instead of R: another summation length). Each gradient has its factor's shape, dtype and layout."""
    lead, K, N, ranks, dtype, adapter_dtype, peft, dropout, empty = case
    n, R = len(ranks), max(ranks)
    x, weight, bias, _, _ = multi_inputs(lead, K, N, (1,), dtype, device)
    stored, As, Bs = _stored_factors(K, N, ranks, adapter_dtype or dtype, device, peft)
    idx = adapter_index(lead, n, device, empty=empty)
    scales = [0.5 + a for a in range(n)]
    scales[-1] = -scales[-1]
    dy = torch.randn(*lead, N, device=device).to(dtype)
    base = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    torch.manual_seed(77)   # the same dropout seed in both calls
    y = lora_linear_multi(*base, As, Bs, scales, idx, dropout_p=dropout)
    y.backward(dy)
    grads = [t.grad for t in base]
    dA = [a.grad.t() if peft else a.grad for a, _ in stored]
    dB = [b.grad.t() if peft else b.grad for _, b in stored]
    for a, b in stored:
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape and a.grad.stride() == a.stride()
        assert b.grad.dtype == b.dtype and b.grad.shape == b.shape and b.grad.stride() == b.stride()
    stacked = [_padded_stack([f.detach() for f in As], R, 1), _padded_stack([f.detach() for f in Bs], R, 0)]
    if backend == "triton":
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, *stacked)]
        torch.manual_seed(77)
        y_st = lora_linear_multi(*leaves, scales, idx, dropout_p=dropout)
        y_st.backward(dy)
        assert torch.equal(y, y_st)
        for g, leaf in zip(grads, leaves):
            assert torch.equal(g, leaf.grad)
        for a, r in enumerate(ranks):
            assert torch.equal(dA[a], leaves[3].grad[a, :, :r]) and torch.equal(dB[a], leaves[4].grad[a, :r])
        return
    # the reference path: against float64 under the same mask (the reference's own seed, drawn alike)
    inputs = (x, weight, bias, *stacked)
    ps = dropout
    ref, ref_grads, _ = _run(inputs, scales, idx, ps, 77, dy, f=lambda t: t.double())
    mag, mag_grads, _ = _run(inputs, scales, idx, ps, 77, dy, f=lambda t: t.double().abs(), scale_f=abs)
    M = idx.numel()
    assert_close(y.detach(), ref, mag, dtype, K + R, "unstacked forward", record=False)
    for name, g, gr, gm, red in zip(("dx", "dW", "dbias"), grads, ref_grads, mag_grads, (N + R, M, M)):
        assert_close(g, gr, gm, dtype, red, f"unstacked {name}", record=False)
    for a, r in enumerate(ranks):
        assert_close(dA[a], ref_grads[3][a, :, :r], mag_grads[3][a, :, :r], dtype, M, f"unstacked dA[{a}]",
                     record=False)
        assert_close(dB[a], ref_grads[4][a, :r], mag_grads[4][a, :r], dtype, M, f"unstacked dB[{a}]",
                     record=False)


def _stacked_step(x, weight, bias, As, Bs, scales, rows, dy):
    """The stacked, padded call of the same adapters (leaves detached): (y, dx, [dA_a], [dB_a]) per adapter."""
    R = max(a.shape[1] for a in As)
    A = _padded_stack([a.detach() for a in As], R, 1).requires_grad_()
    B = _padded_stack([b.detach() for b in Bs], R, 0).requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = lora_linear_multi(x, weight.detach(), None if bias is None else bias.detach(), A, B, scales, rows)
    y.backward(dy)
    return (y.detach(), x.grad, [A.grad[a, :, :f.shape[1]] for a, f in enumerate(As)],
            [B.grad[a, :f.shape[0]] for a, f in enumerate(Bs)])


def test_unstacked_gradients_land_in_each_adapter_through_layer_and_peft(monkeypatch, device):
    """On the kernels, LinearWithLoRA(adapter_names=...) and a patched PEFT layer's adapter_names call give every
    adapter's own parameter its gradient (.grad of its shape and layout: PEFT's lora_A.weight (r, in) too),
    bit for bit the stacked, padded call's; the adapter unused by the batch gets zeros."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    layer = _layer_with_adapters(device)
    x = torch.randn(4, 3, 24, device=device)
    names = ["c", "__base__", "b", "c"]   # "default" unused: not passed to the op at all
    y = layer(x, adapter_names=names)
    dy = torch.randn_like(y)
    y.backward(dy)
    used = ["c", "b"]
    rows = torch.tensor([0, -1, 1, 0], device=device)[:, None].expand(4, 3)
    As, Bs = [layer.adapter(n).A for n in used], [layer.adapter(n).B for n in used]
    y_st, _, dA, dB = _stacked_step(x, layer.linear.weight, layer.linear.bias, As, Bs,
                                    [layer.adapter(n).scale for n in used], rows, dy)
    assert torch.equal(y.detach(), y_st)
    for a, name in enumerate(used):
        A, B = layer.adapter(name).A, layer.adapter(name).B
        assert A.grad.stride() == A.stride() and B.grad.stride() == B.stride()
        assert torch.equal(A.grad, dA[a]) and torch.equal(B.grad, dB[a])
    assert layer.adapter("default").A.grad is None

    peft = pytest.importorskip("peft")
    from lora_fast import patch_peft

    model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    model.add_adapter("third", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["0"]))
    plain = model.base_model.model[0]
    with torch.no_grad():
        for name in ("default", "other", "third"):
            plain.lora_B[name].weight.normal_(0, 0.3)
            for p in (plain.lora_A[name].weight, plain.lora_B[name].weight):
                p.requires_grad_(True)   # PEFT trains its active adapter only
    model.eval()   # PEFT refuses adapter_names while training; autograd still records
    patch_peft(model, warn=False)
    names = ["other", "__base__", "third", "default", "other"]
    x = torch.randn(5, 3, 24, device=device)
    y = model(x, adapter_names=names)
    dy = torch.randn_like(y)
    y.backward(dy)
    used = ["other", "third", "default"]
    rows = torch.tensor([0, -1, 1, 2, 0], device=device)[:, None].expand(5, 3)
    As = [plain.lora_A[n].weight.t() for n in used]
    Bs = [plain.lora_B[n].weight.t() for n in used]
    y_st, _, dA, dB = _stacked_step(x, plain.base_layer.weight, plain.base_layer.bias, As, Bs,
                                    [plain.scaling[n] for n in used], rows, dy)
    assert torch.equal(y.detach(), y_st)
    for a, name in enumerate(used):
        wa, wb = plain.lora_A[name].weight, plain.lora_B[name].weight
        assert wa.grad.is_contiguous() and wb.grad.is_contiguous()
        assert torch.equal(wa.grad, dA[a].t()) and torch.equal(wb.grad, dB[a].t())


class _TritonLaunches:
    """Every Triton launch (interpreted: InterpretedFunction.run) by kernel name, while installed; each inside a
    profiler region named LAUNCH."""

    LAUNCH = "triton::launch"

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        self.names = []
        run = InterpretedFunction.run

        def counting(kernel, *args, **kwargs):
            self.names.append(kernel.fn.__name__)
            with torch.profiler.record_function(self.LAUNCH):   # the interpreter's own torch ops inside
                return run(kernel, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting)


def test_layer_step_launches_do_not_grow_with_n(monkeypatch, device):
    """A training step (forward and backward, autograd) of LinearWithLoRA with n = 1, 2 or 4 adapters in the batch,
    on the kernels: no stack, cat or pad of the adapters (torch.profiler's CPU events), the same Triton launches
    whatever n (n = 1: lora_linear's kernels; n >= 2: the multi-adapter kernels, 2 forward + 3 backward) and the
    same torch ops for n = 2 and 4; saved for backward beyond the parameters and x: the same bytes but for the
    (5, n) fp32 constants table and the (n + 1,) int64 segment starts."""
    if device.type != "cpu":
        pytest.skip("counts interpreted Triton launches (the CPU's interpreter)")
    from torch.profiler import ProfilerActivity, profile

    from lora_fast import LinearWithLoRA

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", "sorted")
    launches = _TritonLaunches(monkeypatch)
    layer = LinearWithLoRA(torch.nn.Linear(24, 20), 4, 2.0)
    for i, r in enumerate((2, 4, 3)):   # mixed ranks, the largest (S's width) the default's at every n
        layer.add_adapter(f"a{i}", r, 1.0)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    layer.linear.requires_grad_(False)
    params = {p.data_ptr() for p in layer.parameters()}
    x = torch.randn(8, 2, 24, requires_grad=True)   # dx too, as for every layer but the first
    views = {"aten::view", "aten::t", "aten::transpose", "aten::as_strided", "aten::unbind", "aten::select",
             "aten::reshape", "aten::expand", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::slice",
             "aten::unsqueeze", "aten::permute", "aten::lift_fresh", "aten::empty", "aten::empty_strided"}
    counts = {}
    for n in (1, 2, 4):
        adapters = (["default", "a0", "a1", "a2"])[:n]
        names = [adapters[i % n] if i % 3 else "__base__" for i in range(8)]
        saved = []

        def pack(t, saved=saved):
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
                saved.append(t.numel() * t.element_size())
            return t

        for _ in range(2):   # the second step counted: the first builds and keeps the layer's adapter table
            launches.names.clear()
            saved.clear()
            for p in (*layer.parameters(), x):   # AccumulateGrad then takes each gradient as it is (no add_)
                p.grad = None
            with profile(activities=[ProfilerActivity.CPU]) as prof, \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                layer(x, adapter_names=names).square().sum().backward()
        # the torch ops called from Python or autograd, not inside another aten op nor by the interpreter
        ops = sorted(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in views
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", launches.LAUNCH))))
        assert not {"aten::stack", "aten::cat", "aten::constant_pad_nd", "aten::pad"} & set(ops), (n, ops)
        counts[n] = (list(launches.names), ops, sum(saved))
    (l1, _, _), (l2, ops2, s2), (l4, ops4, s4) = counts[1], counts[2], counts[4]
    from bench import cost_model
    from bench.launches import MULTI_STEP_LAUNCHES

    assert len(l1) == len(l2) == len(l4) == MULTI_STEP_LAUNCHES, (l1, l2, l4)
    model = cost_model.multi_kernels("lora-fast-multi", M=16, K=24, N=20, r=4, n=4, dtype="float32")
    assert l2 == l4 == [k.launch for k in model["forward"] + model["backward"]]   # the cost model's launches
    assert ops2 == ops4, (collections.Counter(ops4) - collections.Counter(ops2),
                          collections.Counter(ops2) - collections.Counter(ops4))
    assert s4 - s2 == (4 - 2) * (5 * 4 + 8)   # the constants table's column and a segment start per adapter


def test_unstacked_argument_errors(device):
    """Bad per-adapter factors raise before any launch, naming the argument and the adapter's position."""
    x, weight, b, _, _ = multi_inputs((6,), 8, 5, (2,), torch.float32, device)
    A = [torch.randn(8, 2, device=device), torch.randn(8, 3, device=device)]
    B = [torch.randn(2, 5, device=device), torch.randn(3, 5, device=device)]
    idx = torch.tensor([0, 1, -1, 0, 1, 1], device=device)

    def call(A_, B_):
        return lora_linear_multi(x, weight, b, A_, B_, 1.0, idx)

    cases = [
        ((A, B[0]), TypeError, r"^B: expected a sequence \(list or tuple\) of per-adapter tensors like A"),
        ((A[0][None], B), TypeError, r"^A: expected a sequence"),
        (([], []), ValueError, r"^A: expected at least one adapter"),
        ((A, B[:1]), ValueError, r"^B: expected one factor per adapter of A \(2\)"),
        ((A, [B[0], B[1][:2]]), ValueError, r"^B\[1\]: expected shape \(rank=3 as A\[1\], out_features=5\)"),
        (([A[0], A[1][:7]], B), ValueError, r"^A\[1\]: expected shape \(in_features=8, rank >= 1\)"),
        ((A, [B[0], B[1].t()]), ValueError, r"^B\[1\]: expected shape"),
        (([A[0], A[1].double()], B), TypeError, r"^A\[1\]: expected the adapters' one dtype torch.float32"),
        ((A, [B[0].half(), B[1]]), TypeError, r"^B\[0\]: expected the adapters' one dtype torch.float32"),
        (([A[0], A[1].to("meta")], B), ValueError, r"^A\[1\]: expected a tensor on x's device"),
        (([A[0], A[1][:, :1].squeeze(1)], B), ValueError, r"^A\[1\]: expected a 2-D tensor"),
        (([A[0], A[1].long()], B), TypeError, r"^A\[1\]: expected a floating-point dtype"),
    ]
    for (A_, B_), error, match in cases:
        with pytest.raises(error, match=match):
            call(A_, B_)
    with pytest.raises(ValueError, match=r"^adapter_index: expected values in \[-1, 2\)"):
        lora_linear_multi(x, weight, b, A, B, 1.0, idx + 1)
    with pytest.raises(ValueError, match=r"^scale: expected one value per adapter \(2\)"):
        lora_linear_multi(x, weight, b, A, B, [1.0, 2.0, 3.0], idx)


def test_adapter_table_kept_on_the_layer_and_never_stale(monkeypatch, device):
    """A layer keeps its adapter table while its factors' addresses, shapes and strides are unchanged (no table
    built or uploaded per forward), with or without autograd; it reads the factors' current values, so a write
    through .data (no version bump: what made kept stacks opt-in) changes the next output as a fresh layer computes
    it; a factor replaced through .data gets a new table, also between a forward and its backward (the saved
    factors' addresses are checked there), and every result equals a fresh computation bit for bit."""
    from lora_fast import multi as multi_mod
    from lora_fast.kernels import multi

    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    built = []
    monkeypatch.setattr(multi, "adapter_table", lambda *a, f=multi.adapter_table: built.append(1) or f(*a))
    layer = _layer_with_adapters(device)
    x = torch.randn(4, 3, 24, device=device)
    names = ["b", "__base__", "default", "c"]

    def fresh():   # the same call on a layer that keeps nothing
        multi_mod._TABLES.pop(layer, None)
        return layer(x, adapter_names=names)

    with torch.no_grad():
        y1 = layer(x, adapter_names=names)
        y2 = layer(x, adapter_names=names)
        assert len(built) == 1 and torch.equal(y1, y2)
        A = layer.adapter("b").A
        A.data.copy_(torch.randn_like(A))   # invisible to the version counter: the table reads it anyway
        y3 = layer(x, adapter_names=names)
        assert len(built) == 1 and not torch.equal(y3, y1) and torch.equal(y3, fresh())
        built.clear()
        layer.adapter("c").B.data = layer.adapter("c").B.data * 2   # a new storage: a new table
        y4 = layer(x, adapter_names=names)
        assert len(built) == 1 and torch.equal(y4, fresh())
    built.clear()
    y5 = layer(x, adapter_names=names)   # autograd: the kept table serves the training step too
    assert not built
    B = layer.adapter("b").B
    B.data = B.data.clone()   # between forward and backward: its saved address is stale, the backward rebuilds
    y5.square().sum().backward()
    assert len(built) == 1
    grads = [p.grad.clone() for p in (layer.adapter("b").A, B)]
    for p in layer.parameters():
        p.grad = None
    fresh().square().sum().backward()
    assert torch.equal(grads[0], layer.adapter("b").A.grad) and torch.equal(grads[1], B.grad)


@pytest.mark.parametrize("ranks", [(3,), (4, 2, 5)])
def test_unstacked_second_order(ranks, monkeypatch, device):
    """A differentiable backward (create_graph=True) with unstacked adapters (PEFT's transposed views, mixed
    ranks) on the kernels' path is the reference maths on the saved factors: the same second-order gradients
    as the reference backend, bit for bit, each reaching its own stored tensor."""
    n = len(ranks)
    x0, w0, b0, _, _ = multi_inputs((2, 9), 24, 16, (1,), torch.float32, device)
    stored, _, _ = _stored_factors(24, 16, ranks, torch.float32, device, peft=True)
    idx = adapter_index((2, 9), n, device)
    c = torch.randn(2, 9, 16, device=device)   # a loss linear in y (see test_second_order)
    results = []
    for backend in BACKENDS:
        monkeypatch.setenv("LORA_FAST_MULTI", backend)
        x, w, b = [t.detach().clone().requires_grad_() for t in (x0, w0, b0)]
        leaves = [(a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()) for a, bb in stored]
        torch.manual_seed(3)
        y = lora_linear_multi(x, w, b, [a.t() for a, _ in leaves], [bb.t() for _, bb in leaves], [1.5] * n, idx,
                              dropout_p=0.25)
        As = [a for a, _ in leaves]
        gx, *gA = torch.autograd.grad((y * c).sum(), (x, *As), create_graph=True)
        (gx.square().sum() + sum(g.square().sum() for g in gA)).backward()
        results.append([x.grad] + [t.grad for pair in leaves for t in pair])
    for t1, t2 in zip(*results):
        assert torch.equal(t1, t2)


# --- the keep-mask drawn once per step (issue 28 item 3 on the multi-adapter kernels) -------------------------------
# The forward's S pass draws each row's keep-mask with its adapter's p and stores it as bits (lora_linear's layout,
# x's row order); the dX GEMM and the dA pass read those bits and run no Philox; the seed is not saved.


def _multi_bits_run(inputs, scales, idx, ps, dy, edit=None):
    """(uint8 tensors saved, grads of x, A, B) of lora_linear_multi after torch.manual_seed(5) (the seed of
    ``_multi_seed``), backward handed ``edit`` of a copy of each saved uint8 tensor (``edit`` None: the tensor
    itself): utils.saved_bits_and_grads."""
    x, weight, b, A, B = inputs

    def forward(x_, A_, B_):
        return lora_linear_multi(x_, weight, b, A_, B_, scales, idx, dropout_p=ps)

    return saved_bits_and_grads(forward, (x, A, B), dy, edit=edit)


def _multi_seed(device):
    """The dropout seed lora_linear_multi draws after torch.manual_seed(5) (its first draw)."""
    torch.manual_seed(5)
    return reference.draw_seed(device)


@pytest.mark.parametrize("order,n", [("sorted", 4), ("unsorted", 4), ("sorted", 1)])
def test_multi_backward_reads_the_saved_bits(order, n, monkeypatch, device):
    """The forward saves the keep-mask its S pass drew as bits (philox.pack_keep_mask's layout, in x's row order),
    bit for bit the torch mirror's mask (reference.multi_keep_mask: each row drawn with its adapter's p; rows of
    adapter -1 and of an adapter with p = 0 all kept; one adapter: lora_linear's mask, every row drawn with its p),
    and no seed. The dX GEMM and the dA pass read those bits: one flipped bit changes dX in exactly that element
    and dA only in that adapter's row of that column, to the float64 reference's values with the flipped mask;
    clearing the bits of the rows of adapter -1 changes nothing."""
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
    # K = 45: 6 bytes of bits per row, the last one partial, the last 32-wide tile partial; adapter 3: no rows
    M, K, N = 45, 45, 24
    ranks = (4, 8, 3, 2)[:n]
    ps = [0.3, 0.0, 0.5, 0.1][:n]
    scales = [1.5, -0.5, 2.0, 1.0][:n]
    inputs = multi_inputs((M,), K, N, ranks, torch.float32, device)
    idx = adapter_index((M,), n, device, empty=(3,))
    idx[:2] = torch.tensor([0, -1])   # at least one row of adapter 0 (p > 0) and one of -1
    dy = torch.randn(M, N, device=device)
    # a row of an adapter that drops (p > 0), and a column
    droppers = [a for a in range(n) if ps[a] > 0]
    rows = (idx[:, None] == torch.tensor(droppers, device=device)).any(1).nonzero().flatten()
    m0 = int(rows[torch.randint(len(rows), ())])
    k0 = int(torch.randint(K, ()))
    a0 = int(idx[m0])

    def flip(t):
        t[m0, k0 // 8] ^= 1 << (k0 % 8)

    def clear_base_rows(t):
        t[idx < 0] = 0

    saved, grads = _multi_bits_run(inputs, scales, idx, ps, dy)
    _, flipped = _multi_bits_run(inputs, scales, idx, ps, dy, edit=flip)
    _, cleared = _multi_bits_run(inputs, scales, idx, ps, dy, edit=clear_base_rows)

    seed = _multi_seed(device)
    if n == 1:
        mask = philox.keep_mask(seed, M, K, ps[0])
    else:
        mask = reference.multi_keep_mask(seed, inputs[0], idx, ps)
        assert mask[idx < 0].all() and mask[idx == 1].all()   # rows of -1 and of p = 0: all kept
    assert not mask[idx == a0].all()
    used = -(-K // 8)   # the mask's bytes per row; the row's padding bytes are never written nor read
    assert len(saved) == 1 and saved[0].shape == (M, philox.mask_row_bytes(K))
    assert torch.equal(saved[0][:, :used], philox.pack_keep_mask(mask)[:, :used])
    assert torch.equal(philox.unpack_keep_mask(saved[0], K), mask)

    (dx, dA, dB), (fdx, fdA, fdB) = grads, flipped
    assert (dx != fdx).nonzero().tolist() == [[m0, k0]]
    assert (dA != fdA).any(2).nonzero().tolist() == [[a0, k0]]
    assert torch.equal(dB, fdB)
    assert all(torch.equal(g, c) for g, c in zip(grads, cleared))

    mask[m0, k0] = ~mask[m0, k0]
    qs = [philox.quantize(p) for p in ps]

    def ref_op(*args, dropout_p):
        return reference.lora_linear_multi(*args, dropout_p=dropout_p, dropout_mask=mask)

    _, ref, _ = _run(inputs, scales, idx, qs, 5, dy, f=lambda t: t.double(), op=ref_op)
    _, mag, _ = _run(inputs, scales, idx, qs, 5, dy, f=lambda t: t.double().abs(), scale_f=abs, op=ref_op)
    R = max(ranks)
    assert_close(fdx, ref[0], mag[0], torch.float32, N + R, "multi dx, flipped bit", record=False)
    assert_close(fdA, ref[3], mag[3], torch.float32, M, "multi dA, flipped bit", record=False)


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_multi_backward_draws_no_philox(order, monkeypatch, device):
    """Dropout's Philox runs in the forward's S pass only: the backward kernels take no seed (nor drop
    probabilities) and, under the interpreter, the Philox words are drawn in forward and never in backward."""
    from lora_fast.kernels import multi, rng

    for kernel in (multi.multi_gemm_kernel, multi.multi_reduce_kernel):
        assert "SEED_ptr" not in kernel.arg_names and "DROP_P_ptr" not in kernel.arg_names
        assert "MASK_ptr" in kernel.arg_names
    if not multi._interpreted():
        pytest.skip("counting the Philox calls needs the interpreter (a compiled kernel inlines them)")
    monkeypatch.setenv("LORA_FAST_MULTI", "triton")
    monkeypatch.setenv("LORA_FAST_MULTI_ORDER", order)
    calls = []
    words = rng._philox_words

    def counted(*args):
        calls.append(1)
        return words(*args)

    monkeypatch.setattr(rng, "_philox_words", counted)
    inputs = multi_inputs((40,), 36, 20, (4, 2, 3), torch.float32, device)
    idx = adapter_index((40,), 3, device)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = lora_linear_multi(*leaves, [1.0, 2.0, -1.0], idx, dropout_p=[0.25, 0.0, 0.5])
    assert calls   # the S pass drew the mask
    calls.clear()
    y.square().sum().backward()
    assert not calls and all(t.grad is not None for t in leaves)
