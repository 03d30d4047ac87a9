"""Host-side tensor descriptors for the persistent TMA GEMM (kernels/gemm_tma.py, HOST_DESC; issue 28).

By default the TMA kernel builds its descriptors on the GPU (``tl.make_tensor_descriptor``): each program writes up
to 8 tensor maps (P, Q, OUT, the bias, the low-rank term's L and RM, fp16's row factors, the keep-mask's bytes) into
a global scratch buffer that Triton's allocator hands out per launch (ops._scratch), and fences them before its
first TMA load. With host-side descriptors (``triton.tools.tensor_descriptor.TensorDescriptor`` arguments, opt-in:
``LORA_FAST_TMA_DESC=host``) the launch encodes each tensor map on the CPU (Triton's launcher calls
cuTensorMapEncodeTiled per descriptor argument, in triton 3.6 to 3.9) and passes it by value among the kernel's
parameters: no scratch allocation, no tensor-map creation or fence in the kernel.

A host descriptor's block shape is a tile config's (BLOCK_M x BLOCK_K for P, ...), so it is built once the config is
known: ``tma_gemm_specs`` gives every descriptor argument's (shape, strides, block shape) from the launch's argument
values and config; the autotuner's configs carry ``set_block_shapes`` as their pre-hook (Triton's own recipe for
autotuned host descriptors); a launch plan (ops._Launcher) keeps the specs, which its key fixes (the integer
arguments, the constexprs, the config), and builds each launch's descriptors from that call's tensors (``make``).
"""

import os

import triton
from triton.tools.tensor_descriptor import TensorDescriptor

ENV = "LORA_FAST_TMA_DESC"
MODES = ("device", "host")


def mode() -> str:
    """The TMA GEMM's descriptors, from LORA_FAST_TMA_DESC: "device" (unset, empty or "device": built by each program
    on the GPU, the default) or "host" (built by the launch on the CPU; opt-in until a GPU has run it). Raises
    ValueError for another value."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "device"):
        return "device"
    if value != "host":
        raise ValueError(f"{ENV}: expected one of {', '.join(MODES)} (where the TMA GEMM's tensor descriptors are "
                         f"built); got {value!r}")
    return value


class _Planned(TensorDescriptor):
    """A TensorDescriptor for a planned launch (``make``): its four per-call fields in slots, set without the
    dataclass's checks (the launchers checked the layout before: the 16-byte alignment of the base and rows, unit inner
    strides, ops.tma_eligible and _rm_layout; a launch plan's key fixes the rest); zero padding, no TF32 rounding.
    0.9 us to build here against 2.7 us for the dataclass's own instance without its checks (this 2-core machine
    under load, timeit), per descriptor and launch."""

    __slots__ = ("base", "shape", "strides", "block_shape")
    padding = "zero"
    round_f32_to_tf32 = False   # a field of triton 3.9's TensorDescriptor (not 3.6's), read by its launcher

    def __init__(self, base, shape, strides, block_shape):
        self.base, self.shape, self.strides, self.block_shape = base, shape, strides, block_shape


def make(base, shape, strides, block_shape) -> TensorDescriptor:
    """The host descriptor of a planned launch (a launch plan's or a replay's): ``base`` with the plan's shape, strides
    and block shape (lists, as Triton's launcher reads them), zero padding. Only Triton's launcher reads it (no JIT
    binding: a first launch gets the dataclass itself, ``wrap``)."""
    return _Planned(base, shape, strides, block_shape)


def tma_gemm_specs(v: dict) -> dict:
    """{argument name: (shape, strides, block shape)} of the arguments of ``gemm_lowrank_tma_kernel`` passed as host
    descriptors, from ``v``: its argument values by name, the config's included. Empty without HOST_DESC. The same
    descriptors the kernel builds on the device otherwise (gemm_tma.py), operand by operand."""
    if not v.get("HOST_DESC"):
        return {}
    M, N, K, R = v["M"], v["N"], v["K"], v["R"]
    bm, bn, bk, br = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_K"], v["BLOCK_R"]
    specs = {"P_ptr": ([M, K], [v["stride_pm"], 1], [bm, bk]),
             "Q_ptr": (([N, K], [v["stride_qrow"], 1], [bn, bk]) if v["Q_TRANSPOSED"]
                       else ([K, N], [v["stride_qrow"], 1], [bk, bn])),
             "OUT_ptr": ([M, N], [v["stride_om"], 1], [bm, bn // v["SUBTILE"]])}
    if v["HAS_BIAS"] and v["BIAS_TMA"]:
        specs["BIAS_ptr"] = ([N], [1], [bn])
    if v["LOWRANK_TMA"]:
        specs["L_ptr"] = ([M, R], [v["stride_lm"], 1], [bm, br])
        specs["RM_ptr"] = (([N, R], [v["stride_rn"], 1], [bn, br]) if v["RM_ROWS_N"]
                           else ([R, N], [v["stride_rr"], 1], [br, bn]))
        if v["DOT_DTYPE"] == triton.language.float16:
            specs["F_ptr"] = ([M], [1], [bm])
        if v["MASK_TMA"] and bn >= 128:   # the kernel's own condition (a tile row's bytes reach the box's 16)
            specs["MASK_ptr"] = ([M, -(-N // 8)], [v["stride_mask"], 1], [bm, bn // 8])
    return specs


def wrap(arg_names, args: tuple, values: dict) -> tuple:
    """``args`` (the kernel's positional arguments, tensors) with the host descriptors of ``tma_gemm_specs(values)`` in
    their tensors' places, for a launch through Triton's JIT or autotuner (the first of a launch plan, or
    interpreted)."""
    specs = tma_gemm_specs(values)
    if not specs:
        return args
    out = list(args)
    for pos, name in enumerate(arg_names[:len(args)]):
        spec = specs.get(name)
        if spec is not None:   # the dataclass with its checks (alignment, block shape): the JIT types it
            shape, strides, block = spec
            out[pos] = TensorDescriptor(args[pos], list(shape), list(strides), list(block))
    return tuple(out)


def plan_specs(arg_names, args: tuple, values: dict) -> tuple:
    """The host descriptors of a launch plan: ((position, shape, strides, block shape), ...), fixed by the plan's key
    (the integer arguments, the constexprs, the config), so that each planned launch only puts its own tensors in."""
    specs = tma_gemm_specs(values)
    return tuple((pos, *specs[name]) for pos, name in enumerate(arg_names[:len(args)]) if name in specs)


def set_block_shapes(nargs: dict) -> None:
    """An autotune config's pre-hook: each host descriptor argument of ``nargs`` (the arguments with the config's
    values) gets the config's block shape before the launch, as Triton's tutorials do for autotuned host
    descriptors."""
    for name, (_, _, block) in tma_gemm_specs(nargs).items():
        desc = nargs[name]
        if not isinstance(desc, TensorDescriptor):
            raise TypeError(f"set_block_shapes: argument {name} is a {type(desc).__name__}, not the host descriptor "
                            f"config {nargs.get('BLOCK_M')} x {nargs.get('BLOCK_N')} expects")
        desc.block_shape = list(block)


def with_pre_hook(configs: list) -> list:
    """Copies of ``configs`` (triton.Config) with ``set_block_shapes`` as their pre-hook."""
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, num_ctas=c.num_ctas,
                          maxnreg=c.maxnreg, pre_hook=set_block_shapes) for c in configs]
