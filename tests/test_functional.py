"""lora_linear (fused kernels; the interpreter on CPU) against the float64 reference."""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_fast import lora_linear, reference, select_backend
from tests.utils import check_op, make_inputs, reference_grads, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of x, in_features, out_features, rank): odd sizes beside round ones, 2-D, 3-D and 4-D x
SHAPES = [((37,), 123, 77, 1), ((2, 19), 123, 77, 3), ((64,), 64, 64, 16), ((2, 3, 11), 96, 40, 8),
          ((130,), 48, 96, 16)]


@pytest.fixture(autouse=True)
def _kernels_backend(device):
    assert select_backend(torch.empty(1, device=device)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(dtype, shape, bias, device):
    lead, K, N, R = shape
    inputs = make_inputs(lead, K, N, R, dtype, device, bias=bias)
    check_op(lora_linear, *inputs, scale=2.0)


@pytest.mark.parametrize("scale", [0.5, 16.0, -1.0, 0.0])
def test_scales(scale, device):
    check_op(lora_linear, *make_inputs((45,), 70, 50, 8, torch.float32, device), scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters_on_16bit_base(dtype, device):
    inputs = make_inputs((3, 21), 80, 72, 16, dtype, device, adapter_dtype=torch.float32)
    check_op(lora_linear, *inputs, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_x_and_transposed_weight(dtype, device):
    x_full, _, b, A, B = make_inputs((40,), 2 * 90, 60, 8, dtype, device)
    x = x_full[:, ::2]                                   # strided columns
    weight = torch.randn(90, 60, device=device).to(dtype).t()   # (60, 90) view of a (90, 60) tensor
    A = A[::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    check_op(lora_linear, x, weight, b, A, B, scale=1.5)


def test_empty_batch(device):
    x, weight, b, A, B = [t.requires_grad_() for t in make_inputs((0,), 32, 24, 4, torch.float32, device)]
    y = lora_linear(x, weight, b, A, B, 2.0)
    assert y.shape == (0, 24)
    y.sum().backward()
    for t in (x, weight, b, A, B):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_gradients_only_where_required(device):
    x, weight, b, A, B = make_inputs((33,), 40, 20, 4, torch.float32, device)
    A.requires_grad_()
    B.requires_grad_()
    y = lora_linear(x, weight, b, A, B, 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad is None and weight.grad is None and b.grad is None
    _, ref = reference_grads(x, weight, b, A, B, 1.0, dy)
    _, mag = reference_grads(x, weight, b, A, B, 1.0, dy, absolute=True)
    assert ((A.grad.double() - ref[3]).abs() <= tolerance(torch.float32, 33) * mag[3]).all()
    assert ((B.grad.double() - ref[4]).abs() <= tolerance(torch.float32, 33) * mag[4]).all()


def test_one_dimensional_x(device):
    x, weight, b, A, B = make_inputs((1,), 30, 20, 2, torch.float32, device)
    check_op(lora_linear, x[0], weight, b, A, B, scale=1.0)


def test_deterministic_gradients(device):
    inputs = make_inputs((70,), 64, 48, 8, torch.float32, device)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(0)
        lora_linear(*leaves, 2.0).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    if select_backend(inputs[0]) == "triton":
        # the narrow passes split this shape (K and M) and finish by last-ticket programs: every ticket counter is
        # back to zero for the next launch
        from lora_fast.kernels import ops

        assert ops.COUNTERS._buffers and all(int(b.abs().sum()) == 0 for b in ops.COUNTERS._buffers.values())


def test_tolerance_catches_a_wrong_answer(device):
    """The bound is tight enough to fail an op that is off by one percent of the LoRA term."""
    inputs = make_inputs((37,), 64, 48, 8, torch.float32, device)

    def wrong(x, w, b, A, B, scale):
        return lora_linear(x, w, b, A, B, scale * 1.01)

    with pytest.raises(AssertionError, match="forward"):
        check_op(wrong, *inputs, scale=2.0)
    inputs16 = make_inputs((37,), 64, 48, 8, torch.float16, device)

    def dropped_bias(x, w, b, A, B, scale):
        return lora_linear(x, w, None, A, B, scale) + 0 * b

    with pytest.raises(AssertionError, match="forward"):
        check_op(dropped_bias, *inputs16, scale=2.0, grads=False)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 70), K=st.integers(1, 90), N=st.integers(1, 90), R=st.integers(1, 20),
       bias=st.booleans())
def test_random_shapes(M, K, N, R, bias, device):
    check_op(lora_linear, *make_inputs((M,), K, N, R, torch.float32, device, bias=bias), scale=0.75)


def test_reference_backend_is_plain_pytorch(monkeypatch, device):
    monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    x, weight, b, A, B = make_inputs((5,), 8, 6, 2, torch.float32, device)
    assert select_backend(x) == "reference"
    assert torch.equal(lora_linear(x, weight, b, A, B, 2.0), reference.lora_linear(x, weight, b, A, B, 2.0))


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, b, A, B = make_inputs((5,), 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="LORA_FAST_BACKEND=triton"):
        lora_linear(x, weight, b, A, B, 2.0)
    with pytest.raises(RuntimeError, match="float64"):
        lora_linear(*[t.double() for t in (x, weight, b, A, B)], 2.0)


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LORA_FAST_BACKEND"):
        select_backend(torch.empty(1))


def test_reference_matches_book_arithmetic():
    x, weight, b, A, B = make_inputs((4, 5), 16, 12, 4, torch.float64, "cpu")
    expected = x @ weight.t() + b + 3.0 * (x @ A @ B)
    # two float64 evaluations in different orders: a few float64 roundings per term of the magnitude
    mag = x.abs() @ weight.abs().t() + b.abs() + 3.0 * (x.abs() @ A.abs() @ B.abs())
    err = (reference.lora_linear(x, weight, b, A, B, 3.0) - expected).abs()
    assert (err <= 2 * (16 + 4 + 4) * 2.0**-53 * mag).all()




def test_interpreter_set_after_triton_import_raises():
    """TRITON_INTERPRET=1 set after triton was imported: triton's own functions are GPU ones, and the interpreter
    would fail inside a kernel with "Cannot call @triton.jit'd outside ..."; the first call says what to do instead
    (found by a newcomer's trial). In a fresh process: this one imported triton with the variable set."""
    import os
    import subprocess
    import sys

    script = """
import os, torch, triton
os.environ["TRITON_INTERPRET"] = "1"
import lora_fast
x = torch.randn(4, 64)
layer = lora_fast.LinearWithLoRA(torch.nn.Linear(64, 32), 8, 16)
for call in (lambda: lora_fast.select_backend(x), lambda: layer(x)):
    try:
        call()
    except RuntimeError as err:
        assert "TRITON_INTERPRET=1 was set after triton was imported" in str(err), err
        assert "before anything imports triton" in str(err), err
    else:
        raise AssertionError("no error")
# what a CUDA tensor's first call meets (no GPU here): the kernels' import says the same
import sys
sys.modules.pop("lora_fast.kernels", None)
try:
    import lora_fast.kernels
except RuntimeError as err:
    assert "TRITON_INTERPRET=1 was set after triton was imported" in str(err), err
else:
    raise AssertionError("no error")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORA_FAST_BACKEND")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
