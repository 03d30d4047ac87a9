"""PEFT's own test suite run with lora-fast's patch_peft on every PEFT model it builds (plugin.py), and the
per-test comparison of a patched run with an unpatched one (compare.py). See README.md beside this file."""
