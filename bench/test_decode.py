"""Host-side cost of one LoRA layer call at decode sizes (M = 1 to 16 tokens): what a user feels in inference
and small batches. Run with ``pytest bench --benchmark-only`` (not part of ``python -m pytest tests``).

On a CUDA device the calls are synchronised so each timing is a whole call. Without one, lora-fast's layer is
forced onto its reference backend (LORA_FAST_BACKEND=reference): the Triton interpreter must never be timed,
so the CPU rows measure the reference path and are labelled so: "lora-fast-reference" in the test id, "reference
path (CPU)" in extra_info.
"""

import pytest
import torch
from torch import nn

import lora_fast

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# Llama-3-8B's q/o projection on a GPU; on a CPU GPT-2's 768->768, so that the arithmetic does not hide the
# per-call overhead this suite is about
K = N = 4096 if CUDA else 768
RANK = 16
# the CPU rows time lora-fast's reference path (plain PyTorch), not its kernels: named as what they measure
LORA_FAST = "lora-fast" if CUDA else "lora-fast-reference"


def _layer(kind: str) -> nn.Module:
    base = nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if kind == "nn.Linear":
        return base
    if kind == LORA_FAST:
        layer = lora_fast.LinearWithLoRA(base, RANK, 2 * RANK, scaling="alpha/rank")
        layer.lora.A.data = layer.lora.A.data.to(DTYPE)
        layer.lora.B.data = torch.randn_like(layer.lora.B, dtype=DTYPE)
        return layer
    peft = pytest.importorskip("peft", reason="PEFT's LoRA layer needs peft installed")
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK)
    return peft.tuners.lora.Linear(base, "default", config, r=RANK, lora_alpha=2 * RANK)


@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("kind", ["nn.Linear", LORA_FAST, "peft"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "train-step"])
def test_call(benchmark, monkeypatch, kind, M, grad):
    if not CUDA:
        monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    benchmark.group = f"M={M} {'fwd+bwd' if grad else 'forward'}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE),
                                path="triton" if (CUDA and kind == LORA_FAST) else
                                ("reference path (CPU)" if kind == LORA_FAST else kind))
    layer = _layer(kind)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=grad)

    def call():
        if grad:
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)
        if CUDA:
            torch.cuda.synchronize()

    call()
    benchmark(call)
    # the layer computed something of the right shape (and its LoRA term is live: B is not zero)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (M, N) and torch.isfinite(y).all()
