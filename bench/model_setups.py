"""The rows of the whole-model benchmark: one transformers model with random weights, fine-tuned four ways, and the
bytes its LoRA layers save for backward (measured with saved_tensors_hooks, and the formula the CPU mode checks).

Setups (LoRA settings of the issue: every linear layer but the output head, rank 16, alpha 32, scale alpha/rank):
  frozen      no adapter; the backward still runs through every layer to the input embeddings (the floor: a LoRA
              step needs that dX chain anyway), and there is no optimizer step
  peft        peft.get_peft_model(LoraConfig(target_modules="all-linear", ...))
  peft+patch  the same PEFT model after lora_fast.patch_peft (its LoRA layers run lora_fast.lora_linear)
  lora-fast   lora_fast.replace_linear_with_lora(model, target_modules="all-linear", scaling="alpha/rank")
Adapters: float32 on a 16-bit base (PEFT's default, autocast_adapter_dtype=True; LinearWithLoRA's default), or the
base dtype ("bf16 adapters": PEFT's autocast_adapter_dtype=False, LinearWithLoRA's adapters cast after wrapping).
"""

import contextlib
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import lora_fast
from lora_fast import philox
from lora_fast.layers import is_linear

from . import model_configs

SETUPS = ("frozen", "peft", "peft+patch", "lora-fast")
RANK, ALPHA = 16, 32
PEFT_PREFIX = "base_model.model."


@contextlib.contextmanager
def lora_fast_backend(name: Optional[str]):
    """Within: LORA_FAST_BACKEND=name (None: as outside). The CPU agreement runs use "reference" (plain torch: the
    Triton interpreter would take minutes per model); the saved-bytes runs use the kernels' path."""
    old = os.environ.get("LORA_FAST_BACKEND")
    if name is not None:
        os.environ["LORA_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LORA_FAST_BACKEND", None)
        else:
            os.environ["LORA_FAST_BACKEND"] = old


@dataclasses.dataclass
class Run:
    """A model ready to train: ``model`` (in train mode), its trainable ``params``, and its LoRA layers by the
    plain model's qualified name (PEFT's prefix removed), so rows can be compared layer by layer."""

    setup: str
    model: nn.Module
    params: List[nn.Parameter]
    lora_layers: Dict[str, nn.Module]

    def adapters(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A (in, r), B (r, out)) as views of the parameters (PEFT's lora_A.weight is A^T)."""
        out = {}
        for name, m in self.lora_layers.items():
            if isinstance(m, lora_fast.LinearWithLoRA):
                out[name] = (m.lora.A, m.lora.B)
            else:
                out[name] = (m.lora_A["default"].weight.t(), m.lora_B["default"].weight.t())
        return out

    def adapter_grads(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """name -> (dA, dB) in A's and B's layout, after a backward."""
        out = {}
        for name, m in self.lora_layers.items():
            if isinstance(m, lora_fast.LinearWithLoRA):
                out[name] = (m.lora.A.grad, m.lora.B.grad)
            else:
                out[name] = (m.lora_A["default"].weight.grad.t(), m.lora_B["default"].weight.grad.t())
        return out


def build_base(spec: Dict, dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """AutoModelForCausalLM.from_config(spec) in ``dtype`` on ``device``, weights drawn under ``seed`` (so every
    setup starts from the same base), frozen, in train mode."""
    from transformers import AutoModelForCausalLM

    config = model_configs.make_config(spec)
    torch.manual_seed(seed)
    # drawn in float32 whatever ``dtype`` is, then cast: the float64 reference and the float32 and bfloat16 rows
    # then share their base weights (up to the cast)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.to(dtype).requires_grad_(False)
    return model.train()


def target_names(model: nn.Module) -> List[str]:
    """Qualified names of the layers "all-linear" targets: every nn.Linear / Conv1D but the output head (PEFT's
    rule, and lora_fast's for target_modules="all-linear")."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if is_linear(m) and m is not head]


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # non-reentrant: no input needs requires_grad, RNG state is replayed
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(setup: str, spec: Dict, dtype: torch.dtype, *, adapter_dtype: torch.dtype = torch.float32,
          dropout: float = 0.0, checkpointing: bool = False, device="cpu", seed: int = 0) -> Run:
    """Setup ``setup`` (one of SETUPS) of the model ``spec`` with base weights in ``dtype`` (drawn under ``seed``)
    and adapters in ``adapter_dtype``, LoRA dropout ``dropout``, activation checkpointing on or off.

    Raises ValueError for an unknown setup, an adapter dtype other than float32 or ``dtype``; ImportError when
    peft is needed and missing.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup: expected one of {SETUPS}, got {setup!r}")
    if adapter_dtype not in (torch.float32, dtype):
        raise ValueError(f"adapter_dtype: expected float32 or the base dtype {dtype}, got {adapter_dtype}")
    model = build_base(spec, dtype, device, seed)
    if checkpointing:
        _enable_checkpointing(model)
    if setup == "frozen":
        # nothing trains: gradients start at the input embeddings' output, so the backward is the full dX chain
        model.enable_input_require_grads()
        return Run(setup, model, [], {})
    if setup in ("peft", "peft+patch"):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear")
        model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == torch.float32)
        if setup == "peft+patch":
            report = lora_fast.patch_peft(model, warn=False)
            if report.skipped:
                raise RuntimeError(f"patch_peft left layers on PEFT's path: {dict(report.skipped_kinds())}")
        layers = {n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n: m for n, m in model.named_modules()
                  if isinstance(m, LoraLayer)}
    else:
        lora_fast.replace_linear_with_lora(model, RANK, ALPHA, target_modules="all-linear", scaling="alpha/rank",
                                           dropout=dropout)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, lora_fast.LinearWithLoRA)}
        if adapter_dtype != torch.float32:
            for m in layers.values():
                m.lora.to(adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(setup, model.train(), params, layers)
    dtypes = {t.dtype for ab in run.adapters().values() for t in ab}
    if dtypes != {adapter_dtype}:
        raise RuntimeError(f"{setup}: adapters in {dtypes}, expected {adapter_dtype}")
    return run


def set_adapters(run: Run, seed: int = 1) -> None:
    """The same nonzero adapters in every setup, layer by layer (A ~ N(0, 1/in), B ~ N(0, 1/r), drawn in float32
    on the CPU): with B = 0 (PEFT's and the book's initialisation) dA would be zero and the loss would not see the
    adapters, so an agreement check would check nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(run.lora_layers):
            A, B = run.adapters()[name]
            A.copy_(torch.randn(A.shape, generator=g) * A.shape[0] ** -0.5)
            B.copy_(torch.randn(B.shape, generator=g) * B.shape[0] ** -0.5)


def random_batch(vocab: int, batch: int, seq: int, device, seed: int = 2) -> torch.Tensor:
    """Random token ids (batch, seq), the same for every setup (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM cross entropy of predicting ids[:, 1:] from ids[:, :-1] (transformers' loss, fp32 logits)."""
    return model(input_ids=ids, labels=ids).loss


# --- bytes saved for backward in the LoRA layers ---------------------------------------------------------------

def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def measure_saved(run: Run, ids: torch.Tensor) -> Tuple[int, Dict[str, int]]:
    """(bytes, {layer: bytes first saved there}) that autograd saves inside the LoRA layers during one forward:
    every storage counted once over the whole model (q, k and v saving the same x count it once), parameters
    excluded. Runs without activation checkpointing only (its own saved-tensor hooks would be shadowed)."""
    params = {_key(p) for p in run.model.parameters()}
    counted: Dict[int, int] = {}
    per_layer: Dict[str, int] = {}
    stack: List[contextlib.AbstractContextManager] = []

    def pack_for(name):
        def pack(t):
            key = _key(t)
            if key not in params and key not in counted:
                counted[key] = t.untyped_storage().nbytes()
                per_layer[name] = per_layer.get(name, 0) + counted[key]
            return t
        return pack

    def enter(name):
        def pre(module, args):
            ctx = torch.autograd.graph.saved_tensors_hooks(pack_for(name), lambda t: t)
            ctx.__enter__()
            stack.append(ctx)
        return pre

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    handles = []
    for name, m in run.lora_layers.items():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    try:
        loss = loss_of(run.model, ids)
    finally:
        for h in handles:
            h.remove()
    del loss
    return sum(counted.values()), per_layer


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """A targeted linear layer: ``name``, in/out features K and N, and the tokens M and the input ``group`` (layers
    that read the same tensor -- q, k, v; gate, up -- share a group) of its input in a forward."""

    name: str
    K: int
    N: int
    M: int
    group: int
    itemsize: int
    requires_grad: bool  # in the LoRA model: False for inputs computed from frozen layers only (the first q, k, v)


def structure(spec: Dict, dtype: torch.dtype, batch: int, seq: int) -> List[LayerInput]:
    """The targeted layers of ``spec``'s model with their inputs, from one forward on the 'meta' device (no memory,
    no arithmetic: any size runs here). Which layers share an input is read from the tensors themselves; whether an
    input requires grad in the LoRA model, by making each targeted layer's output a leaf that requires grad (as
    its adapter's output would)."""
    model = build_base(spec, dtype, "meta")
    names = set(target_names(model))
    seen: Dict[int, int] = {}
    alive: List[torch.Tensor] = []  # a freed meta tensor's storage address can be reused: keep inputs alive
    layers: List[LayerInput] = []
    handles = []

    def post(module, args, output):
        return output.detach().requires_grad_()

    for name, m in model.named_modules():
        if name in names:
            def pre(module, args, name=name):
                x = args[0]
                alive.append(x)
                group = seen.setdefault(_key(x), len(seen))
                weight = module.weight
                K = x.shape[-1]
                N = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]
                layers.append(LayerInput(name, K, N, x.numel() // K, group, x.element_size(), x.requires_grad))
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return layers


def saved_formula(setup: str, layers: List[LayerInput], adapter_dtype: torch.dtype, dropout: float,
                  device_type: str, rank: int = RANK) -> int:
    """Bytes the LoRA layers save for backward in one forward, per setup (what measure_saved counts):

    fused (peft+patch, lora-fast): x itself (once per group), S = dropout(x) A (M x r, float32) per layer, and
      with dropout the keep-mask as bits (M rows of lora_fast.philox.mask_row_bytes(K): K / 8 bytes, padded to
      16) per layer; no dropped copy of x (lora_fast/functional.py, _save).
    peft: lora_A saves its input -- x itself when the adapters are in x's dtype and dropout is 0 (once per group),
      else a private copy per layer (x cast to the adapters' dtype, or dropout's output); dropout's backward keeps
      its mask where x requires grad: 1 byte per element on CUDA (native_dropout), the adapters' itemsize on CPU
      and 'meta' (torch's unfused dropout keeps its scaled noise tensor); lora_B saves lora_A's output (M x r, in
      the adapters' dtype).
    frozen: 0 (nothing is wrapped; F.linear with a frozen weight saves nothing).
    """
    if setup == "frozen":
        return 0
    a = torch.empty((), dtype=adapter_dtype).element_size()
    groups = {}
    total = 0
    for layer in layers:
        x_bytes = layer.M * layer.K * layer.itemsize
        if setup in ("peft+patch", "lora-fast"):
            groups[layer.group] = x_bytes
            total += layer.M * rank * 4 + (layer.M * philox.mask_row_bytes(layer.K) if dropout > 0 else 0)
        elif setup == "peft":
            if dropout > 0:
                mask = (1 if device_type == "cuda" else a) if layer.requires_grad else 0
                total += layer.M * layer.K * (a + mask)
            elif a == layer.itemsize:
                groups[layer.group] = x_bytes
            else:
                total += layer.M * layer.K * a
            total += layer.M * rank * a
        else:
            raise ValueError(f"setup: expected one of {SETUPS}, got {setup!r}")
    return total + sum(groups.values())
