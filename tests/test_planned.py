"""Planned calls (functional._OpPlan, kernels/plan.py): a call that repeats an earlier call's metadata skips the checks
and the launchers' decisions. What must not change with it: the errors bad input gets, the switches
(LORA_FAST_BACKEND, autocast, choice.clear()), and the results. That the replayed launches are the launchers' own is
tests/test_host_path.py's (it needs compiled kernels: a stand-in driver without the interpreter)."""

import pytest
import torch

from lora_fast import functional, lora_linear, reference
from lora_fast.kernels import choice
from tests.utils import assert_close, linear_magnitude


def _inputs(device, dtype=torch.float32):
    K, N, R = 24, 20, 4
    x = torch.randn(2, 3, K, device=device, dtype=dtype)
    weight = torch.randn(N, K, device=device, dtype=dtype)
    bias = torch.randn(N, device=device, dtype=dtype)
    A = torch.randn(K, R, device=device).requires_grad_()
    B = torch.randn(R, N, device=device).requires_grad_()
    return x, weight, bias, A, B


def _key(x, weight, bias, A, B, scale, p=0.0, training=True):
    return functional._plan_key(x, weight, bias, A, B, scale, p, training, False)


@pytest.fixture
def planned(device):
    """Inputs whose metadata has a plan: two calls on the Triton backend (interpreted on CPU)."""
    if functional.select_backend(torch.empty(1, device=device)) != "triton":
        pytest.skip("the Triton backend is not available here (no GPU, TRITON_INTERPRET unset)")
    choice.clear()
    inputs = _inputs(device)
    for _ in range(2):
        lora_linear(*inputs, 2.0)
    assert _key(*inputs, 2.0) in functional._PLANS
    return inputs


def test_planned_calls_match_float64(planned):
    x, weight, bias, A, B = planned
    for _ in range(3):   # fresh values, the same metadata: every call after the first two is planned
        x = torch.randn_like(x)
        A.data.normal_()
        B.data.normal_()
        y = lora_linear(x, weight, bias, A, B, 2.0)
        want = reference.lora_linear(x.double(), weight.double(), bias.double(), A.double(), B.double(), 2.0)
        mag = linear_magnitude(x.double(), weight.double(), bias.double()) \
            + 2.0 * (x.double().abs() @ A.double().abs()) @ B.double().abs()
        assert_close(y.detach(), want.detach(), mag.detach(), torch.float32, x.shape[-1] + A.shape[1], "planned y")
        dy = torch.randn_like(y)
        y.backward(dy)
        dA_want = 2.0 * x.double().reshape(-1, x.shape[-1]).t() @ (dy.double().reshape(-1, dy.shape[-1])
                                                                    @ B.double().t())
        dA_mag = 2.0 * x.double().abs().reshape(-1, x.shape[-1]).t() @ (dy.double().abs().reshape(-1, dy.shape[-1])
                                                                        @ B.double().abs().t())
        assert_close(A.grad, dA_want, dA_mag, torch.float32, x.numel() // x.shape[-1] + dy.shape[-1], "planned dA")
        A.grad = B.grad = None


def test_planned_calls_keep_the_errors(planned):
    x, weight, bias, A, B = planned
    with pytest.raises(TypeError, match="training"):
        lora_linear(x, weight, bias, A, B, 2.0, training=1)
    with pytest.raises(TypeError, match="dropout_p"):
        lora_linear(x, weight, bias, A, B, 2.0, dropout_p=False)
    with pytest.raises(ValueError, match="scale"):
        lora_linear(x, weight, bias, A, B, float("inf"))
    with pytest.raises(ValueError, match="B"):
        lora_linear(x, weight, bias, A, B[:, :-1], 2.0)
    with pytest.raises(TypeError, match="weight"):
        lora_linear(x, weight.double(), bias, A, B, 2.0)


def test_planned_calls_follow_the_switches(planned, monkeypatch):
    x, weight, bias, A, B = planned
    calls = []
    original = reference.lora_linear
    monkeypatch.setattr(reference, "lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    lora_linear(x, weight, bias, A, B, 2.0)
    assert calls == [1]   # the forced backend, not the plan
    monkeypatch.delenv("LORA_FAST_BACKEND")
    lora_linear(x, weight, bias, A, B, 2.0)
    assert calls == [1]   # planned again
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = lora_linear(x, weight, bias, A, B, 2.0)
    assert y.dtype == torch.bfloat16   # autocast's cast, as nn.Linear: the fp32 plan is not taken
    choice.clear()   # a new LORA_FAST_GEMM is read after clear(): plans made under the old one are forgotten
    assert not functional._PLANS


def test_planned_calls_take_an_escaped_functorch_tensor(planned):
    # a tensor that outlived its torch.func transform is a wrapper without storage (no data pointer to key a plan
    # on); autograd.Function.apply unwraps it, and the call computes what the plain tensor gives (the same kernels)
    x, weight, bias, A, B = planned
    leaked = []

    def f(x_):
        leaked.append(x_)
        return lora_linear(x_, weight, bias, A.detach(), B.detach(), 2.0).sum()

    torch.func.grad(f)(x.clone())
    y = lora_linear(leaked[0], weight, bias, A, B, 2.0)
    assert torch.equal(y, lora_linear(x, weight, bias, A, B, 2.0))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_stored_factors_match_their_views(planned, p):
    # lora_linear_stored (patch_peft's call: PEFT's lora_A.weight (R, K), lora_B.weight (N, R)) computes what
    # lora_linear computes on the transposed views, bit for bit (the kernels read the same memory), on each of its
    # paths: the unplanned first call, the recording calls, the launchers' path after them; and gives the factors'
    # gradients in their own layout (autograd's accumulation then keeps them, no copy)
    x, weight, bias, A, B = planned
    lora_A = A.detach().t().contiguous().requires_grad_()
    lora_B = B.detach().t().contiguous().requires_grad_()
    views = (lora_A.detach().t().requires_grad_(), lora_B.detach().t().requires_grad_())
    arrived = []   # the data pointers of the gradients autograd's accumulation receives
    lora_A.register_hook(lambda g: arrived.append(g.data_ptr()))
    lora_B.register_hook(lambda g: arrived.append(g.data_ptr()))
    for _ in range(5):
        x = torch.randn_like(x).requires_grad_()
        dy = torch.randn(*x.shape[:-1], weight.shape[0], device=x.device)
        torch.manual_seed(7)
        y = functional.lora_linear_stored(x, weight, bias, lora_A, lora_B, 2.0, dropout_p=p)
        y.backward(dy)
        got = (y.detach(), x.grad, lora_A.grad, lora_B.grad)
        x.grad = None
        torch.manual_seed(7)
        want_y = lora_linear(x, weight, bias, *views, 2.0, dropout_p=p)
        want_y.backward(dy)
        want = (want_y.detach(), x.grad, views[0].grad.t(), views[1].grad.t())
        for name, g, w in zip(("y", "dx", "lora_A grad", "lora_B grad"), got, want):
            assert torch.equal(g, w), name
        # kept as they arrived (the parameters' layout): no copy into it
        assert sorted(arrived) == sorted([lora_A.grad.data_ptr(), lora_B.grad.data_ptr()])
        arrived.clear()
        lora_A.grad = lora_B.grad = views[0].grad = views[1].grad = x.grad = None
    with pytest.raises(ValueError, match="lora_A"):
        functional.lora_linear_stored(x, weight, bias, lora_A[0], lora_B, 2.0)


def test_stored_factors_second_order(planned):
    # autograd recording the backward (create_graph=True) through lora_linear_stored's plan: the reference maths on
    # the transposed views, differentiable again; the same double-backward gradients as lora_linear on the views
    x, weight, bias, A, B = planned
    lora_A = A.detach().t().contiguous().requires_grad_()
    lora_B = B.detach().t().contiguous().requires_grad_()
    results = []
    for fn, factors in ((functional.lora_linear_stored, (lora_A, lora_B)),
                        (lora_linear, (lora_A.t(), lora_B.t()))):
        for _ in range(2):   # the first call makes the plan, the second is planned
            y = fn(x, weight, bias, *factors, 2.0)
        (gA,) = torch.autograd.grad(y.square().sum(), lora_A, create_graph=True)
        (ggB,) = torch.autograd.grad(gA.square().sum(), lora_B)
        results.append((gA.detach(), ggB))
    (gA, ggB), (want_gA, want_ggB) = results
    assert gA.shape == lora_A.shape and ggB.shape == lora_B.shape
    assert torch.equal(gA, want_gA) and torch.equal(ggB, want_ggB)


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_transposed_factors_get_gradients_in_their_layout(planned, op):
    # A and B as transposed views of contiguous parameters (PEFT's lora_A.weight.t(), lora_B.weight.t(): what
    # patch_peft's DoRA and 4-bit layers pass): the kernels write dA / dB in the views' layout, so the gradients that
    # reach the parameters after the views' backward are contiguous and autograd's accumulation keeps them (no copy)
    from lora_fast import dora_linear

    x, weight, bias, A, B = planned
    lora_A = A.detach().t().contiguous().requires_grad_()
    lora_B = B.detach().t().contiguous().requires_grad_()
    magnitude = weight.norm(dim=1).detach()
    arrived = []
    lora_A.register_hook(lambda g: arrived.append(g.data_ptr()))
    lora_B.register_hook(lambda g: arrived.append(g.data_ptr()))
    for _ in range(5):   # the first call, the plan's recording calls, the launchers' path after them
        args = (x, weight, bias, lora_A.t(), lora_B.t())
        y = lora_linear(*args, 2.0) if op == "lora_linear" else dora_linear(*args, magnitude, 2.0)
        y.sum().backward()
        assert sorted(arrived) == sorted([lora_A.grad.data_ptr(), lora_B.grad.data_ptr()])
        assert lora_A.grad.is_contiguous() and lora_B.grad.is_contiguous()
        arrived.clear()
        lora_A.grad = lora_B.grad = None


def test_stored_factors_wrong_shapes_name_the_argument(device):
    # lora_linear_stored's factors are (R, K) / (N, R): a wrong one is named with the shape the caller passed, not
    # its transposed view's; x that disagrees with weight is x's error, whatever the factors
    x, weight, bias, A, B = _inputs(device)
    lora_A, lora_B = A.detach().t().contiguous(), B.detach().t().contiguous()   # (4, 24), (20, 4)
    cases = [(lora_A[:, :-1], lora_B, r"lora_A: expected shape \(rank >= 1, in_features=24\), got \(4, 23\)"),
             (lora_A[:0], lora_B[:, :0], r"lora_A: expected shape \(rank >= 1, in_features=24\), got \(0, 24\)"),
             (lora_A, lora_B[:-1], r"lora_B: expected shape \(out_features=20, rank=4\), got \(19, 4\)"),
             (lora_A[:-1], lora_B, r"lora_B: expected shape \(out_features=20, rank=3\), got \(20, 4\)"),
             (lora_A, lora_B.t(), r"lora_B: expected shape \(out_features=20, rank=4\), got \(4, 20\)")]
    for a, b, message in cases:
        with pytest.raises(ValueError, match=message):
            functional.lora_linear_stored(x, weight, bias, a, b, 2.0)
    with pytest.raises(ValueError, match="x: expected last dim in_features=24"):
        functional.lora_linear_stored(x[..., :-1], weight, bias, lora_A[:, :-1], lora_B, 2.0)
