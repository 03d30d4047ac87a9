"""Drop-in LoRA modules: the classes of "Build a Large Language Model (From Scratch)" (Raschka), appendix E,
with the same attribute names, parameter shapes, initialisation and state-dict keys, on the fused op."""

import contextlib
import math
import numbers
import sys
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as module_mod

from ._checks import check_dropout, check_rank, check_scale
from .dora import dequantize_4bit_weight, dora_linear, dora_linear_4bit, dora_unfused
from .functional import lora_delta, lora_linear
from .multi import (
    _lora_linear_multi,
    close_rows_scope,
    current_rows_scope,
    open_rows_scope,
    restore_rows_scope,
    sample_rows,
)
from .qlora import lora_linear_4bit
from .reference import _multi_delta, dora_weight_norm

SCALINGS = ("alpha", "alpha/rank", "rslora")
# PEFT's names: the adapter a LinearWithLoRA is built with, and the per-sample name of "no adapter"
DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"


def lora_scale(alpha: float, rank: int, scaling: str = "alpha") -> float:
    """The LoRA scale for ``scaling``: "alpha" (the appendix's formula), "alpha/rank" (Hu et al. 2021, sec. 4.1;
    PEFT; the book's later code) or "rslora" (alpha / sqrt(rank), Kalajdzievski 2023). Raises ValueError."""
    rank = check_rank(rank)
    alpha = check_scale(alpha, "alpha")
    if scaling == "alpha":
        return alpha
    if scaling == "alpha/rank":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"scaling: expected one of {SCALINGS}, got {scaling!r}")


def conv1d_class():
    """transformers' Conv1D (GPT-2's linear: weight (in, out), y = x @ W + b), or None when transformers has not
    been imported: a model that holds a Conv1D has imported it, so lora-fast never imports transformers itself."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_linear(module: nn.Module) -> bool:
    """True for an nn.Linear or a transformers Conv1D (or a subclass of either): the layers LinearWithLoRA wraps."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear4bit_class():
    """bitsandbytes' Linear4bit (the QLoRA base layer), or None when bitsandbytes has not been imported: a model
    that holds one has imported it, so lora-fast never imports bitsandbytes itself."""
    module = sys.modules.get("bitsandbytes.nn.modules")
    return getattr(module, "Linear4bit", None)


def is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (nf4 or fp4; LinearNF4 / LinearFP4 and other subclasses too)."""
    cls = linear4bit_class()
    return cls is not None and isinstance(module, cls)


def has_4bit_forward(module: nn.Module) -> bool:
    """True when the module computes exactly bitsandbytes' Linear4bit forward (its class does not override it)
    on a weight that is quantized in bitsandbytes' standard layout: what ``lora_linear_4bit`` stands in for."""
    cls = linear4bit_class()
    if cls is None or not isinstance(module, cls) or type(module).forward is not cls.forward:
        return False
    state = getattr(module.weight, "quant_state", None)
    return state is not None and not getattr(state, "packing_format_for_cpu", False)


def has_plain_forward(module: nn.Module) -> bool:
    """True when the module's class computes exactly nn.Linear's (or Conv1D's) forward: its class does not
    override forward. A subclass with its own forward (a clamped or scaled linear) is not plain."""
    conv1d = conv1d_class()
    forward = type(module).forward
    return forward is nn.Linear.forward or (conv1d is not None and forward is conv1d.forward)


def has_forward_hooks(module: nn.Module) -> bool:
    """True when calling the module runs more than its forward: its own forward (pre-)hooks, accelerate's
    _hf_hook, or global module hooks (torch.nn.modules.module.register_module_forward_hook)."""
    # _hf_hook from the instance's __dict__ (where nn.Module keeps plain attributes): getattr on a missing name
    # goes through nn.Module.__getattr__'s AttributeError, ~1.5 us per call
    return bool(module._forward_hooks or module._forward_pre_hooks or module.__dict__.get("_hf_hook")
                or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _fused_kind(linear: nn.Module) -> Optional[str]:
    """How LinearWithLoRA runs ``linear`` fused: "plain" (nn.Linear's or Conv1D's forward: ``lora_linear``), "4bit"
    (bitsandbytes Linear4bit's on a quantized weight: ``lora_linear_4bit``), or None (its own forward or hooks:
    the wrapped layer's call plus ``lora_delta``). ``has_plain_forward`` and ``has_4bit_forward`` in one pass."""
    if has_forward_hooks(linear):
        return None
    forward = type(linear).forward
    if forward is nn.Linear.forward:
        return "plain"
    conv1d = conv1d_class()
    if conv1d is not None and forward is conv1d.forward:
        return "plain"
    return "4bit" if has_4bit_forward(linear) else None


class LoRALayer(nn.Module):
    """The low-rank update: parameters A (in_dim, rank) and B (rank, out_dim); forward(x) = scale * (x @ A @ B).

    A is initialised with kaiming_uniform_(a=sqrt(5)) and B with zeros, as in the book, so the wrapped layer
    starts as the frozen one: bit for bit on the reference path (and for a layer the wrapper calls as it is),
    within the output dtype's rounding of an fp32-accumulated GEMM on the fused kernels, whose summation order
    differs from torch's matmul (measured: max 4.8e-7 relative in fp32). Attributes: ``alpha``, ``rank``,
    ``scaling`` and ``scale``.

    Args:
        in_dim, out_dim: feature sizes (>= 1). rank: >= 1. alpha: finite real.
        scaling: "alpha" (scale = alpha, the appendix), "alpha/rank" (LoRA paper, PEFT) or "rslora".
        device, dtype: of A and B (default: torch's defaults, as in the book).
    Raises: ValueError for rank < 1, a non-finite alpha or an unknown scaling.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, *, scaling: str = "alpha",
                 device=None, dtype=None):
        super().__init__()
        self.scale = lora_scale(alpha, rank, scaling)
        # alpha as a plain number (a tensor or numpy alpha would not serialise into adapter metadata)
        alpha = int(alpha) if isinstance(alpha, numbers.Integral) else check_scale(alpha, "alpha")
        self.alpha, self.rank, self.scaling = alpha, int(rank), scaling
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(rank, out_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A to kaiming_uniform_(a=sqrt(5)), B to zeros, as at construction (so a model built on the 'meta'
        device, moved with ``to_empty()`` and reset module by module, starts as its frozen base, in the sense of the
        class docstring)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.A @ self.B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling!r}, scale={self.scale:g}"


class _MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output that raises if a backward reaches A, B (or DoRA's magnitude): they
    took no part in the forward, so they would silently get no gradient."""

    @staticmethod
    def forward(ctx, y, *adapters):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        if any(ctx.needs_input_grad[1:]):
            raise RuntimeError("LinearWithLoRA: this layer is merged (merge_lora), so its adapters took no part in "
                               "the forward and would get no gradient; call unmerge_lora(model) to train them, or "
                               "freeze them (requires_grad_(False))")
        return (dy,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _warn_if_merged(module, state_dict, prefix, local_metadata):
    if module.merged:
        # one text for every layer, so Python shows it once per call site rather than once per layer
        warnings.warn("state_dict of a merged LinearWithLoRA: its linear.weight holds W + scale * A B, so loading "
                      "it into an unmerged model applies the update twice; unmerge_lora first, or save only the "
                      "adapters (save_lora)", UserWarning, stacklevel=2)


def forward_4bit(linear: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 dropout_p: float, training: bool) -> torch.Tensor:
    """bitsandbytes Linear4bit's forward with the LoRA term fused in: x is cast to the layer's compute dtype (set
    from the first input when the layer has none, as Linear4bit does), the op runs there, and the result is
    cast back to x's dtype. The bias is cast (not overwritten as Linear4bit overwrites it) so a trained bias
    keeps its dtype and gets its gradient."""
    fix_state = getattr(sys.modules.get("bitsandbytes.nn.modules"), "fix_4bit_weight_quant_state_from_module", None)
    if fix_state is not None:
        fix_state(linear)   # a quant_state kept on the module (after FSDP / state-dict loading) back on the weight
    if not linear.compute_type_is_set:
        linear.set_compute_type(x)
        linear.compute_type_is_set = True
    compute = linear.compute_dtype if linear.compute_dtype is not None else x.dtype
    bias = linear.bias.to(compute) if linear.bias is not None else None
    weight = linear.weight
    y = lora_linear_4bit(x.to(compute), weight, weight.quant_state, bias, A, B, scale, dropout_p=dropout_p,
                         training=training)
    return y.to(x.dtype)


def forward_dora_4bit(linear: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor,
                      scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    """``forward_4bit`` with DoRA: bitsandbytes Linear4bit's forward (x in the layer's compute dtype, the result
    cast back to x's dtype) with PEFT's DoRA fused in (``dora_linear_4bit``)."""
    fix_state = getattr(sys.modules.get("bitsandbytes.nn.modules"), "fix_4bit_weight_quant_state_from_module", None)
    if fix_state is not None:
        fix_state(linear)
    if not linear.compute_type_is_set:
        linear.set_compute_type(x)
        linear.compute_type_is_set = True
    compute = linear.compute_dtype if linear.compute_dtype is not None else x.dtype
    bias = linear.bias.to(compute) if linear.bias is not None else None
    weight = linear.weight
    y = dora_linear_4bit(x.to(compute), weight, weight.quant_state, bias, A, B, magnitude, scale,
                         dropout_p=dropout_p, training=training)
    return y.to(x.dtype)


class LinearWithLoRA(nn.Module):
    """nn.Linear plus a LoRA update, fused: forward(x) = linear(x) + lora(dropout(x)) via ``lora_linear``.

    Attributes: ``linear`` (the wrapped nn.Linear or transformers Conv1D, untouched; freeze it yourself as the book
    does), ``lora`` (a LoRALayer), ``dropout`` (probability), ``fan_in_fan_out`` (True for a Conv1D, whose weight
    is stored (in, out); PEFT's name for it) and ``merged`` (set by ``merge_lora``). State-dict keys:
    linear.weight, linear.bias, lora.A, lora.B (merging adds none).
    A and B are made on the linear's device, in its dtype when that is float32/float64, else in float32 (as PEFT
    keeps adapters on a 16-bit base).

    Args:
        linear: the nn.Linear (or transformers Conv1D) to wrap. rank: >= 1. alpha: finite real.
            dropout: probability in [0, 1] on the LoRA input (PEFT's lora_dropout). scaling: see LoRALayer.

    Faithful to the wrapped layer: the fused op stands in for ``linear(x)`` only when that call would run
    nn.Linear's (or Conv1D's) own forward and nothing else. A layer whose class overrides forward (a clamped
    or scaled linear), or that has forward hooks or pre-hooks (FSDP2's ``fully_shard`` on the layer itself,
    accelerate's offload hooks, activation capture, global module hooks), is called as it is and the low-rank
    term is added beside it: ``linear(x) + scale * dropout(x) A B`` (unfused, as PEFT computes it).

    QLoRA: a bitsandbytes ``Linear4bit`` (nf4 / fp4, any blocksize, double quantization on or off, any
    compute_dtype) with its own, un-overridden forward runs ``lora_linear_4bit`` on its packed weight: x cast
    to the layer's compute dtype, the result cast back to x's dtype, as Linear4bit computes it. A and B are
    float32. ``merge_lora`` refuses such layers (see lora_fast.patching).

    Mode: the wrapper starts in the wrapped layer's mode (``linear.training``), so a model wrapped in eval mode
    stays in eval mode (no LoRA dropout) until ``model.train()``.

    Merged (``merge_lora``): linear.weight holds W + scale * (A @ B)^T (for a Conv1D, + scale * A @ B) and
    forward is ``linear(x)`` alone, so no LoRA dropout is applied. The forward runs in any mode; a backward
    that would reach A or B (training a merged adapter) raises RuntimeError, since they would get no gradient.

    Several adapters (PEFT's words; issue 30): the adapter built with the layer is named "default" and keeps
    its attributes and keys (``lora``, ``dropout``; lora.A, lora.B). ``add_adapter(name, rank, alpha, ...)``
    adds another (keys loras.<name>.A, loras.<name>.B), ``set_adapter(name or names)`` chooses the active ones
    (several active: their terms are summed on every row, as PEFT sums them), ``delete_adapter(name)`` removes
    one, and ``forward(x, adapter_names=[...])`` (one name per sample, "__base__" for none, as PEFT's
    ``adapter_names``) gives each sample its own adapter in one fused call (``lora_linear_multi``);
    ``use_adapter_names(model, names)`` passes them to every wrapped layer of a model's forward. A layer with
    several active adapters, or one other than "default", is not merged (``merge_lora`` names it).

    Raises: TypeError if ``linear`` is neither an nn.Linear nor a Conv1D; ValueError for rank, alpha, dropout,
    scaling.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 scaling: str = "alpha"):
        super().__init__()
        if not is_linear(linear):
            raise TypeError(f"linear: expected a torch.nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("linear: its weight is not initialised yet (nn.LazyLinear): run one forward first")
        self.linear = linear
        self.fan_in_fan_out = not isinstance(linear, nn.Linear)
        w = linear.weight
        in_dim, out_dim = w.shape if self.fan_in_fan_out else (linear.in_features, linear.out_features)
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora = LoRALayer(in_dim, out_dim, rank, alpha, scaling=scaling, device=w.device, dtype=dtype)
        self.dropout = check_dropout(dropout, "dropout")
        self.merged = False
        # the exact pre-merge weight, kept by merge_lora for unmerge_lora; not in the state dict
        self.register_buffer("weight_before_merge", None, persistent=False)
        self._register_state_dict_hook(_warn_if_merged)
        # the wrapper takes the wrapped layer's mode: wrapping (or loading an adapter into) a model in eval mode
        # applies no LoRA dropout until model.train(), as the model's own dropout layers do
        self.train(linear.training)

    def reset_parameters(self) -> None:
        """Re-initialise the adapter only (A kaiming-uniform, B zeros); the wrapped layer is left as it is."""
        self.lora.reset_parameters()

    def adapter_parameters(self) -> list:
        """The parameters training adapts (A and B of every adapter; DoRA adds its magnitude)."""
        return [p for name in self.adapters for p in (self._adapter(name).A, self._adapter(name).B)]

    # --- several adapters (PEFT's API) ---------------------------------------------------------------------------

    @property
    def adapters(self) -> list:
        """The names of the adapters this layer holds, "default" first, then in the order they were added."""
        extra = self._modules.get("loras")
        return [DEFAULT_ADAPTER] + (list(extra.keys()) if extra is not None else [])

    @property
    def active_adapters(self) -> list:
        """The names of the active adapters (``set_adapter``): ["default"] unless changed."""
        return list(getattr(self, "_active_adapters", (DEFAULT_ADAPTER,)))

    def _adapter(self, name: str) -> LoRALayer:
        return self.lora if name == DEFAULT_ADAPTER else self._modules["loras"][name]

    def adapter(self, name: str) -> LoRALayer:
        """The LoRALayer (A, B, rank, alpha, scale) of adapter ``name`` ("default": ``self.lora``).
        Raises: TypeError / ValueError for an unknown name."""
        return self._adapter(self._check_known(name, "name"))

    def _adapter_dropout(self, name: str) -> float:
        return self.dropout if name == DEFAULT_ADAPTER else self._dropouts[name]

    def _check_known(self, name, argument: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{argument}: expected an adapter name (str), got {type(name).__name__}")
        if name not in self.adapters:
            raise ValueError(f"{argument}: no adapter named {name!r}; this layer holds {self.adapters}")
        return name

    def add_adapter(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0,
                    scaling: str = "alpha") -> None:
        """Add an adapter ``name`` (a LoRALayer: A kaiming-uniform, B zeros, so it starts as the frozen layer) on
        the default adapter's device and dtype, with its own rank, alpha, dropout and scaling; not activated
        (``set_adapter``, or per call ``adapter_names``). Its state-dict keys are loras.<name>.A and loras.<name>.B.

        Raises: TypeError for a non-str name; ValueError for a name that is taken, empty, has a '.', or is
        "__base__", or for rank, alpha, dropout, scaling (as the constructor); RuntimeError on a merged layer."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        if not name or "." in name or name == BASE_ADAPTER or name in self.adapters:
            raise ValueError(f"name: expected a new adapter name without '.' other than {BASE_ADAPTER!r}, got "
                             f"{name!r} (this layer holds {self.adapters})")
        if self.merged:
            raise RuntimeError("LinearWithLoRA.add_adapter: the layer is merged (merge_lora); unmerge_lora first")
        dropout = check_dropout(dropout, "dropout")
        self._attach_adapter(name, self.new_adapter_layer(rank, alpha, scaling=scaling), dropout)

    def new_adapter_layer(self, rank: int, alpha: float, *, scaling: str = "alpha") -> LoRALayer:
        """A LoRALayer for this layer's features, on the default adapter's device and dtype (A kaiming-uniform, B
        zeros), not attached: what ``add_adapter`` attaches, and what a loader builds before changing anything.
        Raises: ValueError for rank, alpha, scaling."""
        A = self.lora.A
        return LoRALayer(A.shape[0], self.lora.B.shape[1], rank, alpha, scaling=scaling, device=A.device,
                         dtype=A.dtype)

    def _attach_adapter(self, name: str, layer: LoRALayer, dropout: float):
        """Attach ``layer`` as the (not active) adapter ``name`` (checked by the caller); returns a function that
        detaches it again and leaves the module as it was before (a loader's undo)."""
        created = "loras" not in self._modules

        def undo():
            loras, dropouts = self._modules.get("loras"), self.__dict__.get("_dropouts")
            if loras is not None and name in loras:
                del loras[name]
            if dropouts is not None:
                dropouts.pop(name, None)
            if created:
                self._modules.pop("loras", None)
                self.__dict__.pop("_dropouts", None)

        try:
            if created:
                self.loras = nn.ModuleDict()
                self._dropouts = {}
            self.loras[name] = layer
            self._dropouts[name] = dropout
        except BaseException:
            undo()   # a failure half-way (an interrupt) leaves no half-attached adapter either
            raise
        return undo

    def set_adapter(self, adapter_name) -> None:
        """Make ``adapter_name`` (a name, or a list of names: their terms are summed, as PEFT does) the active
        adapter(s) of this layer. Raises: TypeError for anything but a str or a list / tuple of str; ValueError for
        an unknown name or an empty list; RuntimeError on a merged layer (unmerge_lora first)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name) \
            if isinstance(adapter_name, (list, tuple)) else None
        if names is None:
            raise TypeError(f"adapter_name: expected an adapter name (str) or a list of them, got "
                            f"{type(adapter_name).__name__}")
        if not names:
            raise ValueError(f"adapter_name: expected an adapter name or a non-empty list of them, got "
                             f"{adapter_name!r}")
        for name in names:
            self._check_known(name, "adapter_name")
        if self.merged:
            raise RuntimeError("LinearWithLoRA.set_adapter: the layer is merged (merge_lora); unmerge_lora first")
        self._active_adapters = tuple(dict.fromkeys(names))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an added adapter (its parameters and keys); "default" cannot be removed (its keys are the
        book's). When it was active it leaves the active set; an empty set falls back to "default".
        Raises: TypeError / ValueError for an unknown name or "default"."""
        self._check_known(adapter_name, "adapter_name")
        if adapter_name == DEFAULT_ADAPTER:
            raise ValueError("adapter_name: the 'default' adapter is the layer's own (lora.A, lora.B) and is not "
                             "deleted")
        del self.loras[adapter_name]
        del self._dropouts[adapter_name]
        active = tuple(n for n in self.active_adapters if n != adapter_name)
        self._active_adapters = active or (DEFAULT_ADAPTER,)

    def _mixed_forward(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
        """One adapter per sample (PEFT's ``adapter_names``), fused in one ``lora_linear_multi`` call on the named
        adapters' own factors (unstacked: no stack, pad or copy; the kernels' adapter table is kept on the layer
        while the factors' addresses, shapes and strides are unchanged, ``multi._owned_table``)."""
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names: expected a list of adapter names (str), one per sample")
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names: expected one name per sample of x (x.shape[0] = "
                             f"{x.shape[0] if x.dim() >= 2 else 'none: x is 1-D'}), got {len(adapter_names)}")
        if self.merged:
            raise RuntimeError("LinearWithLoRA: adapter_names on a merged layer (merge_lora); unmerge_lora first")
        used = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER]
        for name in used:
            self._check_known(name, "adapter_names")
        position = {name: i for i, name in enumerate(used)}
        if not used:
            used = [DEFAULT_ADAPTER]   # every sample on the base layer: one adapter, no row uses it
        # checked on the host, shared by the layers of a model forward that map the names to the same slots
        # (use_adapter_names: one index upload and one sort per forward, not one per layer)
        rows = sample_rows([position.get(n, -1) for n in adapter_names], x.shape[:-1], len(used), x.device)
        layers = [self._adapter(n) for n in used]
        A, B = [layer.A for layer in layers], [layer.B for layer in layers]
        if len({t.dtype for t in (*A, *B)}) > 1:
            # adapters of several dtypes (one kept in fp32 beside 16-bit ones, as PEFT's autocast_adapter_dtype
            # leaves them): the op takes one adapter dtype, so all are read in float32 (exact widening; a copy of
            # each 16-bit factor per call, whose new address also means a new adapter table per call; gradients
            # flow back through the casts in each factor's own dtype)
            A, B = [t.float() for t in A], [t.float() for t in B]   # (float() of a float32 factor: itself)
        scales = [layer.scale for layer in layers]
        dropouts = [self._adapter_dropout(n) for n in used]
        if not self.fused() or has_4bit_forward(self.linear) or is_linear4bit(self.linear):
            # the wrapped layer's own call, then each row's adapter term (PEFT's loop; a 4-bit base's too: no fused
            # multi-adapter kernel reads 4-bit weights)
            y = self.linear(x)
            return (y + _multi_delta(x, A, B, scales, rows.index, dropouts, self.training, None)).to(y.dtype)
        weight = self.linear.weight.t() if self.fan_in_fan_out else self.linear.weight
        return _lora_linear_multi(x, weight, self.linear.bias, A, B, scales, rows, dropouts, self.training,
                                  owner=self)

    def _forward_one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # the per-step path: submodules and parameters read from their dicts (nn.Module.__getattr__ costs host
        # time on every call), the wrapped layer's kind decided once per call
        modules = self._modules
        linear = modules["linear"]
        if name == DEFAULT_ADAPTER:
            lora, dropout = modules["lora"], self.dropout
        else:
            lora, dropout = modules["loras"][name], self._dropouts[name]
        try:
            params = lora._parameters
            A, B = params["A"], params["B"]
        except KeyError:   # parametrized (torch.nn.utils.parametrize) or otherwise not plain parameters
            A, B = lora.A, lora.B
        kind = _fused_kind(linear)
        if kind is None:
            y = linear(x)
            # summed in the adapters' dtype when wider, then rounded once (as PEFT and the reference do)
            return (y + lora_delta(x, A, B, lora.scale, dropout_p=dropout, training=self.training)).to(y.dtype)
        if kind == "4bit":
            return forward_4bit(linear, x, A, B, lora.scale, dropout, self.training)
        # Conv1D computes x @ W + b with W (in, out): its transpose is a view in nn.Linear's (out, in) layout
        try:
            linear_params = linear._parameters
            weight, bias = linear_params["weight"], linear_params["bias"]
        except KeyError:   # parametrized, or a bias kept as a buffer
            weight, bias = linear.weight, linear.bias
        return lora_linear(x, weight.t() if self.fan_in_fan_out else weight, bias, A, B, lora.scale,
                           dropout_p=dropout, training=self.training)

    def fused(self) -> bool:
        """True when forward runs the fused op (see the class docstring: plain layer, no hooks): nn.Linear's or
        Conv1D's forward (``lora_linear``), or bitsandbytes Linear4bit's on a quantized weight
        (``lora_linear_4bit``)."""
        return _fused_kind(self.linear) is not None

    def forward(self, x: torch.Tensor, *, adapter_names=None) -> torch.Tensor:
        """linear(x) plus the active adapters' terms; with ``adapter_names`` (one name per sample of x's first
        dim, "__base__" for none) each sample's own adapter instead, fused in one call."""
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names)
        if self.merged:
            y = self.linear(x)
            # the merged adapter's parameters (DoRA's magnitude too); added adapters take no part in it
            adapters = [self.lora.A, self.lora.B] + ([self.m] if isinstance(self, LinearWithDoRA) else [])
            if torch.is_grad_enabled() and any(p.requires_grad for p in adapters):
                y = _MergedGuard.apply(y, *adapters)
            return y
        active = self.__dict__.get("_active_adapters")
        if active is None:   # the default adapter alone (no set_adapter yet): the common case, no list built
            return self._forward_one(x, DEFAULT_ADAPTER)
        y = self._forward_one(x, active[0])
        if len(active) == 1:
            return y
        # several active adapters: their terms summed on every row (PEFT), each with its own dropout mask
        delta = sum(lora_delta(x, self._adapter(n).A, self._adapter(n).B, self._adapter(n).scale,
                               dropout_p=self._adapter_dropout(n), training=self.training) for n in active[1:])
        return (y + delta).to(y.dtype)

    def extra_repr(self) -> str:
        extra = f", adapters={self.adapters}, active={self.active_adapters}" if len(self.adapters) > 1 else ""
        return f"dropout={self.dropout}, merged={self.merged}{extra}"


@contextlib.contextmanager
def use_adapter_names(model: nn.Module, adapter_names):
    """Within the block, every LinearWithLoRA of ``model`` is called with ``adapter_names`` (one adapter name per
    sample of the batch, "__base__" for the base model alone), as PEFT's ``model(..., adapter_names=...)``
    passes them with forward pre-hooks: ``with use_adapter_names(model, ["a", "b", "__base__"]): model(x)``.
    The hooks are removed on leaving the block, also after an exception.
    Each forward of ``model`` builds the per-row selection once (``lora_fast.multi.AdapterRows``: the index
    uploaded once, checked on the host, sorted once for the sorted row order) and every layer that maps the names
    to the same adapter slots shares it; a layer with another mapping (an adapter it lacks, adapters added in
    another order) gets its own. Nothing is kept past the forward.
    Raises: TypeError for a non-Module or a non-list of names; ValueError (at the forward) for unknown names or
    a batch of another size."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError("adapter_names: expected a list of adapter names (str), one per sample")
    names = list(adapter_names)

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    dora = [name for name, m in model.named_modules() if isinstance(m, LinearWithDoRA)]
    if dora:
        # a DoRA layer would otherwise run its one adapter on every sample: a silently different model
        raise NotImplementedError(f"use_adapter_names: the model has DoRA layers ({', '.join(dora[:3])}"
                                  f"{', ...' if len(dora) > 3 else ''}), which hold one adapter and cannot take one "
                                  "adapter per sample")
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, LinearWithLoRA)]
    # one shared selection per forward of the model: a scope from its pre-hook to its (always called) hook
    handles += [model.register_forward_pre_hook(open_rows_scope),
                model.register_forward_hook(close_rows_scope, always_call=True)]
    scope = current_rows_scope()
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        restore_rows_scope(scope)   # a forward interrupted past its closing hook leaves nothing behind


class LinearWithDoRA(LinearWithLoRA):
    """nn.Linear with DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5), as PEFT
    computes it (``use_dora=True``), on the fused op ``dora_linear``:

        forward(x) = m ⊙ (x (W + scale (A B)^T)^T) / ||W + scale (A B)^T||_row + b     (no dropout)

    the norm taken per output feature over the (out, in) weight and detached (paper sec. 4.3); with dropout,
    PEFT's formula ``linear(x) + (g - 1) ⊙ (x_d W^T) + g ⊙ scale x_d A B`` with g = m / norm, x_d = dropout(x).

    A LinearWithLoRA (attributes ``linear``, ``lora``, ``dropout``, ``fan_in_fan_out``, ``merged``) plus ``m``:
    the magnitude, an nn.Parameter of shape (out_features,) initialised to ||W_n||, the norm of each output
    feature's row of nn.Linear's (out, in) weight (PEFT's lora_magnitude_vector), in the adapters' dtype
    (float32 on a 16-bit base). State-dict keys: linear.weight, linear.bias, lora.A, lora.B, m.
    g = 1 on rows whose norm is 0 (``lora_fast.dora_linear``).

    The magnitude is computed only from a loaded base: at construction on a real weight, or by
    ``initialize_magnitude()``. A layer built on the meta device (its m then waits), moved with ``to_empty()``
    or reset with ``reset_parameters()`` holds m = NaN, marked not initialised, and its forward (and
    merge_lora) raises RuntimeError until ``initialize_magnitude()`` runs on the loaded base or m is loaded (a
    state dict, ``load_lora``, ``load_peft_adapter``). The meta-device idiom is: build on 'meta', wrap,
    ``to_empty()``, ``reset_parameters()``, load the base, ``initialize_dora_magnitudes(model)``.

    The from-scratch DoRA layer published by the book's author (Raschka, "Improving LoRA: Implementing
    Weight-Decomposed Low-Rank Adaptation (DoRA) from Scratch", 2024) keeps ``m`` of shape (1, in_features): it
    takes the norm over dim 0 of the (out, in) weight, i.e. per input feature, does not detach it and has no
    dropout. This layer follows the paper's per-output-feature reading that PEFT implements, so that a PEFT DoRA
    adapter loads into it and gives the same numbers; the two ``m`` are not interchangeable (their shapes differ,
    so a state dict of one does not load into the other).

    Mode: the wrapper starts in the wrapped layer's mode (``linear.training``), so a model wrapped in eval mode
    stays in eval mode (no LoRA dropout) until ``model.train()``.

    Merged (``merge_lora``): linear.weight holds g ⊙ (W + scale (A B)^T) row-wise (the norm of the unmerged
    weight), a copy of W is kept for an exact ``unmerge_lora``; forward is ``linear(x)``.

    Args: as LinearWithLoRA. Raises: as LinearWithLoRA.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 scaling: str = "alpha"):
        super().__init__(linear, rank, alpha, dropout=dropout, scaling=scaling)
        A = self.lora.A
        self.m = nn.Parameter(torch.empty(self.lora.B.shape[1], device=A.device, dtype=A.dtype))
        # whether m holds a magnitude (computed from a loaded base, loaded from a state dict, or written): a layer
        # built on the meta device, moved with to_empty() or reset waits for initialize_magnitude()
        self._magnitude_ready = False
        if self.base_weight().is_meta:
            return
        if self._unquantized_4bit():
            # bitsandbytes quantizes when the layer is moved to a device: m from the float weight would not be
            # the norm of the weight the forward reads
            self._forget_magnitude()
            return
        self.initialize_magnitude()

    def _unquantized_4bit(self) -> bool:
        return is_linear4bit(self.linear) and getattr(self.linear.weight, "quant_state", None) is None

    def initialize_magnitude(self) -> None:
        """m to ||W + scale (A B)^T|| per output feature (= ||W_n|| while B is zero, as at construction), from the
        base weight as it is now: call it after loading the base into a layer built on the meta device (build on
        'meta', ``to_empty()``, ``reset_parameters()``, load the base, ``initialize_magnitude()``: torchtune's
        order), which then equals a layer built on the loaded base. ``lora_fast.initialize_dora_magnitudes(model)``
        calls it on every LinearWithDoRA of a model that has no magnitude yet.

        Raises: RuntimeError if the base weight is on the meta device (not loaded), or is a bitsandbytes
        Linear4bit not quantized yet (a wrapper built on one waits for this call after the move to a device)."""
        if self._unquantized_4bit():
            raise RuntimeError("LinearWithDoRA.initialize_magnitude: the 4-bit base (bitsandbytes Linear4bit) is "
                               "not quantized yet; move it to its device first (bitsandbytes quantizes then)")
        weight = self.base_weight()
        if weight.is_meta:
            raise RuntimeError("LinearWithDoRA.initialize_magnitude: the base weight is on the meta device; move "
                               "the model with to_empty() and load the base weights first")
        with torch.no_grad():
            self.m.copy_(dora_weight_norm(weight, self.lora.A, self.lora.B, self.lora.scale))
        self._magnitude_ready = True

    reset_magnitude = initialize_magnitude

    def reset_parameters(self) -> None:
        """Re-initialise the adapter (A kaiming-uniform, B zeros) and mark the magnitude as not initialised (NaN,
        and a forward raises until ``initialize_magnitude()`` is called or m is loaded): in the meta-device idiom
        reset_parameters runs before the base is loaded, so m is never computed from uninitialised memory. The
        wrapped layer is left as is."""
        self.lora.reset_parameters()
        self._forget_magnitude()

    def _forget_magnitude(self) -> None:
        if not self.m.is_meta:
            with torch.no_grad():
                self.m.fill_(float("nan"))
        self._magnitude_ready = False

    def magnitude_ready(self) -> bool:
        """True when m holds a magnitude (see ``initialize_magnitude``); one check of m for NaN (the mark of a
        magnitude not initialised) the first time after a reset, so that a magnitude written in place
        (``m.copy_``, a loader) counts."""
        ready = getattr(self, "_magnitude_ready", True)   # a layer pickled before the mark existed: ready
        if not ready and not self.m.is_meta and not torch.isnan(self.m.detach()).any():
            self._magnitude_ready = ready = True
        return ready

    def _check_magnitude(self, caller: str) -> None:
        if not getattr(self, "_magnitude_ready", True) and not torch.compiler.is_compiling() \
                and not self.magnitude_ready():
            raise RuntimeError(f"LinearWithDoRA.{caller}: the magnitude m is not initialised (the layer was built on "
                               "the meta device, moved with to_empty() or reset): load the base weights, then call "
                               "initialize_magnitude() (lora_fast.initialize_dora_magnitudes(model) for a model), or "
                               "load m from a state dict or adapter")

    def _apply(self, fn, *args, **kwargs):
        was_meta = self.m.is_meta
        out = super()._apply(fn, *args, **kwargs)
        if was_meta and not self.m.is_meta:
            # to_empty(): m now holds uninitialised memory, as does the base until it is loaded
            self._forget_magnitude()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "m" in state_dict and not self.m.is_meta:
            self._magnitude_ready = not bool(torch.isnan(self.m.detach()).any())

    def base_weight(self) -> torch.Tensor:
        """The wrapped weight in nn.Linear's (out, in) layout (a transposed view for a Conv1D); a bitsandbytes
        Linear4bit's dequantized (in its quantized dtype: a temporary (out, in) tensor)."""
        if is_linear4bit(self.linear) and getattr(self.linear.weight, "quant_state", None) is not None:
            return dequantize_4bit_weight(self.linear.weight, self.linear.weight.quant_state)
        return self.linear.weight.t() if self.fan_in_fan_out else self.linear.weight

    def adapter_parameters(self) -> list:
        return [self.lora.A, self.lora.B, self.m]

    def add_adapter(self, name: str, rank: int, alpha: float, **kwargs) -> None:
        """Not supported: a LinearWithDoRA holds one adapter (its magnitude belongs to it)."""
        raise NotImplementedError("LinearWithDoRA.add_adapter: several DoRA adapters in one layer are not supported; "
                                  "use LinearWithLoRA for several adapters")

    def forward(self, x: torch.Tensor, *, adapter_names=None) -> torch.Tensor:
        if adapter_names is not None:
            raise NotImplementedError("LinearWithDoRA: adapter_names (one adapter per sample) is not supported on "
                                      "DoRA layers, which hold one adapter; use LinearWithLoRA layers for mixed "
                                      "batches")
        if not self.merged:
            self._check_magnitude("forward")
        if self.merged or not self.fused():
            if self.merged:
                return super().forward(x)
            # the wrapped layer's own call (hooks, own forward), then PEFT's DoRA around its output, unfused
            y = self.linear(x)
            weight = self.base_weight()
            bias = self.linear.bias
            if is_linear4bit(self.linear):
                weight = weight.to(y.dtype)
                bias = bias.to(y.dtype) if bias is not None else None
            return dora_unfused(x.to(y.dtype), y, weight, bias, self.lora.A, self.lora.B, self.m,
                                self.lora.scale, dropout_p=self.dropout, training=self.training)
        if has_4bit_forward(self.linear):
            return forward_dora_4bit(self.linear, x, self.lora.A, self.lora.B, self.m, self.lora.scale, self.dropout,
                                     self.training)
        return dora_linear(x, self.base_weight(), self.linear.bias, self.lora.A, self.lora.B, self.m,
                           self.lora.scale, dropout_p=self.dropout, training=self.training)
