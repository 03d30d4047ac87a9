"""Transformers configs of the whole-model benchmark (``python -m bench.model``), written out here: nothing is
downloaded, the models are built with random weights (AutoModelForCausalLM.from_config).

Sources: each model's config.json on the Hugging Face hub -- meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-0.5B and
openai-community/gpt2 (the book's GPT-2 124M) -- copied field by field for the architecture (sizes, heads, key-value
heads, vocabulary, RoPE, norms, tied embeddings). Token ids and generation settings are left out: the bench feeds
random token ids.
"""

import json
from typing import Dict

REAL: Dict[str, Dict] = {
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        rope_theta=500000.0),
    # Qwen/Qwen2.5-0.5B config.json (Qwen2 puts biases on q, k and v; the class adds them itself)
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        hidden_act="silu", tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
        max_window_layers=24),
    # openai-community/gpt2 config.json (Conv1D layers, learned positions: at most 1024 tokens)
    "gpt2": dict(
        model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
}

# sequence length per model: the 2048, capped by the model's positions (GPT-2 has 1024)
SEQ_LEN = 2048
# batch size per model for the full GPU run (sequences of SEQ_LEN, or 1024 for GPT-2); --batch overrides
BATCH = {"llama-3.2-1b": 4, "qwen2.5-0.5b": 8, "gpt2": 8}
DEFAULT_BATCH = 4

# the model-internal dropouts, set to 0 in every row: LoRA dropout is then the only random op, so rows that should
# agree can be compared (GPT-2's 0.1 would draw masks from torch's generator in some rows and not others' order)
MODEL_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "attention_dropout",
                  "hidden_dropout", "dropout")


def make_config(spec: Dict):
    """A transformers PretrainedConfig from a config dict (``model_type`` plus the class's fields), with the
    model's own dropouts set to 0 (see MODEL_DROPOUTS). Raises ValueError for a dict without model_type."""
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ValueError(f"config: expected a transformers config with a 'model_type', got keys {sorted(spec)}")
    spec.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **spec)
    for name in MODEL_DROPOUTS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def load_json(path: str) -> Dict:
    """A config.json file as a dict. Raises ValueError when it is not a JSON object with a model_type."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or "model_type" not in spec:
        raise ValueError(f"--config {path}: expected a transformers config.json (a JSON object with 'model_type')")
    return spec


def max_positions(config) -> int:
    """The longest sequence the config takes (n_positions for GPT-2, max_position_embeddings otherwise)."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", SEQ_LEN))


def two_layer(spec: Dict, hidden: int = 64, heads: int = 4, vocab: int = 256, positions: int = 128) -> Dict:
    """The CPU mode's small version of a config: two layers, ``hidden`` features, ``heads`` heads of
    hidden/heads features, the same ratios of key-value heads (at least one) and of MLP width, a ``vocab``-token
    vocabulary; what the architecture does (GQA, biases, tied head, RoPE kind, Conv1D) is kept."""
    out = dict(spec)
    out["vocab_size"] = vocab
    if spec.get("model_type") == "gpt2":
        ratio = (spec.get("n_inner") or 4 * spec["n_embd"]) / spec["n_embd"]
        out.update(n_embd=hidden, n_layer=2, n_head=heads, n_positions=positions)
        if spec.get("n_inner"):
            out["n_inner"] = int(round(ratio * hidden))
        return out
    kv = spec.get("num_key_value_heads") or spec["num_attention_heads"]
    ratio = spec["intermediate_size"] / spec["hidden_size"]
    out.update(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
               num_key_value_heads=max(1, heads * kv // spec["num_attention_heads"]), head_dim=hidden // heads,
               intermediate_size=int(round(ratio * hidden)), max_position_embeddings=positions)
    for key in ("max_window_layers",):
        if key in out:
            out[key] = 2
    if isinstance(out.get("rope_scaling"), dict) and "original_max_position_embeddings" in out["rope_scaling"]:
        # llama3 RoPE scaling wants its original context below the model's
        out["rope_scaling"] = dict(out["rope_scaling"], original_max_position_embeddings=positions // 2)
    return out
