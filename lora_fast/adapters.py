"""Adapter-only checkpoints: what LoRA fine-tuning trained, as a state dict or a safetensors file.

A file holds, under the model's state-dict keys, the A and B of every LinearWithLoRA
(``<module path>.lora.A``: (in_features, rank), ``.lora.B``: (rank, out_features), in the adapters' dtype; a
LinearWithDoRA adds ``.m``: (out_features,), its magnitude) and every trainable bias
(``mark_only_lora_as_trainable(bias="all" | "lora_only")``, loralib's and PEFT's bias modes:
``<module path>.linear.bias``, ``<norm path>.bias``, ...). The safetensors metadata holds
``lora_fast.format_version`` and ``lora_fast.layers``: a JSON object {module path: {"rank", "alpha", "scaling",
"dropout", "use_dora"}} ("use_dora" absent means false: files written before DoRA read as LoRA). Safetensors
only (no pickle, so loading a file runs no code).

Several adapters (``LinearWithLoRA.add_adapter``, issue 30): a file holds one adapter, chosen with
``adapter_name`` ("default" unless given), from the layers that hold it, always under the default adapter's keys
above (as PEFT's files leave the adapter name out), so that it loads into any adapter of a model; a named
adapter's file also records ``lora_fast.adapter_name`` in its metadata, for information.
"""

import json
import math
import numbers
import os
import tempfile
import warnings
from collections import namedtuple
from typing import Dict, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._files import give_mode
from .layers import BASE_ADAPTER, DEFAULT_ADAPTER, SCALINGS, LinearWithDoRA, LinearWithLoRA, is_linear
from .patching import _inside_attention, _lora_layers, module_places

FORMAT_VERSION = "1"
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])
PathLike = Union[str, os.PathLike]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _config(layer, adapter: str = DEFAULT_ADAPTER) -> dict:
    lora = layer._adapter(adapter)
    config = {"rank": lora.rank, "alpha": lora.alpha, "scaling": lora.scaling,
              "dropout": layer._adapter_dropout(adapter)}
    if isinstance(layer, LinearWithDoRA):
        config["use_dora"] = True   # written for DoRA only: LoRA files stay as they were
    return config


def _adapter_tensors(name: str, layer, adapter: str = DEFAULT_ADAPTER, lora=None) -> dict:
    """{key: parameter} of one adapter of a layer, under the default adapter's keys whatever the adapter (as PEFT's
    files leave the adapter name out): <name>.lora.A, <name>.lora.B, and <name>.m for DoRA (whose one adapter is
    the default). ``lora``: the LoRALayer of an adapter a loader is about to attach; {} when the layer does not
    hold ``adapter``."""
    if lora is None:
        if adapter not in layer.adapters:
            return {}
        lora = layer._adapter(adapter)
    keys = {_prefix(name) + "lora.A": lora.A, _prefix(name) + "lora.B": lora.B}
    if isinstance(layer, LinearWithDoRA):
        keys[_prefix(name) + "m"] = layer.m
    return keys


def check_adapter_name(adapter_name, caller: str) -> str:
    """``adapter_name`` checked as an adapter name (a non-empty str without '.', not "__base__", as
    ``LinearWithLoRA.add_adapter`` takes them). Raises TypeError / ValueError naming the argument."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"{caller}: adapter_name: expected a str, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name or adapter_name == BASE_ADAPTER:
        raise ValueError(f"{caller}: adapter_name: expected an adapter name without '.' other than "
                         f"{BASE_ADAPTER!r}, got {adapter_name!r}")
    return adapter_name


def model_adapters(model: nn.Module) -> list:
    """The adapter names the model's LinearWithLoRA layers hold, "default" first, then in the order met."""
    names = {}
    for m in model.modules():
        if isinstance(m, LinearWithLoRA):
            names.update(dict.fromkeys(m.adapters))
    return list(names)


def _holding(model: nn.Module, adapter: str, caller: str) -> list:
    """The (name, LinearWithLoRA) pairs of ``model`` that hold ``adapter``; raises ValueError naming the adapters
    the model has when none does (and ``_lora_layers``' errors)."""
    layers = _lora_layers(model, caller)
    holding = [(n, m) for n, m in layers if adapter in m.adapters]
    if not holding:
        raise ValueError(f"{caller}: adapter_name: no layer of the model holds an adapter named {adapter!r}; its "
                         f"adapters: {model_adapters(model)}")
    return holding


def _shown(items) -> str:
    return ", ".join(items)


def _is_bias(name: str) -> bool:
    return name.rpartition(".")[2] == "bias"


def lora_state_dict(model: nn.Module, *, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """What LoRA training changed: the A and B of every LinearWithLoRA (and m of a LinearWithDoRA) and every
    trainable bias (a parameter
    named ``bias`` that requires grad, as ``mark_only_lora_as_trainable(bias="all" | "lora_only")`` leaves
    them), under the keys ``model.state_dict()`` gives them (``trf_blocks.0.att.W_query.lora.A``, ...),
    detached and sharing storage with the parameters.

    ``adapter_name``: which adapter (``LinearWithLoRA.add_adapter``) to take, from the layers that hold it;
    "default" is the adapter a layer is built with, and None (not given) means "default". Whatever the adapter,
    its A and B are under the default adapter's keys (``<layer>.lora.A``, not ``<layer>.loras.<name>.A``), as
    PEFT's adapter files leave the adapter name out, so one adapter's state dict loads into any adapter of another
    model (``load_lora_state_dict(..., adapter_name=...)``).

    Any other trainable parameter (an unfrozen base weight, a trained head) is not an adapter and is left out,
    with one UserWarning naming it: save it with ``model.state_dict()``, or freeze it. Without ``adapter_name``,
    trainable adapters added with ``add_adapter`` are not in it either: one UserWarning names them (each is
    saved by its own call with ``adapter_name``; naming "default" explicitly says so and does not warn).

    Raises: TypeError for a non-Module or a non-str adapter_name; ValueError if the model holds no
    LinearWithLoRA, or no layer holds ``adapter_name`` (the model's adapters are listed).
    """
    implicit = adapter_name is None
    adapter = check_adapter_name(DEFAULT_ADAPTER if implicit else adapter_name, "lora_state_dict")
    out = {}
    for name, layer in _holding(model, adapter, "lora_state_dict"):
        for key, p in _adapter_tensors(name, layer, adapter).items():
            out[key] = p.detach()
    # every adapter's parameters are adapters: left out of this one without the "not an adapter" warning
    adapter_params = {id(p) for _, layer in _lora_layers(model, "lora_state_dict")
                      for p in layer.adapter_parameters()}
    trained_added = {}
    for _, layer in _lora_layers(model, "lora_state_dict"):
        for other in layer.adapters[1:]:
            lora = layer._adapter(other)
            if other != adapter and (lora.A.requires_grad or lora.B.requires_grad):
                trained_added[other] = True
    left_out = []
    for name, p in model.named_parameters():
        if id(p) in adapter_params or not p.requires_grad:
            continue
        if _is_bias(name):
            out[name] = p.detach()
        else:
            left_out.append(name)
    if implicit and trained_added:
        warnings.warn(f"lora_state_dict: the trainable adapters {_shown(trained_added)} (added with add_adapter) are "
                      "not in the default adapter's state dict; save each with adapter_name=... (lora_state_dict, "
                      "save_lora)", UserWarning, stacklevel=2)
    if left_out:
        shown = _shown(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        warnings.warn(f"lora_state_dict: {len(left_out)} trainable parameter(s) are not LoRA adapters or biases and "
                      f"are not saved: {shown}; save them with model.state_dict(), or freeze them "
                      "(mark_only_lora_as_trainable)", UserWarning, stacklevel=2)
    return out


def _plan(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, caller: str, new_layers=None,
          adapter: str = DEFAULT_ADAPTER, new_adapters=None):
    """Check ``state_dict`` against the model's adapter ``adapter`` (plus ``new_layers``: {name: LinearWithLoRA}
    about to be installed, and ``new_adapters``: {name: LoRALayer} about to be attached as ``adapter`` to the layer
    there); returns ([(parameter, tensor)], missing, unexpected) or raises without touching anything."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of str to torch.Tensor, got {type(state_dict).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)] \
        if isinstance(model, nn.Module) else []
    all_layers = layers + list((new_layers or {}).items())
    if not all_layers:
        _lora_layers(model, caller)   # raises: not a module, or no LinearWithLoRA
    new_adapters = new_adapters or {}
    required, owner, lacking = {}, {}, []
    for name, layer in all_layers:
        keys = _adapter_tensors(name, layer, adapter, new_adapters.get(name))
        if not keys and any(k in state_dict for k in _adapter_tensors(name, layer)):
            lacking.append(name or "<model>")
        for key, p in keys.items():
            required[key], owner[key] = p, (name, layer)
    if lacking:
        raise ValueError(f"{caller}: layers without an adapter named {adapter!r} (a state dict carries no rank or "
                         f"alpha to make one: add_adapter first, or load a file with load_lora): {_shown(lacking)}")
    optional = {}
    for name, p in model.named_parameters():
        if _is_bias(name):
            optional[name] = p
    for name, layer in (new_layers or {}).items():
        if layer.linear.bias is not None:
            optional[_prefix(name) + "linear.bias"] = layer.linear.bias
            optional.pop(_prefix(name) + "bias", None)   # the plain layer's key before wrapping
    params = {**optional, **required}
    missing = sorted(set(required) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    shared = sorted(set(params) & set(state_dict))
    not_float = [k for k in shared if not (isinstance(state_dict[k], torch.Tensor)
                                           and state_dict[k].is_floating_point())]
    if not_float:
        raise TypeError(f"{caller}: expected floating-point tensors for keys: {_shown(not_float)}")
    problems = []
    mis_shaped = [f"{k} (given {tuple(state_dict[k].shape)}, model {tuple(params[k].shape)})"
                  for k in shared if state_dict[k].shape != params[k].shape]
    if mis_shaped:
        problems.append("mis-shaped keys: " + _shown(mis_shaped))
    if strict and missing:
        problems.append("missing keys: " + _shown(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + _shown(unexpected))
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(problems))
    # a merged layer's weight holds its default adapter: loading another adapter leaves the weight right
    merged = sorted({repr(owner[k][0]) for k in shared if k in owner and owner[k][1].merged}) \
        if adapter == DEFAULT_ADAPTER else []
    if merged:
        raise RuntimeError(f"{caller}: merged layers {_shown(merged)} would keep the old update in "
                           "their weight; call unmerge_lora(model) before loading")
    return [(params[k], state_dict[k]) for k in shared], missing, unexpected


class Transaction:
    """The changes of one load, each logged before it is made and undone in reverse order if anything raises
    before the load ends (a failure no up-front check foresaw: a device error, an interrupt, a hook): a failed
    load leaves the model's parameters bit for bit, its modules and their attributes as they were. Values are
    converted to each parameter's dtype and device before the first change (``converted``), so the writes
    themselves are plain same-dtype copies. Use as ``with Transaction() as t: t.copy(...); t.setattr(...)``."""

    def __init__(self):
        self._undo = []

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            # undo everything that can be undone; the load's own exception is the one that propagates
            while self._undo:
                try:
                    self._undo.pop()()
                except Exception:
                    pass
        self._undo.clear()
        return False

    @staticmethod
    def converted(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` in ``param``'s dtype and device, as ``param.copy_(value)`` would write it."""
        return value.detach().to(device=param.device, dtype=param.dtype)

    def copy(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """param[...] = value in place (no autograd), the old values kept for the undo."""
        old = param.detach().clone()

        def undo():
            with torch.no_grad():
                param.copy_(old)

        self._undo.append(undo)
        with torch.no_grad():
            param.copy_(value)

    def apply(self, change) -> None:
        """Run ``change()``, which makes one change and returns the function that undoes it (a new adapter
        attached: ``LinearWithLoRA._attach_adapter``)."""
        self._undo.append(change())

    def setitem(self, mapping, key, value) -> None:
        """mapping[key] = value (an added adapter's dropout), the old value (or its absence) put back on undo."""
        missing = key not in mapping
        old = mapping.get(key)
        self._undo.append(lambda: mapping.pop(key) if missing else mapping.__setitem__(key, old))
        mapping[key] = value

    def setattr(self, owner, name: str, value) -> None:
        """setattr(owner, name, value) (a module swapped into its parent, a layer's alpha, ...); the old value
        put back on undo."""
        old = getattr(owner, name)
        self._undo.append(lambda: setattr(owner, name, old))
        setattr(owner, name, value)


def _copy(pairs, transaction: Transaction) -> None:
    pairs = [(param, Transaction.converted(param, tensor)) for param, tensor in pairs]
    for param, tensor in pairs:
        transaction.copy(param, tensor)


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                         strict: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> LoadResult:
    """Copy A, B (and DoRA's m) tensors and trainable biases (keys as ``lora_state_dict`` gives them) into the model's
    LinearWithLoRA layers and bias parameters, in place, converting to each parameter's dtype and device.
    Nothing is copied unless every check passes, and a failure during the copies undoes those made
    (``Transaction``): a failed load leaves the model as it was, bit for bit.

    Args:
        state_dict: {key: tensor}. strict: True (default) raises on missing A/B keys or unexpected keys (bias
            keys are optional: a file saved with frozen biases has none); False loads the keys the model and
            the dict share and reports the others.
        adapter_name: the adapter to load into ("default": the layers' own). The keys are the default
            adapter's (``<layer>.lora.A``) whatever the adapter, as ``lora_state_dict`` gives them. The layers
            must hold the adapter already (a state dict carries no rank or alpha: ``add_adapter`` first, or
            ``load_lora`` a file, which creates it); the layers that hold it are the required ones.
    Returns: LoadResult(missing_keys, unexpected_keys), sorted lists (empty under strict).
    Raises:
        ValueError: keys whose shape differs from the model's (always), missing or unexpected keys (strict),
            each listed; a model without LinearWithLoRA; layers without the adapter named (listed).
        TypeError: a non-mapping, or a value that is not a floating-point tensor (keys listed); a non-str
            adapter_name.
        RuntimeError: a layer whose default adapter is to be loaded is merged (its weight already holds the old A
            and B): unmerge_lora first.
    """
    adapter = check_adapter_name(adapter_name, "load_lora_state_dict")
    pairs, missing, unexpected = _plan(model, state_dict, strict, "load_lora_state_dict", adapter=adapter)
    with Transaction() as transaction:
        _copy(pairs, transaction)
    return LoadResult(missing, unexpected)


def save_lora(model: nn.Module, path: PathLike, *, adapter_name: Optional[str] = None) -> None:
    """Write ``lora_state_dict(model, adapter_name=adapter_name)`` (A, B, DoRA's m and trainable biases) to a
    safetensors file at ``path``, with each layer's rank, alpha, scaling, dropout and use_dora in the metadata (see
    the module docstring). One file holds one adapter ("default" unless ``adapter_name`` names another; without
    ``adapter_name`` lora_state_dict's warning names trained adapters left out), under the
    default adapter's keys and with the layers that hold it: ``load_lora(model, path, adapter_name=...)`` loads it
    into any adapter. The metadata also records ``lora_fast.adapter_name`` (for information; loading ignores it).
    Works for merged layers too (A and B are kept while merged). Overwrites ``path`` atomically: the file is
    written beside it and renamed, so ``path`` holds the old file or the new one, never a partial one.

    Raises: TypeError for a non-Module or a non-str adapter_name; ValueError if the model holds no LinearWithLoRA
    or no layer holds ``adapter_name``; safetensors' and the OS's errors for tensors it cannot write (e.g. 'meta')
    or an unwritable path.
    """
    adapter = check_adapter_name(DEFAULT_ADAPTER if adapter_name is None else adapter_name, "save_lora")
    # the holding layers first, so an adapter no layer holds is reported as save_lora's error
    layers = {name: _config(layer, adapter) for name, layer in _holding(model, adapter, "save_lora")}
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model, adapter_name=adapter_name).items()}
    metadata = {"format": "pt", "lora_fast.format_version": FORMAT_VERSION,
                "lora_fast.layers": json.dumps(layers, sort_keys=True)}
    if adapter != DEFAULT_ADAPTER:
        metadata["lora_fast.adapter_name"] = adapter
    path = os.fspath(path)
    fd, part = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".part",
                                dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, part, metadata=metadata)
        give_mode(part, path)
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.unlink(part)


def _read(path: str, caller: str):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{caller}: path: {path} is a directory; expected a .safetensors file "
                                "written by save_lora")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{caller}: path: no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{caller}: {path} is not a readable safetensors file ({err})") from None


def _layer_configs(path: str, metadata: dict) -> dict:
    """{layer name: {rank, alpha, scaling, dropout}} from a file's metadata, each field checked."""
    version = metadata.get("lora_fast.format_version")
    if version is None or "lora_fast.layers" not in metadata:
        raise ValueError(f"load_lora: {path} is not a lora_fast adapter file (its metadata lacks "
                         "lora_fast.format_version and lora_fast.layers; it was not written by save_lora)")
    if version != FORMAT_VERSION:
        raise ValueError(f"load_lora: {path} has format version {version!r}; this lora_fast reads "
                         f"{FORMAT_VERSION!r}")
    try:
        saved = json.loads(metadata["lora_fast.layers"])
    except ValueError as err:   # json.JSONDecodeError is a ValueError
        raise ValueError(f"load_lora: {path}: metadata field lora_fast.layers is not valid JSON ({err})") from None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ValueError(f"load_lora: {path}: metadata field lora_fast.layers is not a mapping of layer names to "
                         "{rank, alpha, scaling}")
    for name, config in saved.items():
        where = f"load_lora: {path}: metadata lora_fast.layers[{name!r}]"
        rank, alpha = config.get("rank"), config.get("alpha")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{where}.rank: expected an integer >= 1, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{where}.alpha: expected a finite number, got {alpha!r}")
        if config.get("scaling") not in SCALINGS:
            raise ValueError(f"{where}.scaling: expected one of {SCALINGS}, got {config.get('scaling')!r}")
        dropout = config.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{where}.dropout: expected a probability in [0, 1], got {dropout!r}")
        if not isinstance(config.get("use_dora", False), bool):
            raise ValueError(f"{where}.use_dora: expected true or false, got {config.get('use_dora')!r}")
    return saved


def load_lora(model: nn.Module, path: PathLike, *, strict: bool = True,
              adapter_name: str = DEFAULT_ADAPTER) -> LoadResult:
    """Load a file written by ``save_lora`` into the model's adapter ``adapter_name`` ("default": the layers' own),
    in place.

    A named adapter (``adapter_name`` other than "default"): where a layer the file names already holds it, its
    rank, alpha and scaling must be the file's; where it does not, it is created with the file's rank, alpha,
    scaling and dropout (PEFT's ``load_adapter``), on the default adapter's device and dtype, not activated
    (``set_adapter``). A plain nn.Linear / Conv1D there is first wrapped in a LinearWithLoRA as
    ``replace_linear_with_lora`` wraps it (the file's rank, alpha and scaling; its default adapter untrained,
    B = 0, so the model computes what it did until ``set_adapter``), as PEFT's ``load_adapter`` wraps the
    layers it names. A LinearWithDoRA (one adapter) or a DoRA file cannot take a named adapter (ValueError,
    naming the layers). The rest of this docstring
    describes the default adapter; the checks and the all-or-nothing rule hold for both.

    Each layer the file's metadata names must be, in the model, either a LinearWithLoRA with the file's rank,
    alpha, scaling and kind (LoRA or DoRA: a file saved with another rank or alpha would silently change the
    function), or a plain nn.Linear / transformers Conv1D, which is wrapped in a LinearWithLoRA (LinearWithDoRA
    for a DoRA layer) with the file's rank, alpha, scaling and dropout (as ``load_peft_adapter`` wraps plain
    layers from its config; the wrapped layer's A and B follow LinearWithLoRA's device and dtype rules). Every
    LinearWithLoRA whose tensors the file holds must be named in its metadata. Then the tensors are loaded as
    ``load_lora_state_dict(model, tensors, strict=strict)`` does. All checks run before anything is changed, and a
    failure after the first change undoes every change (``Transaction``): a failed load leaves the model as it
    was.

    Returns: LoadResult(missing_keys, unexpected_keys).
    Raises:
        ValueError: a file that is not a lora_fast adapter file, of another format version, or with malformed
            metadata (the field is named); layers whose rank, alpha or scaling differ (listed with both values),
            or without metadata; a named layer that is neither wrapped nor a linear layer; missing, unexpected
            or mis-shaped keys (listed).
        IsADirectoryError, FileNotFoundError: ``path`` is a directory or missing.
        RuntimeError, TypeError: as load_lora_state_dict; RuntimeError also for a named adapter to be created
            on a merged layer.
    """
    adapter = check_adapter_name(adapter_name, "load_lora")
    path = os.fspath(path)
    metadata, tensors = _read(path, "load_lora")
    saved = _layer_configs(path, metadata)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_lora: model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    inside_mha = _inside_attention(model)
    mismatches, new_layers, new_adapters = [], {}, {}
    for name, config in saved.items():
        module = modules.get(name)
        shown = name or "<model>"
        if isinstance(module, LinearWithLoRA) and adapter not in module.adapters:
            # a named adapter the layer does not hold yet: made with the file's settings (PEFT's load_adapter)
            if config.get("use_dora", False) or isinstance(module, LinearWithDoRA):
                mismatches.append(f"{shown}: a DoRA {'file' if config.get('use_dora', False) else 'layer'} holds "
                                  f"one adapter, so it cannot take adapter {adapter!r}")
            elif module.merged:
                raise RuntimeError(f"load_lora: layer {shown} is merged (merge_lora); unmerge_lora before adding "
                                   f"adapter {adapter!r} to it")
            else:
                # one new adapter per layer object, also when the file names it under two of its names
                shared = next((new_adapters[n] for n in new_adapters if modules[n] is module), None)
                new_adapters[name] = shared or module.new_adapter_layer(config["rank"], config["alpha"],
                                                                        scaling=config["scaling"])
        elif isinstance(module, LinearWithLoRA):
            for field in ("rank", "alpha", "scaling", "use_dora"):
                stored, value = config.get(field, False), _config(module, adapter).get(field, False)
                if stored != value:
                    mismatches.append(f"{shown}: {field} {stored!r} in the file, {value!r} in the model"
                                      + (f"'s adapter {adapter!r}" if adapter != DEFAULT_ADAPTER else ""))
        elif module is not None and adapter != DEFAULT_ADAPTER and is_linear(module) \
                and config.get("use_dora", False):
            mismatches.append(f"{name}: a DoRA file holds one adapter, so it cannot take adapter {adapter!r}")
        elif module is not None and id(module) in inside_mha:
            mismatches.append(f"{name}: the out_proj of {inside_mha[id(module)]}, whose forward reads its weight "
                              "without calling it (a LoRA wrapper there would never run)")
        elif module is not None and is_linear(module):
            if name == "":
                raise ValueError(f"load_lora: {path} adapts the model itself, a plain linear layer; wrap it first "
                                 "(LinearWithLoRA or replace_linear_with_lora), since it cannot be replaced in place")
            wrap = LinearWithDoRA if config.get("use_dora", False) else LinearWithLoRA
            # one wrapper per layer object, also when the file names it under two of its names
            shared = next((w for w in new_layers.values() if w.linear is module), None)
            if adapter == DEFAULT_ADAPTER:
                new_layers[name] = shared or wrap(module, config["rank"], config["alpha"],
                                                  scaling=config["scaling"], dropout=config.get("dropout", 0.0))
            else:
                # a named adapter into a plain layer (PEFT's load_adapter wraps the layers it names): wrapped as
                # replace_linear_with_lora would (its default adapter untrained, B = 0: the layer computes what it
                # did), the named adapter created on the wrapper with the file's settings, not activated
                wrapper = new_layers[name] = shared or wrap(module, config["rank"], config["alpha"],
                                                            scaling=config["scaling"])
                made = next((new_adapters[n] for n in new_adapters if new_layers.get(n) is wrapper), None)
                new_adapters[name] = made or wrapper.new_adapter_layer(config["rank"], config["alpha"],
                                                                       scaling=config["scaling"])
        elif strict:
            what = "not in the model" if module is None else f"a {type(module).__name__}, not a linear layer"
            mismatches.append(f"{name or '<model>'}: named in the file, {what}")
    for name, module in modules.items():
        if isinstance(module, LinearWithLoRA) and name not in saved and any(
                k in tensors for k in _adapter_tensors(name, module, DEFAULT_ADAPTER)):
            mismatches.append(f"{name or '<model>'}: the file holds its tensors but no rank/alpha/scaling in its "
                              "metadata lora_fast.layers")
    if mismatches:
        raise ValueError(f"load_lora: {path} does not match the model's LoRA layers: " + "; ".join(mismatches))
    if not new_layers and not any(isinstance(m, LinearWithLoRA) for m in modules.values()):
        raise ValueError(f"load_lora: model holds no LinearWithLoRA layer and {path} names none of its linear "
                         "layers")
    pairs, missing, unexpected = _plan(model, tensors, strict, "load_lora", new_layers, adapter, new_adapters)
    pairs = [(param, Transaction.converted(param, tensor)) for param, tensor in pairs]
    with Transaction() as transaction:
        for layer in {id(layer): layer for layer in new_layers.values()}.values():
            # every place the layer is registered (a second name in one parent too): one wrapper everywhere
            for parent, child in module_places(model, layer.linear):
                transaction.setattr(parent, child, layer)
        attached = set()
        for name, lora in new_adapters.items():
            if id(lora) not in attached:
                attached.add(id(lora))
                module, dropout = new_layers.get(name, modules[name]), saved[name].get("dropout", 0.0)
                transaction.apply(lambda m=module, lo=lora, d=dropout: m._attach_adapter(adapter, lo, d))
        for param, value in pairs:
            transaction.copy(param, value)
    return LoadResult(missing, unexpected)
