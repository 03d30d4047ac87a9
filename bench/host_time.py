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

        def __init__(self, src, metadata):
            pass

        def __call__(self, *args, **kwargs):
            StubLauncher.launches += 1

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
    monkeypatch(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch(functional, "select_backend", lambda x: "triton")
    monkeypatch(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [1.0, 1.0, 1.0])
    return launcher


def _median_us(fn, repeat: int, number: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(samples)


def measure(M_list=(1, 4, 16), K=4096, N=4096, rank=16, dtype=torch.bfloat16, repeat=15, number=40) -> list:
    """Rows of {"what", "M", "us"} (see the module docstring). Needs TRITON_INTERPRET unset or 0."""
    from lora_fast import lora_linear

    patches = []

    def monkeypatch(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    launcher = _install(monkeypatch)
    rows = []
    try:
        weight = torch.randn(N, K).to(dtype)
        bias = torch.randn(N).to(dtype)
        A = (torch.randn(K, rank) / K**0.5).requires_grad_()
        B = torch.randn(rank, N).requires_grad_()
        tiny_w, tiny_x = torch.randn(8, 8), torch.randn(1, 8, requires_grad=True)
        rows.append(dict(what="F.linear forward, 1x8 @ 8x8 fp32 (torch dispatch floor)", M=1,
                         us=_median_us(lambda: torch.nn.functional.linear(tiny_x, tiny_w), repeat, number * 5)))

        def tiny_step():
            torch.nn.functional.linear(tiny_x, tiny_w).sum().backward()

        rows.append(dict(what="F.linear forward+backward, 1x8 @ 8x8 fp32", M=1, us=_median_us(tiny_step, repeat, number)))
        for M in M_list:
            x = torch.randn(M, K).to(dtype).requires_grad_()
            dy = torch.randn(M, N).to(dtype)

            def forward():
                return lora_linear(x, weight, bias, A, B, 2.0)

            def step():
                forward().backward(dy)

            forward()
            step()          # compiles every kernel (and fills the autotuner's cache) before timing
            before = launcher.launches
            fwd = _median_us(forward, repeat, number)
            both = _median_us(step, repeat, number)
            calls = repeat * number
            launches = (launcher.launches - before) / (2 * calls)
            rows.append(dict(what="lora-fast forward", M=M, us=fwd))
            rows.append(dict(what="lora-fast backward (forward+backward - forward)", M=M, us=both - fwd))
            rows.append(dict(what="kernel launches per forward+backward", M=M, us=launches * 2 - 0))
            with torch.no_grad():
                rows.append(dict(what="F.linear forward at this shape (CPU matmul: compute, not dispatch)", M=M,
                                 us=_median_us(lambda: torch.nn.functional.linear(x, weight, bias), 5, 5)))
        from lora_fast.kernels import gemm

        x = torch.randn(16, K).to(dtype)
        out = torch.empty(16, N, dtype=dtype)
        S = torch.zeros(16, rank)
        kernel = gemm.gemm_lowrank_kernel

        def triton_only():
            kernel[(1,)](x, weight, bias, S, B, out, out, 16, N, K, rank, 16,
                         x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), S.stride(0), S.stride(1),
                         B.stride(0), B.stride(1), out.stride(0), out.stride(1), 2.0, 0.0,
                         BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, GROUP_M=8, HAS_BIAS=True,
                         HAS_DROPOUT=False, DOT_DTYPE=_tl_dtype(dtype), INPUT_PRECISION="ieee",
                         num_warps=4, num_stages=3)

        triton_only()
        rows.append(dict(what="Triton's own dispatch of one launch (JITFunction.run, stubbed launch)", M=16,
                         us=_median_us(triton_only, repeat, number)))
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
    print(f"host time per call, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{load}, torch {torch.__version__}, triton {triton.__version__}, LORA_FAST_AUTOTUNE={args.autotune}; "
          f"{args.features[0]}->{args.features[1]}, rank {args.rank}, bf16; only Triton's final launch stubbed")
    for row in rows:
        print(f"  {row['what']:<72} M={row['M']:<3} {row['us']:9.1f}"
              + ("" if "launches" in row["what"] else " us"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
