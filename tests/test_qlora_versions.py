"""A 4-bit weight changed in place between forward and backward: the kernels read the packed weight again in
backward, so they raise as autograd raises for a changed saved tensor (version counters); the reference path
saved the dequantized weight and gives the gradients of the weight the forward used, bit for bit."""

import pytest
import torch

from lora_fast.qlora import lora_linear_4bit

bnbf = pytest.importorskip("bitsandbytes.functional", reason="the 4-bit paths need bitsandbytes")

CHANGES = {
    "qweight": lambda q, s: q.bitwise_xor_(0x11),
    "absmax": lambda q, s: s.absmax.add_(1 if s.absmax.dtype == torch.uint8 else 0.5),
    "state2.absmax": lambda q, s: s.state2.absmax.mul_(2),
    "state2.code": lambda q, s: s.state2.code.mul_(2),
    "offset": lambda q, s: s.offset.add_(0.25),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_weight_changed_between_forward_and_backward(change, backend, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    nested = change in ("state2.absmax", "state2.code", "offset")
    qweight, state = bnbf.quantize_4bit(torch.randn(12, 64), blocksize=64, quant_type="nf4",
                                        compress_statistics=nested)
    x = torch.randn(5, 64)
    A, B = torch.randn(64, 2) / 8, torch.randn(2, 12)

    def grads(modify):
        xs = x.clone().requires_grad_()
        y = lora_linear_4bit(xs, qweight, state, None, A, B, 2.0)
        dy = torch.ones_like(y)
        if not modify:
            y.backward(dy)
            return xs.grad
        saved = [t.clone() for t in (qweight, state.absmax)] + \
            ([state.state2.absmax.clone(), state.state2.code.clone(), state.offset.clone()] if nested else [])
        with torch.no_grad():
            CHANGES[change](qweight, state)
        try:
            y.backward(dy)
            return xs.grad
        finally:
            with torch.no_grad():   # put the weight back for the other runs
                for t, old in zip([qweight, state.absmax] + ([state.state2.absmax, state.state2.code, state.offset]
                                                             if nested else []), saved):
                    t.copy_(old)

    before = grads(False)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*4-bit weight"):
            grads(True)
    else:
        assert torch.equal(grads(True), before)


def test_nested_state_without_offset_names_the_field():
    """A nested quant_state with offset=None used to fail with "Could not infer dtype of NoneType"."""
    from lora_fast.qlora import Packed4bit

    qweight, state = bnbf.quantize_4bit(torch.randn(12, 64), blocksize=64, quant_type="nf4", compress_statistics=True)
    state.offset = None
    with pytest.raises(ValueError, match=r"quant_state: offset: expected .*got None"):
        Packed4bit.from_bitsandbytes(qweight, state)
    state.offset = torch.zeros(2)
    with pytest.raises(ValueError, match=r"quant_state: offset: expected one value.*\(2,\)"):
        Packed4bit.from_bitsandbytes(qweight, state)


def test_qdora_weight_changed_between_forward_and_backward():
    """dora_linear_4bit reads the packed weight again in backward too: an in-place change in between raises."""
    from lora_fast import dora_linear_4bit

    qweight, state = bnbf.quantize_4bit(torch.randn(12, 64), blocksize=64, quant_type="nf4")
    x = torch.randn(5, 64, requires_grad=True)
    A, B = torch.randn(64, 2) / 8, torch.randn(2, 12, requires_grad=True)
    m = torch.rand(12) + 0.5
    y = dora_linear_4bit(x, qweight, state, None, A, B, m, 2.0)
    with torch.no_grad():
        state.absmax.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*4-bit weight"):
        y.sum().backward()
