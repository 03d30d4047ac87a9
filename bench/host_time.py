"""Host time per training step, measured on a machine without a GPU: ``python -m bench.host_time``.

What runs: forward and backward of real modules on CPU tensors through the whole Triton path (input checks,
autograd, lora-fast's launchers, the autotuner's cache lookup, Triton's JIT dispatch), with only Triton's final
launch stubbed: a stand-in Triton driver reports an sm_90 device (132 SMs), compiles every kernel for real
(ptxas, as on a GPU), and its launcher counts the launch instead of making it, after the host work Triton's CUDA
launcher does before it: the global scratch of device-side tensor descriptors (the TMA GEMM's default) from
Triton's allocator (here the CPU allocator), and each host-side descriptor argument (LORA_FAST_TMA_DESC=host)
expanded by Triton's own wrapper, with only the tensor map's encoding (fill_tma_descriptor, cuTensorMapEncodeTiled
in libcuda) stubbed by a 128-byte object. torch.cuda's capability and
property queries are answered for that device; the autotuner gets a stand-in benchmark (the first config is
kept: tuning is not timed, only its cache lookup); the "cublas" path's addmm_ runs on 1 x 1 tensors (torch's
dispatch, no CPU BLAS). Not run: the CUDA driver's own launch call (cuLaunchKernel, a few microseconds per
launch) and torch's CUDA caching allocator (the CPU allocator runs instead). torch runs one intra-op thread.

Rows (bf16 base, fp32 adapters as PEFT keeps them, rank 16, no dropout, x requiring grad, every gradient set to
None before each step): per projection, nn.Linear (frozen), PEFT's lora.Linear, lora-fast's LinearWithLoRA and
PEFT + lora_fast.patch_peft, at a tiny shape (64 -> 64, M = 4: torch's own compute there is small) and, for the
Triton rows, at Llama-3.2-1B's projection shapes with M = 4096 (bench/model_configs.py); per decoder layer of a
tiny Llama (model_configs.two_layer of Llama-3.2-1B: GQA, SiLU MLP, 7 LoRA projections per layer), from the
difference between a 10-layer and a 2-layer model. Every Triton row for each GEMM path (triton, cublas, tma,
forced as LORA_FAST_GEMM does). Columns: thread CPU time (robust to other jobs on a shared machine) and wall
time, min and median per step in microseconds; ratio: median CPU time over PEFT's of the same kind; launches
per step (per layer for the decoder rows; those run in float32 on 8 tokens, in --layer-rounds rounds of paired
samples whose ratio column is the median of the paired ratios, quartiles beside it, see _layer_rows, or with
--layer-dtype bfloat16, which the tma path needs: it takes 16-bit operands only). At M = 4096 the
CPU allocator's large allocations (no caching allocator on CPU: mmap and munmap per step) count in lora-fast's
and patch_peft's rows; a GPU's caching allocator does not pay them. The numbers depend on the machine and its
load (printed).

``--instructions`` runs the same rows under valgrind's callgrind and reports thousands of instructions executed per
step instead of times (the process counts its own instructions around each sample, instrumentation off elsewhere):
a count that other jobs on a shared machine do not change, for comparing two versions of the code; an instruction's
cost varies, so it is no time and its ratios differ from the time ratios (valgrind must be installed; ~10x slower).
"""

import argparse
import copy
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch


def _tma_fill(*args):
    """Stand-in of triton's C-side fill_tma_descriptor (3.6) / fill_tma_descriptor_tiled (3.9), which call
    cuTensorMapEncodeTiled in libcuda: a 128-byte object in place of the encoded CUtensorMap."""
    return bytes(128)


def _stub_driver():
    """A Triton driver for an sm_90 device whose launcher does what Triton's CUDA launcher does on the host before
    cuLaunchKernel, except the CUDA calls (see the module docstring): the global scratch of device-side tensor
    descriptors from Triton's allocator (ops._scratch, on the CPU here), and each host-side tensor descriptor
    argument expanded by Triton's own wrapper (make_tensordesc_arg), with the tensor map's encoding stubbed
    (``_tma_fill``)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import _allocation

    # triton 3.9's launcher takes the kernel's arguments as one tuple after its own; 3.6's flat
    tuple_args = "kernel_metadata" in inspect.signature(nvidia.CudaLauncher.__call__).parameters

    def launched(*args):
        return None

    class StubLauncher:
        launches = 0
        record = None   # a list to append (kernel name, current CUDA device, launch arguments) to, or None

        def __init__(self, src, metadata):
            self.name = getattr(src, "name", "?")
            signature = dict(getattr(src, "signature", None) or {})
            self.expand = nvidia.wrap_handle_tensordesc(launched, signature, getattr(metadata, "tensordesc_meta", None))
            self.scratch = (getattr(metadata, "global_scratch_size", 0), getattr(metadata, "global_scratch_align", 1))

        def __call__(self, *args, **kwargs):
            StubLauncher.launches += 1
            if StubLauncher.record is not None:
                StubLauncher.record.append((self.name, torch.cuda.current_device(), args))
            grid_x, grid_y, grid_z, stream, function, *rest = args
            size, align = self.scratch
            scratch = None
            if size > 0:
                scratch = _allocation._allocator.get()(grid_x * grid_y * grid_z * size, align, stream)
            if self.expand is not launched:
                if tuple_args:
                    self.expand(grid_x, grid_y, grid_z, stream, function, False, False, *rest[:4], scratch, None,
                                None, None, tuple(rest[4:]))
                else:
                    self.expand(grid_x, grid_y, grid_z, stream, function, False, False, scratch, None, *rest)

    class StubDriver:
        launcher_cls = StubLauncher

        def __init__(self):
            props = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                     "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}
            self.utils = types.SimpleNamespace(
                load_binary=lambda name, kernel, shared, device: (None, None, 128, 0, 1024),
                unload_module=lambda module: None, get_device_properties=lambda device: props,
                fill_tma_descriptor=_tma_fill, fill_tma_descriptor_tiled=_tma_fill)

        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            return lambda fn, quantiles=None, **kwargs: [1.0, 1.0, 1.0] if quantiles else 1.0

        def map_python_to_cpp_type(self, ty):
            return ty

    return StubDriver(), StubLauncher


def _install(monkeypatch):
    """Route CPU tensors to the Triton path with the stub driver; ``monkeypatch(obj, name, value)``."""
    import triton
    from triton.runtime import autotuner

    import lora_fast.functional as functional

    stub, launcher = _stub_driver()
    triton.runtime.driver.set_active(stub)
    props = types.SimpleNamespace(multi_processor_count=132, name="stub sm_90 (no launch)")
    current = [0]
    monkeypatch(torch.cuda, "current_device", lambda: current[0])
    monkeypatch(torch.cuda, "set_device", lambda device: current.__setitem__(0, int(device)))
    monkeypatch(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch(functional, "select_backend", lambda x: "triton")
    # the device-side descriptors' global scratch (Triton's allocator protocol) from the CPU allocator
    from lora_fast.kernels import ops

    monkeypatch(ops, "_scratch", lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    # the fused cp.async GEMM, as LORA_FAST_GEMM=triton: nothing can be timed to choose a path without a GPU
    from lora_fast.kernels import choice

    monkeypatch(choice, "forced_path", lambda: "triton")
    choice.clear()
    monkeypatch(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [1.0, 1.0, 1.0])
    return launcher


def _stub_addmm(monkeypatch):
    """cuBLAS's addmm_ (the "cublas" GEMM path) on a GPU returns after queueing; on CPU tensors it would compute
    for seconds at M = 4096. Stand-in: torch's own addmm_ on 1 x 1 tensors (the dispatcher's path, no BLAS)."""
    original = torch.Tensor.addmm_
    one = torch.ones(1, 1)

    def addmm_(self, mat1, mat2, **kwargs):
        original(one, one, one)
        return self

    monkeypatch(torch.Tensor, "addmm_", addmm_)


def _time(fn, repeat: int, number: int, clear=()) -> dict:
    """Per call of ``fn``, over ``repeat`` samples of ``number`` calls each: thread CPU time and wall time, min and
    median, in microseconds. ``clear``: tensors whose .grad is set to None before each call (outside the timing
    only in that it costs a few attribute writes: a training loop's zero_grad(set_to_none=True) does the same)."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(number):
            for t in clear:
                t.grad = None
            fn()
        cpu.append((time.thread_time() - c0) / number * 1e6)
        wall.append((time.perf_counter() - w0) / number * 1e6)
    return dict(cpu_min=min(cpu), cpu_median=statistics.median(cpu), wall_min=min(wall),
                wall_median=statistics.median(wall))


# set (to the callgrind output folder) in the process that main() runs under valgrind for --instructions
_CALLGRIND = "LORA_FAST_CALLGRIND"


def _callgrind(*args) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def _callgrind_dump() -> int:
    """Dump callgrind's counters (``callgrind_control -d``, which also zeroes them) and return the dump's total
    instructions executed (its ``totals:`` line)."""
    folder = os.environ[_CALLGRIND]
    before = set(os.listdir(folder))
    _callgrind("-d")
    (name,) = set(os.listdir(folder)) - before
    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals line in callgrind's dump {name}")


def _instructions(fn, repeat: int, number: int, clear=()) -> dict:
    """Per call of ``fn``: thousands of instructions executed in this process (callgrind's Ir), min and median over
    ``repeat`` samples of ``number`` calls, as ``_time``'s cpu_min / cpu_median (wall: None). Independent of other
    jobs on the machine, unlike time; not a time: an instruction's cost varies (cache misses, branches). Each sample
    turns callgrind's instrumentation on and off around its calls (callgrind_control), and the same switching around
    no calls is subtracted."""
    def sample(calls):
        _callgrind("-z")
        _callgrind("-i", "on")
        for _ in range(calls):
            for t in clear:
                t.grad = None
            fn()
        _callgrind("-i", "off")
        return _callgrind_dump()

    empty = sample(0)
    counts = [(sample(number) - empty) / number / 1e3 for _ in range(repeat)]
    return dict(cpu_min=min(counts), cpu_median=statistics.median(counts), wall_min=None, wall_median=None)


_MEASURE = [_time]


# per projection: Llama-3.2-1B's (bench/model_configs.py: hidden 2048, MLP 8192, 8 of 32 heads for k and v)
def _llama_shapes() -> dict:
    from .model_configs import REAL

    spec = REAL["llama-3.2-1b"]
    h, i = spec["hidden_size"], spec["intermediate_size"]
    kv = spec["num_key_value_heads"] * spec["head_dim"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "gate_proj": (h, i), "down_proj": (i, h)}


TINY = (64, 64)   # in, out features of the tiny projection (torch's own compute there is a few microseconds)


def _projection_rows(launcher, paths, M_big: int, rank: int, dtype, repeat: int, number: int) -> list:
    """forward+backward of one projection: nn.Linear (frozen), PEFT's lora.Linear, lora-fast (LinearWithLoRA),
    PEFT + patch_peft; x requires grad, gradients cleared every step."""
    from peft import LoraConfig, get_peft_model

    import lora_fast
    from lora_fast.kernels import choice

    rows = []

    def modules(K, N):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False)).to(dtype).requires_grad_(False)
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
        patched = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
        lora_fast.patch_peft(patched, warn=False)
        ours = lora_fast.replace_linear_with_lora(copy.deepcopy(base), rank, 2 * rank, target_modules=["0"])
        return {"nn.Linear (frozen)": base, "PEFT lora.Linear": peft, "lora-fast": ours, "PEFT + patch_peft": patched}

    def one(what, module, M, K, N, path):
        x = torch.randn(M, K).to(dtype).requires_grad_()
        dy = torch.randn(M, N).to(dtype)
        params = [p for p in module.parameters() if p.requires_grad]

        def step():
            module(x).backward(dy)

        for t in params + [x]:
            t.grad = None
        step()   # compiles and tunes (stand-in timer) outside the timing
        before = launcher.launches
        timing = _MEASURE[0](step, repeat, number, clear=params + [x])
        launches = (launcher.launches - before) / (repeat * number)
        rows.append(dict(what=what, shape=f"{K}->{N}", M=M, path=path, launches=launches, **timing))

    shapes = [("tiny", TINY, 4)] + [(name, kn, M_big) for name, kn in _llama_shapes().items()]
    for label, (K, N), M in shapes:
        mods = modules(K, N)
        if label == "tiny":   # torch's own rows: only at the tiny shape (at M = 4096 the CPU would compute)
            for what in ("nn.Linear (frozen)", "PEFT lora.Linear"):
                one(what, mods[what], M, K, N, "-")
        for path in paths:
            choice.clear()
            forced = path
            _FORCED[0] = forced
            for what in ("lora-fast", "PEFT + patch_peft"):
                one(what, mods[what], M, K, N, path)
    return rows


_FORCED = ["triton"]


def _layer_rows(launcher, paths, rank: int, dtype, tokens: int, repeat: int, number: int) -> list:
    """Host time per decoder layer of a tiny Llama (bench/model_configs.two_layer of Llama-3.2-1B: GQA, SiLU MLP),
    from the difference between a 10-layer and a 2-layer model (embedding, head and loss cancel), forward+backward
    with gradients cleared every step. float32 and a few tokens: torch's own CPU kernels (attention, norms, the
    frozen and PEFT matmuls, which lora-fast's stubbed launches skip) then cost little beside their dispatch.

    The samples are paired, so that a slow spell of a shared machine falls on the rows it compares instead of on
    one of them: each of the ``repeat`` rounds visits the paths in turn and, for each path, takes one sample of
    ``number`` steps of the frozen, PEFT, lora-fast and patch_peft models, each with 2 and then 10 layers (the
    frozen and PEFT models, which take no path, are sampled once per path). A sample's per-layer cost is its
    10-layer time minus the 2-layer time taken just before it, over 8; min and median are taken over those
    differences, and a row's ``ratio`` is the median over the rounds of its difference over PEFT's of the same
    round and path. A path switch forgets the path choices and plans (``choice.clear()``) and runs each of the
    path's models ``_WARM`` steps untimed before its sample (the first call plans, the next records, then the
    replays run)."""
    from lora_fast.kernels import choice

    from . import model_configs, model_setups

    spec = model_configs.two_layer(model_configs.REAL["llama-3.2-1b"])
    ids = torch.randint(0, spec["vocab_size"], (1, tokens))
    models = {}   # (setup, path) -> [(step, params, LoRA layers) for 2 and 10 layers]
    for setup in ("frozen", "peft", "lora-fast", "peft+patch"):
        for path in (paths if setup in ("lora-fast", "peft+patch") else ("-",)):
            pair = []
            for layers in (2, 10):
                run = model_setups.build(setup, dict(spec, num_hidden_layers=layers), dtype)

                def step(model=run.model):
                    model_setups.loss_of(model, ids).backward()

                pair.append((step, run.params, len(run.lora_layers)))
            models[setup, path] = pair

    def warm(pair):
        for step, params, _ in pair:
            for _ in range(_WARM):
                for t in params:
                    t.grad = None
                step()

    for key in models:
        if key[1] == "-":
            warm(models[key])
    diffs = {key: [] for key in models}   # per-layer samples: (round, path, timing)
    launches = {key: [] for key in models}
    for r in range(repeat):
        for path in paths:
            choice.clear()
            _FORCED[0] = path
            for setup in ("frozen", "peft", "lora-fast", "peft+patch"):
                key = (setup, path if setup in ("lora-fast", "peft+patch") else "-")
                pair = models[key]
                if key[1] != "-":
                    warm(pair)
                small, large = [], []
                for (step, params, _), out in zip(pair, (small, large)):
                    before = launcher.launches
                    out.append(_MEASURE[0](step, 1, number, clear=params))
                    out.append((launcher.launches - before) / number)
                diffs[key].append((r, path, {k: None if small[0][k] is None else (large[0][k] - small[0][k]) / 8
                                             for k in small[0]}))
                launches[key].append((large[1] - small[1]) / 8)
    rows = []
    for (setup, path), summary in _paired(diffs).items():
        pair = models[setup, path]
        rows.append(dict(what=setup, shape=f"decoder layer ({(pair[1][2] - pair[0][2]) / 8:.0f} LoRA projections)",
                         M=tokens, path=path, launches=statistics.median(launches[setup, path]), **summary))
    return rows


def _paired(diffs: dict) -> dict:
    """_layer_rows' statistics. ``diffs``: (setup, path) -> [(round, path, {"cpu_min": .., "cpu_median": ..,
    "wall_min": .., "wall_median": ..})], one per-layer sample per round and path (PEFT's, key ("peft", "-"), once
    per round and path; a value may be None: not measured). Returns (setup, path) -> the min over the samples of
    each "*_min" value, the median of each "*_median" value, and for the lora-fast and patch_peft rows ``ratio``,
    the median over the samples of cpu_median / PEFT's cpu_median of the same round and path, with
    ``ratio_quartiles`` (first, third) when there are two samples or more."""
    peft = {(r, path): t for r, path, t in diffs["peft", "-"]}
    out = {}
    for key, samples in diffs.items():
        summary = {}
        for k in samples[0][2]:
            values = [t[k] for _, _, t in samples]
            summary[k] = None if values[0] is None else (min if k.endswith("min") else statistics.median)(values)
        if key[0] in ("lora-fast", "peft+patch"):
            ratios = [t["cpu_median"] / peft[r, p]["cpu_median"] for r, p, t in samples]
            summary["ratio"] = statistics.median(ratios)
            if len(ratios) > 1:
                q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")   # within the samples
                summary["ratio_quartiles"] = (q1, q3)
        out[key] = summary
    return out


_WARM = 3   # untimed steps of a model after a path switch: plan, record, replay


def measure(M: int = 4096, rank: int = 16, dtype=torch.bfloat16, paths=("triton", "cublas", "tma"), repeat: int = 15,
            number: int = 20, layer_tokens: int = 8, layers: bool = True, layer_dtype=torch.float32,
            instructions: bool = False, layer_rounds: int = 40) -> list:
    """Rows of {"what", "shape", "M", "path", "launches", "cpu_min", "cpu_median", "wall_min", "wall_median"} (see the
    module docstring). ``layer_dtype``: the decoder layers' (float32 by default; the TMA path takes 16-bit only).
    ``instructions``: cpu_* hold thousands of instructions executed instead of microseconds (``_instructions``; the
    process must run under callgrind, see main); the decoder layers then take ``repeat`` rounds, else
    ``layer_rounds`` (see _layer_rows). Needs TRITON_INTERPRET unset or 0."""
    patches = []

    def monkeypatch(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    launcher = _install(monkeypatch)
    from lora_fast.kernels import choice

    monkeypatch(choice, "forced_path", lambda: _FORCED[0])
    _stub_addmm(monkeypatch)
    # one intra-op thread: torch's CPU kernels (the baselines' small matmuls, gradient copies) would otherwise
    # count OpenMP workers' spin-waits in this thread's CPU time, which a GPU run never has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _MEASURE[0] = _instructions if instructions else _time
    try:
        rows = _projection_rows(launcher, paths, M, rank, dtype, repeat, number)
        if layers:
            # counts barely vary between samples: as many rounds as the projections' samples; times do, and a
            # 10-layer step is ~20x a projection's: more rounds, fewer steps each
            rows += _layer_rows(launcher, paths, rank, layer_dtype, layer_tokens,
                                repeat if instructions else layer_rounds, number if instructions
                                else max(3, number // 4))
    finally:
        _MEASURE[0] = _time
        torch.set_num_threads(threads)
        for obj, name, value in reversed(patches):
            setattr(obj, name, value)
    return rows


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _ratios(rows) -> list:
    """Each lora-fast / patch_peft row against PEFT's row of the same kind (tiny projection, or decoder layer): the
    ratio of median thread CPU times for a projection, the median of the paired ratios for a decoder layer
    (_layer_rows' ``ratio``)."""
    peft_proj = next((r for r in rows if r["what"] == "PEFT lora.Linear"), None)
    peft_layer = next((r for r in rows if r["what"] == "peft"), None)
    out = []
    for r in rows:
        ref = peft_layer if r["shape"].startswith("decoder") else peft_proj
        out.append("" if ref is None or r is ref or r["what"] in ("frozen", "nn.Linear (frozen)")
                   else f"{r['ratio'] if 'ratio' in r else r['cpu_median'] / ref['cpu_median']:.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="M of the Llama-3.2-1B projections (default 4096)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--paths", nargs="+", default=["triton", "cublas", "tma"], choices=["triton", "cublas", "tma"])
    p.add_argument("--repeat", type=int, default=None, help="samples per row (default 15; 3 with --instructions)")
    p.add_argument("--number", type=int, default=None, help="steps per sample (default 20; 3 with --instructions)")
    p.add_argument("--no-layers", action="store_true", help="skip the decoder-layer rows")
    p.add_argument("--layer-rounds", type=int, default=40,
                   help="rounds of paired decoder-layer samples, each max(3, number / 4) steps (default 40; with "
                        "--instructions the rounds are --repeat's)")
    p.add_argument("--layer-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the decoder layers' dtype (default float32: torch's CPU kernels cost least; the tma path "
                        "needs bfloat16, else it falls back to the cp.async kernel)")
    p.add_argument("--autotune", choices=("0", "1"), default="1",
                   help="LORA_FAST_AUTOTUNE for the run (1: the autotuner's cache lookup is timed)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions executed (valgrind's callgrind, thousands per step) instead of timing: "
                        "the same on a loaded machine, for comparing two versions of the code; not a time")
    args = p.parse_args(argv)
    for name in ("repeat", "number", "layer_rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.instructions and _CALLGRIND not in os.environ:
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            p.error("--instructions needs valgrind and callgrind_control on PATH")
        with tempfile.TemporaryDirectory(prefix="lora-fast-callgrind-") as folder:
            env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_FAST_AUTOTUNE": args.autotune, _CALLGRIND: folder}
            # instrumentation off until each sample turns it on: the imports and compilations run at full speed
            return subprocess.call(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                    f"--callgrind-out-file={folder}/callgrind.out", sys.executable, "-m",
                                    "bench.host_time", *argv], env=env)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("LORA_FAST_AUTOTUNE",
                                                                                 "1") != args.autotune:
        # the interpreter must be off before triton is imported: run again in a clean process
        env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_FAST_AUTOTUNE": args.autotune}
        return subprocess.call([sys.executable, "-m", "bench.host_time", *argv], env=env)
    default = 3 if args.instructions else None
    rows = measure(args.tokens, args.rank, paths=tuple(args.paths), repeat=args.repeat or default or 15,
                   number=args.number or default or 20, layers=not args.no_layers,
                   layer_dtype=getattr(torch, args.layer_dtype), instructions=args.instructions,
                   layer_rounds=args.layer_rounds)
    import triton

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    unit = "thousands of instructions executed (callgrind)" if args.instructions else "microseconds"
    print(f"host {'instructions' if args.instructions else 'time'} per forward+backward on {platform.machine()} "
          f"({os.cpu_count()} cores, load average {', '.join(f'{v:.2f}' for v in load) if load else 'n/a'}), torch "
          f"{torch.__version__}, triton {triton.__version__}, LORA_FAST_AUTOTUNE={args.autotune}, LORA_FAST_TMA_DESC="
          f"{os.environ.get('LORA_FAST_TMA_DESC', '')}; rank {args.rank}, bf16 base, fp32 adapters, decoder layers "
          f"in {args.layer_dtype}; only Triton's final launch stubbed; {unit}; ratio: median / PEFT's (decoder "
          f"layers: median of {(args.repeat or 3) if args.instructions else args.layer_rounds} paired ratios, "
          f"quartiles beside it)")
    cpu = "kinstr" if args.instructions else "cpu"
    head = (f"  {'what':<20} {'shape':<36} {'M':>5} {'path':<7} {cpu + ' min':>11} {cpu + ' med':>11} {'wall min':>9} "
            f"{'wall med':>9} {'ratio':>6} {'launches':>9} {'quartiles':>10}")
    print(head)

    def wall(v):
        return "-" if v is None else f"{v:.1f}"

    for r, ratio in zip(rows, _ratios(rows)):
        print(f"  {r['what']:<20} {r['shape']:<36} {r['M']:>5} {r['path']:<7} {r['cpu_min']:>11.1f} "
              f"{r['cpu_median']:>11.1f} {wall(r['wall_min']):>9} {wall(r['wall_median']):>9} {ratio:>6} "
              f"{r['launches']:>9.1f} {'%.2f-%.2f' % r['ratio_quartiles'] if 'ratio_quartiles' in r else '':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
