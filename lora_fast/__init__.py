"""lora-fast: fused Triton kernels for LoRA fine-tuning (forward and backward), drop-in LoRA layers."""

from ._version import __version__
from .adapters import load_lora, load_lora_state_dict, lora_state_dict, save_lora
from .dora import dora_linear, dora_linear_4bit
from .functional import lora_delta, lora_linear, select_backend
from .layers import LinearWithDoRA, LinearWithLoRA, LoRALayer, lora_scale, use_adapter_names
from .multi import AdapterRows, adapter_rows, lora_linear_multi
from .patching import (
    count_parameters,
    initialize_dora_magnitudes,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)
from .peft_interop import PatchReport, load_peft_adapter, patch_peft, save_peft_adapter, unpatch_peft
from .qlora import lora_linear_4bit
from .tuning import warmup

__all__ = [
    "__version__",
    # the layers and the op
    "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "lora_linear", "lora_delta", "lora_scale",
    "select_backend", "lora_linear_4bit", "warmup", "lora_linear_multi",
    "use_adapter_names", "AdapterRows", "adapter_rows",
    # DoRA
    "LinearWithDoRA", "dora_linear", "dora_linear_4bit", "initialize_dora_magnitudes",
    # merge, adapter files, trainable parameters
    "merge_lora", "unmerge_lora", "merge_and_unload", "lora_state_dict", "load_lora_state_dict", "save_lora",
    "load_lora", "mark_only_lora_as_trainable", "count_parameters",
    # PEFT
    "patch_peft", "unpatch_peft", "PatchReport", "save_peft_adapter", "load_peft_adapter",
]
