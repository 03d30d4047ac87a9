"""Drop-in means faithful: wrapping keeps hooks, subclass forwards and sharing; meta-device initialisation;
the sizes nn.Linear accepts; a merged layer's plain forward; target/exclude mistakes. Each on the reference
path and on the Triton kernels (the interpreter on CPU)."""

import warnings

import pytest
import torch
from torch import nn

from lora_fast import (
    LinearWithLoRA,
    LoRALayer,
    lora_linear,
    merge_and_unload,
    merge_lora,
    philox,
    replace_linear_with_lora,
    unmerge_lora,
)
from lora_fast.reference import draw_seed
from tests.utils import assert_close, linear_magnitude, reference_grads

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


class ClampedLinear(nn.Linear):
    """A linear with its own forward (as some transformers models define them)."""

    def forward(self, x):
        return super().forward(x).clamp(-0.5, 0.5)


def _randomize(layer):
    with torch.no_grad():
        layer.lora.B.normal_()


def test_hooks_of_the_wrapped_layer_run(backend):
    """A post-hook adding 1 and a pre-hook scaling x by 2 on the inner Linear act exactly as before wrapping,
    and the low-rank term is added beside: y = 2 x W^T + b + 1 + scale * (x A B)."""
    linear = nn.Linear(12, 7)
    linear.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    linear.register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(5, 12)
    before = linear(x).detach()
    layer = replace_linear_with_lora(linear, rank=3, alpha=2.0)
    assert not layer.fused()
    assert torch.equal(layer(x), before)          # B = 0: the wrapped model is the model, hooks and all
    _randomize(layer)
    x.requires_grad_()
    y = layer(x)
    truth = 2 * x.double() @ linear.weight.double().t() + linear.bias.double() + 1 \
        + 2.0 * (x.double() @ layer.lora.A.double() @ layer.lora.B.double())
    mag = 2 * linear_magnitude(x, linear.weight, linear.bias) + 1 \
        + 2.0 * (x.double().abs() @ layer.lora.A.double().abs() @ layer.lora.B.double().abs())
    assert_close(y.detach(), truth.detach(), mag.detach(), torch.float32, 12 + 3, "hooked layer", record=False)
    y.sum().backward()
    assert layer.lora.A.grad is not None and layer.lora.B.grad is not None
    # a hook counting calls sees every call, with dropout too
    calls = []
    layer.linear.register_forward_hook(lambda m, args, out: calls.append(1))
    layer.dropout = 0.5
    layer.train()(x)
    layer.eval()(x)
    assert len(calls) == 2


def test_global_hooks_keep_the_inner_call():
    linear = nn.Linear(4, 3)
    layer = LinearWithLoRA(linear, 2, 1.0)
    assert layer.fused()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        assert not layer.fused()
        layer(torch.randn(2, 4))
    finally:
        handle.remove()
    assert seen == ["Linear", "LinearWithLoRA"]


def test_subclass_with_its_own_forward_is_kept(backend):
    """A clamped linear: with B = 0 the wrapped model is bitwise the model; with B != 0 the term is added beside
    its output; merging is refused rather than changing the function."""
    model = nn.Sequential(ClampedLinear(10, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(8, 10) * 3
    before = model(x).detach()
    replace_linear_with_lora(model, rank=2, alpha=1.0)
    assert isinstance(model[0], LinearWithLoRA) and not model[0].fused() and model[2].fused()
    inner = model[0]
    _randomize(inner)
    with torch.no_grad():
        inner.lora.B.zero_()
        mid = model[0](x)
        assert torch.equal(mid, model[0].linear(x))    # kept its own forward (clamped), B = 0
        after = model(x)
    assert_close(after, before.double(), linear_magnitude(torch.relu(mid), model[2].linear.weight,
                                                          model[2].linear.bias), torch.float32, 2 * 6, "B = 0",
                 record=False)
    _randomize(inner)
    with torch.no_grad():
        y = inner(x)
        expected = inner.linear(x).double() + (x.double() @ inner.lora.A.double() @ inner.lora.B.double())
    mag = 0.5 + x.double().abs() @ inner.lora.A.double().abs() @ inner.lora.B.double().abs()
    assert_close(y, expected, mag, torch.float32, 10 + 2, "clamped + LoRA", record=False)
    with pytest.raises(ValueError, match=r"own forward.*0 \(ClampedLinear\)"):
        merge_lora(model)
    with pytest.raises(ValueError, match="own forward"):
        merge_and_unload(model)
    assert not inner.merged and isinstance(model[0], LinearWithLoRA)


def test_meta_device_initialisation():
    """The FSDP idiom: build on meta, to_empty(), reset_parameters() on every module, load the base checkpoint:
    A is kaiming-uniform and B zero, so the wrapped model equals its base."""
    base = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    state = base.state_dict()
    with torch.device("meta"):
        model = replace_linear_with_lora(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), rank=4, alpha=1.0)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model[0].lora.B.fill_(float("nan"))    # what uninitialised memory may hold
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model.load_state_dict({k.replace("0.", "0.linear.", 1).replace("1.", "1.linear.", 1): v
                           for k, v in state.items()}, strict=False)
    for layer in (model[0], model[1]):
        assert torch.equal(layer.lora.B, torch.zeros_like(layer.lora.B))
        bound = 1 / layer.lora.A.shape[1] ** 0.5      # kaiming_uniform_(a=sqrt(5)) on (in, r): fan_in = r
        assert layer.lora.A.abs().max() <= bound and layer.lora.A.std() > bound / 4
    x = torch.randn(3, 16)
    assert torch.isfinite(model(x)).all()
    assert_close(model(x).detach(), base(x).double().detach(),
                 linear_magnitude(base[0](x), base[1].weight, base[1].bias),
                 torch.float32, 2 * (16 + 8), "meta init", record=False)
    lora = LoRALayer(5, 3, 2, 1.0)
    with torch.no_grad():
        lora.B.normal_()
    lora.reset_parameters()
    assert torch.equal(lora.B, torch.zeros(2, 3))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.ReLU())
        self.block.again = self.proj     # the same Linear registered under a second name

    def forward(self, x):
        return self.block.again(torch.relu(self.proj(x)))


def test_shared_linear_gets_one_wrapper():
    model = Shared()
    replace_linear_with_lora(model, rank=2, alpha=1.0)
    assert isinstance(model.proj, LinearWithLoRA) and model.proj is model.block.again
    wrappers = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrappers) == 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    replace_linear_with_lora(model, rank=2, alpha=1.0)      # calling twice equals calling once
    assert model.proj is model.block.again and set(model.state_dict()) == set(state)
    assert sum(p.numel() for p in model.parameters()) == 6 * 6 + 6 + 2 * (6 + 6)


def test_target_that_is_not_linear_raises_and_unmatched_exclude_warns():
    model = nn.Sequential()
    model.add_module("attn", nn.Sequential(nn.Linear(4, 4)))
    model.add_module("q_proj", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"not linear layers.*attn \(torch\.nn\.Sequential\)"):
        replace_linear_with_lora(model, rank=2, alpha=1.0, target_modules=["attn", "q_proj"])
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    with pytest.warns(UserWarning, match=r"exclude: \['out_haed'\] match no module"):
        replace_linear_with_lora(model, rank=2, alpha=1.0, exclude=["out_haed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_linear_with_lora(nn.Sequential(nn.Linear(2, 2)), rank=1, alpha=1.0, exclude=["0"])


@pytest.mark.parametrize("trainable", ["weight", "bias", "adapters"])
def test_sizes_nn_linear_accepts(trainable, backend):
    """out_features = 0 and in_features = 0 (output = bias) run forward and backward like nn.Linear."""
    for K, N in ((5, 0), (0, 3)):
        linear = nn.Linear(K, N)
        with torch.no_grad():
            linear.bias.normal_()
        layer = LinearWithLoRA(linear, 2, 1.0)
        for name, p in layer.named_parameters():
            p.requires_grad_(name.endswith(trainable) or (trainable == "adapters" and ".lora." in f".{name}"))
        x = torch.randn(4, K, requires_grad=True)
        y = layer(x)
        assert y.shape == (4, N)
        assert torch.equal(y, linear(x))
        y.sum().backward()
        assert x.grad.shape == (4, K) and torch.equal(x.grad, torch.zeros(4, K))
        for p in layer.parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.shape == p.shape
        if trainable == "bias":
            assert torch.equal(linear.bias.grad, torch.full((N,), 4.0))


def test_merged_layer_runs_in_train_mode_and_refuses_only_backward_into_adapters(backend):
    layer = LinearWithLoRA(nn.Linear(6, 5), 2, 1.0)
    _randomize(layer)
    x = torch.randn(3, 6, requires_grad=True)
    unmerged = layer(x).detach()
    merge_lora(layer)
    layer.train()
    y = layer(x)                                  # default state: train mode, grad enabled
    assert_close(y.detach(), unmerged.double(), linear_magnitude(x, layer.weight_before_merge, layer.linear.bias)
                 + x.double().abs() @ layer.lora.A.double().abs() @ layer.lora.B.double().abs(),
                 torch.float32, 2 * (6 + 2), "merged in train mode", record=False)
    with pytest.raises(RuntimeError, match="merged"):
        y.sum().backward()
    layer.lora.requires_grad_(False)
    layer(x).sum().backward()                     # frozen adapters: gradients to x are fine
    assert x.grad is not None
    unmerge_lora(layer)


@pytest.mark.parametrize("R", [8, 32])   # rank 32: dB from the reduction over M, not the dS pass's partials
@pytest.mark.parametrize("case", ["massive activations", "huge scale, B = 0", "S beyond fp16"])
def test_fp16_low_rank_term_stays_finite(case, R, backend):
    """fp16 base, fp32 adapters (what LinearWithLoRA makes): four input channels at 2600 (the massive activations
    of 7B models) with scaling "alpha", alpha 64, rank 8 push scale * S past fp16's 65504 although every true
    output is ~1e3; B = 0 with scale 2e4; sixteen channels at 30000 make S = x A itself pass 65504 (the dB partials
    round S to fp16). Forward and every gradient are finite and within fp16's bound of the float64 reference,
    with and without dropout."""
    K, N = 64, 48
    linear = nn.Linear(K, N).half()
    alpha = {"massive activations": 64.0, "huge scale, B = 0": 2e4, "S beyond fp16": 1.0}[case]
    layer = LinearWithLoRA(linear, R, alpha, scaling="alpha")
    with torch.no_grad():
        if case != "huge scale, B = 0":
            layer.lora.B.normal_(0, 0.01)
        layer.lora.A.uniform_(0.2, 0.35)   # same-signed sums of a known size: S grows with the outliers
        linear.weight.mul_(0.1 if case != "S beyond fp16" else 0.01)
    x = torch.randn(2, 9, K)
    if case == "massive activations":
        x[..., [3, 17, 30, 51]] = 2600.0
    if case == "S beyond fp16":
        x[..., :16] = 30000.0
    x = x.half()
    for p in (0.0, 0.25):
        layer.dropout = p
        # the base weight frozen, as in LoRA training (its gradient dY^T x is a torch matmul, outside the kernels)
        leaves = [t.detach().clone().requires_grad_(t is not linear.weight)
                  for t in (x, linear.weight, linear.bias, layer.lora.A, layer.lora.B)]
        torch.manual_seed(99)
        out = lora_linear(*leaves, layer.lora.scale, dropout_p=p, training=True)
        dy = torch.randn_like(out, dtype=torch.float32).half()
        out.backward(dy)
        assert torch.isfinite(out).all(), f"p={p}: forward not finite"
        for name, leaf in zip(("dx", "dW", "dbias", "dA", "dB"), leaves):
            assert leaf.grad is None or torch.isfinite(leaf.grad).all(), f"p={p}: {name} not finite"
        mask = None
        if p:
            torch.manual_seed(99)
            mask = philox.keep_mask(draw_seed(x.device), 18, K, p).view(x.shape)
        ref, ref_grads = reference_grads(x, linear.weight, linear.bias, layer.lora.A, layer.lora.B,
                                         layer.lora.scale, dy, dropout_p=p, mask=mask)
        mag, mag_grads = reference_grads(x, linear.weight, linear.bias, layer.lora.A, layer.lora.B,
                                         layer.lora.scale, dy, dropout_p=p, mask=mask, absolute=True)
        assert ref.abs().max() < 65504
        if case == "S beyond fp16":
            assert (x.double() @ layer.lora.A.double()).abs().max() > 65504
        assert_close(out.detach(), ref, mag, torch.float16, K + R, f"fp16 outlier forward p={p}", record=False)
        for name, leaf, g, m, n in zip(("dx", "dW", "dbias", "dA", "dB"), leaves, ref_grads, mag_grads,
                                       (N + R, 18, 18, 18, 18)):
            if name == "dW":
                continue
            assert_close(leaf.grad, g, m, torch.float16, n, f"fp16 outlier {name} p={p}", record=False)


def test_torch_func_per_sample_gradients_and_jacobian(backend):
    """vmap(grad(...)) (DP-SGD's per-sample gradients) and jacrev through a LinearWithLoRA: equal to a loop of
    ordinary backward passes, one example at a time."""
    from torch.func import functional_call, grad, jacrev, vmap

    layer = LinearWithLoRA(nn.Linear(10, 4), 3, 2.0)
    _randomize(layer)
    params = {k: v.detach() for k, v in layer.named_parameters() if "lora" in k}
    x, target = torch.randn(5, 10), torch.randn(5, 4)

    def loss(p, xi, ti):
        return ((functional_call(layer, p, (xi[None],)) - ti) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(5):
        layer.zero_grad()
        ((layer(x[i:i + 1]) - target[i]) ** 2).sum().backward()
        for name, p in layer.named_parameters():
            if "lora" in name:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=0,
                                           atol=64 * 2.0**-24 * p.grad.abs().max().item())
    jac = jacrev(lambda xi: layer(xi))(x[0])
    expected = layer.linear.weight + 2.0 * (layer.lora.A @ layer.lora.B).t()
    assert_close(jac.detach(), expected.detach().double(), layer.linear.weight.double().abs()
                 + 2.0 * (layer.lora.A.double().abs() @ layer.lora.B.double().abs()).t(),
                 torch.float32, 3 + 2, "jacobian", record=False)
