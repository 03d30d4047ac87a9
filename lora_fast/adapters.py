"""Adapter-only checkpoints: the LoRA A and B tensors of a model, as a state dict or a safetensors file.

A file holds one tensor per A and B under the model's state-dict key (``<module path>.lora.A``/``.lora.B``,
A: (in_features, rank), B: (rank, out_features), in the adapters' dtype) and, in the safetensors metadata,
``lora_fast.format_version`` and ``lora_fast.layers``: a JSON object {module path: {"rank", "alpha",
"scaling"}}. Safetensors only (no pickle, so loading a file runs no code).
"""

import json
import os
from collections import namedtuple
from typing import Dict, Mapping, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .patching import _lora_layers

FORMAT_VERSION = "1"
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])
PathLike = Union[str, os.PathLike]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _config(layer) -> dict:
    return {"rank": layer.lora.rank, "alpha": layer.lora.alpha, "scaling": layer.lora.scaling}


def _shown(items) -> str:
    return ", ".join(items)


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The A and B of every LinearWithLoRA, under the keys ``model.state_dict()`` gives them
    (``trf_blocks.0.att.W_query.lora.A``, ...), detached and sharing storage with the parameters.

    Raises: TypeError for a non-Module; ValueError if the model holds no LinearWithLoRA.
    """
    out = {}
    for name, layer in _lora_layers(model, "lora_state_dict"):
        out[_prefix(name) + "lora.A"] = layer.lora.A.detach()
        out[_prefix(name) + "lora.B"] = layer.lora.B.detach()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                         strict: bool = True) -> LoadResult:
    """Copy A and B tensors (keys as ``lora_state_dict`` gives them) into the model's LinearWithLoRA layers, in
    place, converting to each parameter's dtype and device. Nothing is copied unless every check passes.

    Args:
        state_dict: {key: tensor}. strict: True (default) raises on missing or unexpected keys; False loads
            the keys the model and the dict share and reports the others.
    Returns: LoadResult(missing_keys, unexpected_keys), sorted lists (empty under strict).
    Raises:
        ValueError: keys whose shape differs from the model's (always), missing or unexpected keys (strict),
            each listed; a model without LinearWithLoRA.
        TypeError: a non-mapping, or a value that is not a floating-point tensor (keys listed).
        RuntimeError: a layer to be loaded is merged (its weight already holds the old A and B): unmerge_lora
            first.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of str to torch.Tensor, got {type(state_dict).__name__}")
    params, owner = {}, {}
    for name, layer in _lora_layers(model, "load_lora_state_dict"):
        for key, p in ((_prefix(name) + "lora.A", layer.lora.A), (_prefix(name) + "lora.B", layer.lora.B)):
            params[key], owner[key] = p, (name, layer)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    shared = sorted(set(params) & set(state_dict))
    not_float = [k for k in shared if not (isinstance(state_dict[k], torch.Tensor)
                                           and state_dict[k].is_floating_point())]
    if not_float:
        raise TypeError(f"load_lora_state_dict: expected floating-point tensors for keys: {_shown(not_float)}")
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
        raise ValueError("load_lora_state_dict: " + "; ".join(problems))
    merged = sorted({repr(owner[k][0]) for k in shared if owner[k][1].merged})
    if merged:
        raise RuntimeError(f"load_lora_state_dict: merged layers {_shown(merged)} would keep the old update in "
                           "their weight; call unmerge_lora(model) before loading")
    with torch.no_grad():
        for k in shared:
            params[k].copy_(state_dict[k])
    return LoadResult(missing, unexpected)


def save_lora(model: nn.Module, path: PathLike) -> None:
    """Write the model's A and B tensors (``lora_state_dict``) to a safetensors file at ``path``, with each
    layer's rank, alpha and scaling in the metadata (see the module docstring). Works for merged layers too
    (A and B are kept while merged). Overwrites ``path``.

    Raises: TypeError for a non-Module; ValueError if the model holds no LinearWithLoRA; safetensors' and the
    OS's errors for tensors it cannot write (e.g. 'meta') or an unwritable path.
    """
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    layers = {name: _config(layer) for name, layer in _lora_layers(model, "save_lora")}
    metadata = {"format": "pt", "lora_fast.format_version": FORMAT_VERSION,
                "lora_fast.layers": json.dumps(layers, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_lora(model: nn.Module, path: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a file written by ``save_lora`` into the model's LinearWithLoRA layers, in place.

    The file's rank, alpha and scaling must equal those of each model layer it shares (a file saved with
    another rank, or another alpha, would silently change the function); then the tensors go through
    ``load_lora_state_dict(model, tensors, strict=strict)``.

    Returns: LoadResult(missing_keys, unexpected_keys).
    Raises:
        ValueError: a file without lora_fast metadata or of another format version; layers whose rank, alpha
            or scaling differ (listed with both values); missing, unexpected or mis-shaped keys (listed).
        RuntimeError, TypeError: as load_lora_state_dict. FileNotFoundError / safetensors errors for a
            missing or corrupt file.
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version = metadata.get("lora_fast.format_version")
    if version is None or "lora_fast.layers" not in metadata:
        raise ValueError(f"load_lora: {path} is not a lora_fast adapter file (its metadata lacks "
                         "lora_fast.format_version and lora_fast.layers; it was not written by save_lora)")
    if version != FORMAT_VERSION:
        raise ValueError(f"load_lora: {path} has format version {version!r}; this lora_fast reads "
                         f"{FORMAT_VERSION!r}")
    try:
        saved = json.loads(metadata["lora_fast.layers"])
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise ValueError("not a mapping of layer names to {rank, alpha, scaling}")
    except ValueError as err:   # json.JSONDecodeError is a ValueError
        raise ValueError(f"load_lora: {path} has malformed lora_fast.layers metadata ({err})") from None
    mismatches = []
    for name, layer in _lora_layers(model, "load_lora"):
        if name not in saved:
            continue
        for field, value in _config(layer).items():
            stored = saved[name].get(field)
            same = stored == value if field == "scaling" else (stored is not None and float(stored) == value)
            if not same:
                mismatches.append(f"{name or '<model>'}: {field} {stored!r} in the file, {value!r} in the model")
    if mismatches:
        raise ValueError(f"load_lora: {path} does not match the model's LoRA layers: " + "; ".join(mismatches))
    return load_lora_state_dict(model, tensors, strict=strict)
