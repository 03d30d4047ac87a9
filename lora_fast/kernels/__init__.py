"""Triton kernels of lora-fast and their launchers. Importing this module imports triton."""

from .ops import lora_backward, lora_forward, new_keep_mask
from .rng import dropout_keep_mask, packed_keep_mask

__all__ = ["lora_forward", "lora_backward", "new_keep_mask", "dropout_keep_mask", "packed_keep_mask"]
