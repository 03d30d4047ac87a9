"""Merge/unmerge, adapter-only safetensors checkpoints, and the trainable-parameter helpers (issue 7)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_fast import (
    LinearWithLoRA,
    count_parameters,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    reference,
    replace_linear_with_lora,
    save_lora,
    unmerge_lora,
)
from tests.utils import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- a GPT in the style of "Build a Large Language Model (From Scratch)", chapter 4 (written for this test) ---
class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return self.scale * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True,
                                                                              unbiased=False) + 1e-5) + self.shift


class Attention(nn.Module):
    def __init__(self, d, heads, context, qkv_bias):
        super().__init__()
        self.heads = heads
        self.W_query = nn.Linear(d, d, bias=qkv_bias)
        self.W_key = nn.Linear(d, d, bias=qkv_bias)
        self.W_value = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(context, context), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.W_query, self.W_key, self.W_value))
        s = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf) / k.shape[-1] ** 0.5
        return self.out_proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, context, qkv_bias):
        super().__init__()
        self.att = Attention(d, heads, context, qkv_bias)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = Norm(d), Norm(d)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab, context, d, heads, layers, qkv_bias=False, head_out=None, head_bias=False):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.trf_blocks = nn.Sequential(*[Block(d, heads, context, qkv_bias) for _ in range(layers)])
        self.final_norm = Norm(d)
        self.out_head = nn.Linear(d, head_out or vocab, bias=head_bias)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return self.out_head(self.final_norm(self.trf_blocks(x)))
# -------------------------------------------------------------------------------------------------------------


def small_gpt(device, rank=4, alpha=8.0, **kwargs):
    """A small GPT with LoRA layers whose B is random (a trained-looking adapter), base frozen."""
    model = GPT(vocab=50, context=16, d=32, heads=4, layers=2, **kwargs).to(device)
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=rank, alpha=alpha, scaling="alpha/rank")
    randomize_adapters(model)
    return model


def randomize_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.A.normal_(0, m.lora.A.shape[0] ** -0.5)
                m.lora.B.normal_(0, m.lora.B.shape[0] ** -0.5)


def lora_linear_layer(K, N, R, dtype, device, bias=True):
    linear = nn.Linear(K, N, bias=bias, device=device)
    with torch.no_grad():
        linear.weight.normal_(0, K ** -0.5)
        if bias:
            linear.bias.normal_()
    layer = LinearWithLoRA(linear.to(dtype), rank=R, alpha=2.0, scaling="alpha/rank")
    randomize_adapters(layer)
    return layer


# --- merge / unmerge -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,R,bias", [(67, 45, 3, True), (40, 96, 8, False)])
def test_merged_matches_unmerged_and_float64(dtype, K, N, R, bias, device):
    layer = lora_linear_layer(K, N, R, dtype, device, bias).eval()
    x = torch.randn(2, 5, K, device=device).to(dtype)
    W = layer.linear.weight.detach().clone()
    inputs = [x, W, layer.linear.bias, layer.lora.A, layer.lora.B]
    scale = layer.lora.scale
    ref = reference.lora_linear(*(None if t is None else t.detach().double() for t in inputs), scale,
                                training=False)
    mag = reference.lora_linear(*(None if t is None else t.detach().double().abs() for t in inputs), abs(scale),
                                training=False)
    with torch.no_grad():
        unmerged = layer(x)
        merge_lora(layer)
        merged = layer(x)
    assert layer.merged and not torch.equal(layer.linear.weight, W)
    # the merged weight is one rounding (counted in tolerance's roundings) from W + scale (A B)^T
    assert_close(merged, ref, mag, dtype, K + R, "merged")
    assert_close(unmerged, ref, mag, dtype, K + R, "unmerged", record=False)


def test_merge_a_gpt2_conv1d_layer(device):
    """transformers' Conv1D stores W as (in, out): its merged update is scale * A @ B, not the transpose."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(45, 67).to(device)             # nf=out 45, nx=in 67: weight (67, 45)
    layer = LinearWithLoRA(conv, 3, 2.0).eval()
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(4, 67, device=device)
    inputs = [x, conv.weight.detach().t(), conv.bias, layer.lora.A, layer.lora.B]
    ref = reference.lora_linear(*(t.detach().double() for t in inputs), 2.0, training=False)
    mag = reference.lora_linear(*(t.detach().double().abs() for t in inputs), 2.0, training=False)
    with torch.no_grad():
        unmerged = layer(x)
        merge_lora(layer)
        merged = layer(x)
    assert_close(unmerged, ref, mag, torch.float32, 70, "conv1d unmerged", record=False)
    assert_close(merged, ref, mag, torch.float32, 70, "conv1d merged", record=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_restores_the_weight_exactly(dtype, device):
    layer = lora_linear_layer(37, 21, 5, dtype, device)
    W = layer.linear.weight.detach().clone()
    param = layer.linear.weight
    merge_lora(layer)
    first = layer.linear.weight.detach().clone()
    assert layer.weight_before_merge is not None and "weight_before_merge" not in layer.state_dict()
    unmerge_lora(layer)
    assert torch.equal(layer.linear.weight, W) and layer.weight_before_merge is None and not layer.merged
    merge_lora(layer)
    assert torch.equal(layer.linear.weight, first)
    unmerge_lora(layer)
    assert torch.equal(layer.linear.weight, W)
    assert layer.linear.weight is param  # optimisers keep their reference


def test_merge_twice_and_unmerge_twice_change_nothing_and_warn_once(device):
    model = small_gpt(device)
    merge_lora(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"merge_lora: 13 layer\(s\) already merged") as record:
        merge_lora(model)
    assert len(record) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())
    unmerge_lora(model)
    unmerged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"unmerge_lora: 13 layer\(s\) already unmerged") as record:
        unmerge_lora(model)
    assert len(record) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in unmerged.items())


def test_training_a_merged_layer_raises(device):
    """A merged model's forward runs in every mode (as PEFT's and the book's merged layers do); only a backward
    that would reach A or B raises."""
    model = small_gpt(device)
    idx = torch.randint(0, 50, (2, 7), device=device)
    merge_lora(model)
    model.train()
    logits = model(idx)                     # the default state: train mode, grad enabled
    with pytest.raises(RuntimeError, match="merged"):
        logits.sum().backward()
    with torch.no_grad():  # inference in train mode, eval mode with grad, frozen adapters: allowed
        model(idx)
    model.eval()
    model(idx)
    model.train()
    for m in model.modules():
        if isinstance(m, LinearWithLoRA):
            m.lora.requires_grad_(False)
    model(idx)
    assert all(m.merged for m in model.modules() if isinstance(m, LinearWithLoRA))


def test_merged_model_and_merge_and_unload(device):
    model = small_gpt(device).eval()
    idx = torch.randint(0, 50, (2, 9), device=device)
    base_keys = set(GPT(vocab=50, context=16, d=32, heads=4, layers=2).state_dict())
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
        # the per-layer bound is tested above; through 13 merged layers and 2 nonlinear blocks the fp32 logits
        # differ by ~4e-7 of their largest value (seen); a missing scale or a transposition moves them by O(1)
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())
        plain = merge_and_unload(model)
        assert plain is model
        assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
        assert set(model.state_dict()) == base_keys
        assert torch.equal(model(idx), merged)  # same merged weights, same nn.Linear
    single = lora_linear_layer(12, 7, 2, torch.float32, device)
    expected = single.linear.weight + single.lora.scale * (single.lora.A @ single.lora.B).t()
    mag = single.linear.weight.double().abs() + abs(single.lora.scale) * (
        single.lora.A.double().abs() @ single.lora.B.double().abs()).t()
    out = merge_and_unload(single)
    assert type(out) is nn.Linear
    assert_close(out.weight.detach(), expected.detach().double(), mag, torch.float32, 2 * 2, "merge_and_unload",
                 record=False)


def test_no_lora_layer_raises():
    for fn in (merge_lora, unmerge_lora, merge_and_unload, lora_state_dict, mark_only_lora_as_trainable):
        with pytest.raises(ValueError, match="no LinearWithLoRA"):
            fn(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="model"):
        merge_lora("not a model")


# --- adapter files ----------------------------------------------------------------------------------------------
def test_save_then_load_into_a_fresh_model(tmp_path, device):
    torch.manual_seed(torch.seed() % 2**31)
    base = GPT(vocab=50, context=16, d=32, heads=4, layers=2).to(device)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base.requires_grad_(False)   # the book freezes the base model before adding LoRA
    model = replace_linear_with_lora(base, rank=4, alpha=8.0, scaling="alpha/rank").eval()
    randomize_adapters(model)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(lora_state_dict(model)) and len(keys) == 2 * 13
    assert json.loads(meta["lora_fast.layers"])["trf_blocks.1.ff.0"] == {"rank": 4, "alpha": 8.0,
                                                                          "scaling": "alpha/rank", "dropout": 0.0}
    fresh = GPT(vocab=50, context=16, d=32, heads=4, layers=2).to(device)
    fresh.load_state_dict(base_state)
    replace_linear_with_lora(fresh, rank=4, alpha=8.0, scaling="alpha/rank").eval()
    idx = torch.randint(0, 50, (2, 11), device=device)
    with torch.no_grad():
        saved_out = model(idx)
        assert not torch.equal(fresh(idx), saved_out)
        assert load_lora(fresh, path) == ([], [])
        assert torch.equal(fresh(idx), saved_out)


def test_wrong_shape_missing_and_unexpected_keys_raise(tmp_path):
    model = small_gpt("cpu")
    path = tmp_path / "a.safetensors"
    save_lora(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    key = "trf_blocks.0.att.W_key.lora.A"
    tensors[key] = torch.randn(33, 4)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"mis-shaped keys: trf_blocks\.0\.att\.W_key\.lora\.A \(given \(33, 4\)"):
        load_lora(model, path)
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    del tensors["out_head.lora.B"]
    tensors["extra.lora.A"] = torch.zeros(2, 2)
    save_file(tensors, str(path), metadata=meta)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"missing keys: out_head\.lora\.B; unexpected keys: extra\.lora\.A"):
        load_lora(model, path)
    assert all(torch.equal(v, lora_state_dict(model)[k]) for k, v in before.items())  # nothing half-loaded
    assert load_lora(model, path, strict=False) == (["out_head.lora.B"], ["extra.lora.A"])
    with pytest.raises(TypeError, match="mapping"):
        load_lora_state_dict(model, [1, 2])


def test_other_rank_alpha_or_scaling_raises(tmp_path):
    path = tmp_path / "r4.safetensors"
    save_lora(small_gpt("cpu", rank=4), path)
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_query: rank 4 in the file, 8 in the model"):
        load_lora(small_gpt("cpu", rank=8), path)
    with pytest.raises(ValueError, match=r"alpha 8\.0 in the file, 16\.0 in the model"):
        load_lora(small_gpt("cpu", rank=4, alpha=16.0), path)
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a lora_fast adapter file"):
        load_lora(small_gpt("cpu"), path)


def test_loading_into_a_merged_model_raises():
    model = small_gpt("cpu")
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        load_lora_state_dict(model, state)


# --- trainable parameters -----------------------------------------------------------------------------------
def bias_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4, bias=False), nn.Linear(4, 3))
    return replace_linear_with_lora(model, rank=2, alpha=1.0, exclude=["3"])


@pytest.mark.parametrize("bias,expected", [
    ("none", {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B"}),
    ("all", {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B", "0.linear.bias", "1.bias", "3.bias"}),
    ("lora_only", {"0.lora.A", "0.lora.B", "2.lora.A", "2.lora.B", "0.linear.bias"}),
])
def test_mark_only_lora_as_trainable(bias, expected):
    model = bias_model()
    assert mark_only_lora_as_trainable(model, bias=bias) is model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # hand count: Linear(6,5) 35, LayerNorm(5) 10, Linear(5,4) 20, Linear(4,3) 15; LoRA 2*(6+5) + 2*(5+4) = 40
    lora, biases = 40, {"none": 0, "all": 5 + 5 + 3, "lora_only": 5}[bias]
    assert count_parameters(model) == (lora + biases, 35 + 10 + 20 + 15 + lora)
    with pytest.raises(ValueError, match="bias: expected one of"):
        mark_only_lora_as_trainable(model, bias="lora")


def test_count_parameters_tied_weights_count_once():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    emb.weight.requires_grad_(False)
    assert count_parameters(model) == (0, 40)


@pytest.mark.parametrize("head_out,head_bias,wrapped", [(50257, False, 3_470_608), (2, True, 2_666_528)])
def test_gpt2_124m_lora_parameter_count(head_out, head_bias, wrapped):
    """The GPT-2 124M configuration (book ch. 4, qkv_bias False; ch. 6 and appendix E swap in a Linear(768, 2)
    classification head), rank 16: LoRA counts by hand, against the model built on the 'meta' device."""
    d, layers, vocab, context, r = 768, 12, 50257, 1024, 16
    # per block: W_query, W_key, W_value, out_proj (d -> d) and ff (d -> 4d -> d); r * (in + out) each
    blocks_lora = layers * (4 * r * (d + d) + r * (d + 4 * d) + r * (4 * d + d))
    head_lora = r * (d + head_out)
    assert (blocks_lora, blocks_lora + head_lora) == (2_654_208, wrapped)
    # embeddings; per block 3 d*d (no qkv bias) + out_proj d*d + d, ff 8 d*d + 5 d, two norms 4 d; final norm
    base = (vocab + context) * d + layers * (12 * d * d + 10 * d) + 2 * d + d * head_out + head_bias * head_out
    for exclude, lora in ((["out_head"], blocks_lora), (None, blocks_lora + head_lora)):
        with torch.device("meta"):
            model = GPT(vocab, context, d, heads=12, layers=layers, head_out=head_out, head_bias=head_bias)
        if head_out == vocab:
            assert count_parameters(model)[1] == base == 163_009_536  # the book's count for this model
        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, rank=r, alpha=16, exclude=exclude)
        assert count_parameters(model) == (lora, base + lora)
        model.out_head.requires_grad_(True)
        mark_only_lora_as_trainable(model)
        assert count_parameters(model) == (lora, base + lora)


def test_load_lora_wraps_a_plain_model(tmp_path):
    """A file names every layer with its rank, alpha, scaling and dropout: load_lora wraps the plain layers it
    names (as load_peft_adapter does) and the result computes what the saved model computed."""
    model = small_gpt("cpu", rank=3, alpha=6.0).eval()
    path = tmp_path / "a.safetensors"
    save_lora(model, path)
    plain = GPT(vocab=50, context=16, d=32, heads=4, layers=2)
    plain.load_state_dict({k.replace(".linear.", "."): v for k, v in model.state_dict().items()
                           if ".lora." not in k})
    plain.eval()
    assert load_lora(plain, path) == ([], [])
    wrapped = {n: m for n, m in plain.named_modules() if isinstance(m, LinearWithLoRA)}
    assert len(wrapped) == 13 and all(m.lora.rank == 3 and m.lora.scale == 2.0 for m in wrapped.values())
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(plain(idx), model(idx))
    # a file naming a module that is not a linear layer, or a layer without metadata, changes nothing
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["lora_fast.layers"])
    layers["trf_blocks.0.norm1"] = layers.pop("trf_blocks.0.att.W_query")
    save_file(tensors, str(path), metadata={**meta, "lora_fast.layers": json.dumps(layers)})
    fresh = GPT(vocab=50, context=16, d=32, heads=4, layers=2)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.norm1: named in the file, a Norm, not a linear layer"):
        load_lora(fresh, path)
    assert not any(isinstance(m, LinearWithLoRA) for m in fresh.modules())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"W_query: the file holds its tensors but no rank/alpha/scaling"):
        load_lora(small_gpt("cpu", rank=3, alpha=6.0), path)


def test_trainable_biases_are_saved_and_restored(tmp_path):
    """mark_only_lora_as_trainable(bias=...) trains biases: save_lora keeps them, load_lora restores them, and a
    trainable parameter that is neither an adapter nor a bias is named in a warning."""
    torch.manual_seed(torch.seed() % 2**31)
    model = mark_only_lora_as_trainable(bias_model(), bias="all")
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1)
    path = tmp_path / "b.safetensors"
    save_lora(model, path)
    assert {"0.linear.bias", "1.bias", "3.bias"} <= set(lora_state_dict(model))
    fresh = bias_model()
    fresh.load_state_dict({k: v for k, v in bias_model().state_dict().items()})
    for (name, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
        if not (name.endswith("bias") or ".lora." in name):
            with torch.no_grad():
                p.copy_(q)
    x = torch.randn(4, 6)
    assert not torch.equal(fresh(x), model(x))
    load_lora(fresh, path)
    assert torch.equal(fresh(x), model(x))
    model[1].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 trainable parameter\(s\) are not LoRA adapters or biases .*: 1\.weight"):
        lora_state_dict(model)


def test_load_lora_errors_name_the_file_and_field(tmp_path):
    model = small_gpt("cpu")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_lora(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_lora(model, tmp_path / "none.safetensors")
    path = tmp_path / "a.safetensors"
    save_lora(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["lora_fast.layers"])
    layers["out_head"]["alpha"] = "eight"
    save_file(tensors, str(path), metadata={**meta, "lora_fast.layers": json.dumps(layers)})
    with pytest.raises(ValueError, match=r"a\.safetensors: metadata lora_fast.layers\['out_head'\]\.alpha: "
                                         "expected a finite number, got 'eight'"):
        load_lora(model, path)
    save_file(tensors, str(path), metadata={**meta, "lora_fast.layers": "{not json"})
    with pytest.raises(ValueError, match="a.safetensors: metadata field lora_fast.layers is not valid JSON"):
        load_lora(model, path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora(model, path)


def test_save_lora_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the old file whole (and no part file)."""
    from lora_fast import adapters

    path = tmp_path / "a.safetensors"
    save_lora(small_gpt("cpu", rank=4), path)
    old = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_lora(small_gpt("cpu", rank=8), path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_saved_files_get_the_default_mode_or_keep_the_old_one(tmp_path):
    """save_lora / save_peft_adapter write through a temporary file (0o600 as mkstemp and safetensors make it):
    the result has the mode a plain open() gives (0o666 less the umask), or the mode of the file it replaces."""
    import os
    import stat

    from lora_fast import save_lora, save_peft_adapter

    pytest.importorskip("peft")
    model = replace_linear_with_lora(torch.nn.Sequential(torch.nn.Linear(4, 3)), rank=1, alpha=1)
    umask = os.umask(0o022)
    try:
        path = tmp_path / "a.safetensors"
        save_lora(model, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.chmod(path, 0o640)
        save_lora(model, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        save_peft_adapter(model, tmp_path / "adapter")
        assert stat.S_IMODE(os.stat(tmp_path / "adapter" / "adapter_model.safetensors").st_mode) == 0o644
    finally:
        os.umask(umask)
