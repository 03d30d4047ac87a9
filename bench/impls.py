"""The implementations the bench compares, each built around the same tensors.

Every builder takes (weight, bias, A, B, scale, dropout_p) -- weight (N, K) and bias (N,) frozen, A (K, r) and
B (r, N) trainable, all in the data dtype -- and returns a callable x (M, K) -> y (M, N) that trains (dropout
active). Adapters are kept in the base dtype for every row (PEFT's get_peft_model with
autocast_adapter_dtype=False; Unsloth does the same), so that all rows do the same arithmetic.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lora_fast
from lora_fast import reference

IMPLS = ("F.linear", "book", "peft", "addmm-chain", "compile", "lora-fast", "peft-dora", "lora-fast-dora")
# DoRA rows (Liu et al. 2024; PEFT's use_dora=True): the magnitude trains too (a third parameter, dm)
DORA_IMPLS = ("peft-dora", "lora-fast-dora")
DESCRIPTIONS = {
    "F.linear": "F.linear alone, W frozen: the floor",
    "book": "the book's LinearWithLoRA arithmetic (lora_fast.reference.lora_linear, eager, nn.Dropout's RNG)",
    "peft": "PEFT's peft.tuners.lora.Linear around an nn.Linear",
    "addmm-chain": "y = x W^T; y.addmm_(x A, B, alpha=scale) with a hand-written backward (Unsloth's technique)",
    "compile": 'torch.compile(lora_fast.reference.lora_linear, mode="max-autotune-no-cudagraphs", torch RNG)',
    "lora-fast": "lora_fast.lora_linear (fused Triton kernels)",
    "peft-dora": "PEFT's peft.tuners.lora.Linear with use_dora=True (DoRA)",
    "lora-fast-dora": "lora_fast.dora_linear (DoRA on the fused kernels)",
}

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Built:
    """An implementation ready to run: ``forward(x)``, and its trainable adapter tensors ``params`` (A, B
    as passed, or PEFT's lora_A.weight (r, K) and lora_B.weight (N, r), which share A's and B's storage;
    ``transposed`` says so; DoRA rows add the magnitude (N,)). Calling the object calls forward."""

    forward: Forward
    params: List[torch.Tensor]
    transposed: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def as_AB(self, grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Gradients of ``params`` in A's (K, r) and B's (r, N) layout (a magnitude's (N,) as it is)."""
        return [g.t() if g.dim() == 2 else g for g in grads] if self.transposed else list(grads)


class AddmmChainLoRA(torch.autograd.Function):
    """LoRA linear as two in-place addmm's with a hand-written backward (the technique of Unsloth's fast LoRA).

    Forward: S = dropout(x) A (M, r); y = x W^T + b; y += scale * S B (in place). Saved: dropout(x) (x itself
    without dropout), S, the keep-mask when dropout_p > 0, and the parameters.
    Backward: dS = dY B^T; dB = scale S^T dY; dX = dY W, then dX += scale * keep/(1-p) * (dS A^T) in place;
    dA = scale dropout(x)^T dS. Shapes: x (M, K), weight (N, K), bias (N,) or None, A (K, r), B (r, N), all in
    x's dtype. Raises ValueError otherwise.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout_p):
        if not (x.dim() == 2 and A.dtype == B.dtype == weight.dtype == x.dtype):
            raise ValueError("AddmmChainLoRA: expected 2-D x and weight, A, B in x's dtype, got "
                             f"x {tuple(x.shape)} {x.dtype}, weight {weight.dtype}, A {A.dtype}, B {B.dtype}")
        mask = None
        x_lora = x
        if dropout_p > 0:
            x_lora, mask = torch.native_dropout(x, dropout_p, True)
        S = x_lora @ A
        y = F.linear(x, weight, bias)
        y.addmm_(S, B, alpha=scale)
        ctx.save_for_backward(x_lora, weight, A, B, S, mask)
        ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, weight, A, B, S, mask = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        dx = dW = db = dA = dB = None
        dS = dy @ B.t()
        if need_dB:
            dB = (S.t() @ dy).mul_(scale)
        if need_dx:
            dx = dy @ weight
            if mask is None:
                dx.addmm_(dS, A.t(), alpha=scale)
            else:
                dx.addcmul_(dS @ A.t(), mask, value=scale / (1.0 - p))
        if need_dA:
            dA = (x_lora.t() @ dS).mul_(scale)
        if need_dW:
            raise NotImplementedError("AddmmChainLoRA: the bench keeps the base weight frozen")
        if need_db and ctx.has_bias:
            db = dy.sum(0)
        return dx, dW, db, dA, dB, None, None


def _peft_layer(weight, bias, A, B, scale, dropout_p, use_dora: bool = False) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    N, K = weight.shape
    r = A.shape[1]
    base = nn.Linear(K, N, bias=bias is not None, device="meta", dtype=weight.dtype)
    # share the bench's tensors (no copies): the saved-bytes count excludes parameter storages by identity
    base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        base.bias = nn.Parameter(bias.detach(), requires_grad=False)
    # PEFT's scaling is lora_alpha / r
    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=dropout_p, use_dora=use_dora)
    layer = PeftLinear(base, "default", config, r=r, lora_alpha=scale * r, lora_dropout=dropout_p,
                       use_dora=use_dora)
    layer.lora_A["default"].weight = nn.Parameter(A.detach().t())  # PEFT's lora_A.weight is (r, in)
    layer.lora_B["default"].weight = nn.Parameter(B.detach().t())  # lora_B.weight is (out, r)
    if use_dora:
        # the magnitude as lora-fast-dora's row starts it (in the adapters' dtype): ||W + s (A B)^T|| per row
        layer.lora_magnitude_vector["default"].weight = nn.Parameter(_magnitude(weight, A, B, scale))
    if layer.lora_A["default"].weight.dtype != weight.dtype:
        raise RuntimeError("peft: adapter dtype differs from the base dtype")
    return layer.train()


def _magnitude(weight, A, B, scale) -> torch.Tensor:
    return reference.dora_weight_norm(weight, A, B, scale).to(A.dtype)


def peft_available() -> Optional[str]:
    """None when PEFT can be imported, else the reason it cannot."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        return f"peft is not installed ({e})"
    return None


def build(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
          scale: float, dropout_p: float, *, compiled_cache: Optional[Dict] = None) -> Built:
    """Implementation ``name`` (one of IMPLS) over these tensors, as a ``Built``; x (M, K) -> y (M, N). The DoRA
    rows add the magnitude m (N,) = ||W + scale (A B)^T||_row as a third trainable parameter.

    Raises ValueError for an unknown name; ImportError when ``peft`` is asked for and not installed.
    """
    if name == "F.linear":
        return Built(lambda x: F.linear(x, weight, bias), [])
    if name == "book":
        # torch's dropout, as the book and users' code run it (the Philox mask in torch ops would slow it)
        return Built(lambda x: reference.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p,
                                                     training=True, dropout_rng="torch"), [A, B])
    if name == "peft":
        layer = _peft_layer(weight, bias, A, B, scale, dropout_p)
        return Built(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight], transposed=True)
    if name == "addmm-chain":
        return Built(lambda x: AddmmChainLoRA.apply(x, weight, bias, A, B, scale, dropout_p), [A, B])
    if name == "compile":
        cache = compiled_cache if compiled_cache is not None else {}
        if "fn" not in cache:
            cache["fn"] = torch.compile(reference.lora_linear, mode="max-autotune-no-cudagraphs")
        fn = cache["fn"]
        return Built(lambda x: fn(x, weight, bias, A, B, scale, dropout_p=dropout_p, training=True,
                                  dropout_rng="torch"), [A, B])
    if name == "lora-fast":
        return Built(lambda x: lora_fast.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p,
                                                     training=True), [A, B])
    if name == "peft-dora":
        layer = _peft_layer(weight, bias, A, B, scale, dropout_p, use_dora=True)
        return Built(layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                             layer.lora_magnitude_vector["default"].weight], transposed=True)
    if name == "lora-fast-dora":
        m = _magnitude(weight, A, B, scale).requires_grad_(A.requires_grad)
        return Built(lambda x: lora_fast.dora_linear(x, weight, bias, A, B, m, scale, dropout_p=dropout_p,
                                                     training=True), [A, B, m])
    raise ValueError(f"implementation: expected one of {IMPLS}, got {name!r}")


def make_tensors(M: int, K: int, N: int, rank: int, dtype: torch.dtype, device, *, bias: bool,
                 requires_grad: bool = True):
    """x (M, K) requiring grad (as inside a network), frozen weight (N, K) and bias (N,), trainable A (K, r) and
    B (r, N), all in ``dtype``; values scaled so that y and the LoRA term are O(1). On 'meta' nothing is drawn."""
    def rand(*shape, std=1.0, grad=False):
        if torch.device(device).type == "meta":
            t = torch.empty(*shape, device=device, dtype=dtype)
        else:
            t = (torch.randn(*shape, device=device) * std).to(dtype)
        return t.requires_grad_(grad and requires_grad)

    x = rand(M, K, grad=True)
    weight = rand(N, K, std=K**-0.5)
    b = rand(N) if bias else None
    A = rand(K, rank, std=K**-0.5, grad=True)
    B = rand(rank, N, std=rank**-0.5, grad=True)
    return x, weight, b, A, B
