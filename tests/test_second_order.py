"""Second derivatives through the fused ops: Hessian-vector products and Hessians (torch.autograd.functional,
i.e. autograd.grad with create_graph=True) of lora_linear, its custom op (the torch.compile path),
lora_linear_4bit and dora_linear, on the Triton kernels (the interpreter on CPU) and on the reference path,
against the reference maths in float64. The backward used to be once-differentiable: these came back as zeros."""

import pytest
import torch
from torch.autograd.functional import hessian, hvp

from lora_fast import dora_linear, functional, lora_linear, reference
from tests.utils import assert_close

BACKENDS = ["triton", "reference"]
M, K, N, R = 6, 20, 9, 3


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


def _second_order(op, inputs, v, seed):
    """hvp of 0.5 * sum(op(*inputs)^2), the mask drawn under torch seed ``seed`` (so both sides drop alike)."""
    def f(*args):
        torch.manual_seed(seed)
        return 0.5 * (op(*args) ** 2).sum()

    return hvp(f, tuple(inputs), tuple(v))[1]


def _check(op, ref_op, inputs, dtype, reduction, name):
    """op's hvp in fp32 against ref_op's in float64; the magnitude bound is ref_op's hvp on |inputs|, |v| (every
    term of the hvp is a product of inputs and v with non-negative coefficients there)."""
    v = [torch.randn_like(t) for t in inputs]
    seed = int(torch.randint(0, 2**31, ()).item())
    got = _second_order(op, inputs, v, seed)
    truth = _second_order(lambda *a: ref_op(*a, absolute=False), [t.double() for t in inputs],
                          [t.double() for t in v], seed)
    mag = _second_order(lambda *a: ref_op(*a, absolute=True), [t.double().abs() for t in inputs],
                        [t.double().abs() for t in v], seed)
    for i, (g, t, m) in enumerate(zip(got, truth, mag)):
        assert g.abs().max() > 0, f"{name}: hvp part {i} is zero"
        assert_close(g, t, m, dtype, reduction, f"{name} hvp[{i}]", record=False)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_lora_linear_hvp(backend, path, dropout_p):
    if path == "custom_op" and backend == "reference":
        pytest.skip("the custom op is the kernels' torch.compile path")
    x = torch.randn(M, K)
    W = torch.randn(N, K) / K**0.5
    b = torch.randn(N)
    A = torch.randn(K, R) / K**0.5
    B = torch.randn(R, N) / R**0.5
    scale = 1.5
    p = dropout_p

    def op(x_, A_, B_):
        if path == "custom_op":
            seed = reference.draw_seed(x_.device) if p > 0 else None
            return functional._lora_linear_fwd(x_, W, b, A_, B_, scale, p, seed)[0]
        return lora_linear(x_, W, b, A_, B_, scale, dropout_p=p, training=True)

    def ref(x_, A_, B_, absolute):
        w, bb = (W.double().abs(), b.double().abs()) if absolute else (W.double(), b.double())
        return reference.lora_linear(x_, w, bb, A_, B_, scale, dropout_p=p, training=True)

    _check(op, ref, [x, A, B], torch.float32, 2 * (K + R + N + M), f"lora_linear {path}")


def test_lora_linear_hessian_of_adapters(backend):
    """The full Hessian in (A, B), W and x fixed: the A-B block is the op's own second derivative."""
    x, W = torch.randn(M, K), torch.randn(N, K) / K**0.5
    A, B = torch.randn(K, R) / K**0.5, torch.randn(R, N) / R**0.5
    c = torch.randn(M, N)

    def f(A_, B_, x_=x, W_=W, c_=c):
        return (torch.tanh(lora_linear(x_, W_, None, A_, B_, 0.7)) * c_).sum()

    got = hessian(f, (A, B))
    truth = hessian(lambda A_, B_: (torch.tanh(reference.lora_linear(x.double(), W.double(), None, A_, B_, 0.7))
                                    * c.double()).sum(), (A.double(), B.double()))
    for i in range(2):
        for j in range(2):
            t = truth[i][j]
            assert got[i][j].abs().max() > 0, f"Hessian block ({i}, {j}) is zero"
            err = (got[i][j].double() - t).abs().max().item()
            # fp32 against float64 through tanh: a few hundred fp32 roundoffs of the block's largest entry
            assert err <= 1e-4 * t.abs().max().item(), f"Hessian block ({i}, {j}): error {err:.3e}"


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_dora_linear_hvp(backend, dropout_p):
    x = torch.randn(M, K)
    W = torch.randn(N, K) / K**0.5
    b = torch.randn(N)
    A = torch.randn(K, R) / K**0.5
    B = torch.randn(R, N) / R**0.5
    m = torch.rand(N) + 0.5
    scale = 1.5

    def op(x_, A_, B_, m_):
        return dora_linear(x_, W, b, A_, B_, m_, scale, dropout_p=dropout_p, training=True)

    def ref(x_, A_, B_, m_, absolute):
        if absolute:
            # |terms|: g = m / norm with the norm of the signed weights (the same positive factor both sides)
            norm = reference.dora_weight_norm(W.double(), A.double(), B.double(), scale)
            g = m_ / norm
            mask = _mask_now(x_, dropout_p)
            xd = x_ if mask is None else x_ * mask / (1 - dropout_p)
            base = x_ @ W.double().abs().t()
            lora = scale * (xd @ A_ @ B_)
            extra = (xd @ W.double().abs().t()) * (g + 1) if mask is not None else base * (g + 1)
            return base + b.double().abs() + extra + g * lora
        return reference.dora_linear(x_, W.double(), b.double(), A_, B_, m_, scale, dropout_p=dropout_p,
                                     training=True)

    _check(op, ref, [x, A, B, m], torch.float32, 2 * (K + R + N + M), "dora_linear")


def _mask_now(x, p):
    """The keep-mask the op draws next from torch's generator (as reference._dropped draws it)."""
    if p <= 0:
        return None
    from lora_fast import philox
    seed = reference.draw_seed(x.device)
    return philox.keep_mask(seed, x.shape[0], x.shape[1], p).to(x.dtype)


def _quantized_inputs():
    """A 4-bit (nf4) weight (N, 64), its dequantization by the layout's definition (reference_4bit: no
    bitsandbytes CPU kernel involved) in fp32, and x, b, A, B for it."""
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="the 4-bit path needs bitsandbytes")
    from lora_fast import reference_4bit

    qweight, state = bnbf.quantize_4bit(torch.randn(N, 64), blocksize=64, quant_type="nf4")
    Wd = reference_4bit.dequantize(qweight, state).to(torch.float32)
    return qweight, state, Wd, torch.randn(M, 64), torch.randn(N), torch.randn(64, R) / 8, torch.randn(R, N) / R**0.5


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_linear_4bit_hvp(backend, dropout_p):
    from lora_fast.qlora import lora_linear_4bit

    qweight, state, Wd, x, b, A, B = _quantized_inputs()
    scale = 1.5

    def op(x_, A_, B_):
        return lora_linear_4bit(x_, qweight, state, b, A_, B_, scale, dropout_p=dropout_p, training=True)

    def ref(x_, A_, B_, absolute):
        w, bb = (Wd.double().abs(), b.double().abs()) if absolute else (Wd.double(), b.double())
        return reference.lora_linear(x_, w, bb, A_, B_, scale, dropout_p=dropout_p, training=True)

    _check(op, ref, [x, A, B], torch.float32, 2 * (64 + R + N + M), "lora_linear_4bit")


def test_first_order_backward_still_uses_the_kernels(monkeypatch):
    """Without create_graph the backward is the kernels' (the graph path is not taken)."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    called = []
    monkeypatch.setattr(functional, "_backward_graph", lambda *a: called.append(1))
    x = torch.randn(M, K, requires_grad=True)
    A = torch.randn(K, R, requires_grad=True)
    B = torch.randn(R, N, requires_grad=True)
    lora_linear(x, torch.randn(N, K), None, A, B, 1.0).sum().backward()
    assert not called and x.grad is not None and A.grad is not None and B.grad is not None


def test_dora_linear_4bit_hvp(backend):
    """QDoRA (dora_linear_4bit) too: its backward is differentiable when a graph is recorded."""
    from lora_fast import dora_linear_4bit

    qweight, state, Wd, x, b, A, B = _quantized_inputs()
    m = torch.rand(N) + 0.5
    scale = 1.5

    def op(x_, A_, B_, m_):
        return dora_linear_4bit(x_, qweight, state, b, A_, B_, m_, scale)

    def ref(x_, A_, B_, m_, absolute):
        if absolute:
            g = m_ / reference.dora_weight_norm(Wd.double(), A.double(), B.double(), scale)
            return (x_ @ Wd.double().abs().t()) * (g + 1) + b.double().abs() + g * scale * (x_ @ A_ @ B_)
        return reference.dora_linear(x_, Wd.double(), b.double(), A_, B_, m_, scale)

    _check(op, ref, [x, A, B, m], torch.float32, 2 * (64 + R + N + M), "dora_linear_4bit")
