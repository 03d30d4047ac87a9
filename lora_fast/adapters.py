"""Adapter-only checkpoints: what LoRA fine-tuning trained, as a state dict or a safetensors file.

A file holds, under the model's state-dict keys, the A and B of every LinearWithLoRA
(``<module path>.lora.A``: (in_features, rank), ``.lora.B``: (rank, out_features), in the adapters' dtype; a
LinearWithDoRA adds ``.m``: (out_features,), its magnitude) and every trainable bias
(``mark_only_lora_as_trainable(bias="all" | "lora_only")``, loralib's and PEFT's bias modes:
``<module path>.linear.bias``, ``<norm path>.bias``, ...). The safetensors metadata holds
``lora_fast.format_version`` and ``lora_fast.layers``: a JSON object {module path: {"rank", "alpha", "scaling",
"dropout", "use_dora"}} ("use_dora" absent means false: files written before DoRA read as LoRA). Safetensors
only (no pickle, so loading a file runs no code).
"""

import json
import math
import numbers
import os
import tempfile
import warnings
from collections import namedtuple
from typing import Dict, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._files import give_mode
from .layers import SCALINGS, LinearWithDoRA, LinearWithLoRA, is_linear
from .patching import _inside_attention, _lora_layers, module_places

FORMAT_VERSION = "1"
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])
PathLike = Union[str, os.PathLike]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _config(layer) -> dict:
    config = {"rank": layer.lora.rank, "alpha": layer.lora.alpha, "scaling": layer.lora.scaling,
              "dropout": layer.dropout}
    if isinstance(layer, LinearWithDoRA):
        config["use_dora"] = True   # written for DoRA only: LoRA files stay as they were
    return config


def _adapter_tensors(name: str, layer) -> dict:
    """{state-dict key: parameter} of a layer's adapters: lora.A, lora.B, and m for DoRA."""
    keys = {_prefix(name) + "lora.A": layer.lora.A, _prefix(name) + "lora.B": layer.lora.B}
    if isinstance(layer, LinearWithDoRA):
        keys[_prefix(name) + "m"] = layer.m
    return keys


def _shown(items) -> str:
    return ", ".join(items)


def _is_bias(name: str) -> bool:
    return name.rpartition(".")[2] == "bias"


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What LoRA training changed: the A and B of every LinearWithLoRA (and m of a LinearWithDoRA) and every
    trainable bias (a parameter
    named ``bias`` that requires grad, as ``mark_only_lora_as_trainable(bias="all" | "lora_only")`` leaves
    them), under the keys ``model.state_dict()`` gives them (``trf_blocks.0.att.W_query.lora.A``, ...),
    detached and sharing storage with the parameters.

    Any other trainable parameter (an unfrozen base weight, a trained head) is not an adapter and is left out,
    with one UserWarning naming it: save it with ``model.state_dict()``, or freeze it.

    Raises: TypeError for a non-Module; ValueError if the model holds no LinearWithLoRA.
    """
    out = {}
    adapter_params = set()
    for name, layer in _lora_layers(model, "lora_state_dict"):
        for key, p in _adapter_tensors(name, layer).items():
            out[key] = p.detach()
            adapter_params.add(id(p))
    left_out = []
    for name, p in model.named_parameters():
        if id(p) in adapter_params or not p.requires_grad:
            continue
        if _is_bias(name):
            out[name] = p.detach()
        else:
            left_out.append(name)
    added = [n for n in left_out if ".loras." in f".{n}"]
    left_out = [n for n in left_out if n not in added]
    if added:
        shown = _shown(added[:5]) + (", ..." if len(added) > 5 else "")
        warnings.warn(f"lora_state_dict: {len(added)} parameter(s) of adapters added with add_adapter are not saved "
                      f"(only the default adapter is, as yet): {shown}; save them with model.state_dict()",
                      UserWarning, stacklevel=2)
    if left_out:
        shown = _shown(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        warnings.warn(f"lora_state_dict: {len(left_out)} trainable parameter(s) are not LoRA adapters or biases and "
                      f"are not saved: {shown}; save them with model.state_dict(), or freeze them "
                      "(mark_only_lora_as_trainable)", UserWarning, stacklevel=2)
    return out


def _plan(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, caller: str, new_layers=None):
    """Check ``state_dict`` against the model (plus ``new_layers``: {name: LinearWithLoRA} about to be installed);
    returns ([(parameter, tensor)], missing, unexpected) or raises without touching anything."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of str to torch.Tensor, got {type(state_dict).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)] \
        if isinstance(model, nn.Module) else []
    layers += list((new_layers or {}).items())
    if not layers:
        _lora_layers(model, caller)   # raises: not a module, or no LinearWithLoRA
    required, owner = {}, {}
    for name, layer in layers:
        for key, p in _adapter_tensors(name, layer).items():
            required[key], owner[key] = p, (name, layer)
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
    merged = sorted({repr(owner[k][0]) for k in shared if k in owner and owner[k][1].merged})
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
                         strict: bool = True) -> LoadResult:
    """Copy A, B (and DoRA's m) tensors and trainable biases (keys as ``lora_state_dict`` gives them) into the model's
    LinearWithLoRA layers and bias parameters, in place, converting to each parameter's dtype and device.
    Nothing is copied unless every check passes, and a failure during the copies undoes those made
    (``Transaction``): a failed load leaves the model as it was, bit for bit.

    Args:
        state_dict: {key: tensor}. strict: True (default) raises on missing A/B keys or unexpected keys (bias
            keys are optional: a file saved with frozen biases has none); False loads the keys the model and
            the dict share and reports the others.
    Returns: LoadResult(missing_keys, unexpected_keys), sorted lists (empty under strict).
    Raises:
        ValueError: keys whose shape differs from the model's (always), missing or unexpected keys (strict),
            each listed; a model without LinearWithLoRA.
        TypeError: a non-mapping, or a value that is not a floating-point tensor (keys listed).
        RuntimeError: a layer to be loaded is merged (its weight already holds the old A and B): unmerge_lora
            first.
    """
    pairs, missing, unexpected = _plan(model, state_dict, strict, "load_lora_state_dict")
    with Transaction() as transaction:
        _copy(pairs, transaction)
    return LoadResult(missing, unexpected)


def save_lora(model: nn.Module, path: PathLike) -> None:
    """Write ``lora_state_dict(model)`` (A, B, DoRA's m and trainable biases) to a safetensors file at ``path``,
    with each layer's rank, alpha, scaling, dropout and use_dora in the metadata (see the module docstring).
    Works for merged layers too (A and B are kept while merged). Overwrites ``path`` atomically: the file is
    written beside it and renamed, so ``path`` holds the old file or the new one, never a partial one.

    Raises: TypeError for a non-Module; ValueError if the model holds no LinearWithLoRA; safetensors' and the
    OS's errors for tensors it cannot write (e.g. 'meta') or an unwritable path.
    """
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    layers = {name: _config(layer) for name, layer in _lora_layers(model, "save_lora")}
    metadata = {"format": "pt", "lora_fast.format_version": FORMAT_VERSION,
                "lora_fast.layers": json.dumps(layers, sort_keys=True)}
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


def load_lora(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a file written by ``save_lora`` into the model, in place.

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
        RuntimeError, TypeError: as load_lora_state_dict.
    """
    path = os.fspath(path)
    metadata, tensors = _read(path, "load_lora")
    saved = _layer_configs(path, metadata)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_lora: model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    inside_mha = _inside_attention(model)
    mismatches, new_layers = [], {}
    for name, config in saved.items():
        module = modules.get(name)
        if isinstance(module, LinearWithLoRA):
            for field in ("rank", "alpha", "scaling", "use_dora"):
                stored, value = config.get(field, False), _config(module).get(field, False)
                if stored != value:
                    mismatches.append(f"{name or '<model>'}: {field} {stored!r} in the file, {value!r} in the model")
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
            new_layers[name] = shared or wrap(module, config["rank"], config["alpha"], scaling=config["scaling"],
                                              dropout=config.get("dropout", 0.0))
        elif strict:
            what = "not in the model" if module is None else f"a {type(module).__name__}, not a linear layer"
            mismatches.append(f"{name or '<model>'}: named in the file, {what}")
    for name, module in modules.items():
        if isinstance(module, LinearWithLoRA) and name not in saved and any(
                k in tensors for k in _adapter_tensors(name, module)):
            mismatches.append(f"{name or '<model>'}: the file holds its tensors but no rank/alpha/scaling in its "
                              "metadata lora_fast.layers")
    if mismatches:
        raise ValueError(f"load_lora: {path} does not match the model's LoRA layers: " + "; ".join(mismatches))
    if not new_layers and not any(isinstance(m, LinearWithLoRA) for m in modules.values()):
        raise ValueError(f"load_lora: model holds no LinearWithLoRA layer and {path} names none of its linear "
                         "layers")
    pairs, missing, unexpected = _plan(model, tensors, strict, "load_lora", new_layers)
    with Transaction() as transaction:
        for layer in {id(layer): layer for layer in new_layers.values()}.values():
            # every place the layer is registered (a second name in one parent too): one wrapper everywhere
            for parent, child in module_places(model, layer.linear):
                transaction.setattr(parent, child, layer)
        _copy(pairs, transaction)
    return LoadResult(missing, unexpected)
