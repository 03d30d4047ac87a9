"""Loads are transactional: a failure injected at every write a load makes (each Tensor.copy_ and each
nn.Module.__setattr__, the k-th one for every k) leaves the model's tensors bit for bit, its modules (objects and
types) and their attributes as they were; the load that runs past every k succeeds. load_lora_state_dict,
load_lora and load_peft_adapter, each on models with layers already wrapped and layers the load wraps."""

import copy

import pytest
import torch
from torch import nn

from lora_fast import (
    LinearWithDoRA,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
    save_lora,
)


class Injected(RuntimeError):
    pass


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.v(torch.relu(self.q(x)))))


def _simple(value):
    return isinstance(value, (bool, int, float, str, type(None)))


def _snapshot(model):
    """Everything a load may change: tensors by their bytes, parameter objects, module objects and types, and
    every module's plain attributes (alpha, scale, dropout, merged, ...)."""
    tensors = {k: (v.dtype, v.detach().clone().reshape(-1).view(torch.uint8))
               for k, v in model.state_dict(keep_vars=True).items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    attrs = {n: {k: v for k, v in vars(m).items() if _simple(v)} for n, m in model.named_modules()}
    return tensors, params, modules, attrs


def _assert_same(before, after, k):
    tensors, params, modules, attrs = before
    assert after[2] == modules, f"failure at write {k}: modules changed"
    assert after[1] == params, f"failure at write {k}: parameter objects changed"
    assert after[3] == attrs, f"failure at write {k}: module attributes changed"
    assert after[0].keys() == tensors.keys(), f"failure at write {k}: state-dict keys changed"
    for key, (dtype, raw) in tensors.items():
        got_dtype, got = after[0][key]
        assert got_dtype == dtype and torch.equal(got, raw), f"failure at write {k}: {key} changed"


@pytest.fixture
def inject(monkeypatch):
    """inject(k): the k-th Tensor.copy_ or nn.Module.__setattr__ from now raises Injected (0: none)."""
    state = {"k": 0, "calls": 0}
    copy_, setattr_ = torch.Tensor.copy_, nn.Module.__setattr__

    def count():
        state["calls"] += 1
        if state["calls"] == state["k"]:
            raise Injected(f"injected failure at write {state['k']}")

    def copy_hook(self, *args, **kwargs):
        count()
        return copy_(self, *args, **kwargs)

    def setattr_hook(self, name, value):
        count()
        return setattr_(self, name, value)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_hook)
    monkeypatch.setattr(nn.Module, "__setattr__", setattr_hook)

    def arm(k):
        state["k"], state["calls"] = k, 0
        return state

    return arm


def _every_failure(make_model, load, inject):
    """Run ``load`` on a fresh model with the k-th write failing, for k = 1, 2, ... until a load completes."""
    k = 0
    while True:
        k += 1
        model = make_model()
        before = _snapshot(model)
        state = inject(k)
        try:
            load(model)
        except Injected:
            inject(0)
            _assert_same(before, _snapshot(model), k)
            continue
        inject(0)
        assert state["calls"] < k, "the load completed although a write failed"
        return k - 1, model


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def test_load_lora_state_dict_is_transactional(inject):
    base = _Net()
    source = replace_linear_with_lora(copy.deepcopy(base), 2, 3.0, target_modules=["q", "v"])
    _perturb(mark_only_lora_as_trainable(source, bias="all"))
    # float64 values: converted to the parameters' float32 on the way in
    state = {k: v.double() for k, v in lora_state_dict(source).items()}
    writes, model = _every_failure(lambda: replace_linear_with_lora(copy.deepcopy(base), 2, 3.0,
                                                                    target_modules=["q", "v"]),
                                   lambda m: load_lora_state_dict(m, state), inject)
    assert writes >= 4
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value.float()), key


@pytest.mark.parametrize("wrapped", ["none", "q"])
def test_load_lora_is_transactional(wrapped, inject, tmp_path):
    base = _Net()
    source = replace_linear_with_lora(copy.deepcopy(base).requires_grad_(False), 2, 3.0, target_modules=["q"])
    source.v = LinearWithDoRA(source.v, 2, 3.0)
    _perturb(source)
    save_lora(source, tmp_path / "a.safetensors")

    def make():
        model = copy.deepcopy(base)
        if wrapped == "q":
            model = replace_linear_with_lora(model, 2, 3.0, target_modules=["q"])
        return model

    writes, model = _every_failure(make, lambda m: load_lora(m, tmp_path / "a.safetensors"), inject)
    assert writes >= 3
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_load_peft_adapter_is_transactional(inject, tmp_path):
    peft = pytest.importorskip("peft", reason="load_peft_adapter needs peft")
    from lora_fast import load_peft_adapter

    base = _Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q", "v"], bias="all", modules_to_save=["head"], lora_dropout=0.1))
    _perturb(theirs)
    theirs.eval().save_pretrained(tmp_path)

    def make():
        # q already wrapped (with other alpha and dropout), v plain: both kinds of change are made
        return replace_linear_with_lora(copy.deepcopy(base), 2, 1.0, target_modules=["q"])

    writes, model = _every_failure(make, lambda m: load_peft_adapter(m, tmp_path), inject)
    assert writes >= 8
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), theirs(x), rtol=0, atol=64 * 2.0**-24 * theirs(x).abs().max())


def test_load_into_a_new_adapter_is_transactional(inject, tmp_path):
    """load_lora and load_peft_adapter into a named adapter the layers do not hold yet (issue 30): a failure at any
    write leaves no adapter half-created, on any layer."""
    from lora_fast import load_peft_adapter, save_peft_adapter

    base = _Net()
    source = replace_linear_with_lora(copy.deepcopy(base), 2, 3.0, target_modules=["q", "v"])
    for layer in (source.q, source.v):
        layer.add_adapter("b", 3, 5.0, scaling="alpha/rank", dropout=0.1)
    _perturb(mark_only_lora_as_trainable(source))
    save_lora(source, tmp_path / "b.safetensors", adapter_name="b")
    save_peft_adapter(source, tmp_path / "peft", selected_adapters=["b"])
    x = torch.randn(4, 8)
    for load in (lambda m: load_lora(m, tmp_path / "b.safetensors", adapter_name="b"),
                 lambda m: load_peft_adapter(m, tmp_path / "peft" / "b", adapter_name="b")):
        writes, model = _every_failure(lambda: replace_linear_with_lora(copy.deepcopy(base), 2, 3.0,
                                                                        target_modules=["q", "v"]), load, inject)
        assert writes >= 4
        for m in (source, model):
            m.q.set_adapter("b")
            m.v.set_adapter("b")
        with torch.no_grad():
            assert torch.equal(model.eval()(x), source.eval()(x))
        # into the plain model: the layers wrapped as well (PEFT's load_adapter), all or nothing
        writes, model = _every_failure(lambda: copy.deepcopy(base), load, inject)
        assert writes >= 6
        for m in (source, model):
            m.q.set_adapter("b")
            m.v.set_adapter("b")
        with torch.no_grad():
            assert torch.equal(model.eval()(x), source.eval()(x))
