"""Model surgery: replace_linear_with_lora (the book's function, made idempotent and selective)."""

import re
from typing import Callable, Iterable, Optional, Union

from torch import nn

from .layers import LinearWithLoRA, is_linear

Exclude = Optional[Union[Iterable[str], Callable[[str, nn.Module], bool]]]
TargetModules = Optional[Union[str, Iterable[str]]]
ALL_LINEAR = "all-linear"


def _excluder(exclude: Exclude) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    names = tuple(exclude)
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
    names = tuple(target_modules)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"target_modules: expected a regex string, {ALL_LINEAR!r} or an iterable of module names, "
                        f"got {target_modules!r}")
    return lambda name, module: any(name == n or name.endswith("." + n) for n in names)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, exclude: Exclude = None,
                             target_modules: TargetModules = None, **kwargs) -> nn.Module:
    """Wrap every nn.Linear (and transformers Conv1D, GPT-2's linear) in ``model`` (recursively) in a
    LinearWithLoRA, in place; returns the model.

    As the book's function (appendix E), plus: a layer already wrapped is left as it is (calling twice equals
    calling once), ``exclude`` skips layers by qualified name (e.g. "out_head" or "trf_blocks.0.att.W_query";
    a name also matches as a dotted suffix) or by a predicate ``(qualified_name, module) -> bool``, and a model
    that is itself a linear layer comes back wrapped.

    ``target_modules`` selects layers as PEFT's LoraConfig does: a list of names, each matching a qualified
    name or a dotted suffix of it (["c_attn", "q_proj"]); a string, a regular expression that must match the
    whole qualified name; or "all-linear": every linear layer except the output head (a Hugging Face model's
    get_output_embeddings(), as in PEFT; for other models, the last linear layer registered, e.g. the book's
    out_head). None (default) targets every linear layer. ``exclude`` applies after ``target_modules``.

    Args: rank >= 1, alpha, and LinearWithLoRA's keywords (dropout, scaling).
    Raises: ValueError for a bad rank, alpha, dropout or scaling (from LinearWithLoRA) or an invalid regex;
        TypeError for a target_modules that is neither a string nor an iterable of strings.
    """
    excluded = _excluder(exclude)
    targeted = _targeter(model, target_modules)
    if is_linear(model):
        # a lone layer is its own whole model: there is no head to leave out
        return model if excluded("", model) else LinearWithLoRA(model, rank, alpha, **kwargs)

    def skip(name: str, module: nn.Module) -> bool:
        return not targeted(name, module) or excluded(name, module)

    _replace(model, "", rank, alpha, skip, kwargs)
    return model


def _replace(module: nn.Module, prefix: str, rank, alpha, skip, kwargs) -> None:
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, LinearWithLoRA):
            continue
        if is_linear(child):
            if not skip(qualified, child):
                setattr(module, name, LinearWithLoRA(child, rank, alpha, **kwargs))
        else:
            _replace(child, qualified + ".", rank, alpha, skip, kwargs)
