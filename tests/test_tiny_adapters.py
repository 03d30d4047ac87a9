"""fp32 adapters on a 16-bit base after a few small optimizer steps (|B| ~ 5e-7: fp16's subnormals; 1e-9: below
them): the narrow pass dS = dY B^T took B rounded to fp16, so dA was 3% wrong, or exactly zero. Against float64
on both backends, for lora_linear (every gradient, tests/utils.py's tolerances), lora_linear_4bit and
dora_linear (dA, max-normalised)."""

import pytest
import torch

from lora_fast import dora_linear, lora_linear, reference
from tests.utils import check_op, make_inputs, tolerance

SIZES = [5e-7, 1e-9]


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
def test_lora_linear(size, dtype, backend):
    inputs = make_inputs((33,), 64, 40, 4, dtype, "cpu", adapter_dtype=torch.float32, lora_weight=size)
    check_op(lora_linear, *inputs, scale=2.0)


def _dA_error(op, ref, x, A, B, dy):
    """max |dA - dA_64| / max |dA_64| of ``op`` (fp16 x, fp32 adapters) against ``ref`` on float64 inputs."""
    As = A.clone().requires_grad_()
    op(x, As, B).backward(dy)
    A64 = A.double().requires_grad_()
    ref(x.double(), A64, B.double()).backward(dy.double())
    assert A64.grad.abs().max() > 0
    return ((As.grad.double() - A64.grad).abs().max() / A64.grad.abs().max()).item()


@pytest.mark.parametrize("size", SIZES)
def test_dora_linear(size, backend):
    x, W, b, A, B = make_inputs((33,), 64, 40, 4, torch.float16, "cpu", adapter_dtype=torch.float32,
                                lora_weight=size)
    m = reference.dora_weight_norm(W, A, B, 2.0) * (1 + 0.3 * torch.randn(40))
    dy = torch.randn(33, 40).half()
    err = _dA_error(lambda x_, A_, B_: dora_linear(x_, W, b, A_, B_, m, 2.0),
                    lambda x_, A_, B_: reference.dora_linear(x_, W.double(), b.double(), A_, B_, m.double(), 2.0),
                    x, A, B, dy)
    assert err <= tolerance(torch.float16, 64 + 40), f"dA relative error {err:.3e}"


@pytest.mark.parametrize("size", SIZES)
def test_lora_linear_4bit(size, backend):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="the 4-bit path needs bitsandbytes")
    from lora_fast.qlora import lora_linear_4bit
    from lora_fast.reference_4bit import dequantize as _deq_by_definition

    qweight, state = bnbf.quantize_4bit(torch.randn(40, 64).half(), blocksize=64, quant_type="nf4")
    Wd = _deq_by_definition(qweight, state).double()
    x = torch.randn(33, 64).half()
    A = torch.randn(64, 4) / 8
    B = torch.randn(4, 40) * size
    dy = torch.randn(33, 40).half()
    err = _dA_error(lambda x_, A_, B_: lora_linear_4bit(x_, qweight, state, None, A_, B_, 2.0),
                    lambda x_, A_, B_: reference.lora_linear(x_, Wd, None, A_, B_, 2.0), x, A, B, dy)
    assert err <= tolerance(torch.float16, 64 + 40), f"dA relative error {err:.3e}"
