"""PEFT and Hugging Face interop: patch_peft against PEFT's own path, PEFT's adapter format both ways, GPT-2's
Conv1D and target_modules in replace_linear_with_lora.

Tiny transformers models built from config objects (random weights, nothing downloaded), <= 16 tokens, so that
the Triton interpreter keeps the file short on CPU.

Error model for whole models: a model is a chain of reductions (norms, projections, attention scores, attention
times values, MLP). fp32 rounding adds about gamma_n = n * 2**-24 per reduction of length n along the chain, so
logits are compared against a float64 copy of the PEFT model, relative to the largest reference value (through
layer norms and softmax no elementwise magnitude bound exists), with tolerance(float32, n) where n is the sum of
the reduction lengths along the depth (``_depth``). Gradients go down the chain and back and then reduce over
the tokens: 2 n + tokens. The same bound is asserted for PEFT's own fp32 path, so it is not tuned to the kernels;
a wrong scale, transpose or missing term is an O(1) relative error (the LoRA terms are made large here).
"""

import copy
import json
import pickle
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import (  # noqa: E402
    LinearWithLoRA,
    load_peft_adapter,
    mark_only_lora_as_trainable,
    patch_peft,
    peft_interop,
    replace_linear_with_lora,
    save_peft_adapter,
    unpatch_peft,
)
from tests.utils import assert_close, linear_magnitude, reference_grads  # noqa: E402

BATCH, TOKENS, VOCAB, HIDDEN = 2, 8, 100, 32


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def bert():
    return BertForMaskedLM(BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0, attn_implementation="eager"))


def _depth(model) -> int:
    """Sum of the reduction lengths along the model's depth: per block two norms, q/k/v, scores (head dim),
    attention times values (tokens), output projection, MLP up and down; then the final norm and the head."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    per_block = 5 * hidden + hidden // heads + TOKENS + inter
    return layers * per_block + 3 * hidden  # final norm, head (BERT's MLM head adds a dense + norm: 3 covers it)


def _randomize_adapters(model, std=0.5):
    """PEFT initialises lora_B to zero; large random adapters make the LoRA term as big as the base term."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            # std / sqrt(reduction length) per factor: PEFT's weights are (r, in) and (out, r), ours (in, r), (r, out)
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, std / p.shape[-1] ** 0.5)
            elif ".lora.A" in name or ".lora.B" in name:
                p.normal_(0.0, std / p.shape[0] ** 0.5)


def _peft_model(make, **config):
    base = make()
    model = get_peft_model(base, LoraConfig(**config))
    _randomize_adapters(model)
    return model


def _inputs():
    return torch.randint(1, VOCAB, (BATCH, TOKENS))


class _Spy:
    """Counts calls of the fused op from peft_interop (a patched layer that fell back calls PEFT instead)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("lora_linear", "lora_linear_stored"):   # the summed adapters' op, the single adapter's
            monkeypatch.setattr(peft_interop, name, self._counted(getattr(peft_interop, name)))

    def _counted(self, real):
        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        return counted


def _run(model, ids, probe):
    """Logits and the gradients of (logits * probe).sum() for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits * probe.to(logits.dtype)).sum().backward()
    # the adapters and the base biases of LoRA layers (bias="all"); other biases can have a zero gradient by
    # symmetry (a key bias under softmax), which no relative bound can judge
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and ("lora_" in n or "base_layer.bias" in n)}
    return logits.detach(), grads


def _compare(actual, ref, n, name):
    magnitude = torch.full_like(ref, ref.abs().max().item())
    assert_close(actual, ref, magnitude, torch.float32, n, name, record=False)


CASES = {
    # GPT-2: Conv1D bases (fan_in_fan_out), c_proj matches both attention and MLP projections
    "gpt2": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    # BERT: bias="all" trains the base biases of the LoRA layers, through the fused op
    "bert": (bert, dict(r=3, lora_alpha=6, target_modules=["query", "value"], bias="all")),
    # Llama: every linear but lm_head, rsLoRA, grouped-query attention
    "llama": (llama, dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_matches_peft(case, monkeypatch):
    make, config = CASES[case]
    model = _peft_model(make, lora_dropout=0.0, **config)
    model.train()  # the models' own dropouts are 0: train mode is deterministic and exercises training=True
    reference = copy.deepcopy(model).double()
    ids = _inputs()
    probe = torch.randn(BATCH, TOKENS, VOCAB)
    ref_logits, ref_grads = _run(reference, ids, probe.double())
    peft_logits, peft_grads = _run(model, ids, probe)

    report = patch_peft(model)
    assert report.skipped == {}
    n_lora = sum(isinstance(m, peft.tuners.lora.Linear) for m in model.modules())
    assert len(report.patched) == n_lora > 0
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids, probe)
    assert spy.calls == n_lora

    n = _depth(model.base_model.model)
    for name, out in (("peft", peft_logits), ("patched", logits)):
        _compare(out, ref_logits, n, f"{case} {name} logits")
    assert set(grads) == set(ref_grads)
    assert any("lora_A" in g for g in grads) and any("lora_B" in g for g in grads)
    if config.get("bias") == "all":
        assert any(g.endswith("query.base_layer.bias") for g in grads)
    for g in ref_grads:
        for name, out in (("peft", peft_grads[g]), ("patched", grads[g])):
            _compare(out, ref_grads[g], 2 * n + BATCH * TOKENS, f"{case} {name} d{g}")


def test_dropout_in_eval_mode_and_train_mode(monkeypatch):
    model = _peft_model(gpt2, r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.3)
    model.eval()
    reference = copy.deepcopy(model).double()
    ids = _inputs()
    ref = reference(input_ids=ids).logits.detach()
    patch_peft(model)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert spy.calls == 2
    _compare(logits, ref, _depth(model.base_model.model), "eval-mode logits")
    # train mode: the dropout module's mode reaches the fused op (PEFT's p, lora-fast's mask)
    model.train()
    with torch.no_grad():
        dropped = model(input_ids=ids).logits
    assert spy.calls == 4
    assert (dropped - logits).abs().max() > 1e-3 * ref.abs().max()


def test_fp32_adapters_on_a_16bit_base(monkeypatch):
    """PEFT keeps adapters in fp32 on a half-precision base; one layer, compared like tests/utils.check_op."""
    K, N, R, dtype = 48, 40, 4, torch.float16
    model = get_peft_model(nn.Sequential(nn.Linear(K, N)).to(dtype), LoraConfig(r=R, lora_alpha=8,
                                                                                 target_modules=["0"]))
    layer = model.base_model.model[0]
    for m in (layer.lora_A["default"], layer.lora_B["default"]):
        m.float()
    _randomize_adapters(model)
    patch_peft(model)
    spy = _Spy(monkeypatch)
    x = torch.randn(3, 5, K).to(dtype)
    y = model(x)
    assert spy.calls == 1 and y.dtype == dtype
    w, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight.t(), layer.lora_B["default"].weight.t()
    ref, _ = reference_grads(x, w, b, A, B, 2.0, torch.zeros(3, 5, N))
    mag, _ = reference_grads(x, w, b, A, B, 2.0, torch.zeros(3, 5, N), absolute=True)
    assert_close(y, ref, mag, dtype, K + R, "fp16 base, fp32 adapters", record=False)


def test_peft_states_fall_back_to_peft(monkeypatch):
    """disable_adapter, merged adapters, adapter_names and a second adapter behave exactly as in PEFT."""
    model = _peft_model(gpt2, r=4, lora_alpha=8, target_modules=["c_attn"])
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"]))
    _randomize_adapters(model)
    model.eval()
    ids = _inputs()

    def both(**kwargs):
        """Patched and PEFT's own logits in the model's current state."""
        patch_peft(model)
        patched = model(input_ids=ids, **kwargs).logits
        unpatch_peft(model)
        return patched, model(input_ids=ids, **kwargs).logits

    with torch.no_grad():
        spy = _Spy(monkeypatch)
        with model.disable_adapter():
            assert torch.equal(*both())
        assert torch.equal(*both(adapter_names=["default", "other"]))
        model.merge_adapter()
        assert torch.equal(*both())
        model.unmerge_adapter()
        assert spy.calls == 0
        patch_peft(model)
        # set_adapter switches the fused layers to the other adapter
        model.set_adapter("other")
        reference = copy.deepcopy(model).double()
        unpatch_peft(reference)
        _compare(model(input_ids=ids).logits, reference(input_ids=ids).logits, _depth(model.base_model.model),
                 "second adapter")
        assert spy.calls == 2


@pytest.mark.parametrize("same_scaling", [True, False])
def test_several_active_adapters_are_fused_without_dropout(same_scaling, monkeypatch):
    """set_adapter([a, b]): PEFT sums both adapters' terms; patched, one fused call per layer with the ranks side by
    side, logits and both adapters' gradients against float64 (PEFT's own maths on an unpatched float64 copy).
    With dropout at work each adapter's own mask is needed: PEFT's forward, bit for bit."""
    model = _peft_model(llama, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2 if same_scaling else 6,
                                          target_modules=["q_proj", "v_proj"]))
    _randomize_adapters(model)
    model.base_model.set_adapter(["default", "other"])
    for name, p in model.named_parameters():   # set_adapter freezes what is not active: both stay trainable
        p.requires_grad_("lora_" in name)
    ids = _inputs()
    reference = copy.deepcopy(model).double()
    report = patch_peft(model, warn=False)
    assert len(report.patched) == 4 and not report.skipped   # 2 layers x 2 blocks
    spy = _Spy(monkeypatch)
    probe = torch.randn(BATCH, TOKENS, VOCAB)
    logits, grads = _run(model, ids, probe)
    assert spy.calls == 4
    ref_logits, ref_grads = _run(reference, ids, probe.double())
    n = _depth(model.base_model.model)
    _compare(logits, ref_logits.float(), n, "summed adapters logits")
    assert any(".other." in k for k in grads) and set(grads) == set(ref_grads)
    for k in grads:
        _compare(grads[k], ref_grads[k].float(), n, "summed adapters " + k)
    # dropout at work on one adapter of one layer: that layer runs PEFT's own forward (its masks), bit for bit as
    # unpatched under the same seed; the other layers stay fused
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_dropout["default"] = nn.Dropout(0.3)
    model.train()
    x = torch.randn(BATCH, TOKENS, HIDDEN)
    torch.manual_seed(7)
    patched = layer(x)
    assert spy.calls == 4
    model(input_ids=ids)
    assert spy.calls == 4 + 3
    unpatch_peft(model)
    torch.manual_seed(7)
    assert torch.equal(patched, layer(x))


def test_dora_is_fused_on_gpt2_conv1d(monkeypatch):
    """PEFT's DoRA layers (use_dora=True) run on lora_fast.dora_linear, Conv1D bases included; logits within the
    fp32 bound of a float64 copy of the PEFT model (DoRA itself: tests/test_dora.py)."""
    model = _peft_model(gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)
    model.eval()
    ids = _inputs()
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(input_ids=ids).logits
    report = patch_peft(model)
    assert len(report.patched) == 4 and report.skipped == {}
    calls = []
    real = peft_interop.dora_linear
    monkeypatch.setattr(peft_interop, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        _compare(model(input_ids=ids).logits, expected, _depth(model.base_model.model), "DoRA logits")
    assert len(calls) == 4


def test_unpatch_restores_peft_and_the_model_still_pickles():
    model = _peft_model(gpt2, r=2, lora_alpha=2, target_modules=["c_attn"])
    report = patch_peft(model)
    assert patch_peft(model).patched == report.patched  # idempotent
    keys = set(model.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    assert set(clone.state_dict()) == keys and len(patch_peft(clone).patched) == 2
    assert unpatch_peft(model) == 2
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert unpatch_peft(model) == 0


@pytest.mark.parametrize("scaling", ["alpha", "alpha/rank", "rslora"])
def test_save_peft_adapter_loads_in_peft(scaling, tmp_path):
    base = gpt2().eval()
    ours = replace_linear_with_lora(copy.deepcopy(base).requires_grad_(False), rank=4, alpha=3.0, scaling=scaling,
                                    target_modules=["c_attn", "c_fc"])
    # another rank and alpha on one layer: PEFT's rank_pattern / alpha_pattern
    ours.transformer.h[1].attn.c_attn = LinearWithLoRA(ours.transformer.h[1].attn.c_attn.linear, 2, 5.0,
                                                       scaling=scaling)
    _randomize_adapters(ours)
    save_peft_adapter(ours, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear)]) == 4
    ids = _inputs()
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
        theirs64 = copy.deepcopy(theirs).double()(input_ids=ids).logits
        theirs_logits = theirs(input_ids=ids).logits
    n = _depth(base)
    _compare(theirs_logits, theirs64, n, "PEFT logits")
    _compare(ours_logits, theirs64, n, "lora-fast logits")
    layer = theirs.base_model.model.transformer.h[1].attn.c_attn
    assert layer.scaling["default"] == pytest.approx(ours.transformer.h[1].attn.c_attn.lora.scale)


def test_peft_adapter_loads_into_our_layers(tmp_path):
    base = llama().eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                                                            rank_pattern={"down_proj": 2}, lora_dropout=0.1))
    _randomize_adapters(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ids = _inputs()
    with torch.no_grad():
        theirs64 = copy.deepcopy(theirs).double()(input_ids=ids).logits
    # into plain layers (wrapped by the loader) and into layers already wrapped with the right ranks
    fresh = load_peft_adapter(copy.deepcopy(base), tmp_path)
    wrapped = replace_linear_with_lora(copy.deepcopy(base), rank=4, alpha=1.0, target_modules=["q_proj"])
    replace_linear_with_lora(wrapped, rank=2, alpha=1.0, target_modules=["down_proj"])
    with pytest.warns(UserWarning, match="not in the adapter"):
        replace_linear_with_lora(wrapped, rank=3, alpha=1.0, target_modules=["v_proj"])
        load_peft_adapter(wrapped, tmp_path)
    for ours in (fresh, wrapped):
        layer = ours.model.layers[0].mlp.down_proj
        assert isinstance(layer, LinearWithLoRA) and layer.lora.rank == 2 and layer.dropout == 0.1
        assert layer.lora.scale == pytest.approx(3.0)
        with torch.no_grad():
            _compare(ours.eval()(input_ids=ids).logits, theirs64, _depth(base), "loaded logits")


def test_load_rejects_what_it_cannot_represent(tmp_path):
    base = gpt2()
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):   # a DoRA adapter into LoRA layers
        load_peft_adapter(replace_linear_with_lora(copy.deepcopy(base), 2, 1.0, target_modules=["c_attn"]),
                          tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_dir"):
        load_peft_adapter(base, tmp_path / "missing")
    with pytest.raises(ValueError, match="found none"):
        save_peft_adapter(base, tmp_path / "none")
    with pytest.raises(ValueError, match="lone LinearWithLoRA"):
        save_peft_adapter(LinearWithLoRA(nn.Linear(4, 4), 2, 1.0), tmp_path / "lone")
    # an adapter for another architecture names modules this model does not have
    other = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not in model"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "llama")


def test_conv1d_layer_matches_reference():
    K, N, R = 24, 40, 3
    conv = Conv1D(N, K)
    layer = LinearWithLoRA(conv, R, 2.0, scaling="alpha/rank")
    assert layer.fan_in_fan_out and layer.lora.A.shape == (K, R) and layer.lora.B.shape == (R, N)
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(2, 7, K, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    inputs = (x, conv.weight.t(), conv.bias, layer.lora.A, layer.lora.B)
    ref, ref_grads = reference_grads(*inputs, 2.0 / R, dy)
    mag, mag_grads = reference_grads(*inputs, 2.0 / R, dy, absolute=True)
    assert_close(y, ref, mag, torch.float32, K + R, "Conv1D forward", record=False)
    for name, leaf, g, m, n in (("dx", x, ref_grads[0], mag_grads[0], N + R),
                                ("dA", layer.lora.A, ref_grads[3], mag_grads[3], 14),
                                ("dB", layer.lora.B, ref_grads[4], mag_grads[4], 14)):
        assert_close(leaf.grad, g, m, torch.float32, n, f"Conv1D {name}", record=False)
    # the wrapped Conv1D alone (B = 0) is the Conv1D: both within fp32's error of the float64 product, and of
    # each other (two fp32 sums of K terms, in orders that depend on the CPU and BLAS)
    with torch.no_grad():
        layer.lora.B.zero_()
        ours, theirs = layer(x), conv(x)
        truth = x.double() @ conv.weight.double() + conv.bias.double()
        mag = linear_magnitude(x, conv.weight.t(), conv.bias)
        assert_close(ours, truth, mag, torch.float32, K, "wrapped Conv1D, B = 0", record=False)
        assert_close(theirs, truth, mag, torch.float32, K, "transformers Conv1D", record=False)
        assert_close(ours, theirs.double(), mag, torch.float32, 2 * K, "wrapped vs plain Conv1D", record=False)


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))


def test_target_modules():
    model = gpt2()
    assert _wrapped(replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules=["c_attn"])) == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert _wrapped(replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules=r".*\.1\.mlp\.c_.*")) == [
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    # as PEFT: a regex that also matches the activation and the dropout is an error, not a silent skip
    with pytest.raises(ValueError, match=r"not linear layers.*transformer\.h\.1\.mlp\.act "
                                         r"\(transformers\.activations\.NewGELUActivation\)"):
        replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules=r".*\.1\.mlp\..*")
    all_linear = _wrapped(replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules="all-linear"))
    assert len(all_linear) == 8 and "lm_head" not in all_linear
    # PEFT's own "all-linear" picks the same layers
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                        if isinstance(m, peft.tuners.lora.Linear))
    assert all_linear == peft_names
    # on a model PEFT already wrapped: PEFT's Linear named with its module, and said to be PEFT's; nothing changes
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn \(peft\.tuners\.lora\.layer\.Linear\).*"
                                         r"h\.0\.attn\.c_attn.*: already wrapped by PEFT.*patch_peft"):
        replace_linear_with_lora(peft_model, 2, 1.0, target_modules=["c_attn"])
    assert not _wrapped(peft_model)
    # every target mode that would reach inside PEFT's layers (their base_layer, lora_A, lora_B) raises the same,
    # naming each PEFT layer once, with the model unchanged; patched or not, the PeftModel or its base model
    ids = torch.tensor([[1, 2, 3]])
    patch_peft(peft_model, warn=False)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    for target in (None, "all-linear", r".*base_layer", ["lora_A.default"]):
        for m in (peft_model, peft_model.get_base_model()):
            with pytest.raises(ValueError, match=r"model: .*h\.0\.attn\.c_attn \(peft\.tuners\.lora\.layer\.Linear\)"
                                                 r".*already wrapped by PEFT.*patch_peft") as err:
                replace_linear_with_lora(m, 2, 1.0, target_modules=target)
            assert str(err.value).count("h.1.mlp.c_proj (") == 1
    assert not _wrapped(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)
    # a model that is itself a PEFT layer (names without a prefix), and a linear registered both inside a PEFT
    # layer and outside it (selected by its first name, as the wrapping selects it): refused, nothing changes
    one = peft_model.base_model.model.transformer.h[0].attn.c_attn
    for target in (r"lora_A\.default", "base_layer", None):
        with pytest.raises(ValueError, match=r"model: <model> \(peft\.tuners\.lora\.layer\.Linear\).*already "
                                             r"wrapped by PEFT"):
            replace_linear_with_lora(one, 2, 1.0, target_modules=target)
    assert not _wrapped(one)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = peft.tuners.lora.Linear(self.a, "default", config=LoraConfig(r=2), r=2, lora_alpha=4)

    shared = Shared()
    for kwargs in (dict(target_modules=["a"]), dict(exclude=lambda name, module: name.startswith("b."))):
        with pytest.raises(ValueError, match=r"model: b \(peft\.tuners\.lora\.layer\.Linear\).*already wrapped"):
            replace_linear_with_lora(shared, 2, 1.0, **kwargs)
        assert not _wrapped(shared) and type(shared.b.base_layer) is nn.Linear
    # PEFT's layers excluded (the predicate form): the plain layers left are wrapped, PEFT's are untouched
    partial = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn"]))
    replace_linear_with_lora(partial, 2, 1.0, exclude=lambda name, module: ".c_attn." in name)
    assert "base_model.model.transformer.h.0.mlp.c_fc" in _wrapped(partial)
    assert not any(".c_attn" in n for n in _wrapped(partial))
    # a model without get_output_embeddings: the last linear is the head (the book's out_head)
    book = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    assert _wrapped(replace_linear_with_lora(book, 2, 1.0, target_modules="all-linear")) == ["0", "2"]
    assert _wrapped(replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules=["c_proj"],
                                             exclude=["transformer.h.0.mlp.c_proj"])) == [
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules="(")
    with pytest.raises(TypeError, match="target_modules"):
        replace_linear_with_lora(copy.deepcopy(model), 2, 1.0, target_modules=[1, 2])


def test_exports():
    for name in ("patch_peft", "unpatch_peft", "save_peft_adapter", "load_peft_adapter", "PatchReport"):
        assert name in lora_fast.__all__ and hasattr(lora_fast, name)
    with pytest.raises(TypeError, match="model"):
        patch_peft("not a model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch_peft(nn.Linear(2, 2)).patched == []


class _Classifier(nn.Module):
    """A body with LoRA targets, a norm and a trainable head (PEFT's modules_to_save case)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(self.norm(self.v(torch.relu(self.q(x)))))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_biases_and_modules_to_save_round_trip(bias, tmp_path):
    """Trained biases and a trained head survive both ways: PEFT's files into our layers, and our save into
    PEFT, computing what the trained model computed."""
    base = _Classifier()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], bias=bias,
                                                            modules_to_save=["classifier"]))
    _perturb(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = theirs(x)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=64 * 2.0**-24 * expected.abs().max().item())
    # ours, trained the same way, into PEFT
    ours = replace_linear_with_lora(copy.deepcopy(base).requires_grad_(False), 2, 4.0, scaling="alpha/rank",
                                    target_modules=["q", "v"])
    mark_only_lora_as_trainable(ours, bias=bias)
    ours.classifier.requires_grad_(True)
    _perturb(ours)
    with pytest.warns(UserWarning, match=r"not saved: \['classifier\.weight'"):
        save_peft_adapter(ours, tmp_path / "no-head")
    save_peft_adapter(ours, tmp_path / "ours", modules_to_save=["classifier"])
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        want = ours.eval()(x)
        torch.testing.assert_close(back(x), want, rtol=0, atol=64 * 2.0**-24 * want.abs().max().item())
        torch.testing.assert_close(load_peft_adapter(copy.deepcopy(base), tmp_path / "ours").eval()(x), want,
                                   rtol=0, atol=64 * 2.0**-24 * want.abs().max().item())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("field,value,words", [
    ("lora_alpha", float("nan"), "lora_alpha: expected a finite number"),
    ("lora_alpha", "eight", "lora_alpha: expected a finite number"),
    ("alpha_pattern", {"q": float("inf")}, r"alpha_pattern\['q'\]: expected a finite number"),
    ("r", 0, "r: expected an integer >= 1"),
    ("lora_dropout", 1.5, r"lora_dropout: expected a probability in \[0, 1\]"),
])
def test_failed_load_leaves_the_model_as_it_was(field, value, words, tmp_path):
    base = _Classifier()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    for model in (copy.deepcopy(base), replace_linear_with_lora(copy.deepcopy(base), 2, 1.0)):
        before, kinds = _state(model)
        with pytest.raises(ValueError, match=f"adapter_config.json: {words}"):
            load_peft_adapter(model, tmp_path)
        after, after_kinds = _state(model)
        assert after_kinds == kinds and all(torch.equal(before[k], after[k]) for k in before)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_peft_adapter(copy.deepcopy(base), tmp_path)


def test_lora_dropout_one_loads_and_trains(tmp_path):
    base = _Classifier()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q"], lora_dropout=1.0))
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(replace_linear_with_lora(copy.deepcopy(base), 2, 1.0, target_modules=["q"]), tmp_path)
    assert ours.q.dropout == 1.0
    ours.train()(torch.randn(3, 8)).sum().backward()
    patch_peft(theirs, warn=False)
    theirs.train()(torch.randn(3, 8)).sum().backward()
    theirs.eval()(torch.randn(3, 8))


def test_save_peft_adapter_is_atomic(tmp_path, monkeypatch):
    """A failure while overwriting a rank-4 adapter with a rank-64 one leaves the rank-4 pair, loadable; other
    files in the folder stay."""
    import safetensors.torch

    base = _Classifier()
    small = replace_linear_with_lora(copy.deepcopy(base), 4, 4.0, scaling="alpha/rank", target_modules=["q"])
    save_peft_adapter(small, tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    big = replace_linear_with_lora(copy.deepcopy(base), 64, 4.0, scaling="alpha/rank", target_modules=["q"])

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_peft_adapter(big, tmp_path / "adapter")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert load_peft_adapter(copy.deepcopy(base), tmp_path / "adapter").q.lora.rank == 4
    save_peft_adapter(big, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "README.md").read_text() == "mine"
    assert load_peft_adapter(copy.deepcopy(base), tmp_path / "adapter").q.lora.rank == 64


def test_patched_model_is_freed_without_the_cycle_collector():
    import gc
    import weakref

    model = _peft_model(gpt2, r=2, lora_alpha=2, target_modules=["c_attn"])
    patch_peft(model)
    clone = copy.deepcopy(model)
    layer = clone.base_model.model.transformer.h[0].attn.c_attn
    assert layer.forward._module() is layer            # the copy's forward runs the copy
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()
