"""Triton kernels of lora-fast and their launchers. Importing this module imports triton."""

from .ops import lora_backward, lora_forward
from .rng import dropout_keep_mask

__all__ = ["lora_forward", "lora_backward", "dropout_keep_mask"]
