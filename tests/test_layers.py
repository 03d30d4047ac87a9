"""Drop-in property: the book's appendix-E classes (written here as the reference) and ours agree."""

import math

import pytest
import torch
from torch import nn

from lora_fast import LinearWithLoRA, LoRALayer, lora_scale, replace_linear_with_lora
from tests.utils import assert_close


# --- the book's code ("Build a Large Language Model (From Scratch)", appendix E), as printed -------------
class BookLoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class BookLinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = BookLoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def book_replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, BookLinearWithLoRA(module, rank, alpha))
        else:
            book_replace_linear_with_lora(module, rank, alpha)
# -----------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.att = nn.ModuleDict(dict(W_query=nn.Linear(d, d, bias=False), out_proj=nn.Linear(d, d)))
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.att["out_proj"](torch.tanh(self.att["W_query"](x)))
        return x + self.ff(x)


def tiny_model(d=24, classes=3):
    return nn.Sequential(Block(d), Block(d), nn.LayerNorm(d), nn.Linear(d, classes))


def test_same_outputs_and_gradients_as_the_book(device):
    torch.manual_seed(1)
    book = tiny_model()
    for p in book.parameters():
        p.requires_grad = False
    book_replace_linear_with_lora(book, rank=4, alpha=8)
    # train B away from zero so the LoRA path matters
    with torch.no_grad():
        for m in book.modules():
            if isinstance(m, BookLoRALayer):
                m.B.normal_(0, 0.1)
    ours = tiny_model()
    for p in ours.parameters():
        p.requires_grad = False
    replace_linear_with_lora(ours, rank=4, alpha=8)
    assert ours.state_dict().keys() == book.state_dict().keys()
    ours.load_state_dict(book.state_dict())
    book.double().to(device)
    ours.to(device)

    x = torch.randn(2, 9, 24, device=device)
    out_book = book(x.double())
    out_ours = ours(x)
    assert_close(out_ours, out_book.detach(), out_book.detach().abs().max().expand_as(out_book), torch.float32,
                 200, "model output", record=False)
    out_book.square().sum().backward()
    out_ours.square().sum().backward()
    book_params = dict(book.named_parameters())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 9 and all(n.endswith(("lora.A", "lora.B")) for n in trained)
    for name in trained:
        g_ours, g_book = dict(ours.named_parameters())[name].grad, book_params[name].grad
        assert_close(g_ours, g_book, g_book.abs().max().expand_as(g_book), torch.float32, 200, name, record=False)


def test_initialisation_matches_the_book():
    torch.manual_seed(3)
    book = BookLinearWithLoRA(nn.Linear(10, 7), 3, 2.0)
    torch.manual_seed(3)
    ours = LinearWithLoRA(nn.Linear(10, 7), 3, 2.0)
    assert torch.equal(book.lora.A, ours.lora.A) and torch.equal(book.lora.B, ours.lora.B)
    assert not ours.lora.B.any()
    assert list(ours.state_dict()) == ["linear.weight", "linear.bias", "lora.A", "lora.B"]
    assert ours.lora.A.shape == (10, 3) and ours.lora.B.shape == (3, 7)
    assert ours.lora.alpha == 2.0 and ours.lora.scale == 2.0


def test_book_checkpoint_loads_both_ways():
    book = BookLinearWithLoRA(nn.Linear(10, 7), 3, 2.0)
    ours = LinearWithLoRA(nn.Linear(10, 7), 3, 2.0)
    ours.load_state_dict(book.state_dict())
    book.load_state_dict(ours.state_dict())
    no_bias = LinearWithLoRA(nn.Linear(10, 7, bias=False), 3, 2.0)
    assert list(no_bias.state_dict()) == ["linear.weight", "lora.A", "lora.B"]


@pytest.mark.parametrize("scaling,expected", [("alpha", 16.0), ("alpha/rank", 2.0), ("rslora", 16 / math.sqrt(8))])
def test_scaling_modes(scaling, expected):
    assert lora_scale(16, 8, scaling) == expected
    assert LoRALayer(4, 4, 8, 16, scaling=scaling).scale == expected


def test_lora_layer_forward_is_the_book_formula():
    layer = LoRALayer(6, 5, 2, 3.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 6)
    truth = 3.0 * (x.double() @ layer.A.double() @ layer.B.double())
    mag = 3.0 * (x.double().abs() @ layer.A.double().abs() @ layer.B.double().abs())
    assert_close(layer(x).detach(), truth, mag, torch.float32, 6 + 2, "LoRALayer forward", record=False)


def _counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def test_replace_twice_equals_once_and_counts():
    model = tiny_model(d=24, classes=3)
    for p in model.parameters():
        p.requires_grad = False
    frozen_total = _counts(model)[1]
    assert replace_linear_with_lora(model, rank=4, alpha=4) is model
    once = {k: v.clone() for k, v in model.state_dict().items()}
    replace_linear_with_lora(model, rank=4, alpha=4)
    assert model.state_dict().keys() == once.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
    assert not any(isinstance(m.linear, LinearWithLoRA) for m in model.modules() if isinstance(m, LinearWithLoRA))
    # per block: W_query, out_proj (24x24): 2 * 4 * (24 + 24); ff: 4 * (24 + 96) twice; head 4 * (24 + 3)
    expected = 2 * (2 * 4 * 48 + 2 * 4 * 120) + 4 * 27
    assert _counts(model) == (expected, frozen_total + expected)


def test_exclude_by_name_and_predicate():
    model = replace_linear_with_lora(tiny_model(), rank=2, alpha=1, exclude=["3"])
    assert isinstance(model[3], nn.Linear) and isinstance(model[0].ff[0], LinearWithLoRA)
    model = replace_linear_with_lora(tiny_model(), rank=2, alpha=1, exclude="att.W_query")
    assert isinstance(model[0].att["W_query"], nn.Linear) and isinstance(model[1].att["W_query"], nn.Linear)
    assert isinstance(model[0].att["out_proj"], LinearWithLoRA)
    model = replace_linear_with_lora(tiny_model(), rank=2, alpha=1,
                                     exclude=lambda name, m: m.out_features > 50)
    assert isinstance(model[0].ff[0], nn.Linear) and isinstance(model[0].ff[2], LinearWithLoRA)


def test_replace_on_a_bare_linear_and_kwargs():
    wrapped = replace_linear_with_lora(nn.Linear(5, 3), rank=2, alpha=4, dropout=0.1, scaling="alpha/rank")
    assert isinstance(wrapped, LinearWithLoRA)
    assert wrapped.dropout == 0.1 and wrapped.lora.scale == 2.0


def test_adapters_follow_the_base_device_and_are_fp32_on_a_16bit_base():
    layer = LinearWithLoRA(nn.Linear(8, 4).half(), 2, 1.0)
    assert layer.lora.A.dtype == torch.float32 and layer.lora.B.dtype == torch.float32
    layer64 = LinearWithLoRA(nn.Linear(8, 4).double(), 2, 1.0)
    assert layer64.lora.A.dtype == torch.float64


def test_multihead_attention_is_left_whole():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.warns(UserWarning, match=r"1\.out_proj"):
        replace_linear_with_lora(model, rank=2, alpha=1)
    assert isinstance(model[0], LinearWithLoRA)
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(1, 3, 8)
    out, _ = model[1](x, x, x)
    assert out.shape == (1, 3, 8)


def test_wrappers_take_the_wrapped_layers_mode():
    """A model wrapped (or loaded into) in eval mode stays in eval mode: no LoRA dropout until model.train(), so
    an adapter loaded for evaluation computes the deterministic output."""
    import tempfile

    from lora_fast import load_lora, save_lora

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    replace_linear_with_lora(model, rank=2, alpha=4, dropout=0.5)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_()
    x = torch.randn(5, 8)
    assert torch.equal(model(x), model(x))   # no dropout in eval mode
    model.train()
    assert all(m.training for m in model.modules())
    with tempfile.TemporaryDirectory() as d:
        save_lora(model, f"{d}/a.safetensors")
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        fresh.load_state_dict({k.replace(".linear.", "."): v for k, v in model.state_dict().items()
                               if ".lora." not in k})
        fresh.eval()
        load_lora(fresh, f"{d}/a.safetensors")
    assert not any(m.training for m in fresh.modules())
    model.eval()
    assert torch.equal(fresh(x), model(x))
