"""Projection shapes of real models, and the grid the bench runs over.

Sources (the models' config.json on the Hugging Face hub): hidden_size, intermediate_size, num_key_value_heads
x head_dim, attention_bias. Llama-3-8B and Mistral-7B-v0.1 share every projection shape; Qwen2.5-7B has biases
on q/k/v; GPT-2 124M (the book's model) has biases everywhere.
"""

import dataclasses
from typing import Dict, List, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear layer of a model: x (M, in_features) -> y (M, out_features)."""

    model: str
    name: str  # the projections of the model that have this shape, e.g. "q/o"
    in_features: int
    out_features: int
    bias: bool

    @property
    def label(self) -> str:
        return f"{self.model} {self.name} {self.in_features}->{self.out_features}"


MODELS: Dict[str, List[Projection]] = {
    "llama3-8b": [
        Projection("llama3-8b", "q/o", 4096, 4096, False),
        Projection("llama3-8b", "k/v", 4096, 1024, False),
        Projection("llama3-8b", "gate/up", 4096, 14336, False),
        Projection("llama3-8b", "down", 14336, 4096, False),
    ],
    "mistral-7b": [
        Projection("mistral-7b", "q/o", 4096, 4096, False),
        Projection("mistral-7b", "k/v", 4096, 1024, False),
        Projection("mistral-7b", "gate/up", 4096, 14336, False),
        Projection("mistral-7b", "down", 14336, 4096, False),
    ],
    "qwen2.5-7b": [
        Projection("qwen2.5-7b", "q", 3584, 3584, True),
        Projection("qwen2.5-7b", "o", 3584, 3584, False),
        Projection("qwen2.5-7b", "k/v", 3584, 512, True),
        Projection("qwen2.5-7b", "gate/up", 3584, 18944, False),
        Projection("qwen2.5-7b", "down", 18944, 3584, False),
    ],
    "gpt2-124m": [
        Projection("gpt2-124m", "q/k/v/o", 768, 768, True),
        Projection("gpt2-124m", "fc", 768, 3072, True),
        Projection("gpt2-124m", "proj", 3072, 768, True),
    ],
}

TOKENS = (2048, 8192, 16384)
RANKS = (8, 16, 64)
DTYPES = ("bfloat16", "float16")
DROPOUTS = (0.0, 0.1)

# --quick: the target point (H200, bf16, r=16, dropout 0, M=8192) on the Llama-3-8B shapes
QUICK = dict(models=("llama3-8b",), tokens=(8192,), ranks=(16,), dtypes=("bfloat16",), dropouts=(0.0,))


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration: a projection at M tokens, LoRA rank, dtype name and dropout."""

    proj: Projection
    tokens: int
    rank: int
    dtype: str
    dropout: float

    @property
    def M(self) -> int:
        return self.tokens

    @property
    def K(self) -> int:
        return self.proj.in_features

    @property
    def N(self) -> int:
        return self.proj.out_features


def projections(models: Sequence[str]) -> List[Projection]:
    """The projections of ``models``, in order; a shape shared by several models (Mistral = Llama) runs once,
    labelled with every model that has it. Raises ValueError for an unknown model."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--model: unknown {unknown}; expected some of {sorted(MODELS)}")
    seen: Dict[Tuple[int, int, bool], Projection] = {}
    for model in models:
        for p in MODELS[model]:
            key = (p.in_features, p.out_features, p.bias)
            if key in seen:
                first = seen[key]
                seen[key] = dataclasses.replace(first, model=f"{first.model}+{model}")
            else:
                seen[key] = p
    return list(seen.values())


def grid(models, tokens, ranks, dtypes, dropouts) -> List[Case]:
    """Every Case of the selection, shape-major (all settings of one shape are adjacent)."""
    return [Case(p, m, r, d, q) for p in projections(models) for m in tokens for r in ranks for d in dtypes
            for q in dropouts]
