"""Host time per call, measured on a machine without a GPU: ``python -m bench.host_time``.

What runs: lora_fast.lora_linear forward and backward on CPU tensors of real shapes, through the whole Triton
path (input checks, autograd, lora-fast's launchers, the autotuner's cache lookup, Triton's JIT dispatch:
argument binding, specialisation key, kernel cache), with only Triton's final launch stubbed: a stand-in
Triton driver reports an sm_90 device (132 SMs), compiles every kernel for real (ptxas, as on a GPU), and its
launcher returns without launching. torch.cuda's capability and property queries are answered for that
device. Everything the host does per call on a GPU therefore runs, except the CUDA driver's own launch call
(cuLaunchKernel, a few microseconds per launch) and torch's CUDA allocator (the CPU allocator runs instead).
The autotuner is given a stand-in benchmark (every config times 1 ms, so the first is kept): tuning itself
is not timed, only its cache lookup.

Rows: lora-fast forward, backward (one loss.backward() minus its forward), and Triton's own dispatch of one
kernel launch (JITFunction.run with the stub), beside F.linear's forward and backward on tiny tensors (torch's
dispatch floor) and at the same shapes. Medians of repeated calls, in microseconds, on this CPU; the numbers
depend on the machine and its load (the load average is printed with them).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import torch


def _stub_driver():
    """A Triton driver for an sm_90 device whose launcher does nothing (see the module docstring)."""
    from triton.backends.compiler import GPUTarget

    class StubLauncher:
        launches = 0
        record = None   # a list to append (kernel name, current CUDA device, launch arguments) to, or None

        def __init__(self, src, metadata):
            self.name = getattr(src, "name", "?")

        def __call__(self, *args, **kwargs):
            StubLauncher.launches += 1
            if StubLauncher.record is not None:
                StubLauncher.record.append((self.name, torch.cuda.current_device(), args))

    class StubDriver:
        launcher_cls = StubLauncher

        def __init__(self):
            props = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                     "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}
            self.utils = types.SimpleNamespace(
                load_binary=lambda name, kernel, shared, device: (None, None, 128, 0, 1024),
                unload_module=lambda module: None, get_device_properties=lambda device: props)

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
    # the fused cp.async GEMM, as LORA_FAST_GEMM=triton: nothing can be timed to choose a path without a GPU
    from lora_fast.kernels import choice

    monkeypatch(choice, "forced_path", lambda: "triton")
    choice.clear()
    monkeypatch(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [1.0, 1.0, 1.0])
    return launcher


def _time_us(fn, repeat: int, number: int) -> tuple:
    """(median, min) over ``repeat`` runs of the per-call time of ``number`` calls, in microseconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(samples), min(samples)


def measure(M_list=(1, 4, 16), K=4096, N=4096, rank=16, dtype=torch.bfloat16, repeat=21, number=50) -> list:
    """Rows of {"what", "M", "median_us", "min_us", "launches"} (see the module docstring). Needs
    TRITON_INTERPRET unset or 0."""
    from lora_fast import lora_linear
    from lora_fast.kernels import gemm

    patches = []

    def monkeypatch(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    launcher = _install(monkeypatch)
    rows = []

    def row(what, M, timing, launches=None):
        rows.append(dict(what=what, M=M, median_us=timing[0], min_us=timing[1], launches=launches))

    try:
        weight = torch.randn(N, K).to(dtype)
        bias = torch.randn(N).to(dtype)
        A = (torch.randn(K, rank) / K**0.5).requires_grad_()
        B = torch.randn(rank, N).requires_grad_()
        tiny_w, tiny_x = torch.randn(8, 8), torch.randn(1, 8, requires_grad=True)
        row("F.linear forward, 1x8 @ 8x8 fp32 (torch's dispatch floor)", 1,
            _time_us(lambda: torch.nn.functional.linear(tiny_x, tiny_w), repeat, number * 4))
        tiny = _time_us(lambda: torch.nn.functional.linear(tiny_x, tiny_w).sum().backward(), repeat, number)
        row("F.linear forward+backward (with a sum), 1x8 @ 8x8 fp32", 1, tiny)
        for M in M_list:
            x = torch.randn(M, K).to(dtype).requires_grad_()
            dy = torch.randn(M, N).to(dtype)

            def forward(x=x):
                return lora_linear(x, weight, bias, A, B, 2.0)

            def step(x=x, dy=dy):
                forward(x).backward(dy)

            step()          # compiles every kernel (and fills the autotuner's cache) before timing
            before = launcher.launches
            fwd = _time_us(forward, repeat, number)
            forward_launches = (launcher.launches - before) / (repeat * number)
            before = launcher.launches
            both = _time_us(step, repeat, number)
            step_launches = (launcher.launches - before) / (repeat * number)
            row("lora-fast forward", M, fwd, forward_launches)
            row("lora-fast backward (forward+backward minus forward)", M, (both[0] - fwd[0], both[1] - fwd[1]),
                step_launches - forward_launches)
        x = torch.randn(16, K).to(dtype)
        out = torch.empty(16, N, dtype=dtype)
        S = torch.zeros(16, rank)

        def triton_only():
            gemm.gemm_lowrank_kernel[(1,)](
                x, weight, bias, S, B, out, out, 16, N, K, rank, 16, x.stride(0), x.stride(1), weight.stride(1),
                weight.stride(0), S.stride(0), S.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
                2.0, 0.0, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, GROUP_M=8, HAS_BIAS=True,
                HAS_DROPOUT=False, DOT_DTYPE=_tl_dtype(dtype), INPUT_PRECISION="ieee", num_warps=4, num_stages=3)

        triton_only()
        row("Triton's own JIT dispatch of one launch (kernel[grid](...), stubbed launch)", 16,
            _time_us(triton_only, repeat, number), 1)
    finally:
        for obj, name, value in reversed(patches):
            setattr(obj, name, value)
    return rows


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16], help="M values (default 1 4 16)")
    p.add_argument("--features", nargs=2, type=int, default=[4096, 4096], metavar=("IN", "OUT"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--autotune", choices=("0", "1"), default="1",
                   help="LORA_FAST_AUTOTUNE for the run (1: the autotuner's cache lookup is timed)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("LORA_FAST_AUTOTUNE",
                                                                                 "1") != args.autotune:
        # the interpreter must be off before triton is imported: run again in a clean process
        env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_FAST_AUTOTUNE": args.autotune}
        return subprocess.call([sys.executable, "-m", "bench.host_time", *(argv if argv is not None else
                                                                           sys.argv[1:])], env=env)
    rows = measure(tuple(args.tokens), args.features[0], args.features[1], args.rank)
    import triton

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"host time per call on {platform.machine()} ({os.cpu_count()} cores, load average "
          f"{', '.join(f'{v:.2f}' for v in load) if load else 'n/a'}), torch {torch.__version__}, triton "
          f"{triton.__version__}, LORA_FAST_AUTOTUNE={args.autotune}; {args.features[0]}->{args.features[1]}, "
          f"rank {args.rank}, bf16; only Triton's final launch stubbed")
    print(f"  {'':<78} {'M':>3} {'median us':>10} {'min us':>8} {'launches':>9}")
    for r in rows:
        launches = "" if r["launches"] is None else f"{r['launches']:.0f}"
        print(f"  {r['what']:<78} {r['M']:>3} {r['median_us']:>10.1f} {r['min_us']:>8.1f} {launches:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
