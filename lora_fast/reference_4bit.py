"""Plain-PyTorch LoRA linear on a 4-bit base: bitsandbytes' own dequantization, then ``reference.lora_linear``.

The ground truth of the QLoRA tests and a baseline of the benchmarks. It never imports the kernels; it imports
bitsandbytes (``pip install -e ".[qlora]"``) when called.
"""

from typing import Optional

import torch

from . import reference


def bitsandbytes_functional():
    """``bitsandbytes.functional``, or ImportError saying what to install."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise ImportError("lora-fast's 4-bit (QLoRA) paths need bitsandbytes: pip install bitsandbytes "
                          "(or pip install -e \".[qlora]\")") from err
    return bnb_functional


def dequantize(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    """The (out_features, in_features) weight in the quantized tensor's dtype (``quant_state.dtype``), from
    ``bitsandbytes.functional.dequantize_4bit`` (QLoRA, Dettmers et al. 2023: NF4 / FP4 with block absmax,
    double quantization undone first). Raises ImportError without bitsandbytes."""
    data = qweight.data if isinstance(qweight, torch.nn.Parameter) else qweight
    return bitsandbytes_functional().dequantize_4bit(data, quant_state)


def lora_linear_4bit(x: torch.Tensor, qweight: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                     A: torch.Tensor, B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True,
                     dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x deq(W)^T + b + scale * (dropout(x) @ A) @ B, unfused: deq(W) from bitsandbytes, cast to x's dtype
    (as bitsandbytes' matmul_4bit casts it), then ``reference.lora_linear`` (autograd does the backward; the
    4-bit weight gets no gradient). Arguments as ``lora_fast.qlora.lora_linear_4bit``; ``dropout_mask`` as
    ``reference.lora_linear``'s. Raises ImportError without bitsandbytes; TypeError / ValueError as
    ``lora_fast.lora_linear``."""
    weight = dequantize(qweight, quant_state).to(x.dtype)
    return reference.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, training=training,
                                 dropout_mask=dropout_mask)
