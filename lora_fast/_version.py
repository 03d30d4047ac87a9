"""The version of lora-fast, in a module of its own: setup.py reads it without importing the package, and the
kernels' cache keys (kernels/choice.py) import it without importing the package's face (layers, PEFT code)."""

__version__ = "0.1.0"
