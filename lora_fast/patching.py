"""Model surgery: replace_linear_with_lora (the book's function, made idempotent and selective); merge and
unmerge; trainable-parameter helpers."""

import re
import warnings
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from ._checks import check_dropout
from .layers import LinearWithDoRA, LinearWithLoRA, has_plain_forward, is_linear, is_linear4bit, lora_scale
from .reference import dora_scale

Exclude = Optional[Union[Iterable[str], Callable[[str, nn.Module], bool]]]
TargetModules = Optional[Union[str, Iterable[str]]]
ALL_LINEAR = "all-linear"


def _excluder(model: nn.Module, exclude: Exclude) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    names = [exclude] if isinstance(exclude, str) else exclude
    try:
        names = tuple(names)
    except TypeError:
        pass   # _suffix_matcher names the argument
    matcher = _suffix_matcher(names, "exclude",
                              "module names (a string or an iterable of strings) or a predicate (name, module) -> bool")
    module_names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    unmatched = [n for n in names if not any(m == n or m.endswith("." + n) for m in module_names)]
    if unmatched:
        # a typo in exclude would otherwise wrap the very layer meant to be left alone (the output head)
        warnings.warn(f"exclude: {unmatched} match no module of the model", UserWarning, stacklevel=3)
    return matcher


def _suffix_matcher(names, argument: str, expected: str) -> Callable[[str, nn.Module], bool]:
    """Match a qualified module name equal to one of ``names`` or ending in "." + one of them."""
    given = names
    try:
        names = tuple(names)
    except TypeError:
        names = (None,)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{argument}: expected {expected}, got {given!r}")
    return lambda name, module: any(name == n or name.endswith("." + n) for n in names)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    """The output head "all-linear" leaves out. A Hugging Face model (it has get_output_embeddings): its output
    embeddings as in PEFT, else a "score" or "classifier" child (PEFT's sequence-classification heads), else
    none. Any other model: the last linear layer registered (the book's ``out_head``, a classifier head)."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        for name in ("score", "classifier"):
            if head is None and is_linear(getattr(model, name, None)):
                head = getattr(model, name)
        return head
    head = None
    for module in model.modules():
        if is_linear(module) or isinstance(module, LinearWithLoRA):
            head = module
    return head.linear if isinstance(head, LinearWithLoRA) else head


def _targeter(model: nn.Module, target_modules: TargetModules) -> Callable[[str, nn.Module], bool]:
    """PEFT's rules for target_modules (LoraConfig): a string is a regex that must match the whole qualified
    name, "all-linear" every linear but the output head, an iterable of names matches a name or a dotted
    suffix of it; None targets every linear layer."""
    if target_modules is None:
        return lambda name, module: True
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            head = _output_head(model)
            return lambda name, module: module is not head
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({err})") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    return _suffix_matcher(target_modules, "target_modules",
                           f"a regex string, {ALL_LINEAR!r} or an iterable of module names")


def _class_name(module: nn.Module) -> str:
    """The class of ``module`` with its module, so that PEFT's ``Linear`` does not read as torch's: torch.nn's
    own classes by their public name (torch.nn.Sequential), others in full (peft.tuners.lora.layer.Linear)."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_peft_layer(module: nn.Module) -> bool:
    """True for a layer PEFT injected (its tuner layers derive from peft's BaseTunerLayer); peft is not imported."""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(module).__mro__)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, exclude: Exclude = None,
                             target_modules: TargetModules = None, use_dora: bool = False, **kwargs) -> nn.Module:
    """Wrap every nn.Linear (and transformers Conv1D, GPT-2's linear) in ``model`` (recursively) in a
    LinearWithLoRA (a LinearWithDoRA with ``use_dora=True``, PEFT's name for it), in place; returns the model.

    As the book's function (appendix E), plus: a layer already wrapped is left as it is (calling twice equals
    calling once); a layer registered in several places (shared or tied submodules) gets one wrapper, put in
    every place, and is selected by its first qualified name (the one ``named_modules()`` gives); ``exclude``
    skips layers by qualified name (e.g. "out_head" or "trf_blocks.0.att.W_query";
    a name also matches as a dotted suffix) or by a predicate ``(qualified_name, module) -> bool``, and a model
    that is itself a linear layer comes back wrapped.

    ``target_modules`` selects layers as PEFT's LoraConfig does: a list of names, each matching a qualified
    name or a dotted suffix of it (["c_attn", "q_proj"]); a string, a regular expression that must match the
    whole qualified name; or "all-linear": every linear layer except the output head (a Hugging Face model's
    get_output_embeddings(), as in PEFT; for other models, the last linear layer registered, e.g. the book's
    out_head). None (default) targets every linear layer. ``exclude`` applies after ``target_modules``.
    nn.MultiheadAttention modules are left whole (their forward reads out_proj.weight directly): a
    target_modules that names their out_proj raises, and with None or "all-linear" a UserWarning names the
    out_proj layers left unwrapped. A layer registered under several names, in one parent or several, gets one
    wrapper in every place. A linear
    subclass with its own forward, or a layer with hooks, is wrapped but keeps its own call (LinearWithLoRA
    adds the low-rank term beside it); ``exclude`` names that match no module give a UserWarning.

    Args: rank >= 1, alpha, use_dora (bool), and LinearWithLoRA's keywords (dropout, scaling). A layer already
        wrapped keeps its kind (LoRA or DoRA).
    Raises: ValueError for a bad rank, alpha, dropout or scaling (from LinearWithLoRA), an invalid regex, a
        target_modules that names a module that is not a linear layer (as PEFT refuses it) or the out_proj of an
        nn.MultiheadAttention (named, with the reason), a model whose PEFT layers (a PeftModel's) hold linear
        modules the selection would wrap (each PEFT layer named; the model is left unchanged);
        TypeError for a target_modules that is neither a string nor an iterable of strings.
    """
    excluded = _excluder(model, exclude)
    targeted = _targeter(model, target_modules)
    # the arguments are checked before any layer is touched, even when no layer ends up wrapped
    lora_scale(alpha, rank, kwargs.get("scaling", "alpha"))
    check_dropout(kwargs.get("dropout", 0.0), "dropout")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora: expected a bool, got {type(use_dora).__name__}")
    if isinstance(model, LinearWithLoRA):
        return model
    wrap = LinearWithDoRA if use_dora else LinearWithLoRA
    if is_linear(model):
        # a lone layer is its own whole model: there is no head to leave out
        return model if excluded("", model) else wrap(model, rank, alpha, **kwargs)

    inside_mha = _inside_attention(model)
    explicit = target_modules is not None and not (isinstance(target_modules, str)
                                                   and target_modules.lower() == ALL_LINEAR)
    if explicit:
        inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))
        named = [(n, m) for n, m in model.named_modules()
                 if n and not n.startswith(inside) and targeted(n, m) and not excluded(n, m)]
        in_mha = [f"{n} (in {inside_mha[id(m)]})" for n, m in named if id(m) in inside_mha]
        if in_mha:
            raise ValueError(f"target_modules: {target_modules!r} names the output projection of "
                             f"nn.MultiheadAttention: {', '.join(in_mha)}. Its forward passes out_proj.weight to "
                             "F.multi_head_attention_forward without calling out_proj, so a LoRA wrapper there would "
                             "never run; lora-fast does not adapt nn.MultiheadAttention (exclude the layer, or use "
                             "PEFT, whose lora.MultiheadAttention merges the update into the weights it passes)")
        wrong = [(n, m) for n, m in named if not (is_linear(m) or isinstance(m, LinearWithLoRA))]
        if wrong:
            peft = [n for n, m in wrong if _is_peft_layer(m)]
            hint = (f"; {', '.join(peft)}: already wrapped by PEFT (a PeftModel's LoRA layers run on lora-fast's "
                    "kernels with patch_peft(model); replace_linear_with_lora takes the model without PEFT's "
                    "layers)") if peft else ""
            raise ValueError(f"target_modules: {target_modules!r} names modules that are not linear layers "
                             f"(torch.nn.Linear or transformers' Conv1D): "
                             f"{', '.join(f'{n} ({_class_name(m)})' for n, m in wrong)}{hint}")
    else:
        left = [n for n, m in model.named_modules() if id(m) in inside_mha and targeted(n, m) and not excluded(n, m)]
        if left:
            warnings.warn(f"replace_linear_with_lora: the output projections of nn.MultiheadAttention are left "
                          f"unwrapped ({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}): its forward reads "
                          "out_proj.weight without calling out_proj, so a wrapper would never run",
                          UserWarning, stacklevel=2)

    # PEFT's layers hold nn.Linear modules of their own (base_layer, lora_A.<name>, lora_B.<name>): wrapping those
    # would break PEFT's forward, which reads base_layer.weight (found by a newcomer's trial: target_modules None or
    # "all-linear" wrapped them silently and the model failed in its forward)
    # A linear inside them is selected by its first qualified name in the model, as _replace selects it (a layer
    # also registered outside PEFT's layer is wrapped in every place, PEFT's included)
    first_names = {}
    for name, module in model.named_modules():
        first_names.setdefault(id(module), name)
    peft_layers = []   # the outermost ones (named_modules gives a parent before its children)
    for name, module in model.named_modules():
        if _is_peft_layer(module) and not any(p == "" or name.startswith(p + ".") for p, _ in peft_layers):
            peft_layers.append((name, module))

    def selected(c: nn.Module) -> bool:
        name = first_names[id(c)]
        return targeted(name, c) and not excluded(name, c)

    reached = [(n, m) for n, m in peft_layers
               if any(is_linear(c) and selected(c) for cn, c in m.named_modules() if cn)]
    if reached:
        listed = ", ".join(f"{n or '<model>'} ({_class_name(m)})" for n, m in reached)
        raise ValueError(f"model: {listed}: already wrapped by "
                         "PEFT, whose layers' own linear modules (base_layer, lora_A, lora_B) the target_modules "
                         f"{target_modules!r} would wrap (a PeftModel's LoRA layers run on lora-fast's kernels with "
                         "patch_peft(model); replace_linear_with_lora takes the model without PEFT's layers)")

    def skip(name: str, module: nn.Module) -> bool:
        return not targeted(name, module) or excluded(name, module)

    # one wrapper per layer object: a layer shared by several parents is wrapped once, in every place
    wrappers = {id(m.linear): m for m in model.modules() if isinstance(m, LinearWithLoRA)}
    # every wrapper is built before any is put in place: a layer that cannot be wrapped (an unsupported base,
    # a magnitude that cannot be computed) raises with the model unchanged
    places = []
    _replace(model, "", wrap, rank, alpha, skip, kwargs, wrappers, first_names, places)
    for parent, name, wrapper in places:
        setattr(parent, name, wrapper)
    if target_modules is not None and not any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        # as PEFT does: a target list that matches nothing is a mistake, not a no-op
        raise ValueError(f"target_modules: {target_modules!r} matched no linear layer of the model")
    return model


def _inside_attention(model: nn.Module) -> dict:
    """{id(linear): "<path> (nn.MultiheadAttention)"} for the linear layers nn.MultiheadAttention owns."""
    return {id(child): f"{name or '<model>'} ({type(m).__name__})"
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for child in m.children() if is_linear(child)}


def module_places(model: nn.Module, module: nn.Module) -> list:
    """Every (parent, attribute name) under which ``module`` is registered in ``model``: a layer registered twice
    in one parent (``self.a = self.b = linear``) or in several parents has several. A LinearWithLoRA's own
    ``linear`` slot is not one."""
    return [(parent, name) for parent in model.modules() if not isinstance(parent, LinearWithLoRA)
            for name, child in parent._modules.items() if child is module]


def _replace(module: nn.Module, prefix: str, wrap, rank, alpha, skip, kwargs, wrappers, first_names,
             places: list) -> None:
    """Collect (parent, attribute, wrapper) for every linear layer to wrap under ``module`` into ``places``; the
    wrappers are built here, the model is not changed."""
    # every registered name, also a second name of one child (named_children() gives each child once)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qualified = f"{prefix}{name}"
        # nn.MultiheadAttention reads out_proj.weight directly, so wrapping it would break the attention
        # (PEFT, too, leaves it to a dedicated layer class): such modules are left whole
        if isinstance(child, (LinearWithLoRA, nn.MultiheadAttention)):
            continue
        if is_linear(child):
            wrapper = wrappers.get(id(child))
            if wrapper is None and not skip(first_names.get(id(child), qualified), child):
                wrapper = wrappers[id(child)] = wrap(child, rank, alpha, **kwargs)
            if wrapper is not None:
                places.append((module, name, wrapper))
        else:
            _replace(child, qualified + ".", wrap, rank, alpha, skip, kwargs, wrappers, first_names, places)


def initialize_dora_magnitudes(model: nn.Module, *, force: bool = False) -> nn.Module:
    """Compute the magnitude m = ||W + scale (A B)^T|| per output feature of every LinearWithDoRA in ``model``
    whose magnitude is not initialised (every one with ``force``), from the base weights as they are now; returns
    the model. The last step of the meta-device idiom with DoRA (build on 'meta', replace_linear_with_lora(...,
    use_dora=True), ``to_empty()``, ``reset_parameters()`` on every module, load the base, then this): the
    result equals the model wrapped on the loaded base (torchtune initialises its DoRA magnitudes after loading
    too). Layers whose m was loaded (a state dict, load_lora, load_peft_adapter) keep it.

    Raises: TypeError if model is not an nn.Module; RuntimeError (before any change) if a layer to initialise
    still has its base on the meta device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"initialize_dora_magnitudes: model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, LinearWithDoRA) and (force or not m.magnitude_ready())]
    meta = [n or "<model>" for n, m in layers if m.base_weight().is_meta]
    if meta:
        raise RuntimeError(f"initialize_dora_magnitudes: the base weights of {meta} are on the meta device; move "
                           "the model with to_empty() and load the base weights first")
    for _, layer in layers:
        layer.initialize_magnitude()
    return model


# --- merge / unmerge and trainable-parameter helpers (issue 7) ------------------------------------------------

BIAS_MODES = ("none", "all", "lora_only")


def _lora_layers(model: nn.Module, caller: str) -> list:
    """The (qualified name, LinearWithLoRA) pairs of ``model``, itself included (name ""), in module order.

    Raises: TypeError if ``model`` is not an nn.Module; ValueError (naming ``caller``) if it holds no
    LinearWithLoRA, which means replace_linear_with_lora was not applied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)]
    if not layers:
        raise ValueError(f"{caller}: model holds no LinearWithLoRA layer (apply replace_linear_with_lora first)")
    return layers


def _merged_weight(layer: LinearWithLoRA) -> torch.Tensor:
    """W + scale * (A @ B)^T, summed in float32 (float64 if W or the adapters are float64), cast once to W's dtype;
    for DoRA, times m / ||W + scale (A @ B)^T|| per output feature. A Conv1D (fan_in_fan_out) stores W as
    (in, out), so its update is scale * A @ B untransposed."""
    weight, A, B = layer.linear.weight, layer.lora.A, layer.lora.B
    acc = torch.promote_types(torch.promote_types(torch.float32, weight.dtype), A.dtype)
    delta = layer.lora.scale * (A.to(weight.device, acc) @ B.to(weight.device, acc))  # (in, out)
    merged = weight.to(acc) + (delta if layer.fan_in_fan_out else delta.t())
    if isinstance(layer, LinearWithDoRA):
        layer._check_magnitude("merge")
        # DoRA: each output feature's row (a Conv1D's column) scaled by g = m / ||W_n + scale (A B)^T_n||, the
        # norm of the unmerged weight, so linear(x) computes g ⊙ (x W^T + scale x A B) + b (PEFT's merge)
        norm = torch.linalg.vector_norm(merged, dim=0 if layer.fan_in_fan_out else 1)
        # g = 1 on rows of norm 0 (reference.dora_scale: the same rule as the forward on both backends)
        g = dora_scale(layer.m.detach().to(weight.device, acc), norm)
        merged = merged * (g[None, :] if layer.fan_in_fan_out else g[:, None])
    return merged.to(weight.dtype)


def _warn_unchanged(caller: str, names: list, state: str) -> None:
    if names:
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        warnings.warn(f"{caller}: {len(names)} layer(s) already {state} were left unchanged: {shown}",
                      UserWarning, stacklevel=3)


def _check_untied(model: nn.Module, layers: list, caller: str) -> None:
    """A merged update would land in every user of a shared weight (tied embeddings, a weight shared by two
    wrappers): refuse, naming the sharing parameters (PEFT warns for tied targets; a silent merge is wrong)."""
    users = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    wrapped = {}
    for name, layer in layers:
        wrapped.setdefault(id(layer.linear.weight), []).append(name)
    shared = [users.get(key, []) for key, names in wrapped.items()
              if len(names) > 1 or len(users.get(key, [])) > 1]
    if shared:
        raise ValueError(f"{caller}: these weights are shared (tied), so merging would add the update to every "
                         f"user: {shared}; exclude the tied layer from replace_linear_with_lora, or keep it unmerged")


def _check_plain(layers: list, caller: str) -> None:
    """Merging adds the update to W, which equals adding it to the output only for a layer whose forward is
    nn.Linear's (or Conv1D's): refuse layers whose class has its own forward (a clamped or scaled linear)."""
    quantized = [f"{name or '<model>'} ({type(layer.linear).__name__})" for name, layer in layers
                 if is_linear4bit(layer.linear)]
    if quantized:
        # PEFT dequantizes, adds the update and quantizes again: the update then survives only up to one 4-bit
        # quantization step of its block (absmax / 8 or more for NF4), usually larger than the update itself
        raise ValueError(f"{caller}: these wrapped layers have a 4-bit base (bitsandbytes Linear4bit): "
                         f"{', '.join(quantized)}; merging would requantize W + scale * (A B)^T to 4 bits and lose "
                         "most of the update, so lora-fast does not merge them: keep the adapters unmerged, or "
                         "load the base in 16 bits to merge")
    several = [f"{name or '<model>'} (active: {', '.join(layer.active_adapters)})" for name, layer in layers
               if layer.active_adapters != ["default"]]
    if several:
        raise ValueError(f"{caller}: these wrapped layers have several active adapters, or one other than "
                         f"'default': {', '.join(several)}; merging folds the 'default' adapter alone, so "
                         "set_adapter('default') first")
    own = [f"{name or '<model>'} ({type(layer.linear).__name__})" for name, layer in layers
           if not has_plain_forward(layer.linear)]
    if own:
        raise ValueError(f"{caller}: these wrapped layers have their own forward, so W + scale * (A B)^T would not "
                         f"compute linear(x) + scale * x A B: {', '.join(own)}; keep them unmerged")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LinearWithLoRA's update into its weight, in place: W <- W + scale * (A @ B)^T; returns the model.

    W is (out_features, in_features) and A @ B is (in_features, out_features), hence the transpose (LoRA, Hu et
    al. 2021, sec. 4.1: "we can explicitly compute and store W = W0 + BA" at deployment). The sum is formed in
    float32 (float64 for float64 tensors) and rounded once into W's dtype, so a merged fp16/bf16 layer is within
    one rounding of the exact merged weight. A merged layer's forward is ``linear(x)`` alone: no low-rank
    matmuls, no LoRA dropout. The Parameter objects stay the same (optimisers and hooks keep their references).
    A LinearWithDoRA merges as PEFT does: W <- g ⊙ (W + scale * (A @ B)^T) row-wise, g = m / (the norm of that
    sum per output feature).

    Memory: for exact ``unmerge_lora`` each merged layer keeps a copy of its original weight (a non-persistent
    buffer ``weight_before_merge``, on W's device, not in the state dict): out_features * in_features elements
    in W's dtype per layer, i.e. the wrapped weights' size once more while merged. ``merge_and_unload`` keeps
    no copy. A and B are kept as they are.

    Layers already merged are left as they are, with one UserWarning per call listing them.

    Raises: TypeError if model is not an nn.Module; ValueError if it holds no LinearWithLoRA, if a wrapped
        weight is shared (tied embeddings, one weight in two wrappers), or if a wrapped layer has its own forward
        or a 4-bit base (bitsandbytes Linear4bit: not merged, the layers are named), or several active adapters
        (or one other than 'default': ``set_adapter``; the layers are named).
    """
    already = []
    layers = _lora_layers(model, "merge_lora")
    _check_untied(model, [(n, m) for n, m in layers if not m.merged], "merge_lora")
    _check_plain(layers, "merge_lora")
    for name, layer in layers:
        if layer.merged:
            already.append(name)
            continue
        weight = layer.linear.weight
        with torch.no_grad():
            merged = _merged_weight(layer)
            layer.weight_before_merge = weight.detach().clone()
            weight.copy_(merged)
        layer.merged = True
    _warn_unchanged("merge_lora", already, "merged")
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``, in place: every merged LinearWithLoRA gets back its original weight bit for bit
    (``torch.equal``), from the copy merge_lora kept, which is then freed; returns the model.

    Layers are restored in reverse module order, so that a weight shared by two wrappers also comes back exactly.
    Layers not merged are left as they are, with one UserWarning per call listing them.

    Raises: TypeError if model is not an nn.Module; ValueError if it holds no LinearWithLoRA; RuntimeError if a
    layer is marked merged but holds no pre-merge copy (``merged`` set by hand).
    """
    not_merged = []
    for name, layer in reversed(_lora_layers(model, "unmerge_lora")):
        if not layer.merged:
            not_merged.append(name)
            continue
        if layer.weight_before_merge is None:
            raise RuntimeError(f"unmerge_lora: layer {name!r} is marked merged but holds no pre-merge weight; "
                               "it was not merged by merge_lora")
        with torch.no_grad():
            layer.linear.weight.copy_(layer.weight_before_merge)
        layer.weight_before_merge = None
        layer.merged = False
    _warn_unchanged("unmerge_lora", not_merged[::-1], "unmerged")
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by its nn.Linear holding the merged weight W + scale * (A @ B)^T (computed
    as in ``merge_lora``; layers already merged keep their weight); returns the model, or the nn.Linear when
    the model itself is a LinearWithLoRA. In place: the result has the base model's modules and state-dict
    keys, and no adapter, pre-merge copy or extra memory (as PEFT's ``merge_and_unload``).

    Raises: TypeError if model is not an nn.Module; ValueError if it holds no LinearWithLoRA, if a wrapped
        weight is shared (tied embeddings, one weight in two wrappers), or if a wrapped layer has its own forward
        or a 4-bit base (bitsandbytes Linear4bit: not merged, the layers are named), or several active adapters
        (or one other than 'default': ``set_adapter``; the layers are named).
    """
    layers = _lora_layers(model, "merge_and_unload")
    _check_untied(model, [(n, m) for n, m in layers if not m.merged], "merge_and_unload")
    _check_plain([(n, m) for n, m in layers if not m.merged], "merge_and_unload")
    for name, layer in layers:
        if not layer.merged:
            with torch.no_grad():
                layer.linear.weight.copy_(_merged_weight(layer))
        layer.weight_before_merge = None
        layer.merged = True
        if name == "":
            return layer.linear
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.linear)
    return model


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze every parameter except the LoRA A and B (and DoRA's magnitude m), in place; returns the model.

    ``bias`` as loralib (``lora.mark_only_lora_as_trainable``) and PEFT (``LoraConfig.bias``) define it:
    "none" trains no bias, "all" trains every parameter named ``bias`` in the model, "lora_only" trains the
    biases of the layers that have LoRA (each LinearWithLoRA's ``linear.bias``).

    Raises: ValueError for another ``bias`` or a model without LinearWithLoRA; TypeError for a non-Module.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    layers = _lora_layers(model, "mark_only_lora_as_trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in layers:
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
        if bias == "lora_only" and layer.linear.bias is not None:
            layer.linear.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) numbers of parameter elements; a parameter shared by several modules (tied
    embeddings) counts once, buffers not at all. Works on the 'meta' device.

    Raises: TypeError if model is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters: model: expected a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
