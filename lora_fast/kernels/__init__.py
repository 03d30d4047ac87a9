"""Triton kernels of lora-fast and their launchers. Importing this module imports triton.

Raises (on import): RuntimeError when TRITON_INTERPRET=1 was set after triton's import (_env.check_interpreter):
the kernels would be interpreted and triton's own functions they call would not."""

from .._env import check_interpreter
from .ops import lora_backward, lora_forward, new_keep_mask
from .rng import dropout_keep_mask, packed_keep_mask

check_interpreter()

__all__ = ["lora_forward", "lora_backward", "new_keep_mask", "dropout_keep_mask", "packed_keep_mask"]
