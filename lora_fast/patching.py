"""Model surgery: replace_linear_with_lora (the book's function, made idempotent and selective)."""

from typing import Callable, Iterable, Optional, Union

from torch import nn

from .layers import LinearWithLoRA

Exclude = Optional[Union[Iterable[str], Callable[[str, nn.Module], bool]]]


def _excluder(exclude: Exclude) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    names = tuple(exclude)
    return lambda name, module: any(name == n or name.endswith("." + n) for n in names)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, exclude: Exclude = None,
                             **kwargs) -> nn.Module:
    """Wrap every nn.Linear in ``model`` (recursively) in a LinearWithLoRA, in place; returns the model.

    As the book's function (appendix E), plus: a layer already wrapped is left as it is (calling twice equals
    calling once), ``exclude`` skips layers by qualified name (e.g. "out_head" or "trf_blocks.0.att.W_query";
    a name also matches as a dotted suffix) or by a predicate ``(qualified_name, module) -> bool``, and a model
    that is itself an nn.Linear comes back wrapped.

    Args: rank >= 1, alpha, and LinearWithLoRA's keywords (dropout, scaling).
    Raises: ValueError for a bad rank, alpha, dropout or scaling (from LinearWithLoRA).
    """
    skip = _excluder(exclude)
    if isinstance(model, nn.Linear):
        return model if skip("", model) else LinearWithLoRA(model, rank, alpha, **kwargs)
    _replace(model, "", rank, alpha, skip, kwargs)
    return model


def _replace(module: nn.Module, prefix: str, rank, alpha, skip, kwargs) -> None:
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, LinearWithLoRA):
            continue
        if isinstance(child, nn.Linear):
            if not skip(qualified, child):
                setattr(module, name, LinearWithLoRA(child, rank, alpha, **kwargs))
        else:
            _replace(child, qualified + ".", rank, alpha, skip, kwargs)
