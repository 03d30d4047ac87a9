"""No layer is skipped in silence: nn.MultiheadAttention's out_proj named in target_modules raises (its forward
never calls out_proj), left unwrapped by None / "all-linear" with a warning; a Linear registered under two names
of one parent gets one wrapper in both places (wrapping, load_lora, load_peft_adapter). Outputs on both
backends against float64."""

import copy

import pytest
import torch
from torch import nn

from lora_fast import LinearWithLoRA, load_lora, replace_linear_with_lora, save_lora
from tests.utils import assert_close

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


def _encoder():
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)


@pytest.mark.parametrize("targets", [["out_proj"], ["linear1", "out_proj"], r".*out_proj"])
def test_out_proj_of_multihead_attention_named_raises(targets):
    model = _encoder()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"self_attn\.out_proj \(in self_attn \(MultiheadAttention\)\).*never run"):
        replace_linear_with_lora(model, 2, 1.0, target_modules=targets)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_out_proj_left_unwrapped_is_reported(targets, backend):
    model = nn.Sequential(_encoder(), nn.Linear(8, 4))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match=r"0\.self_attn\.out_proj.*without calling out_proj"):
        replace_linear_with_lora(model, 2, 1.0, target_modules=targets)
    assert isinstance(model[0].linear1, LinearWithLoRA) and not isinstance(model[0].self_attn.out_proj, LinearWithLoRA)
    with torch.no_grad():
        after = model(x)
    # B = 0: the same function (within fp32 rounding on the kernels, see docs/faithfulness.md)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())


class _Twice(nn.Module):
    """One Linear registered under two names of one parent, applied twice."""

    def __init__(self):
        super().__init__()
        self.a = self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _lora_truth(layer, x, x_mag=None):
    """float64 value and magnitude of a LinearWithLoRA's output for x; ``x_mag`` (default |x|) the magnitude of
    x's own error, carried through the layer (|W| + |scale| |A||B|)."""
    w, b = layer.linear.weight.double(), layer.linear.bias.double()
    A, B = layer.lora.A.double(), layer.lora.B.double()
    y = x @ w.t() + b + layer.lora.scale * (x @ A @ B)
    x_mag = x.abs() if x_mag is None else x_mag
    mag = x_mag @ w.abs().t() + b.abs() + abs(layer.lora.scale) * (x_mag @ A.abs() @ B.abs())
    return y, mag


def _check_twice(model, x):
    assert model.a is model.b and isinstance(model.a, LinearWithLoRA)
    assert len([m for m in model.modules() if isinstance(m, LinearWithLoRA)]) == 1
    with torch.no_grad():
        h, h_mag = _lora_truth(model.a, x.double())
        t = torch.tanh(h)
        # tanh is 1-Lipschitz: its input's error (bounded by h_mag) reaches the second layer, which carries it
        # with |W| + |scale| |A||B|, beside the second layer's own rounding (bounded by its magnitude on |t|)
        y, mag = _lora_truth(model.a, t, t.abs() + h_mag)
        assert_close(model(x), y, mag, torch.float32, 2 * (6 + 2), "twice", record=False)


def test_linear_registered_twice_in_one_parent(backend):
    model = replace_linear_with_lora(_Twice(), 2, 1.5)
    with torch.no_grad():
        model.a.lora.B.normal_()
    _check_twice(model, torch.randn(5, 6))


def test_load_lora_wraps_every_place(backend, tmp_path):
    source = replace_linear_with_lora(_Twice().requires_grad_(False), 2, 1.5)
    with torch.no_grad():
        source.a.lora.B.normal_()
    save_lora(source, tmp_path / "a.safetensors")
    model = _Twice()
    model.a.load_state_dict(source.a.linear.state_dict())
    load_lora(model, tmp_path / "a.safetensors")
    _check_twice(model, torch.randn(5, 6))


def test_load_peft_adapter_wraps_every_place(backend, tmp_path):
    peft = pytest.importorskip("peft", reason="load_peft_adapter needs peft")
    from lora_fast import load_peft_adapter

    base = _Twice()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    model = load_peft_adapter(copy.deepcopy(base), tmp_path)
    _check_twice(model, torch.randn(5, 6))


# --- PEFT coverage (issue 25 item 7) -------------------------------------------------------------------------


def test_patch_peft_fuses_plain_lora_linear_around_linear4bit(backend, monkeypatch):
    """A hand-built model with a bitsandbytes Linear4bit: PEFT wraps it in its plain lora.Linear (no quantization
    config); patch_peft fuses it (lora_linear_4bit), forward and backward against float64."""
    peft = pytest.importorskip("peft", reason="patch_peft needs peft")
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit base needs bitsandbytes")
    from lora_fast import patch_peft, peft_interop
    from lora_fast.reference_4bit import dequantize as _deq_by_definition

    plain = nn.Linear(64, 24)
    base = bnb.nn.Linear4bit(64, 24, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
    base.load_state_dict(plain.state_dict())
    base = base.to("cpu")   # bitsandbytes quantizes on .to(device)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert type(layer) is peft.tuners.lora.layer.Linear
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    report = patch_peft(model)
    assert report.patched == ["base_model.model.0"] and not report.skipped
    calls = []
    fused = peft_interop.forward_4bit
    monkeypatch.setattr(peft_interop, "forward_4bit", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x = torch.randn(5, 64, requires_grad=True)
    y = model(x)
    assert calls, "the layer ran PEFT's forward"
    dy = torch.randn_like(y)
    y.backward(dy)
    W = _deq_by_definition(base.weight, base.weight.quant_state).double()
    A = layer.lora_A["default"].weight.detach().double().t().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().t().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    s = layer.scaling["default"]
    truth = x64 @ W.t() + base.bias.double() + s * (x64 @ A @ B)
    truth.backward(dy.double())
    mag = x64.detach().abs() @ W.abs().t() + base.bias.double().abs() + s * (x64.detach().abs() @ A.detach().abs()
                                                                             @ B.detach().abs())
    assert_close(y.detach(), truth.detach(), mag, torch.float32, 64 + 3, "peft 4-bit", record=False)
    got = layer.lora_B["default"].weight.grad.t().double()
    assert (got - B.grad).abs().max() <= 1e-5 * B.grad.abs().max()
    got = layer.lora_A["default"].weight.grad.t().double()
    assert (got - A.grad).abs().max() <= 1e-5 * A.grad.abs().max()


class _QV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def test_layers_peft_creates_after_patch_peft(backend, monkeypatch):
    """An adapter added to a patched layer is fused at call time; a layer PEFT creates later runs PEFT's forward
    until patch_peft is called again, which then patches it (as the docstring and PatchReport say)."""
    peft = pytest.importorskip("peft", reason="patch_peft needs peft")
    from lora_fast import patch_peft, peft_interop

    model = peft.get_peft_model(_QV(), peft.LoraConfig(r=2, target_modules=["q"]))
    assert patch_peft(model).patched == ["base_model.model.q"]
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q", "v"]))
    model.set_adapter("second")
    calls = []
    fused = peft_interop.lora_linear_stored
    monkeypatch.setattr(peft_interop, "lora_linear_stored", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x = torch.randn(3, 8)
    model(x)
    assert len(calls) == 1   # q (patched, its new adapter fused at call time); v is new, on PEFT's forward
    report = patch_peft(model)
    assert sorted(report.patched) == ["base_model.model.q", "base_model.model.v"]
    calls.clear()
    model(x)
    assert len(calls) == 2
