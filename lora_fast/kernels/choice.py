"""The one place where a GEMM-shaped launch picks its path, by measurement, as Triton's autotuner picks configs.

Paths of ``ops.gemm_lowrank`` (forward y and backward dX; same semantics, same saved tensors):
  "triton": the fused cp.async kernel (kernels/gemm.py): the low-rank term initialises the accumulator, one store.
  "tma":    the persistent fused kernel with TMA descriptors (kernels/gemm_tma.py), sm_90 and newer, for operands
            whose alignment descriptors accept (ops.tma_eligible); others fall back to "triton" before launch.
  "cublas": the same kernel with no K loop writes bias + the low-rank term (masked in dX with dropout) into the
            output, then ``torch.addmm`` accumulates P @ Q into it with beta = 1 (cuBLAS's fp32 accumulation,
            the low-rank term rounded once to the output dtype before the sum).

The first call of a key (device, dtype, M rounded up to a power of two, N, K, R, dropout or not, forward or dX)
times every path with ``triton.testing.do_bench`` and keeps the fastest; the choice is remembered in memory
and on disk, one JSON file per device and per (torch, triton, lora-fast) version
(``$LORA_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora_fast``, else ``~/.cache/lora_fast``), so a second process
does not time again and a new version times afresh. ``LORA_FAST_GEMM=auto|triton|cublas|tma|ws`` forces a path (read
when a key is first resolved; ``clear()`` forgets the resolved keys). Under the Triton interpreter nothing is
timed: "triton" unless forced. With this, lora-fast is never slower than its own cuBLAS path, by construction.
"""

import json
import os
import re
import tempfile
from typing import Callable, Dict, Optional

PATHS = ("triton", "cublas", "tma")
# opt-in paths: taken only when LORA_FAST_GEMM names them, never timed by the automatic choice. "ws": the
# warp-specialised Gluon GEMM (kernels/gemm_ws.py; sm_90, bf16, no dropout, else "tma"), which no GPU has run yet
OPT_IN = ("ws",)
ENV = "LORA_FAST_GEMM"


def forced_path() -> Optional[str]:
    """The path LORA_FAST_GEMM forces, None for auto/unset. Raises ValueError for another value."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS + OPT_IN:
        raise ValueError(f"{ENV}: expected one of auto, {', '.join(PATHS + OPT_IN)}; got {value!r}")
    return value


def cache_dir() -> str:
    """Where the measured choices are kept on disk."""
    explicit = os.environ.get("LORA_FAST_CACHE_DIR", "").strip()
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora_fast")


def _versions() -> str:
    import torch
    import triton

    from .. import __version__
    return f"torch{torch.__version__}-triton{triton.__version__}-lora_fast{__version__}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "_", text).strip("_")


def _do_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn))


class GemmChoice:
    """Measured path per key, in memory and on disk.

    Args:
        timer: ``timer(fn) -> milliseconds`` (default: triton.testing.do_bench, which needs a GPU).
        versions: the version string that names the disk file (default: torch, triton and lora-fast versions).
    """

    def __init__(self, timer: Callable[[Callable[[], None]], float] = _do_bench, versions: Optional[str] = None,
                 *, paths=PATHS, default: str = "triton", forced: Optional[Callable[[], Optional[str]]] = None,
                 prefix: str = "gemm"):
        self.timer = timer
        self.versions = versions
        # the op's paths, the one taken when nothing is measured, its own forcing switch (default LORA_FAST_GEMM
        # through forced_path) and the disk file's prefix
        self.paths, self.default, self.forced, self.prefix = tuple(paths), default, forced, prefix
        self._memory: Dict[tuple, str] = {}
        self._disk: Dict[str, Dict[str, str]] = {}   # file path -> {key text: path}

    def clear(self) -> None:
        """Forget the keys resolved in this process (the disk files stay)."""
        self._memory.clear()
        self._disk.clear()

    def get(self, key: tuple) -> Optional[str]:
        return self._memory.get(key)

    def resolve(self, key: tuple, device_name, candidates: Dict[str, Callable[[], None]], *,
                measure: bool = True) -> str:
        """The path for ``key``: forced by LORA_FAST_GEMM, else remembered (memory, then disk), else timed over
        ``candidates`` (name -> a call that runs that path once) when ``measure``, else "triton".
        ``device_name``: the GPU's name (it names the disk file), or a callable returning it."""
        path = self.forced() if self.forced is not None else forced_path()
        if path is None and measure:
            file = self._file(device_name() if callable(device_name) else device_name)
            text = repr(key)
            table = self._load(file)
            path = table.get(text)
            if path not in candidates:
                times = {name: self.timer(fn) for name, fn in candidates.items()}
                path = min(times, key=times.get)
                table[text] = path
                self._save(file, table)
        self._memory[key] = path or self.default
        return self._memory[key]

    def _file(self, device_name: str) -> str:
        versions = self.versions if self.versions is not None else _versions()
        return os.path.join(cache_dir(), f"{self.prefix}-{_slug(device_name)}-{_slug(versions)}.json")

    def _load(self, file: str) -> Dict[str, str]:
        if file not in self._disk:
            try:
                with open(file, encoding="utf-8") as f:
                    table = json.load(f)
                if not isinstance(table, dict):
                    table = {}
            except (OSError, ValueError):
                table = {}   # missing or unreadable: measure again, rewrite it
            self._disk[file] = {k: v for k, v in table.items() if v in self.paths}
        return self._disk[file]

    def _save(self, file: str, table: Dict[str, str]) -> None:
        """Write the whole table atomically (another process may read it meanwhile); a read-only or full disk
        costs only the re-timing in the next process."""
        try:
            os.makedirs(os.path.dirname(file), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(table, f, indent=0, sort_keys=True)
            os.replace(tmp, file)
        except OSError:
            pass


GEMM = GemmChoice()
# QLoRA's two paths (lora_fast/qlora.py): the GEMM dequantizing each 4-bit tile, or one dequantization pass into a
# 16-bit scratch weight and the 16-bit op's kernels; forced by LORA_FAST_GEMM_4BIT, read by qlora.py itself
GEMM_4BIT = GemmChoice(paths=("fused", "dequant"), default="fused", forced=lambda: None, prefix="gemm4bit")


def clear() -> None:
    """Forget the resolved keys of this process (tests that change LORA_FAST_GEMM call it)."""
    GEMM.clear()
    GEMM_4BIT.clear()
