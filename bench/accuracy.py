"""Each implementation's largest error against float64 on small shapes (dropout 0: the implementations
draw different dropout masks; lora-fast's dropout is checked against its own mask in tests/test_dropout.py).
DoRA rows are compared with lora_fast.reference.dora_linear on their own magnitude.

Error of an output = max |out - ref| / max |ref|, ref from lora_fast.reference on the inputs upcast to
float64; outputs: y and the gradients dx, dA, dB for dy drawn at random (F.linear: y and dx of x W^T + b).
"""

from typing import Dict, Sequence, Tuple

import torch

from lora_fast import reference

from . import impls

SMALL_SHAPES = ((64, 96, 80, 8, True), (37, 123, 61, 3, False))  # (M, K, N, r, bias): round and odd sizes


def errors(impl: str, dtype: torch.dtype, device="cpu",
           shapes: Sequence[Tuple[int, int, int, int, bool]] = SMALL_SHAPES) -> Dict[str, float]:
    """{"y": err, "dx": err, "dA": err, "dB": err} worst over ``shapes`` (F.linear: y and dx only)."""
    worst: Dict[str, float] = {}
    scale = 0.5
    for M, K, N, r, bias in shapes:
        x, weight, b, A, B = impls.make_tensors(M, K, N, r, dtype, device, bias=bias)
        built = impls.build(impl, weight, b, A, B, scale, 0.0)
        y = built(x)
        dy = torch.randn(y.shape, device=device).to(dtype)
        leaves = [x, *built.params]
        leaves = leaves[:3]   # x, A, B (a DoRA row's magnitude gradient is tested in tests/test_dora.py)
        grads = torch.autograd.grad(y, leaves, dy)
        grads = [grads[0], *built.as_AB(grads[1:])]

        ref_leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
        wd = weight.double()
        bd = b.double() if b is not None else None
        if impl == "F.linear":
            ref_y = torch.nn.functional.linear(ref_leaves[0], wd, bd)
        elif impl in impls.DORA_IMPLS:
            # the row's own magnitude (its third parameter), upcast; the norm is float64 here
            ref_y = reference.dora_linear(ref_leaves[0], wd, bd, ref_leaves[1], ref_leaves[2],
                                          built.params[2].detach().double(), scale)
        else:
            ref_y = reference.lora_linear(ref_leaves[0], wd, bd, ref_leaves[1], ref_leaves[2], scale)
        ref_grads = torch.autograd.grad(ref_y, ref_leaves[:len(leaves)], dy.double())
        names = ("dx", "dA", "dB")[:len(leaves)]
        for name, out, ref in (("y", y, ref_y), *zip(names, grads, ref_grads)):
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            worst[name] = max(worst.get(name, 0.0), err)
    return worst
