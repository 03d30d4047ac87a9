"""lora-fast: fused Triton kernels for LoRA fine-tuning (forward and backward), drop-in LoRA layers."""

from .functional import lora_linear, select_backend
from .layers import LinearWithLoRA, LoRALayer, lora_scale
from .patching import replace_linear_with_lora
from .peft_interop import PatchReport, load_peft_adapter, patch_peft, save_peft_adapter, unpatch_peft

__version__ = "0.1.0"

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "lora_linear", "lora_scale",
           "select_backend", "patch_peft", "unpatch_peft", "PatchReport", "save_peft_adapter", "load_peft_adapter"]
