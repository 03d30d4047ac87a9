"""Per launch: lora-fast's kernels as a profiler times them on a GPU, beside the cost model's bound of each.

The cost model (bench/cost_model.py) lists lora-fast's launches in the order kernels/ops.py makes them, each
with the Triton kernel it runs; ``profile_step`` records the CUDA kernels of forward+backward calls with
torch.profiler, and ``pair`` lines the two lists up in order. A list that does not line up (another number of
launches, or another kernel at some position) is reported as such, never forced into pairs: it means the cost
model no longer describes what the launchers do.
"""

from typing import Dict, List, Sequence, Tuple

from . import cost_model

# lora_linear_multi's kernels (kernels/multi.py; cost_model.multi_kernels "lora-fast-multi"): a layer step with n
# adapters in the batch launches these five, whatever n (issue 30: the adapters are read where they live through
# the layer's kept adapter table, no stack or pad per step; tests/test_multi.py counts them on the CPU)
MULTI_KERNEL_NAMES = ("multi_proj_kernel", "multi_gemm_kernel", "multi_reduce_kernel")
MULTI_STEP_LAUNCHES = 5   # S, y; dS, dX, dA and dB (x requiring grad; 4 without dX)
KERNEL_NAMES = (cost_model.GEMM, cost_model.PROJ, cost_model.REDUCE, cost_model.FINISH) + MULTI_KERNEL_NAMES


def profile_step(forward, x, trainable, dy=None, repeats: int = 5) -> List[Tuple[str, float]]:
    """lora-fast's kernel launches in one forward+backward of ``forward(x)``: [(kernel name, mean device time in
    microseconds over ``repeats`` profiled steps)], in launch order. CUDA only (torch.profiler's CUDA activity).

    Raises RuntimeError when the steps launch different sequences (the plan changed between steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    y = forward(x)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)   # the first call plans / autotunes: outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            for t in trainable:
                t.grad = None
            forward(x).backward(dy)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and _kernel(e.name)),
                    key=lambda e: e.time_range.start)
    names = [_kernel(e.name) for e in events]
    times = [float(getattr(e, "device_time", None) or e.cuda_time) for e in events]
    return average_steps(names, times, repeats)


def _kernel(name: str) -> str:
    return next((k for k in KERNEL_NAMES if name.startswith(k)), "")


def average_steps(names: Sequence[str], times: Sequence[float], repeats: int) -> List[Tuple[str, float]]:
    """Split a profile of ``repeats`` identical steps into steps and average each launch's time over them."""
    if repeats < 1 or len(names) % repeats:
        raise RuntimeError(f"{len(names)} launches do not split into {repeats} equal steps")
    n = len(names) // repeats
    steps = [list(names[i * n:(i + 1) * n]) for i in range(repeats)]
    if any(s != steps[0] for s in steps):
        raise RuntimeError(f"the profiled steps launched different kernels: {steps}")
    return [(steps[0][j], sum(times[i * n + j] for i in range(repeats)) / repeats) for j in range(n)]


def pair(kernels: Sequence[cost_model.Kernel], profiled: Sequence[Tuple[str, float]], gemm_flops_per_s: float,
         copy_bytes_per_s: float) -> Tuple[List[Dict], str]:
    """Rows {launch, kernel, bound_us, measured_us, x_bound} pairing the cost model's launches with the profiled
    ones in order, and "" when they line up; otherwise no rows and a message saying where they part."""
    expected = [k.launch for k in kernels]
    got = [name for name, _ in profiled]
    if expected != got:
        at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        return [], (f"the cost model's {len(expected)} launches and the profile's {len(got)} part at launch {at}: "
                    f"model {expected}, profile {got}")
    rows = []
    for k, (_, us) in zip(kernels, profiled):
        bound_us = k.time(gemm_flops_per_s, copy_bytes_per_s) * 1e6
        rows.append(dict(launch=k.name, kernel=k.launch, bound_us=bound_us, measured_us=us,
                         x_bound=us / bound_us if bound_us > 0 else float("nan")))
    return rows, ""
