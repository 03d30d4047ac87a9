"""Environment switches read at call time (never at import)."""

import os

# the values triton itself reads as true for TRITON_INTERPRET (checked against triton.knobs on 3.9)
_TRUE = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_TRITON_INTERPRETS = []   # [bool] once known: triton fixes it when it is imported


def interpreter_ready() -> bool:
    """With TRITON_INTERPRET set: whether the imported triton runs in its interpreter. Triton reads the variable
    when it is imported (its own library functions, tl.sum and the like, are then built as interpreted or as GPU
    functions once); set after that import, lora-fast's kernels would be interpreted but triton's functions they
    call would not, and the interpreter fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
    Imports triton; True when this cannot be told (a triton without these modules)."""
    if not _TRITON_INTERPRETS:
        try:
            import triton.language.standard as standard
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return True
        probe = getattr(standard, "sum", None)
        if probe is None:
            return True
        _TRITON_INTERPRETS.append(isinstance(probe, InterpretedFunction))
    return _TRITON_INTERPRETS[0]


def check_interpreter() -> None:
    """Raises RuntimeError when TRITON_INTERPRET is set but the imported triton does not interpret (set after
    triton's import; see interpreter_ready). Imports triton when the variable is set; a no-op otherwise."""
    if interpreting() and not interpreter_ready():
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported: triton reads it at its import, so "
                           "its own functions were built for a GPU and its interpreter cannot run lora-fast's "
                           "kernels. Set TRITON_INTERPRET=1 before anything imports triton (in the shell, or at the "
                           "top of the script), or unset it for the reference path on CPU")
