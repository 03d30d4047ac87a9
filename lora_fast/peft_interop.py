"""PEFT interop: PEFT LoRA layers on the fused op (patch_peft / unpatch_peft), and PEFT's adapter format for
models made with replace_linear_with_lora (save_peft_adapter / load_peft_adapter).

PEFT (Hugging Face, https://github.com/huggingface/peft) stores a LoRA layer as ``lora_A`` = nn.Linear(in, r)
and ``lora_B`` = nn.Linear(r, out) and computes base(x) + lora_B(lora_A(dropout(x))) * scaling, with scaling =
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). In lora-fast's notation A = lora_A.weight^T (in, r),
B = lora_B.weight^T (r, out) and scale = scaling. With ``use_dora=True`` (DoRA, Liu et al. 2024) each layer also
has ``lora_magnitude_vector`` (out,) = lora-fast's LinearWithDoRA ``m``. peft, transformers and safetensors are
imported only when a function here is called.
"""

import collections
import ctypes
import dataclasses
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
import weakref
from typing import Optional, Union

import torch
from torch import nn

from . import _env
from ._files import give_mode
from .adapters import Transaction, check_adapter_name, model_adapters
from .dora import dora_linear
from .functional import lora_linear, lora_linear_stored
from .layers import (
    DEFAULT_ADAPTER,
    LinearWithDoRA,
    LinearWithLoRA,
    forward_4bit,
    forward_dora_4bit,
    has_4bit_forward,
    has_plain_forward,
    is_linear,
    is_linear4bit,
    lora_scale,
)
from .multi import _lora_linear_multi, close_rows_scope, open_rows_scope, sample_rows
from .patching import _inside_attention, module_places

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# the prefix PEFT's PeftModel puts before a module path of the base model in its adapter files
PEFT_PREFIX = "base_model.model."
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class PatchReport:
    """What patch_peft did. ``patched``: qualified names of the PEFT LoRA layers that now run on the fused op.
    ``skipped``: qualified name -> reason, for the LoRA layers that run on PEFT's own path. Both describe the
    layers that exist at the call: LoRA layers PEFT creates later (``add_adapter`` / ``load_adapter`` /
    ``inject_adapter_in_model`` on modules not adapted before) run PEFT's own forward until ``patch_peft`` is
    called again; a new adapter on a layer already patched is fused at call time."""

    patched: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)

    def skipped_kinds(self) -> collections.Counter:
        """Number of skipped layers per reason."""
        return collections.Counter(self.skipped.values())


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as err:
        raise ImportError("lora_fast.patch_peft needs peft: pip install peft") from err
    return lora_layer


def _peft_lora_4bit():
    """PEFT's LoRA layer class over a bitsandbytes Linear4bit (peft.tuners.lora.bnb.Linear4bit), or None when
    bitsandbytes (hence that class) is not available."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:
        return None
    return getattr(lora_bnb, "Linear4bit", None)


def _has_hooks(module: nn.Module) -> bool:
    # a hook (accelerate's offloading _hf_hook, a user's) expects the module's own forward to be called
    return bool(module._forward_hooks or module._forward_pre_hooks or module.__dict__.get("_hf_hook"))


def _layer_reason(module: nn.Module, lora_layer) -> Optional[str]:
    """Why this LoRA layer cannot be fused at all (its class or its base layer), or None."""
    # PEFT's 4-bit class is looked up only for a Linear4bit base (importing it imports bitsandbytes)
    lora_4bit = _peft_lora_4bit() if is_linear4bit(getattr(module, "base_layer", None)) else None
    if lora_4bit is not None and type(module) is lora_4bit:
        if not has_4bit_forward(module.base_layer):
            return f"base layer {type(module.base_layer).__name__} (own forward, or not quantized in " \
                   "bitsandbytes' standard layout)"
        return None
    if type(module) is lora_layer.Linear and has_4bit_forward(getattr(module, "base_layer", None)):
        # PEFT's plain lora.Linear around a bitsandbytes Linear4bit (a hand-built model: PEFT picks its 4-bit class
        # only under a quantization config): its forward is Linear4bit's, then the LoRA term, as the 4-bit class
        return None
    if type(module) is not lora_layer.Linear:
        kind = type(module)
        return f"PEFT layer {kind.__module__.rsplit('.', 1)[-1]}.{kind.__name__} (not a plain lora.Linear)"
    base = module.base_layer
    if not is_linear(base) or not has_plain_forward(base):
        return f"base layer {type(base).__name__} (quantized, nested or custom)"
    weight = base.weight
    if type(weight.data) is not torch.Tensor or weight.dtype not in _FUSED_DTYPES + (torch.float64,):
        return f"base weight of type {type(weight.data).__name__} and dtype {weight.dtype}"
    return None


_MISSING = object()


def _state(module: nn.Module, private: str, public: str):
    """A PEFT layer's attribute from its instance dict (``private``, where PEFT keeps it), else through the public
    property ``public``: the properties and nn.Module.__getattr__ cost host time on every call."""
    value = module.__dict__.get(private, _MISSING)
    return getattr(module, public) if value is _MISSING else value


def _submodule(module: nn.Module, name: str):
    """A submodule (PEFT's ModuleDicts, base_layer) from nn.Module's own dict (no __getattr__)."""
    found = module.__dict__["_modules"].get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


def _adapter_reason(module: nn.Module) -> tuple:
    """(adapter name, None) when the layer's active adapter can run fused, else (None, reason)."""
    parts = _adapter_parts(module)
    return (parts[0], None) if parts[0] is not None else (None, parts[1])


_FUSED_DROPOUTS = (nn.Dropout, nn.Identity)


def _adapter_parts(module: nn.Module) -> tuple:
    """(adapter name, lora_A, lora_B, lora_dropout) of the layer's active adapter when it can run fused, else
    (None, reason). Each fact looked up once, from the modules' own dicts (host time: every call asks)."""
    active = _state(module, "_active_adapter", "active_adapter")
    lora_As = _submodule(module, "lora_A")._modules
    if isinstance(active, str):
        if active not in lora_As:
            return None, "no active adapter"
        adapter = active
    else:
        active = [a for a in active if a in lora_As]
        if len(active) != 1:
            return None, "several active adapters" if active else "no active adapter"
        adapter = active[0]
    # peft >= 0.15 keeps every variant (DoRA, aLoRA, ...) in lora_variant; older versions only have use_dora
    own = module.__dict__
    variant = own.get("lora_variant", {}).get(adapter)
    use_dora = own.get("use_dora", {}).get(adapter)
    if (variant is not None or use_dora) and not _is_dora(module, adapter):
        return None, "LoRA variant " + ("DoRA" if use_dora else type(variant).__name__)
    lora_A, lora_B = lora_As[adapter], _submodule(module, "lora_B")._modules[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A._parameters.get("bias") is not None:
        return None, "custom lora_A / lora_B modules"
    if lora_B._parameters.get("bias") is not None:
        return None, "lora_bias"
    dropout = _submodule(module, "lora_dropout")._modules[adapter]
    if type(dropout) not in _FUSED_DROPOUTS:
        return None, f"lora_dropout {type(dropout).__name__}"
    if _has_hooks(_submodule(module, "base_layer")) or _has_hooks(lora_A) or _has_hooks(lora_B):
        return None, "forward hooks on the base layer or lora_A / lora_B"
    return adapter, lora_A, lora_B, dropout


def _param(module: nn.Module, name: str):
    """A module's parameter from its own _parameters dict (nn.Module.__getattr__ costs ~5k instructions a call),
    else its attribute (a buffer, a property, ...)."""
    found = module.__dict__["_parameters"].get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


def _is_dora(module: nn.Module, adapter: str) -> bool:
    """True when the adapter is PEFT's plain DoRA on a Linear (DoraLinearVariant, its DoraLinearLayer holding the
    magnitude, no hooks on it): what ``dora_linear`` computes. Other variants, DoRA subclasses included, are not."""
    if not getattr(module, "use_dora", {}).get(adapter):
        return False
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError:
        return False
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return False
    magnitude = getattr(module, "lora_magnitude_vector", {})
    layer = magnitude[adapter] if adapter in magnitude else None
    return type(layer) is DoraLinearLayer and not _has_hooks(layer)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _fused_adapter(module: nn.Module, x, args, kwargs) -> Optional[tuple]:
    """What to run fused for this call: (adapter, base layer, lora_A.weight, lora_B.weight, is_4bit, is_dora,
    lora_dropout), or None for PEFT's own forward. Every state PEFT's forward treats specially (disabled or merged
    adapters, adapter_names, extra arguments) goes to PEFT. Each fact is looked up once per call (host time)."""
    if args or kwargs or _state(module, "_disable_adapters", "disable_adapters") \
            or _state(module, "merged_adapters", "merged"):
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    device = x.device
    if _autocast_on(device.type):
        return None
    parts = _adapter_parts(module)
    adapter = parts[0]
    if adapter is None:
        return None
    base = _submodule(module, "base_layer")
    weight = _param(base, "weight")
    A = _param(parts[1], "weight")
    B = _param(parts[2], "weight")
    is_4bit = has_4bit_forward(base)
    if is_4bit:
        # the op runs in the layer's compute dtype (x cast to it, as Linear4bit casts it)
        compute = base.compute_dtype or x.dtype
        if x.dtype not in _FUSED_DTYPES or compute not in _FUSED_DTYPES or A.dtype not in (compute, torch.float32):
            return None
        if A.dtype != compute and not getattr(module, "cast_input_dtype_enabled", True):
            return None
    elif x.dtype != weight.dtype or A.dtype not in (x.dtype, torch.float32):
        return None
    if A.dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True):
        return None
    if weight.device != device or A.device != device or B.device != device:
        return None
    is_dora = _is_dora(module, adapter)
    if is_dora:
        magnitude = module.lora_magnitude_vector[adapter].weight
        if magnitude.dtype not in (A.dtype, torch.float32) or magnitude.device != device:
            return None
    return adapter, base, A, B, is_4bit, is_dora, parts[3]


def _plain_adapter(module: nn.Module, adapter: str) -> Optional[tuple]:
    """(lora_A, lora_B, lora_dropout) of a plain LoRA adapter of the layer (no variant, DoRA included; nn.Linear
    lora_A / lora_B without bias or hooks; nn.Dropout or nn.Identity), or None: the adapters that the summed and
    the mixed-batch paths fuse."""
    if module.__dict__.get("lora_variant", {}).get(adapter) is not None \
            or module.__dict__.get("use_dora", {}).get(adapter):
        return None
    lora_A = _submodule(module, "lora_A")._modules[adapter]
    lora_B = _submodule(module, "lora_B")._modules[adapter]
    dropout = _submodule(module, "lora_dropout")._modules[adapter]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None \
            or lora_B.bias is not None or type(dropout) not in (nn.Dropout, nn.Identity) \
            or _has_hooks(lora_A) or _has_hooks(lora_B):
        return None
    return lora_A, lora_B, dropout


def _summed_adapters(module: nn.Module, x, args, kwargs) -> Optional[tuple]:
    """(base, A (in, r1 + r2 + ...), B (r1 + r2 + ..., out), scale) for a call where PEFT's forward sums several
    active adapters' terms, base(x) + sum_a lora_B_a(lora_A_a(x)) * scaling_a: one fused call with the adapters
    side by side along the rank, x [A_1 .. A_n] [s_1 B_1; ..; s_n B_n] (the same sum; the scalings folded into B
    when they differ, rounded once in the adapters' dtype). Only where no dropout is at work (each adapter's own
    mask would differ), every active adapter is plain LoRA on a plain base with adapters of one dtype, and no hooks
    sit on the modules; else None (PEFT's forward)."""
    if args or kwargs or _state(module, "_disable_adapters", "disable_adapters") \
            or _state(module, "merged_adapters", "merged"):
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or _autocast_on(x.device.type):
        return None
    active = _state(module, "_active_adapter", "active_adapter")
    lora_As = _submodule(module, "lora_A")._modules
    active = [a for a in ([active] if isinstance(active, str) else active) if a in lora_As]
    if len(active) < 2:
        return None
    base = _submodule(module, "base_layer")
    if not is_linear(base) or not has_plain_forward(base) or _has_hooks(base):
        return None
    weight = base.weight
    As, Bs, scales = [], [], []
    for adapter in active:
        plain = _plain_adapter(module, adapter)
        if plain is None:
            return None
        lora_A, lora_B, dropout = plain
        if type(dropout) is nn.Dropout and dropout.p != 0 and dropout.training:
            return None   # each adapter's own mask: PEFT's forward
        As.append(lora_A.weight)
        Bs.append(lora_B.weight)
        scales.append(module.scaling[adapter])
    dtype = As[0].dtype
    if x.dtype != weight.dtype or dtype not in (x.dtype, torch.float32) \
            or any(t.dtype != dtype or t.device != x.device for t in As + Bs) or weight.device != x.device:
        return None
    if dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True):
        return None
    # PEFT's lora_A.weight is (r, in) and lora_B.weight (out, r): A = [A_1^T .. A_n^T], B = [B_1^T; ..; B_n^T]
    A = torch.cat(As, dim=0).t()
    if all(sc == scales[0] for sc in scales):
        return base, A, torch.cat(Bs, dim=1).t(), scales[0]
    return base, A, torch.cat([b * sc for b, sc in zip(Bs, scales)], dim=1).t(), 1.0


def _mixed_batch_operands(module: nn.Module, x, args, kwargs):
    """(A, B: lists of n factors (in, r_a) and (r_a, out), scales, dropout ps, adapter rows) for a call with PEFT's
    ``adapter_names``
    (one adapter per sample) that ``lora_linear_multi`` computes as PEFT's ``_mixed_batch_forward`` does (the
    rows an ``AdapterRows``, shared by the layers of one forward of the patched model), or
    None for PEFT's own forward. Only while the opt-in multi-adapter kernels are on (LORA_FAST_MULTI=triton):
    otherwise PEFT's loop stays (the reference path would compute the same loop, rounded otherwise)."""
    if os.environ.get("LORA_FAST_MULTI", "").strip().lower() != "triton":
        return None
    names = kwargs.get("adapter_names")
    if args or set(kwargs) != {"adapter_names"} or module.disable_adapters or module.merged:
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or _autocast_on(x.device.type):
        return None
    if not (x.is_cuda or (x.device.type == "cpu" and _env.interpreting())):
        return None   # the opt-in kernels cannot serve x (a CPU tensor without the interpreter): PEFT's loop
    if not isinstance(names, (list, tuple)) or len(names) != x.shape[0] \
            or not all(isinstance(n, str) for n in names):
        return None   # PEFT's forward raises its own error
    base = module.base_layer
    if has_4bit_forward(base) or is_linear4bit(base):
        return None
    # PEFT skips "__base__" and names it does not hold: the base layer alone on those samples
    used = [n for n in dict.fromkeys(names) if n in module.lora_A]
    if not used:
        return None
    weight = base.weight
    if _has_hooks(base):
        return None
    for adapter in used:
        plain = _plain_adapter(module, adapter)
        if plain is None:
            return None
        lora_A, lora_B, _ = plain
        A = lora_A.weight
        if x.dtype != weight.dtype or A.dtype not in (x.dtype, torch.float32) or A.dtype != lora_B.weight.dtype \
                or A.dtype != module.lora_A[used[0]].weight.dtype:
            return None
        if A.dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True):
            return None
        if weight.device != x.device or A.device != x.device or lora_B.weight.device != x.device:
            return None
    # PEFT's lora_A.weight is (r, in) and lora_B.weight (out, r): transposed views, read by the kernels where they
    # live (unstacked, each rank its own; gradients flow back into the weights)
    A = [module.lora_A[a].weight.t() for a in used]
    B = [module.lora_B[a].weight.t() for a in used]
    scales = [module.scaling[a] for a in used]
    dropouts = [module.lora_dropout[a] for a in used]
    ps = [d.p if isinstance(d, nn.Dropout) and d.training else 0.0 for d in dropouts]
    position = {a: i for i, a in enumerate(used)}
    return A, B, scales, ps, sample_rows([position.get(n, -1) for n in names], x.shape[:-1], len(used), x.device)


def _fused_forward(module: nn.Module, x, *args, **kwargs):
    """Installed as a patched lora.Linear's forward: the fused op when _fused_adapter allows, else PEFT's."""
    if "adapter_names" in kwargs:
        mixed = _mixed_batch_operands(module, x, args, kwargs)
        if mixed is None:
            return type(module).forward(module, x, *args, **kwargs)
        A, B, scales, ps, rows = mixed
        if len(A) > 1:
            _ensure_rows_scope(module)   # a model patched before it held several adapters: share from now on
        base = module.base_layer
        weight = base.weight if isinstance(base, nn.Linear) else base.weight.t()
        # the adapter table kept on the PEFT layer (multi._owned_table): no upload while its adapters stay put
        return _lora_linear_multi(x, weight, base.bias, A, B, scales, rows, ps, True, owner=module)
    plan = _fused_adapter(module, x, args, kwargs)
    if plan is None:
        summed = _summed_adapters(module, x, args, kwargs)
        if summed is not None:
            base, A, B, scale = summed
            weight = base.weight if isinstance(base, nn.Linear) else base.weight.t()
            return lora_linear(x, weight, base.bias, A, B, scale, dropout_p=0.0, training=False)
        return type(module).forward(module, x, *args, **kwargs)
    adapter, base, A, B, is_4bit, is_dora, dropout = plan
    p = dropout.p if type(dropout) is nn.Dropout else 0.0
    own = module.__dict__
    scale = own["scaling"][adapter] if "scaling" in own else module.scaling[adapter]
    # the 4-bit and DoRA ops take transposed views of PEFT's parameters (lora_A.weight (r, in), lora_B.weight
    # (out, r)): gradients flow back into them
    if is_4bit and is_dora:
        # QDoRA: dora_linear_4bit in the layer's compute dtype (PEFT's DoRA reads deq(W) in the adapters' dtype:
        # within one rounding of deq(W) in the compute dtype)
        return forward_dora_4bit(base, x, A.t(), B.t(), module.lora_magnitude_vector[adapter].weight, scale, p,
                                 module.training and dropout.training)
    if is_4bit:
        # QLoRA: the LoRA term reads x in the compute dtype (PEFT reads it in x's own dtype: the same when they
        # agree, within one rounding of x otherwise)
        return forward_4bit(base, x, A.t(), B.t(), scale, p, dropout.training)
    # Conv1D (fan_in_fan_out) stores (in, out); .t() gives nn.Linear's (out, in) layout as a view, no copy
    weight = _param(base, "weight")
    if not isinstance(base, nn.Linear):
        weight = weight.t()
    if is_dora:
        # PEFT's DoRA drops (and recomputes the base on the dropped input) only while the layer trains
        return dora_linear(x, weight, base.bias, A.t(), B.t(), module.lora_magnitude_vector[adapter].weight, scale,
                           dropout_p=p, training=module.training and dropout.training)
    # PEFT's (r, in) and (out, r) parameters as they are: no transposed views on autograd's graph, gradients in
    # the parameters' layout
    return lora_linear_stored(x, weight, _param(base, "bias"), A, B, scale, dropout_p=p, training=dropout.training)


class _FusedForward:
    """A patched layer's instance ``forward``: calls _fused_forward on the layer through a weak reference, so that
    the layer and its forward form no reference cycle (a patched model is freed by reference counting, its GPU
    memory at once after ``del model``). deepcopy and pickle rebind it to the copied layer."""

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    def __call__(self, x, *args, **kwargs):
        return _fused_forward(self._module(), x, *args, **kwargs)

    def __deepcopy__(self, memo):
        # deepcopy registers the new layer in memo before copying its __dict__, which holds this object
        module = self._module()
        return _FusedForward(memo.get(id(module), module))

    def __reduce__(self):
        # pickle memoises the layer first, so this refers back to it instead of recursing
        return _FusedForward, (self._module(),)


def _is_patched(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _FusedForward)


def patch_peft(model: nn.Module, *, warn: bool = True) -> PatchReport:
    """Make every PEFT LoRA Linear in ``model`` run forward and backward through ``lora_linear``, in place.

    ``model``: a ``peft.PeftModel`` or any module with PEFT LoRA layers injected (peft.tuners.lora.Linear, over an
    nn.Linear or transformers' Conv1D, fan_in_fan_out; peft.tuners.lora.bnb.Linear4bit over a bitsandbytes
    Linear4bit, QLoRA, run on ``lora_linear_4bit`` in the layer's compute dtype). Each such layer gets a forward
    that, per call, runs the fused op when PEFT's forward would compute base(x) + lora_B(lora_A(dropout(x))) *
    scaling for exactly one adapter (or PEFT's DoRA, ``use_dora=True``, on ``dora_linear``, over nn.Linear or
    Conv1D): the active adapter is plain LoRA or DoRA (no other variant, no lora_bias), adapters are neither
    disabled nor merged, no adapter_names (mixed batches: fused on ``lora_linear_multi`` only while its opt-in
    kernels are on, ``LORA_FAST_MULTI=triton``, for plain LoRA adapters) or other extra arguments, x in the base
    weight's dtype
    with adapters in that dtype or float32, no autocast, one device, no forward hooks. Otherwise the call runs
    PEFT's own forward, so results never silently differ from PEFT's (up to floating-point rounding; dropout
    masks come from lora-fast's generator, with PEFT's probability and the dropout module's train/eval mode).
    bias "none"/"all"/"lora_only", rsLoRA and fp32 adapters on fp16/bf16 bases are supported. PEFT's own API
    (save_pretrained, set_adapter, merge_and_unload, disable_adapter) keeps working: the patch only adds an
    instance ``forward`` per layer and, once some layer holds several adapters (at the patch, or at the first
    ``adapter_names`` batch that uses several), a forward pre-hook and hook on ``model`` (and a PeftModel's
    wrapped model) that let the layers of one forward share one ``adapter_names`` selection (its index and sort
    built once); parameters and state-dict keys are PEFT's. Calling twice equals calling once.

    PEFT's plain lora.Linear around a bitsandbytes Linear4bit (what PEFT builds for a hand-built model without a
    quantization config) is fused as its 4-bit class is, on ``lora_linear_4bit``. Layers of other PEFT classes
    (Embedding, Conv2d, 8-bit bnb, hqq, torchao layers, ...) are left untouched.

    The patch covers the LoRA layers that exist when it is called. An adapter added later to a patched layer is
    fused at call time; a LoRA layer created later (``add_adapter`` or ``load_adapter`` targeting modules not
    adapted before) runs PEFT's own forward until ``patch_peft(model)`` is called again (calling it again
    patches the new layers and reports every layer).

    Returns: a PatchReport: ``patched`` (names of the layers that run fused in the current adapter state) and
        ``skipped`` (name -> reason); with ``warn`` one warning lists the skipped reasons and their counts.
    Raises: ImportError without peft; TypeError if ``model`` is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a peft.PeftModel), got {type(model).__name__}")
    lora_layer = _peft_lora()
    report = PatchReport()
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        reason = _layer_reason(module, lora_layer)
        if reason is None:
            if not _is_patched(module):
                module.forward = _FusedForward(module)
            _, reason = _adapter_reason(module)
            if reason == "several active adapters":
                # fused as one call when no dropout is at work (_summed_adapters), judged on an empty input
                weight = module.base_layer.weight
                probe = torch.empty(0, module.in_features, dtype=weight.dtype, device=weight.device)
                if _summed_adapters(module, probe, (), {}) is not None:
                    reason = None
        if reason is None:
            report.patched.append(name)
        else:
            report.skipped[name] = reason
    _track_rows_scope(model)
    if warn and report.skipped:
        kinds = ", ".join(f"{kind} ({n})" for kind, n in sorted(report.skipped_kinds().items()))
        warnings.warn(f"patch_peft: {len(report.skipped)} LoRA layers stay on PEFT's own path: {kinds}",
                      stacklevel=2)
    return report


def unpatch_peft(model: nn.Module) -> int:
    """Undo patch_peft: every patched PEFT LoRA layer in ``model`` gets PEFT's own forward back (and the model's
    selection-scope hooks are removed). Returns the number of layers restored. Raises TypeError if ``model`` is
    not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    roots = []
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            roots += [r() for r in _PATCHED_ROOTS.pop(module, ()) if r() is not None]
            restored += 1
    # the hooks of every module of ``model`` (a patch of an inner module, such as a PeftModel's LoraModel, put them
    # there) and of each restored layer's patched model that holds no patched layer any more
    for module in [*model.modules(), *_scope_modules(model)[1:]]:
        _remove_rows_scope(module)
    for root in roots:
        if not any(_is_patched(m) for m in root.modules()):
            _remove_rows_scope(root)
    return restored


def _scope_modules(model: nn.Module) -> list:
    """The patched model and, for a PeftModel, the model it wraps (``generate`` calls that one directly)."""
    inner = getattr(model, "get_base_model", None)
    inner = inner() if callable(inner) else None
    return [model] + ([inner] if isinstance(inner, nn.Module) and inner is not model else [])


# patched layer -> the models patch_peft was called on with it (weakly: a patched model is freed by reference
# counting; a PeftModel and its inner LoraModel may both have been patched)
_PATCHED_ROOTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _track_rows_scope(model: nn.Module) -> None:
    """Remember the model of each patched layer, and give it the selection-scope hooks now when some layer
    holds several adapters (an adapter_names batch may then sort); a model of one adapter per layer gets them
    at its first mixed batch with several (``_ensure_rows_scope``), so that plain forwards pay no hook."""
    root = weakref.ref(model)
    several = False
    for module in model.modules():
        if _is_patched(module):
            roots = _PATCHED_ROOTS.setdefault(module, [])
            roots[:] = [r for r in roots if r() is not None]
            if root not in roots:   # weak references to one live object compare equal
                roots.append(root)
            several = several or len(getattr(module, "lora_A", ())) > 1
    if several:
        _add_rows_scope(model)


def _ensure_rows_scope(layer: nn.Module) -> None:
    for root in _PATCHED_ROOTS.get(layer, ()):
        model = root()
        if model is not None:
            _add_rows_scope(model)


def _add_rows_scope(model: nn.Module) -> None:
    """Hooks on the patched model that make each of its forwards one scope of shared adapter selections
    (multi.open_rows_scope / close_rows_scope): PEFT's ``adapter_names`` batches build the index and its sort
    once per forward, not once per layer. Added once (found again in a copied model too)."""
    for module in _scope_modules(model):
        if any(h is open_rows_scope for h in module._forward_pre_hooks.values()):
            continue
        module.register_forward_pre_hook(open_rows_scope)
        module.register_forward_hook(close_rows_scope, always_call=True)


def _remove_rows_scope(model: nn.Module) -> None:
    for module in _scope_modules(model):
        for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                              (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                       module._forward_hooks_always_called))):
            for key in [k for k, h in hooks.items() if h is open_rows_scope or h is close_rows_scope]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


def _lora_modules(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def _pattern(name: str) -> str:
    # PEFT matches rank_pattern / alpha_pattern keys as a regex on a dotted suffix of the module path
    return "^" + re.escape(name)


def _trainable_extras(model: nn.Module, layers: dict, modules_to_save) -> tuple:
    """(bias mode, {PEFT key: tensor} of biases, {PEFT key: tensor} of modules_to_save, [left-out names])."""
    saved_modules = {}
    for target in modules_to_save:
        names = [n for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not names:
            raise ValueError(f"modules_to_save: {target!r} matches no module of the model")
        for n in names:
            module = model.get_submodule(n)
            if any(isinstance(m, LinearWithLoRA) for m in module.modules()):
                raise ValueError(f"modules_to_save: {n!r} holds LoRA layers; PEFT saves whole modules that have "
                                 "no adapter (a trained head, an embedding)")
            for pn, p in module.named_parameters():
                saved_modules[PEFT_PREFIX + n + "." + pn] = p
    in_modules = {id(p) for p in saved_modules.values()}
    lora_biases = {id(layer.linear.bias): name for name, layer in layers.items() if layer.linear.bias is not None}
    adapter_ids = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
    params = {n: p for n, p in model.named_parameters() if id(p) not in in_modules}
    trainable_bias = [n for n, p in params.items() if p.requires_grad and n.rpartition(".")[2] == "bias"]
    other_bias = [n for n in trainable_bias if id(params[n]) not in lora_biases]
    mode = "all" if other_bias else "lora_only" if trainable_bias else "none"
    biases = {}
    for n, p in params.items():
        if n.rpartition(".")[2] != "bias" or mode == "none" or id(p) in adapter_ids:
            continue
        if id(p) in lora_biases:
            biases[PEFT_PREFIX + lora_biases[id(p)] + ".base_layer.bias"] = p
        elif mode == "all":
            biases[PEFT_PREFIX + n] = p
    saved_ids = {id(p) for p in biases.values()} | in_modules | adapter_ids
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved_ids]
    return mode, biases, saved_modules, left_out


def _write_dir_atomically(save_dir: str, write) -> None:
    """Make ``save_dir`` hold what ``write(tmp_dir)`` writes, besides the files it held before, so that a
    failure (a full disk, an error in ``write``) leaves the old folder as it was: everything is written into a
    new sibling folder (the other files hard-linked or copied in), which then takes the old folder's place, by
    an atomic exchange where the OS offers one (Linux renameat2), else by two renames."""
    save_dir = os.path.abspath(save_dir)
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(save_dir) + ".", suffix=".part", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp makes the folder private (0o700): give it the old folder's mode, or the default one
    os.chmod(tmp, os.stat(save_dir).st_mode & 0o7777 if os.path.isdir(save_dir) else 0o777 & ~umask)
    try:
        write(tmp)
        if not os.path.isdir(save_dir):
            os.rename(tmp, save_dir)
            return
        for entry in os.listdir(save_dir):
            source, target = os.path.join(save_dir, entry), os.path.join(tmp, entry)
            if os.path.exists(target):
                continue
            if os.path.isdir(source):
                shutil.copytree(source, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, target)
        if _exchange(tmp, save_dir):
            shutil.rmtree(tmp)      # now the old folder
            return
        old = tmp + ".old"
        os.rename(save_dir, old)
        os.rename(tmp, save_dir)
        shutil.rmtree(old)
    finally:
        if os.path.isdir(tmp) and os.path.abspath(tmp) != save_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc >= 2.28); False where the
    OS or the file system has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_peft_adapter(model: nn.Module, save_dir: Union[str, os.PathLike], *,
                      base_model_name_or_path: Optional[str] = None, modules_to_save=None,
                      selected_adapters=None) -> None:
    """Write the LoRA layers of ``model`` (LinearWithLoRA, from replace_linear_with_lora) as PEFT LoRA adapters.

    Several adapters (``LinearWithLoRA.add_adapter``) are written as PEFT's ``save_pretrained`` writes them:
    ``selected_adapters`` (a list of names; None, the default: every adapter the model holds), one complete PEFT
    adapter each, "default" in ``save_dir`` itself and any other in the subfolder ``save_dir/<name>``, each
    with the layers that hold it. Load one into PEFT with ``PeftModel.from_pretrained(base, folder,
    adapter_name=name)`` or ``peft_model.load_adapter(folder, adapter_name=name)``, into lora-fast with
    ``load_peft_adapter(model, folder, adapter_name=name)``. Trained biases are shared by the adapters here and
    written once, into the default adapter's folder (else the first selected adapter's), the other adapters'
    configs saying ``bias="none"``: PEFT loads only one adapter with a bias. ``modules_to_save`` go into every
    adapter's file (PEFT keeps them per adapter). What follows describes one adapter's folder.

    Files (PEFT's format, loadable with ``peft.PeftModel.from_pretrained(base_model, save_dir)`` where
    base_model is the model before replace_linear_with_lora): ``adapter_config.json`` written by PEFT's own
    LoraConfig, and ``adapter_model.safetensors`` with, per layer at module path P,
    ``base_model.model.P.lora_A.weight`` = A^T (rank, in) and ``base_model.model.P.lora_B.weight`` = B^T
    (out, rank), in the adapters' dtype; LinearWithDoRA layers (all or none) add
    ``base_model.model.P.lora_magnitude_vector`` = m (out,) and ``use_dora`` in the config.
    ``lora_alpha`` and ``use_rslora`` are chosen so that PEFT computes our
    scale: "alpha/rank" -> lora_alpha = alpha; "rslora" -> use_rslora, lora_alpha = alpha; "alpha" (scale =
    alpha) -> lora_alpha = alpha * rank. Layers with another rank or alpha than the most common one go into
    rank_pattern / alpha_pattern. Conv1D layers set fan_in_fan_out. target_modules lists the exact paths.

    Trained biases are saved as PEFT saves them (``mark_only_lora_as_trainable(bias=...)``): PEFT's ``bias`` is
    "lora_only" when only LoRA layers' biases require grad (keys ``base_model.model.P.base_layer.bias``), "all"
    when another bias does (then every bias of the model is saved), else "none". ``modules_to_save``: names
    of whole modules without LoRA to save as well (a trained classifier head; PEFT's LoraConfig field, keys
    ``base_model.model.M.weight`` ...). Any other parameter that requires grad is left out with one warning.

    The folder is replaced as a whole: a failure while writing leaves the files that were there (a config and
    weights that belong together), other files in the folder are kept.

    Raises: ImportError without peft or safetensors; ValueError if ``model`` has no LinearWithLoRA, if an
        adapter's layers mix "rslora" with other scalings, DoRA with LoRA, or use different dropouts (PEFT keeps
        one per adapter; the adapter is named), if a selected adapter is held by no layer, or if a
        modules_to_save name matches no module or a module with LoRA layers; TypeError for selected_adapters
        that are not a list of names.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if isinstance(model, LinearWithLoRA):
        raise ValueError("model: a lone LinearWithLoRA has no module path; PEFT adapters name layers in a model")
    layers = _lora_modules(model)
    if not layers:
        raise ValueError("model: expected LinearWithLoRA layers (see replace_linear_with_lora), found none")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    modules_to_save = list(modules_to_save or [])
    known = model_adapters(model)
    if selected_adapters is None:
        selected = known
    else:
        if isinstance(selected_adapters, str) or not isinstance(selected_adapters, (list, tuple)) or not all(
                isinstance(a, str) for a in selected_adapters):
            raise TypeError(f"selected_adapters: expected a list of adapter names, got {selected_adapters!r}")
        unknown = [a for a in selected_adapters if a not in known]
        if unknown or not selected_adapters:
            raise ValueError(f"selected_adapters: expected names of the model's adapters {known}, got "
                             f"{list(selected_adapters)}")
        selected = list(dict.fromkeys(selected_adapters))
    bias_mode, biases, saved_modules, left_out = _trainable_extras(model, layers, modules_to_save)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    # the trained biases are the model's, shared by its adapters: written once, into the default adapter's folder
    # (else the first selected), the others saying bias "none": PEFT loads only one adapter with a bias
    carrier = DEFAULT_ADAPTER if DEFAULT_ADAPTER in selected else selected[0]
    outputs = {adapter: _peft_adapter_files(layers, adapter, LoraConfig, dict(
        bias=bias_mode if adapter == carrier else "none", modules_to_save=modules_to_save or None,
        base_model_name_or_path=base_model_name_or_path)) for adapter in selected}
    saved_modules = {key: p.detach().contiguous().cpu() for key, p in saved_modules.items()}
    biases = {key: p.detach().contiguous().cpu() for key, p in biases.items()}
    if left_out:
        warnings.warn(f"save_peft_adapter: {len(left_out)} trainable parameter(s) are neither adapters, biases nor "
                      f"in modules_to_save and are not saved: {left_out[:5]}{' ...' if len(left_out) > 5 else ''}",
                      UserWarning, stacklevel=2)

    def write(folder: str) -> None:
        for adapter, (config, tensors) in outputs.items():
            # PEFT's save_pretrained: the default adapter in the folder itself, any other in a subfolder
            sub = "" if adapter == DEFAULT_ADAPTER else adapter
            target = os.path.join(folder, sub)
            os.makedirs(target, exist_ok=True)
            config.save_pretrained(target)
            weights = os.path.join(target, ADAPTER_WEIGHTS_NAME)
            extras = {**biases, **saved_modules} if adapter == carrier else saved_modules
            save_file({**tensors, **extras}, weights, metadata={"format": "pt"})
            give_mode(weights, os.path.join(os.fspath(save_dir), sub, ADAPTER_WEIGHTS_NAME))

    _write_dir_atomically(os.fspath(save_dir), write)


def _peft_adapter_files(layers: dict, adapter: str, config_class, fields: dict) -> tuple:
    """(PEFT LoraConfig, {PEFT key: tensor}) of one adapter of the LinearWithLoRA ``layers`` ({path: layer}), from
    the layers that hold it; raises ValueError for settings one PEFT config cannot hold."""
    holding = {n: layer for n, layer in layers.items() if adapter in layer.adapters}
    if not holding:
        raise ValueError(f"selected_adapters: no layer holds adapter {adapter!r}")
    what = "model" if adapter == DEFAULT_ADAPTER else f"model's adapter {adapter!r}"
    loras = {n: layer._adapter(adapter) for n, layer in holding.items()}
    rslora = {lora.scaling == "rslora" for lora in loras.values()}
    if len(rslora) > 1:
        raise ValueError(f"{what}: PEFT has one use_rslora per adapter; these layers mix 'rslora' with other "
                         "scalings")
    dropouts = {layer._adapter_dropout(adapter) for layer in holding.values()}
    if len(dropouts) > 1:
        raise ValueError(f"{what}: PEFT has one lora_dropout per adapter; these layers use {sorted(dropouts)}")
    dora = {isinstance(layer, LinearWithDoRA) for layer in holding.values()}
    if len(dora) > 1:
        raise ValueError(f"{what}: PEFT has one use_dora per adapter; these layers mix LinearWithDoRA and "
                         "LinearWithLoRA")
    ranks, alphas, tensors = {}, {}, {}
    for name, layer in holding.items():
        lora = loras[name]
        ranks[name] = lora.rank
        alphas[name] = lora.alpha * lora.rank if lora.scaling == "alpha" else lora.alpha
        prefix = PEFT_PREFIX + name + "."
        tensors[prefix + "lora_A.weight"] = lora.A.detach().t().contiguous().cpu()
        tensors[prefix + "lora_B.weight"] = lora.B.detach().t().contiguous().cpu()
        if isinstance(layer, LinearWithDoRA):
            tensors[prefix + "lora_magnitude_vector"] = layer.m.detach().contiguous().cpu()
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = config_class(
        r=r, lora_alpha=alpha, use_rslora=rslora.pop(), lora_dropout=dropouts.pop(), use_dora=dora.pop(),
        target_modules=sorted(holding), fan_in_fan_out=all(layer.fan_in_fan_out for layer in holding.values()),
        rank_pattern={_pattern(n): k for n, k in ranks.items() if k != r},
        alpha_pattern={_pattern(n): a for n, a in alphas.items() if a != alpha},
        **fields,
    )
    return config, tensors


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches a dotted suffix of the path
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(adapter_dir: str):
    """PEFT's LoraConfig from adapter_config.json, with every field lora-fast uses checked, naming file and field."""
    from peft import LoraConfig

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter_dir: no adapter_config.json in {adapter_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter_dir: {path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"adapter_dir: {path} does not hold a JSON object")

    def real(value, field):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"adapter_dir: {path}: {field}: expected a finite number, got {value!r}")

    def rank(value, field):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"adapter_dir: {path}: {field}: expected an integer >= 1, got {value!r}")

    rank(raw.get("r", 8), "r")
    real(raw.get("lora_alpha", 8), "lora_alpha")
    for key, value in (raw.get("rank_pattern") or {}).items():
        rank(value, f"rank_pattern[{key!r}]")
    for key, value in (raw.get("alpha_pattern") or {}).items():
        real(value, f"alpha_pattern[{key!r}]")
    dropout = raw.get("lora_dropout", 0.0)
    real(dropout, "lora_dropout")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"adapter_dir: {path}: lora_dropout: expected a probability in [0, 1], got {dropout!r}")
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"adapter_dir: {path}: bias: expected 'none', 'all' or 'lora_only', got {raw.get('bias')!r}")
    try:
        config = LoraConfig.from_pretrained(adapter_dir)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter_dir: {path}: not a LoraConfig PEFT can read ({err})") from None
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"adapter_dir: expected a LoRA adapter, got peft_type {config.peft_type}")
    if getattr(config, "lora_bias", False):
        raise ValueError("adapter_dir: lora_bias adapters are not supported by LinearWithLoRA")
    return config


def _in_modules_to_save(module_name: str, modules_to_save: list) -> bool:
    """PEFT's rule: a module is saved whole when its path, or a path above it, equals or ends in "." + an entry."""
    parts = module_name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == m or p.endswith("." + m) for p in prefixes for m in modules_to_save)


def load_peft_adapter(model: nn.Module, adapter_dir: Union[str, os.PathLike], *,
                      adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, e.g. from
    ``PeftModel.save_pretrained``) into ``model``'s adapter ``adapter_name``, in place; returns the model.

    ``adapter_name`` (PEFT's ``load_adapter(adapter_dir, adapter_name)``): the adapter to load into, "default"
    (the default) being the layers' own. ``adapter_dir`` is read as given, as PEFT reads it: an adapter that
    ``save_pretrained`` (or ``save_peft_adapter``) wrote under a name other than "default" is in the subfolder of
    that name. Where a layer does not hold a named adapter yet, it is created (``add_adapter``: the config's
    rank, alpha, scaling and dropout, the default adapter's device and dtype, not activated), as PEFT's
    load_adapter creates it; a plain nn.Linear / Conv1D there is first wrapped in a LinearWithLoRA (as
    ``replace_linear_with_lora`` wraps it: its default adapter untrained, B = 0, so the model computes what it
    did until ``set_adapter``), as PEFT's load_adapter wraps the layers it names; LinearWithDoRA layers and DoRA
    adapters cannot take a named adapter (ValueError). The rest of this docstring describes the default adapter;
    the checks and the all-or-nothing rule hold for both.

    For every module path P in the file, ``model``'s module at P gets A = lora_A.weight^T (in, r) and
    B = lora_B.weight^T (r, out) (copied into its dtype; with use_dora, m = lora_magnitude_vector into a
    LinearWithDoRA) and PEFT's scale: lora_alpha / r, or lora_alpha / sqrt(r)
    with use_rslora (scaling "alpha/rank" or "rslora", alpha = lora_alpha; rank_pattern / alpha_pattern are
    honoured), and lora_dropout. A LinearWithLoRA there must have rank r; a plain nn.Linear or Conv1D there is
    wrapped in a LinearWithLoRA first. ``model`` is the base model PEFT wrapped (keys "base_model.model.P").
    Biases saved with PEFT's bias "all" / "lora_only" (``P.base_layer.bias`` and other ``*.bias`` keys) and the
    modules of ``modules_to_save`` (a classifier head) are copied into the model's parameters of those names
    (their requires_grad is left as it is). LinearWithLoRA layers the file does not name are left as they are
    (a warning lists them). Everything is checked before anything changes: a failed load leaves the model bit
    for bit as it was.

    Raises: ImportError without peft or safetensors; FileNotFoundError for missing files; ValueError for a
        malformed adapter_config.json (file and field named), a non-LoRA adapter, lora_bias, a DoRA adapter for a
        LinearWithLoRA (or the reverse), tensors of
        another kind (embedding adapters), a path that is not in ``model``, or shapes that do not match;
        RuntimeError for merged layers; TypeError / ValueError for an adapter_name that is not an adapter name.
    """
    from safetensors.torch import load_file

    adapter = check_adapter_name(adapter_name, "load_peft_adapter")
    adapter_dir = os.fspath(adapter_dir)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"adapter_dir: no {ADAPTER_WEIGHTS_NAME} in {adapter_dir}")
    config = _read_config(adapter_dir)
    tensors = load_file(weights_path)
    modules_to_save = list(config.modules_to_save or [])
    pairs, extras = collections.defaultdict(dict), {}
    for key, value in tensors.items():
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(?:(lora_A|lora_B)\.weight|(lora_magnitude_vector))", key)
        if match is not None:
            pairs[match.group(1)][match.group(2) or match.group(3)] = value
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        if name is not None and (".modules_to_save." in name or ".original_module." in name):
            continue   # PEFT's bias="all" also saves the wrapper's internal copies: the plain keys hold the values
        to_save = name is not None and _in_modules_to_save(name.rpartition(".")[0], modules_to_save)
        if name is None or not (name.endswith(".bias") and config.bias != "none" or to_save):
            raise ValueError(f"adapter_dir: tensor {key!r} is not a LoRA lora_A/lora_B weight, a bias of bias="
                             f"{config.bias!r} or a parameter of modules_to_save {modules_to_save}")
        extras[name] = value
    merged = [name for name, m in model.named_modules() if isinstance(m, LinearWithLoRA) and m.merged]
    if merged:
        raise RuntimeError(f"load_peft_adapter: layers {merged[:5]} are merged, so their weights hold the old "
                           f"update; unmerge_lora(model) first")
    # every module and tensor is checked before any is changed, so a bad file leaves the model as it was
    plan = []
    for name, pair in pairs.items():
        expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if config.use_dora else set())
        if set(pair) != expected:
            raise ValueError(f"adapter_dir: module {name!r} has {sorted(pair)}, expected {sorted(expected)} "
                             f"(use_dora={config.use_dora})")
        lora_A, lora_B = pair["lora_A"], pair["lora_B"]
        magnitude = pair.get("lora_magnitude_vector")
        if magnitude is not None and tuple(magnitude.shape) != (lora_B.shape[0],):
            raise ValueError(f"adapter_dir: module {name!r} has lora_magnitude_vector {tuple(magnitude.shape)}, "
                             f"expected ({lora_B.shape[0]},)")
        r = _pattern_value(config.rank_pattern or {}, name, config.r)
        alpha = _pattern_value(config.alpha_pattern or {}, name, config.lora_alpha)
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(f"adapter_dir: module {name!r} has lora_A {tuple(lora_A.shape)} and lora_B "
                             f"{tuple(lora_B.shape)}, expected rank {r} from the config")
        _check_target(model, name, r, lora_A.shape[1], lora_B.shape[0], config.use_dora, adapter)
        # the wrapper of a plain layer (the new adapter of a wrapped one) is built now, before any change: a base
        # it cannot wrap raises here
        wrapper = _new_wrapper(model, name, r, alpha, config, adapter)
        plan.append((name, lora_A, lora_B, magnitude, r, alpha, wrapper,
                     _new_adapter(model, name, r, alpha, config, adapter, wrapper)))
    params = dict(model.named_parameters())
    extra_plan = []
    for name, value in extras.items():
        target = name
        if name.endswith(".base_layer.bias"):
            layer_name = name[: -len(".base_layer.bias")]
            try:
                module = model.get_submodule(layer_name)
            except AttributeError:
                raise ValueError(f"adapter_dir: bias {name!r}: module {layer_name!r} is not in model") from None
            target = (layer_name + ".linear.bias") if isinstance(module, LinearWithLoRA) else layer_name + ".bias"
        elif target not in params:
            # a parameter of a wrapped layer: PEFT names it after the plain layer
            parent, _, leaf = target.rpartition(".")
            target = f"{parent}.linear.{leaf}" if f"{parent}.linear.{leaf}" in params else target
        param = params.get(target)
        if param is None:
            raise ValueError(f"adapter_dir: tensor {name!r} has no parameter {target!r} in model")
        if param.shape != value.shape:
            raise ValueError(f"adapter_dir: tensor {name!r} has shape {tuple(value.shape)}, the model's "
                             f"{target!r} has {tuple(param.shape)}")
        extra_plan.append((param, value))   # wrapping a layer later keeps its Parameter objects
    # the new values first (layers to wrap, tensors in their parameters' dtypes), then every change through one
    # Transaction, which undoes them all if one fails: a failed load leaves the model as it was
    scaling = "rslora" if config.use_rslora else "alpha/rank"
    staged, wrappers, new_adapters = [], {}, {}
    for name, lora_A, lora_B, magnitude, r, alpha, wrapper, new_adapter in plan:
        module = model.get_submodule(name)
        # one wrapper (one new adapter) per layer object, also when the file names it under two of its names; the
        # wrappers of plain layers were built in the checking pass (a base that cannot be wrapped raised there)
        layer = wrappers.get(id(module)) or (wrapper if wrapper is not None else module)
        wrappers[id(module)] = layer
        if new_adapter is not None:
            new_adapter = new_adapters.setdefault(id(module), new_adapter)
        lora = new_adapter if new_adapter is not None else layer._adapter(adapter)
        values = [(lora.A, lora_A.t()), (lora.B, lora_B.t())] \
            + ([(layer.m, magnitude)] if magnitude is not None else [])
        staged.append((name, layer, lora, new_adapter, [(p, Transaction.converted(p, v)) for p, v in values], r,
                       alpha))
    extra_plan = [(param, Transaction.converted(param, value)) for param, value in extra_plan]
    loaded, attached = set(), set()
    dropout = float(config.lora_dropout)
    with Transaction() as transaction:
        for name, layer, lora, new_adapter, values, r, alpha in staged:
            current = model.get_submodule(name)
            if current is not layer and not isinstance(current, LinearWithLoRA):
                # every place the layer is registered (a second name in one parent too): one wrapper everywhere
                for parent, child in module_places(model, current):
                    transaction.setattr(parent, child, layer)
            if new_adapter is not None and id(new_adapter) not in attached:
                attached.add(id(new_adapter))
                transaction.apply(lambda m=layer, lo=new_adapter: m._attach_adapter(adapter, lo, dropout))
            for param, value in values:
                transaction.copy(param, value)
            transaction.setattr(lora, "alpha", alpha)
            transaction.setattr(lora, "scaling", scaling)
            transaction.setattr(lora, "scale", lora_scale(alpha, r, scaling))
            if adapter == DEFAULT_ADAPTER:
                transaction.setattr(layer, "dropout", dropout)
            else:
                transaction.setitem(layer._dropouts, adapter, dropout)
            loaded.add(name)
        for param, value in extra_plan:
            transaction.copy(param, value)
    missing = sorted(n for n, m in _lora_modules(model).items() if adapter in m.adapters and n not in loaded)
    if missing:
        warnings.warn(f"load_peft_adapter: {len(missing)} LoRA layers are not in the adapter and keep their "
                      f"weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}", stacklevel=2)
    return model


def _check_target(model: nn.Module, name: str, r: int, in_features: int, out_features: int,
                  use_dora: bool = False, adapter: str = DEFAULT_ADAPTER) -> None:
    """Raise ValueError unless ``name`` is a LinearWithLoRA whose adapter ``adapter`` has rank r or is to be made
    (a LinearWithDoRA for DoRA) or, for the default adapter, a linear layer, of these feature sizes."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"adapter_dir: the adapter names module {name!r}, which is not in model") from None
    named = "" if adapter == DEFAULT_ADAPTER else f" (adapter {adapter!r})"
    if isinstance(module, LinearWithLoRA) and adapter != DEFAULT_ADAPTER and (
            use_dora or isinstance(module, LinearWithDoRA)):
        raise ValueError(f"adapter_dir: module {name!r}{named}: a DoRA {'adapter' if use_dora else 'layer'} holds "
                         "one adapter, the default one")
    if isinstance(module, LinearWithLoRA):
        if adapter in module.adapters and module._adapter(adapter).rank != r:
            raise ValueError(f"adapter_dir: module {name!r}{named} has rank {r}, model's LinearWithLoRA has rank "
                             f"{module._adapter(adapter).rank}")
        if isinstance(module, LinearWithDoRA) != use_dora:
            raise ValueError(f"adapter_dir: the adapter has use_dora={use_dora}, model's module {name!r} is a "
                             f"{type(module).__name__}")
        shape = tuple(module.lora.A.shape[:1]) + tuple(module.lora.B.shape[1:])
    elif id(module) in _inside_attention(model):
        raise ValueError(f"adapter_dir: module {name!r} is the out_proj of {_inside_attention(model)[id(module)]}, "
                         "whose forward reads its weight without calling it: a LoRA wrapper there would never run")
    elif is_linear(module) and adapter != DEFAULT_ADAPTER and use_dora:
        raise ValueError(f"adapter_dir: module {name!r}{named}: a DoRA adapter is a layer's one adapter, the default "
                         "one")
    elif is_linear(module):
        # nn.Linear's sizes from its attributes: a 4-bit Linear4bit's weight holds packed codes
        shape = tuple(module.weight.shape) if not isinstance(module, nn.Linear) \
            else (module.in_features, module.out_features)
    else:
        raise ValueError(f"adapter_dir: module {name!r} is a {type(module).__name__}, expected a LinearWithLoRA, "
                         f"nn.Linear or Conv1D")
    if shape != (in_features, out_features):
        raise ValueError(f"adapter_dir: module {name!r} has (in, out) = {shape}, the adapter's lora_A/lora_B "
                         f"give {(in_features, out_features)}")


def _new_adapter(model: nn.Module, name: str, r: int, alpha: float, config, adapter: str,
                 wrapper: Optional[LinearWithLoRA] = None):
    """The LoRALayer that will be attached as ``adapter`` to the LinearWithLoRA at ``name`` (already checked by
    _check_target), or to ``wrapper``, the new wrapper of the plain layer there; built without changing the model;
    None for the default adapter of a new wrapper and when the layer holds ``adapter``."""
    module = wrapper if wrapper is not None else model.get_submodule(name)
    if not isinstance(module, LinearWithLoRA) or adapter in module.adapters:
        return None
    return module.new_adapter_layer(r, alpha, scaling="rslora" if config.use_rslora else "alpha/rank")


def _new_wrapper(model: nn.Module, name: str, r: int, alpha: float, config,
                 adapter: str = DEFAULT_ADAPTER) -> Optional[LinearWithLoRA]:
    """The LinearWithLoRA (LinearWithDoRA) that will wrap the plain linear at ``name`` (already checked by
    _check_target), built without changing the model; None when ``name`` is already wrapped. For a named
    ``adapter`` (PEFT's load_adapter wraps the layers it names) the wrapper's default adapter stays untrained
    (B = 0, no dropout: the layer computes what it did) and the named one is made by ``_new_adapter``."""
    module = model.get_submodule(name)
    if isinstance(module, LinearWithLoRA):
        return None
    scaling = "rslora" if config.use_rslora else "alpha/rank"
    wrap = LinearWithDoRA if config.use_dora else LinearWithLoRA
    dropout = float(config.lora_dropout) if adapter == DEFAULT_ADAPTER else 0.0
    return wrap(module, r, alpha, dropout=dropout, scaling=scaling)

