"""Environment switches read at call time (never at import)."""

import os

# the values triton itself reads as true for TRITON_INTERPRET (checked against triton.knobs on 3.9)
_TRUE = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
