"""The one place where a launch picks what it runs by measurement: the GEMM path, and each kernel's tile config.

Paths of ``ops.gemm_lowrank`` (forward y and backward dX; same semantics, same saved tensors):
  "triton": the fused cp.async kernel (kernels/gemm.py): the low-rank term initialises the accumulator, one store.
  "tma":    the persistent fused kernel with TMA descriptors (kernels/gemm_tma.py), sm_90 and newer, for operands
            whose alignment descriptors accept (ops.tma_eligible); others fall back to "triton" before launch.
  "cublas": the same kernel with no K loop writes bias + the low-rank term (masked in dX with dropout) into the
            output, then ``torch.addmm`` accumulates P @ Q into it with beta = 1 (cuBLAS's fp32 accumulation,
            the low-rank term rounded once to the output dtype before the sum).

The first call of a key (dtype, M rounded up to a power of two, N, K, R, dropout or not, forward or dX) times two
candidates: the fused kernel that the operands allow (TMA where ``ops.tma_eligible``, else cp.async: on sm_90 the
persistent TMA kernel replaces the cp.async one, so only one of them is timed) and the cuBLAS path, and keeps the
faster. Each kernel's first call per autotuner key picks its tile config the same way (``Tuning``): the configs
are ranked by a cost model (``configs.gemm_cost``: wave quantisation and operand traffic) and the best
``TOP_CONFIGS`` are timed. Under the Triton interpreter nothing is timed: "triton" unless forced.

Cost of a first use, by construction (no GPU has run it; an H200, a bf16 4096 x 4096 GEMM at M = 4096, ~0.2 ms):
``bench`` times a call for about ``WARMUP_MS`` + ``REP_MS`` = 1 + 4 ms of GPU time (at least 3 and at most 50
timed calls, each after an L2 flush of ~10 us), plus ~0.1 ms of host time per timed call; a key times 2 paths
and tunes up to ``TOP_CONFIGS`` = 3 configs of each path's kernel (the cuBLAS path's K = 0 kernel too): at most
2 + 2 x 3 = 8 benchmarks x ~6 ms = ~50 ms, against ~19 benchmarks x ~130 ms (2.3 s) before. Compiling is
separate: one compilation per config and argument specialisation (not per key: N, K and M only enter through
their divisibility by 16), ~0.3-1.5 s each when Triton's own disk cache (``~/.triton/cache``) is cold, ~10 ms
when warm. With a warm Triton cache a key's first use is ~0.05-0.1 s (< 0.5 s); a cold one pays the compiles once
per machine.

What is measured is kept, in memory and on disk (kernels/cache.py's ``SharedTable``: one JSON file per GPU name
and per (torch, CUDA, triton, lora-fast) versions under ``cache_dir()``, shared by every process of the machine
through a file lock, only ever added to), and agreed across the ranks of a ``torch.distributed`` job
(``agree``: the first rank to resolve a key publishes its choice in the job's store and every rank runs that
one), so all ranks run the same kernels and round identically. ``LORA_FAST_GEMM=auto|triton|cublas|tma|ws`` forces
a path (read when a key is first resolved; ``clear()`` forgets the resolved keys; ``ws``, the opt-in
warp-specialised Gluon GEMM, is never timed); ``LORA_FAST_AUTOTUNE=0`` takes
each kernel's first config.

Memory: timing allocates one L2 flush buffer of the device's L2 size (``flush_bytes``: 40 MB on an A100, 50 MB on
an H100 / H200), released when the timing of a call ends; the candidates write into the caller's own output, so
nothing else is allocated beyond what the launch itself needs (a 4-bit key also allocates one (M, N) output in
x's dtype, qlora._measured_path). ``lora_fast.warmup`` does all of it before training starts.
"""

import os
from typing import Callable, Dict, Iterable, Optional

from .cache import (  # noqa: F401 (cache_dir, MAX_*)
    MAX_FILE_BYTES,
    SharedTable,
    _slug,
    _versions,
    agree,
    cache_dir,
    published,
)

PATHS = ("triton", "cublas", "tma")
# opt-in paths: taken only when LORA_FAST_GEMM names them, never timed by the automatic choice. "ws": the
# warp-specialised Gluon GEMM (kernels/gemm_ws.py; sm_90, bf16, no dropout, else "tma"), which no GPU has run yet
OPT_IN = ("ws",)
ENV = "LORA_FAST_GEMM"
# the tile configs of a GEMM-shaped kernel that are timed, after the cost model's ranking (of up to 6)
TOP_CONFIGS = 3
# bench(): GPU time spent before timing (after the first, untimed call) and on the timed calls; a few ms separate
# paths that differ by more than the run-to-run noise of a ~0.1-1 ms kernel (~1-2% on a quiet GPU), and the one
# comparison that decides (the median of each candidate) is kept
WARMUP_MS = 1.0
REP_MS = 4.0
MIN_REPS, MAX_REPS = 3, 50


def forced_path() -> Optional[str]:
    """The path LORA_FAST_GEMM forces, None for auto/unset. Raises ValueError for another value."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS + OPT_IN:
        raise ValueError(f"{ENV}: expected one of auto, {', '.join(PATHS + OPT_IN)}; got {value!r}")
    return value


def candidate_paths(tma_eligible: bool) -> tuple:
    """The paths timed for a key: the fused kernel the operands allow (the persistent TMA kernel where its
    descriptors accept them, which supersedes the cp.async kernel on sm_90, else the cp.async kernel) and cuBLAS."""
    return ("tma", "cublas") if tma_eligible else ("triton", "cublas")


# --- timing ------------------------------------------------------------------------------------------------------

def flush_bytes(device=None) -> int:
    """Bytes of the L2 flush buffer ``bench`` allocates: the device's L2 cache size (at least 1 MB; 64 MB where
    torch does not report it)."""
    import torch

    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    return max(1 << 20, l2) if l2 else 64 << 20   # unknown: 64 MB, above every L2 of sm_80 / sm_90 parts


def bench(fn: Callable[[], None], quantiles: Optional[Iterable[float]] = None):
    """Median milliseconds of ``fn`` on the current CUDA device (a list of ``quantiles`` when given, as
    ``triton.testing.do_bench``): one untimed call (compiles, tunes), then ~``WARMUP_MS`` of calls, then
    ``MIN_REPS`` to ``MAX_REPS`` calls in ~``REP_MS``, each timed by CUDA events after the L2 is flushed (a
    buffer of ``flush_bytes()``, freed on return)."""
    import torch

    fn()
    torch.cuda.synchronize()
    flush = torch.empty(flush_bytes() // 4, dtype=torch.int32, device="cuda")
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    first.record()
    fn()
    last.record()
    torch.cuda.synchronize()
    estimate = max(first.elapsed_time(last), 1e-3)
    for _ in range(int(WARMUP_MS / estimate)):
        fn()
    reps = max(MIN_REPS, min(MAX_REPS, int(REP_MS / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    del flush
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))

    def at(q):
        return times[min(len(times) - 1, int(q * len(times)))]
    return [at(q) for q in quantiles] if quantiles is not None else at(0.5)


# --- the path choice ---------------------------------------------------------------------------------------------

class GemmChoice:
    """Measured path per key, in memory, on disk (``SharedTable``) and agreed across a job's ranks (``agree``).

    A key is ``(device, ...)``: the device keys the memory only; the disk file is named by the device's GPU name
    and the versions, and the rest of the key names the entry (so one machine's processes share it whatever
    their device index).

    Args:
        timer: ``timer(fn) -> milliseconds`` (default ``bench``, which needs a GPU).
        versions: the version string that names the disk file (default: torch, CUDA, triton, lora-fast versions).
        paths, default, forced, prefix: the op's paths, the one taken when nothing is measured, its forcing switch
            (default LORA_FAST_GEMM through ``forced_path``) and the disk file's prefix.
    """

    def __init__(self, timer: Callable[[Callable[[], None]], float] = None, versions: Optional[str] = None,
                 *, paths=PATHS, default: str = "triton", forced: Optional[Callable[[], Optional[str]]] = None,
                 prefix: str = "gemm"):
        self.timer = timer
        self.versions = versions
        self.paths, self.default, self.forced, self.prefix = tuple(paths), default, forced, prefix
        self.timed = 0          # keys this process measured (the rest came from memory, disk or another rank)
        self._memory: Dict[tuple, str] = {}
        self._tables: Dict[str, SharedTable] = {}

    def clear(self) -> None:
        """Forget the keys resolved in this process (the disk files stay)."""
        self._memory.clear()
        self._tables.clear()

    def get(self, key: tuple) -> Optional[str]:
        return self._memory.get(key)

    def resolve(self, key: tuple, device_name, candidates: Dict[str, Callable[[], None]], *,
                measure: bool = True) -> str:
        """The path for ``key``: forced (LORA_FAST_GEMM), else remembered (memory, the job's store, disk), else
        timed over ``candidates`` (name -> a call that runs that path once) when ``measure``, else the default.
        ``device_name``: the GPU's name, or a callable returning it."""
        path = self.forced() if self.forced is not None else forced_path()
        if path is None and measure:
            table = self.table(device_name() if callable(device_name) else device_name)
            text = repr(tuple(key[1:]))

            def decide():
                known = table.get(text)
                if known in candidates:
                    return known
                timer = self.timer or bench
                times = {name: timer(fn) for name, fn in candidates.items()}
                self.timed += 1
                return min(times, key=times.get)

            path = agree(f"{os.path.basename(table.path)}/{text}", decide, lambda v: v in self.paths)
            if table.get(text) != path:
                table.add(text, path)
        self._memory[key] = path or self.default
        return self._memory[key]

    def known(self, key: tuple, device_name, candidates: Iterable[str]) -> Optional[str]:
        """The path ``resolve(key, device_name, {c: ... for c in candidates})`` takes from elsewhere, without timing:
        what a rank published in the job's store (any valid path), else the disk cache's entry when it names one of
        ``candidates``; None where resolve would time them. Reads only: what resolve returns, the files and the
        store stay as they were (ops.term_for's lookup before a key's first call; memory and forcing are the
        caller's ``get`` and ``forced``)."""
        table = self.table(device_name() if callable(device_name) else device_name)
        text = repr(tuple(key[1:]))
        path = published(f"{os.path.basename(table.path)}/{text}", lambda v: v in self.paths)
        if path is not None:
            return path
        path = table.get(text)
        return path if path in tuple(candidates) else None

    def table(self, device_name: str) -> SharedTable:
        file = self._file(device_name)
        if file not in self._tables:
            self._tables[file] = SharedTable(file)
        return self._tables[file]

    def _file(self, device_name: str) -> str:
        versions = self.versions if self.versions is not None else _versions()
        return os.path.join(cache_dir(), f"{self.prefix}-{_slug(device_name)}-{_slug(versions)}.json")


# --- the tile configs --------------------------------------------------------------------------------------------

def config_text(config) -> str:
    """A triton.Config as one short string (its kernel arguments, warps and stages)."""
    parts = [f"{k}={v}" for k, v in sorted(config.kwargs.items())]
    return ",".join(parts + [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"])


def _launcher_name(launcher) -> str:
    """A stable name for a launcher: the module global that holds it (``lora_fast.kernels.ops._gemm_dx``)."""
    name = getattr(launcher, "name", None)
    if name:
        return name
    import sys

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("lora_fast.") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is launcher:
                    launcher.name = f"{module_name}.{attr}"
                    return launcher.name
    return f"{launcher.kernel.fn.__name__}.{id(launcher)}"


class Tuning:
    """Each launcher's tile config per autotuner key, measured once per machine and agreed across ranks.

    The key is Triton's autotuner key (the values of the launcher's key arguments and every tensor argument's
    dtype) with the launcher's name, the compute capability and the constexpr arguments. Unknown keys are tuned by
    ``triton.autotune`` over the configs the cost model ranks best (``TOP_CONFIGS``, ``configs.gemm_cost``; all of
    them for kernels that are not GEMM-shaped) with ``bench`` as its timer; the chosen config is kept in a
    ``SharedTable`` beside the path choice (prefix "tune") and published to the job's ranks.
    """

    def __init__(self, bench_fn: Optional[Callable] = None, versions: Optional[str] = None):
        self.bench_fn, self.versions = bench_fn, versions
        # keys this process tuned (a key that differs from a tuned one only in its constexprs gets the autotuner's
        # in-memory result for that one, as Triton's own key has no constexprs)
        self.tuned = 0
        self._memory: Dict[tuple, object] = {}
        self._tuners: Dict[tuple, object] = {}
        self._tables: Dict[str, SharedTable] = {}

    def clear(self) -> None:
        self._memory.clear()
        self._tuners.clear()
        self._tables.clear()

    def launch(self, launcher, grid, args, kwargs, device, capability, dtype):
        """Launch ``launcher.kernel`` with the config of this key (tuning it first if no one has): returns
        (the compiled kernel, its config)."""
        import torch

        configs = launcher.configs_fn(capability, dtype)
        nargs = dict(zip(launcher.kernel.arg_names, args))
        tuner_key = tuple(nargs[k] for k in launcher.key if k in nargs) + tuple(
            str(a.dtype) for a in args if hasattr(a, "dtype"))
        name = _launcher_name(launcher)
        constexprs = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        text = repr((name, tuple(capability), tuner_key, constexprs))
        index = device.index if device.index is not None else torch.cuda.current_device()
        config = self._memory.get((index, text))
        compiled = None
        if config is None:
            by_text = {config_text(c): c for c in configs}
            if len(configs) == 1:
                config = configs[0]
            else:
                table = self._table(torch.cuda.get_device_properties(device).name)
                outcome = {}

                def decide():
                    known = table.get(text)
                    if known in by_text:
                        return known
                    tuner = self._tuner(launcher, name, configs, capability, dtype, device)
                    # the autotuner benchmarks the pruned configs (each launch writes this call's outputs), then
                    # launches the best
                    outcome["compiled"] = tuner[grid](*args, **kwargs)
                    outcome["text"] = config_text(tuner.best_config)
                    self.tuned += 1
                    return outcome["text"]

                chosen = agree(f"{os.path.basename(table.path)}/{text}", decide, lambda v: v in by_text)
                if table.get(text) != chosen:
                    table.add(text, chosen)
                config = by_text[chosen]
                if outcome.get("text") == chosen:
                    compiled = outcome["compiled"]   # launched with the agreed config already
            self._memory[(index, text)] = config
        if compiled is None:
            if config.pre_hook is not None:   # as the autotuner does (host descriptors' block shapes: descriptors.py)
                config.pre_hook({**nargs, **kwargs, **config.all_kwargs()})
            compiled = launcher.kernel[grid](*args, **kwargs, **config.all_kwargs())
        return compiled, config

    def _tuner(self, launcher, name, configs, capability, dtype, device):
        import triton

        tuner_key = (name, tuple(capability), dtype)
        tuner = self._tuners.get(tuner_key)
        if tuner is None:
            prune = None
            gemm_shaped = {"M", "N", "K"} <= set(launcher.kernel.arg_names) and all(
                {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(c.kwargs) for c in configs)
            if gemm_shaped:
                import torch

                sms = torch.cuda.get_device_properties(device).multi_processor_count
                prune = {"perf_model": _CostModel(capability, sms, dtype), "top_k": TOP_CONFIGS}
            tuner = triton.autotune(configs=configs, key=launcher.key, prune_configs_by=prune,
                                    do_bench=self.bench_fn or bench)(launcher.kernel)
            self._tuners[tuner_key] = tuner
        return tuner

    def _table(self, device_name: str) -> SharedTable:
        versions = self.versions if self.versions is not None else _versions()
        file = os.path.join(cache_dir(), f"tune-{_slug(device_name)}-{_slug(versions)}.json")
        if file not in self._tables:
            self._tables[file] = SharedTable(file)
        return self._tables[file]


class _CostModel:
    """``perf_model`` of triton.autotune for GEMM-shaped kernels (``configs.gemm_cost``)."""

    def __init__(self, capability, sms, dtype):
        self.capability, self.sms, self.dtype = tuple(capability), sms, dtype

    def __call__(self, **meta):
        from . import configs

        return configs.gemm_cost(meta["M"], meta["N"], meta["K"], meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"],
                                 meta["num_warps"], meta["num_stages"], self.capability, self.sms, self.dtype)


GEMM = GemmChoice()
# QLoRA's two paths (lora_fast/qlora.py): the GEMM dequantizing each 4-bit tile, or one dequantization pass into a
# 16-bit scratch weight and the 16-bit op's kernels; forced by LORA_FAST_GEMM_4BIT, read by qlora.py itself
GEMM_4BIT = GemmChoice(paths=("fused", "dequant"), default="fused", forced=lambda: None, prefix="gemm4bit")
TUNING = Tuning()


def clear() -> None:
    """Forget the resolved keys of this process (tests that change LORA_FAST_GEMM call it)."""
    GEMM.clear()
    GEMM_4BIT.clear()
    TUNING.clear()
    from . import plan

    plan.clear()
