"""Plain-PyTorch LoRA linear on a 4-bit base: the layout's definition in torch ops, then ``reference.lora_linear``.

The ground truth of the QLoRA tests and a baseline of the benchmarks. It never imports the kernels; it imports
bitsandbytes (``pip install -e ".[qlora]"``) when called, for its 16-value code tables only.

Why not bitsandbytes' own ``dequantize_4bit``: on the CPU, bitsandbytes 0.50.2 dequantizes an even
in_features with a native kernel that takes the quantization blocks to lie inside rows. Where blocks straddle
rows (in_features not a multiple of the blocksize, e.g. 48 at blocksize 64 or 128, 192 at 128 or 256) its
result is wrong (up to 4 NF4 steps off; its own quantize -> dequantize round trip shows it), and whether that
kernel runs depends on the CPU's features. Its quantization (``quantize_4bit``) is not affected: the codes and
absmax it writes are whatever they are, and this module reads them by the layout's definition. (Its generic
torch path, taken for an odd in_features or on a GPU, agrees with the definition bit for bit.)
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


def block_absmax(quant_state) -> torch.Tensor:
    """The fp32 absmax of every ``quant_state.blocksize`` block of the flattened weight.

    Without double quantization: ``quant_state.absmax`` itself. With it (``quant_state.nested``, QLoRA's double
    quantization): absmax[j] = code2[q[j]] * absmax2[j // blocksize2] + offset, with q = ``quant_state.absmax``
    (uint8 codes), code2 / absmax2 / blocksize2 from ``quant_state.state2`` (bitsandbytes' 8-bit dynamic map) and
    ``quant_state.offset``; the product and the sum each rounded to fp32, as bitsandbytes computes them.
    """
    absmax = quant_state.absmax.reshape(-1)
    if not getattr(quant_state, "nested", False):
        return absmax.to(torch.float32)
    state2 = quant_state.state2
    j = torch.arange(absmax.numel(), device=absmax.device)
    scaled = state2.code.reshape(-1).to(torch.float32)[absmax.long()] \
        * state2.absmax.reshape(-1).to(torch.float32)[j // int(state2.blocksize)]
    return scaled + torch.as_tensor(quant_state.offset, device=absmax.device).to(torch.float32)


def dequantize(qweight: torch.Tensor, quant_state) -> torch.Tensor:
    """The (out_features, in_features) weight in ``quant_state.dtype``, by the definition of bitsandbytes' 4-bit
    layout (QLoRA, Dettmers et al. 2023): the packed bytes hold two codes each, the even flat index of the
    row-major (N, K) weight in the high nibble; element i is code[nibble_i] * absmax[i // blocksize] in fp32
    (code: bitsandbytes' NF4 or FP4 table of ``quant_state.quant_type``; absmax: ``block_absmax``), then cast to
    ``quant_state.dtype``. ``qweight``: the packed codes (uint8, or a quant_storage dtype holding the same bytes).

    Raises ImportError without bitsandbytes; ValueError for a missing quant_state or a byte count that does not
    match its shape."""
    bnb_functional = bitsandbytes_functional()
    if quant_state is None:
        raise ValueError("quant_state: expected bitsandbytes' QuantState, got None (the weight is not quantized)")
    data = qweight.data if isinstance(qweight, torch.nn.Parameter) else qweight
    data = data.contiguous().reshape(-1).view(torch.uint8)
    N, K = (int(s) for s in quant_state.shape)
    n = N * K
    if data.numel() != (n + 1) // 2:
        raise ValueError(f"qweight: expected {(n + 1) // 2} bytes of packed codes for shape {(N, K)}, got "
                         f"{data.numel()}")
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n].long()
    code = bnb_functional.get_4bit_type(quant_state.quant_type, device=data.device).to(torch.float32)
    block = torch.arange(n, device=data.device) // int(quant_state.blocksize)
    weight = code[nibbles] * block_absmax(quant_state)[block]
    return weight.reshape(N, K).to(quant_state.dtype)


def lora_linear_4bit(x: torch.Tensor, qweight: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                     A: torch.Tensor, B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True,
                     dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x deq(W)^T + b + scale * (dropout(x) @ A) @ B, unfused: deq(W) by the layout's definition
    (``dequantize``), cast to x's dtype (as bitsandbytes' matmul_4bit casts it), then ``reference.lora_linear``
    (autograd does the backward; the 4-bit weight gets no gradient). Arguments as
    ``lora_fast.qlora.lora_linear_4bit``; ``dropout_mask`` as ``reference.lora_linear``'s. Raises ImportError
    without bitsandbytes; TypeError / ValueError as ``lora_fast.lora_linear``."""
    weight = dequantize(qweight, quant_state).to(x.dtype)
    return reference.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, training=training,
                                 dropout_mask=dropout_mask)
