"""Launchers of the fused LoRA linear: forward 2 launches (S = dropout(x) A, the GEMM), backward 3 (dS with dB, the
dX GEMM, dA); each narrow pass finishes its own reductions (kernels/lowrank.py).

Shapes: x (M, K), weight (N, K) as nn.Linear stores it, bias (N,), A (K, R), B (R, N), dy (M, N).
Maths: LoRA, Hu et al. 2021, eq. 3, y = x W^T + b + scale * dropout(x) A B, with dropout on the LoRA input
as PEFT applies it. Every tensor is passed with its strides; nothing is copied or transposed.
"""

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver

from .. import philox
from . import choice, configs, descriptors, plan
from .gemm import gemm_lowrank_kernel
from .gemm_tma import gemm_lowrank_tma_kernel
from .lowrank import lowrank_proj_kernel, reduce_m_kernel, sum_partials_kernel
from .rng import packed_keep_mask


def _autotuning() -> bool:
    """LORA_FAST_AUTOTUNE=0 launches each kernel's first config without tuning (test runs with many shapes)."""
    return os.environ.get("LORA_FAST_AUTOTUNE", "1") != "0"


# Triton decides at decoration time (when these modules were imported) whether kernels are interpreted
_INTERPRETED = configs.interpreting()
_PLAN_LIMIT = 4096   # launch plans kept per kernel (one per distinct shape, stride and alignment pattern)


class _device_guard:
    """Make ``device`` the current CUDA device for a launch (Triton launches on the current device and its
    current stream); a no-op when it already is."""

    __slots__ = ("index", "previous")

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        self.previous = torch.cuda.current_device()
        if self.previous != self.index:
            torch.cuda.set_device(self.index)

    def __exit__(self, *exc):
        if self.previous != self.index:
            torch.cuda.set_device(self.previous)


class _Launcher:
    """A kernel with one fixed config under the interpreter and per-architecture autotuning on a GPU.

    On a GPU the first call for a given (device, argument specialisation, grid, constexprs) goes through
    Triton's autotuner and JIT (compiling, tuning); it leaves a launch plan: the compiled kernel, the resolved
    grid and the values of the constexpr and config arguments. Later calls with the same key launch the
    compiled kernel directly (Triton's own launch protocol, the same in triton 3.6 to 3.9), on the tensors'
    device and its current stream: no autotuner key, no JIT binding, no capability query, no environment read.
    """

    def __init__(self, kernel, configs_fn, key, interp_config, *, pointers: int, scalars: int,
                 host_descriptors: bool = False):
        self.kernel = kernel
        # the TMA GEMM's host-side descriptors (kernels/descriptors.py): tensors wrapped once the config is known
        self.host_descriptors = host_descriptors
        self.configs_fn = configs_fn
        self.key = key
        self.interp_config = interp_config
        # the kernel's signature groups: ``pointers`` tensors first, ``scalars`` floats last, integers between
        self.pointers, self.scalars = pointers, scalars
        self._plans = {}

    def __call__(self, grid, *args, device: torch.device, dtype: torch.dtype, **kwargs):
        if _INTERPRETED:
            rec = plan.recorder()
            if rec is not None:
                rec.fail()   # interpreted launches are not compiled kernels: nothing to replay
            if self.host_descriptors:
                args = descriptors.wrap(self.kernel.arg_names, args, {**dict(zip(self.kernel.arg_names, args)),
                                                                      **kwargs, **self.interp_config})
            return self.kernel[grid](*args, **kwargs, **self.interp_config)
        index = device.index if device.index is not None else torch.cuda.current_device()
        # what Triton specialises on: each pointer's dtype and 16-byte alignment, each integer's value (== 1,
        # divisibility by 16), the constexprs; the float scalars are runtime values
        plan_key = (index, *[(t.dtype, t.data_ptr() & 15 == 0) for t in args[:self.pointers]],
                    args[self.pointers:len(args) - self.scalars], grid if isinstance(grid, tuple) else None,
                    *kwargs.items())
        launch_plan = self._plans.get(plan_key)
        if launch_plan is None:
            with _device_guard(index):
                launch_plan = self._plan(grid, args, kwargs, device, dtype)
            if len(self._plans) >= _PLAN_LIMIT:
                self._plans.clear()
            self._plans[plan_key] = launch_plan
            rec = plan.recorder()
            if rec is not None:
                rec.fail()   # this call compiled or tuned: the next call with this metadata is recorded instead
            return   # the planning call launched the kernel
        compiled, g0, g1, g2, tail, current_stream, specs = launch_plan
        if specs:   # host descriptors of this call's tensors (the plan fixes their shapes, strides, block shapes)
            args = list(args)
            for pos, shape, strides, block in specs:
                args[pos] = descriptors.make(args[pos], shape, strides, block)
        bound = (*args, *tail)
        runtime = knobs.runtime
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        # launch metadata only for a profiler's hook (an empty HookChain in triton 3.9, None in older versions)
        hooked = enter_hook is not None and getattr(enter_hook, "calls", True)
        # _device_guard written out (no guard object per launch: host time)
        previous = torch.cuda.current_device()
        if previous != index:
            torch.cuda.set_device(index)
        try:
            stream = current_stream(index)
            metadata = compiled.launch_metadata((g0, g1, g2), stream, *bound) if hooked else None
            compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook,
                         exit_hook, *bound)
        finally:
            if previous != index:
                torch.cuda.set_device(previous)
        if plan.RECORDING[0]:
            rec = plan.recorder()
            if rec is not None:
                rec.launch(compiled, (g0, g1, g2), args, tail, index, current_stream)

    def _plan(self, grid, args, kwargs, device, dtype):
        """Launch through Triton's autotuner / JIT once and return the launch plan of this call."""
        capability = torch.cuda.get_device_capability(device)
        names = self.kernel.arg_names
        tensors = args
        if not _autotuning():
            config = self.configs_fn(capability, dtype)[0]
            if self.host_descriptors:
                args = descriptors.wrap(names, args, {**dict(zip(names, args)), **kwargs, **config.all_kwargs()})
            compiled = self.kernel[grid](*args, **kwargs, **config.all_kwargs())
        else:
            if self.host_descriptors:   # the first config's block shapes; each config's pre-hook sets its own
                first = self.configs_fn(capability, dtype)[0]
                args = descriptors.wrap(names, args, {**dict(zip(names, args)), **kwargs, **first.all_kwargs()})
            # the config measured once per machine and agreed across ranks (kernels/choice.py's Tuning)
            compiled, config = choice.TUNING.launch(self, grid, args, kwargs, device, capability, dtype)
        values = {**dict(zip(names, tensors)), **kwargs, **config.kwargs}
        tail = tuple(values[name] for name in names[len(args):])
        resolved = tuple(grid(values) if callable(grid) else grid) + (1, 1)
        specs = descriptors.plan_specs(names, tensors, values) if self.host_descriptors else ()
        # the active driver's stream query, bound once (driver.active is a lazy proxy: slow to go through per launch)
        return compiled, resolved[0], resolved[1], resolved[2], tail, driver.active.get_current_stream, specs


_gemm = _Launcher(gemm_lowrank_kernel, configs.gemm_configs, ["M_BUCKET", "N", "K", "R"],
                  dict(configs.INTERP_GEMM, num_warps=4, num_stages=1), pointers=7, scalars=1)
# dX without dropout: the same configs, its own tuning. The autotuner's key (M bucket, N, K, R, dtypes) cannot
# tell the forward (W read as W^T) from dX (W read as stored) when in = out, and the best tile differs
_gemm_dx = _Launcher(gemm_lowrank_kernel, configs.gemm_configs, ["M_BUCKET", "N", "K", "R"],
                     dict(configs.INTERP_GEMM, num_warps=4, num_stages=1), pointers=7, scalars=1)
# dX with dropout: the same kernel with smaller tiles (configs.gemm_configs(dropout=True): no spills)
_gemm_dropout = _Launcher(gemm_lowrank_kernel, functools.partial(configs.gemm_configs, dropout=True),
                          ["M_BUCKET", "N", "K", "R"], dict(configs.INTERP_GEMM, num_warps=4, num_stages=1),
                          pointers=7, scalars=1)
# the persistent TMA GEMM (sm_90+, aligned operands): forward, dX, dX with dropout tuned apart, and per padded
# rank, whose operands' shared memory prunes the configs (configs.gemm_tma_configs)
_TMA_INTERP = dict(configs.INTERP_GEMM, SUBTILE=2, num_warps=4, num_stages=1)
_tma_launchers = {}


def _tma_launcher(kind: str, block_r: int, host: bool, rm_fp32: bool = False) -> "_Launcher":
    """``host``: the kernel with host-side descriptors (kernels/descriptors.py), whose configs set the descriptors'
    block shapes before each launch of the autotuner (their pre-hook). ``rm_fp32``: the term by pointer loads of
    fp32 RM (fp32 adapters without the pass's copy), whose fp32 tiles take shared memory of their own
    (configs.tma_shared_bytes): its own, smaller config list."""
    key = (kind, block_r, host, rm_fp32)
    launcher = _tma_launchers.get(key)
    if launcher is None:
        configs_fn = functools.partial(configs.gemm_tma_configs, dropout=kind == "dropout", block_r=block_r,
                                       rm_fp32=rm_fp32)
        if host:
            def configs_fn(capability, dtype, plain=configs_fn):
                return descriptors.with_pre_hook(plain(capability, dtype))
        launcher = _Launcher(gemm_lowrank_tma_kernel, configs_fn, ["M_BUCKET", "N", "K", "R"], _TMA_INTERP,
                             pointers=8, scalars=1, host_descriptors=host)
        _tma_launchers[key] = launcher
    return launcher


# the low-rank term alone (K = 0) before cuBLAS's addmm (choice.py's "cublas" path): its own tuning
_term = _Launcher(gemm_lowrank_kernel, configs.gemm_configs, ["M_BUCKET", "N", "K", "R"],
                  dict(configs.INTERP_GEMM, num_warps=4, num_stages=1), pointers=7, scalars=1)
_term_dropout = _Launcher(gemm_lowrank_kernel, functools.partial(configs.gemm_configs, dropout=True),
                          ["M_BUCKET", "N", "K", "R"], dict(configs.INTERP_GEMM, num_warps=4, num_stages=1),
                          pointers=7, scalars=1)
_proj = _Launcher(lowrank_proj_kernel, configs.proj_configs, ["M_BUCKET", "K", "R"],
                  dict(BLOCK_K=configs.INTERP_PROJ_BLOCK["BLOCK_K"], num_warps=4, num_stages=1), pointers=16, scalars=5)
# x @ A with dropout: its own config list (configs.proj_configs(dropout=True): no spills)
_proj_dropout = _Launcher(lowrank_proj_kernel, functools.partial(configs.proj_configs, dropout=True),
                          ["M_BUCKET", "K", "R"], dict(BLOCK_K=configs.INTERP_PROJ_BLOCK["BLOCK_K"], num_warps=4,
                                                       num_stages=1), pointers=16, scalars=5)
# dS = dY B^T finishing dB: its own config list (configs.proj_configs(partials=True): no spills)
_proj_partials = _Launcher(lowrank_proj_kernel, functools.partial(configs.proj_configs, partials=True),
                           ["M_BUCKET", "K", "R"], dict(BLOCK_K=configs.INTERP_PROJ_BLOCK["BLOCK_K"], num_warps=4,
                                                        num_stages=1), pointers=16, scalars=5)
# the same with fp32 adapters on a 16-bit dY (Q = B^T fp32): configs.proj_configs(partials=True, q_fp32=True)
_proj_partials_q32 = _Launcher(lowrank_proj_kernel, functools.partial(configs.proj_configs, partials=True, q_fp32=True),
                               ["M_BUCKET", "K", "R"], dict(BLOCK_K=configs.INTERP_PROJ_BLOCK["BLOCK_K"], num_warps=4,
                                                            num_stages=1), pointers=16, scalars=5)
_reduce = _Launcher(reduce_m_kernel, configs.reduce_configs, ["M_BUCKET", "K", "R"], dict(num_warps=4, num_stages=1),
                    pointers=6, scalars=1)
_finish = _Launcher(sum_partials_kernel, configs.finish_configs, [], dict(num_warps=4, num_stages=1),
                    pointers=2, scalars=1)


# The kernels offset a block along K in int64 and within it in int32: offs_k * stride < BLOCK_K * stride must
# stay below 2**31, so an operand whose stride along K reaches 2**31 / 128 (BLOCK_K up to 128) is copied first
# (a column-major x of 16M rows or more, a weight of 16M in_features: never seen in practice)
_K_STRIDE_LIMIT = 2**24


def _empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, seen by a recording (kernels/plan.py) as a buffer each replay allocates afresh."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if plan.RECORDING[0]:
        rec = plan.recorder()
        if rec is not None:
            rec.alloc(t)
    return t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(t) (t's strides when t is dense: a gradient in its input's layout), seen by a recording
    as ``_empty``'s buffers are. For dA / dB: a transposed view of a contiguous parameter (PEFT's lora_A.weight.t())
    gets a gradient whose transpose is contiguous, which autograd's accumulation keeps as the parameter's .grad;
    a contiguous gradient of such a view would be copied into the parameter's layout (one more kernel)."""
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    if plan.RECORDING[0]:
        rec = plan.recorder()
        if rec is not None:
            rec.alloc(out)
    return out


def _along_k(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.contiguous() if t.stride(dim) >= _K_STRIDE_LIMIT else t


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)   # plain Python: triton.cdiv is a constexpr function in triton 3.9 (slow to call)


def _m_bucket(M: int) -> int:
    return max(16, 1 << (M - 1).bit_length())   # next power of two


def _proj_block_m() -> int:
    return configs.INTERP_PROJ_BLOCK["BLOCK_M"] if _INTERPRETED else configs.PROJ_BLOCK_M


def _copy_n(block_r: int) -> int:
    """Columns of RM per copy program (lowrank.py's COPY_RM): configs.COPY_RM_ELEMENTS per program on a GPU, 16
    interpreted (several programs on the tests' small shapes)."""
    return 16 if _INTERPRETED else max(16, configs.COPY_RM_ELEMENTS // block_r)


def _reduce_blocks(dtype):
    if _INTERPRETED:
        return configs.INTERP_REDUCE_BLOCK["BLOCK_M"], configs.INTERP_REDUCE_BLOCK["BLOCK_K"]
    return configs.reduce_blocks(dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _splits(M: int, K: int, block_m: int, block_k: int, device: torch.device) -> int:
    """Row splits of a reduction over M: enough programs for two waves of the GPU (two splits interpreted)."""
    row_blocks = _cdiv(M, block_m)
    if _INTERPRETED:
        return min(2, row_blocks)
    programs = 2 * _sm_count(device)
    return max(1, min(row_blocks, _cdiv(programs, _cdiv(K, block_k))))


@functools.lru_cache(maxsize=4096)   # a pure function of its arguments, called twice per step (host time)
def _proj_layout(M: int, K: int, R: int, block_m: int, device: torch.device, partials: bool):
    """(rows per program, columns per program) of a narrow pass (configs.proj_layout). Interpreted: two K splits,
    and two row blocks per group when there are partials, so that every path runs in the tests."""
    if _INTERPRETED:
        quantum = configs.INTERP_PROJ_BLOCK["BLOCK_K"]
        splits = max(1, min(2, _cdiv(K, quantum)))
        return (2 if partials else 1) * block_m, _cdiv(_cdiv(K, splits), quantum) * quantum
    return configs.proj_layout(M, K, R, block_m, _sm_count(device), partials)


class _Counters:
    """The int32 tickets of the narrow passes' in-kernel reductions (kernels/lowrank.py), per device and stream:
    zero between launches (the last program of each counter puts it back), so one zeroed buffer serves every
    launch of a stream in turn; launches on two streams at once get two buffers. Grown (a fresh zeroed buffer)
    when a launch needs more counters than it holds."""

    def __init__(self):
        self._buffers = {}

    def get(self, device: torch.device, count: int) -> torch.Tensor:
        if _INTERPRETED:
            key = (device, 0)
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            key = (index, driver.active.get_current_stream(index))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
            self._buffers[key] = buffer
        if plan.RECORDING[0]:
            rec = plan.recorder()
            if rec is not None:
                rec.constant(buffer)
        return buffer


COUNTERS = _Counters()


def lowrank_project(P, Q, stride_qk, stride_qr, R, *, out_scale=1.0, dropout_p=0.0, seed=None, partial_of=None,
                    grad=None, grad_scale=1.0, keep_out=None, term=None, term2=None):
    """OUT (M, R) fp32 = out_scale * (keep ⊙ P) @ Q, Q given by (pointer tensor, strides) of shape (K, R), in one
    launch. Returns (OUT, ``grad`` or None).

    With dropout (``dropout_p`` > 0, the keep-mask of ``seed``) and ``keep_out``, a uint8 (M,
    ``philox.mask_row_bytes(K)``) tensor, the launch also stores the mask it drew there, bit-packed
    (``philox.pack_keep_mask``'s layout), for a backward that reads it instead of drawing it again.

    With ``partial_of=L`` (M, R) it also writes ``grad`` (R, K), any dtype and strides, = grad_scale * L^T P from
    per-row-group partials ((groups, R, K) fp32 scratch, ``_proj_layout`` sizes the groups) that the last
    program of each K split sums in group order. Split along K when the row groups do not fill the GPU: then one
    raw (M, R) fp32 sum per split, which the last split of each row group to finish adds up and scales.

    ``term``: a ``Term`` (``term_for``) the launch also fills with OUT's copy that the TMA GEMM's low-rank term reads
    by TMA (gemm_tma.py): term.scale * OUT rounded to the dot dtype as the GEMM rounds it; with ``term.rm`` (fp32
    adapters) also RM's copy, term.rm_from cast to the dot dtype, by extra programs of the same launch.
    ``term2`` (with ``term``; ``second_term``): a second copy of OUT for another GEMM of the same term, term2.scale *
    OUT rounded the same way (RM's copy, if any, is term's: written once). Raises ValueError when term2's rows are
    not term's row stride apart (the launch passes one stride for both).
    """
    M, K = P.shape
    device = P.device
    out = _empty((M, R), torch.float32, device)
    block_m = _proj_block_m()
    rows_per_program, k_per_split = _proj_layout(M, K, R, block_m, device, partial_of is not None)
    grid = (_cdiv(M, rows_per_program), _cdiv(K, k_per_split))
    split_k = grid[1] > 1
    split = _empty((grid[1], M, R), torch.float32, device) if split_k else out
    L, partial, target = out, out, out
    if partial_of is not None:
        L = partial_of
        partial = _empty((grid[0], R, K), torch.float32, device)
        target = grad
    counters = COUNTERS.get(device, grid[0] + grid[1]) if split_k or partial_of is not None else out
    # fp32 RM's copy for the TMA GEMM (Term.rm): extra programs along axis 0, a chunk of COPY_N columns each
    copy_rm = term is not None and term.rm is not None
    rm_n = copy_n = 0
    if copy_rm:
        block_r = configs.block_r(R)
        rm_n = term.rm.shape[1] if term.rm_strides[1] == 1 else term.rm.shape[0]
        copy_n = _copy_n(block_r)
        grid = (grid[0] + _cdiv(_cdiv(rm_n, copy_n), grid[1]), grid[1])
    if dropout_p > 0:
        launch = _proj_dropout
    elif partial_of is not None:
        launch = _proj_partials_q32 if Q.dtype == torch.float32 and P.dtype != torch.float32 else _proj_partials
    else:
        launch = _proj
    write_mask = keep_out is not None and dropout_p > 0
    write_term2 = term is not None and term2 is not None
    if write_term2 and term2.values.stride(0) != term.values.stride(0):
        raise ValueError("lowrank_project: term2's values must have term's row stride (both from second_term)")
    launch(grid, P, Q, out, L, partial, seed if seed is not None else out, split, target, counters,
           keep_out if write_mask else out, term.values if term is not None else out,
           term.factors if term is not None and term.factors is not None else out,
           term.rm_from if copy_rm else out, term.rm if copy_rm else out,
           term2.values if write_term2 else out,
           term2.factors if write_term2 and term2.factors is not None else out,
           M, K, R, _m_bucket(M), rows_per_program, k_per_split, rm_n,
           P.stride(0), P.stride(1), stride_qk, stride_qr, out.stride(0), out.stride(1), L.stride(0), L.stride(1),
           target.stride(0), target.stride(1), keep_out.stride(0) if write_mask else 0,
           term.values.stride(0) if term is not None else 0,
           *(term.rm_from_strides + term.rm_strides if copy_rm else (0, 0, 0, 0)),
           float(out_scale), float(grad_scale), float(dropout_p), float(term.scale) if term is not None else 1.0,
           float(term2.scale) if write_term2 else 1.0,
           BLOCK_M=block_m, BLOCK_R=configs.block_r(R), HAS_DROPOUT=dropout_p > 0, WRITE_MASK=write_mask,
           WRITE_PARTIAL=partial_of is not None, SPLIT_K=split_k, WRITE_TERM=term is not None,
           WRITE_TERM2=write_term2, COPY_RM=copy_rm,
           COPY_N=copy_n, DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
           device=device, dtype=P.dtype)
    return out, grad if partial_of is not None else None


def reduce_rows(P, L, scale, out, *, transpose=False, dropout_p=0.0, keep=None):
    """out (K, R), or (R, K) with ``transpose``, = scale * (keep ⊙ P)^T @ L over the M rows of P (M, K) and
    L (M, R), in one launch: split along M for about two waves of the GPU, the splits' (K, R) fp32 partials summed
    in split order by the last program of each block of K (deterministic). Returns ``out``. With dropout
    (``dropout_p`` > 0) the keep-mask is read from ``keep``, the forward's bits (``lowrank_project(keep_out=)``,
    ``rng.packed_keep_mask``). Raises ValueError for dropout without ``keep``."""
    if dropout_p > 0 and keep is None:
        raise ValueError("reduce_rows: dropout_p > 0 needs keep, the bit-packed keep-mask")
    M, K = P.shape
    R = L.shape[1]
    block_m, block_k = _reduce_blocks(P.dtype)
    splits = _splits(M, K, block_m, block_k, P.device)
    rows_per_split = _cdiv(_cdiv(M, block_m), splits) * block_m
    splits = max(1, _cdiv(M, rows_per_split))
    grid = (_cdiv(K, block_k), splits)
    partial = counters = out
    if splits > 1:
        partial = _empty((splits, K, R), torch.float32, P.device)
        counters = COUNTERS.get(P.device, grid[0])
    strides = (out.stride(1), out.stride(0)) if transpose else (out.stride(0), out.stride(1))
    dropout = dropout_p > 0
    _reduce(grid, P, L, partial, out, counters, keep if dropout else out,
            M, K, R, rows_per_split, _m_bucket(M),
            P.stride(0), P.stride(1), L.stride(0), L.stride(1), *strides, keep.stride(0) if dropout else 0,
            float(scale),
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=configs.block_r(R), HAS_DROPOUT=dropout,
            SPLIT_M=splits > 1, DOT_DTYPE=configs.dot_dtype(P.dtype),
            INPUT_PRECISION=configs.input_precision(P.dtype),
            device=P.device, dtype=P.dtype)
    return out


def finish(partial, scale, out, *, transpose=False):
    """out = (scale * partial.sum(0)).to(out.dtype), one launch; partial (S, rows, cols) fp32 contiguous, out
    (rows, cols), or (cols, rows) with ``transpose`` (DoRA's dm from its partials)."""
    splits, rows, cols = partial.shape
    strides = (out.stride(1), out.stride(0)) if transpose else (out.stride(0), out.stride(1))
    block = configs.FINISH_BLOCK
    _finish((_cdiv(rows * cols, block),), partial, out, splits, rows, cols, rows * cols, *strides, float(scale),
            BLOCK=block, device=partial.device, dtype=out.dtype)
    return out


def _measures() -> bool:
    """Whether the first call of a GEMM key times its candidate paths (choice.GEMM.resolve): on a GPU; under the
    interpreter nothing is timed (the fused kernel unless a path is forced)."""
    return not _INTERPRETED


def _gemm_key(P, N: int, R: int, dropout: bool, backward: bool) -> tuple:
    """The measured choice's key of a GEMM (kernels/choice.py): device, dtype, M bucket, N, K, rank, dropout, dX."""
    M, K = P.shape
    return (P.device, P.dtype, _m_bucket(M), N, K, R, dropout, backward)


def gemm_lowrank(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, *, dropout_p=0.0, keep=None,
                 out=None, backward=False, term=None):
    """OUT (M, N) in P's dtype = P @ Q (+ bias) + lowrank_scale * (keep ⊙ (L @ RM)).

    Q (K, N) and RM (R, N) are given as (pointer tensor, strides) so transposed weights need no copy. With
    ``dropout_p`` > 0, ``keep`` is the bit-packed keep-mask of the (M, N) output's columns (uint8 (M,
    ``philox.mask_row_bytes(N)``): ``lowrank_project(keep_out=)``, ``rng.packed_keep_mask``).
    ``out``: an optional (M, N) tensor to write into (a view of the caller's N-D output). ``backward``: the dX
    GEMM, tuned and chosen apart from the forward. The path (the fused Triton GEMM or cuBLAS after the low-rank
    term) is measured per key and remembered (kernels/choice.py). ``term``: L's rounded copy (``term_for``, filled
    by the pass that wrote L), which the TMA kernel then reads by TMA; the other paths ignore it.
    """
    M, K = P.shape
    R = L.shape[1]
    if out is None:
        out = _empty((M, N), P.dtype, P.device)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()   # N elements; the kernel reads the bias with unit stride
    if dropout_p > 0 and keep is None:
        raise ValueError("gemm_lowrank: dropout_p > 0 needs keep, the bit-packed keep-mask")
    args = (P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward, term)
    key = _gemm_key(P, N, R, dropout_p > 0, backward)
    path = choice.GEMM.get(key)
    if path is None:
        rec = plan.recorder()
        if rec is not None:
            rec.fail()   # resolving times the candidates: their launches are not this call's
        def name():
            return torch.cuda.get_device_name(P.device)
        candidates = {p: functools.partial(_GEMM_PATHS[p], *args)
                      for p in choice.candidate_paths(tma_eligible(P, Q, q_strides, out))}
        path = choice.GEMM.resolve(key, name, candidates, measure=_measures())
    if path == "ws" and not ws_eligible(P, Q, q_strides, out, dropout_p):
        path = "tma"      # the opt-in Gluon kernel's limits (bf16, sm_90, no dropout): the TMA kernel instead
    if path == "tma" and not tma_eligible(P, Q, q_strides, out):
        path = "triton"   # a misaligned operand (or no Hopper): the cp.async kernel, chosen before launch
    _GEMM_PATHS[path](*args)
    return out


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def tma_eligible(P, Q, q_strides, out) -> bool:
    """Whether the TMA kernel can take these operands: 16-bit, on Hopper or newer (any device under the
    interpreter); P and
    OUT with unit stride along their rows, Q with unit stride along K (the forward's W^T) or along N (dX's W);
    16-byte aligned bases and row strides (tensor descriptors' requirements)."""
    return out.stride(1) == 1 and _tma_operands(P, Q, q_strides, out.stride(0), out.data_ptr())


def _tma_operands(P, Q, q_strides, out_row: int, out_ptr: int) -> bool:
    """tma_eligible for an output of row stride ``out_row`` at ``out_ptr`` (unit stride along its rows)."""
    if P.dtype == torch.float32 or (not _INTERPRETED and _capability(P.device)[0] < 9):
        return False
    elt = P.element_size()
    q_row = q_strides[1] if q_strides[0] == 1 else q_strides[0] if q_strides[1] == 1 else None
    return (P.stride(1) == 1 and q_row is not None
            and (P.stride(0) * elt) % 16 == 0 and (out_row * elt) % 16 == 0 and (q_row * elt) % 16 == 0
            and P.data_ptr() % 16 == 0 and Q.data_ptr() % 16 == 0 and out_ptr % 16 == 0)


def _rm_layout(RM, rm_strides, dtype):
    """How the TMA kernel reads RM (R, N) given as (tensor, strides) by a descriptor: "rows" (unit stride along N:
    the forward's B), "rows_n" (unit stride along R: dX's A^T from A's (K, R) rows), or None (another dtype than
    ``dtype``, the dot's, or a misaligned base or row: the pointer loads)."""
    if RM.dtype != dtype or RM.data_ptr() % 16:
        return None
    elt = RM.element_size()
    if rm_strides[1] == 1 and (rm_strides[0] * elt) % 16 == 0:
        return "rows"
    if rm_strides[0] == 1 and (rm_strides[1] * elt) % 16 == 0:
        return "rows_n"
    return None


class Term(NamedTuple):
    """The TMA GEMM's copy of its low-rank term's left operand (kernels/gemm_tma.py, LOWRANK_TMA), written by the pass
    that computes L (S or dS; lowrank_project(term=)): ``values`` (M, R) in the dot dtype, rows padded to 16 bytes,
    = scale * L rounded as gemm.lowrank_init_bits rounds it; fp16: divided by a power-of-two factor per row,
    ``factors`` (M,) fp32 (fp16.py's range guard), else None. ``scale``: lowrank_scale without dropout, 1 with it
    (then the scale is applied after the keep-mask, as before).

    For fp32 adapters (PEFT's default) on a 16-bit base also the right operand: ``rm``, RM (R, N) cast to the dot
    dtype as gemm.lowrank_init_bits casts its RM tile, a view with 16-byte rows (R, N) or (N, R) (``rm_strides``:
    element (r, n) at r * rm_strides[0] + n * rm_strides[1]), written by the same pass's extra programs
    (lowrank.py's COPY_RM) from ``rm_from`` (the fp32 RM, with ``rm_from_strides``); None when RM is already in
    the dot dtype with a descriptor layout."""
    values: torch.Tensor
    factors: Optional[torch.Tensor]
    scale: float
    rm: Optional[torch.Tensor] = None
    rm_strides: Optional[tuple] = None
    rm_from: Optional[torch.Tensor] = None
    rm_from_strides: Optional[tuple] = None


def _padded(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor whose rows are 16-byte multiples apart (a view of a wider buffer, which a
    recording allocates and aliases)."""
    unit = 16 // dtype.itemsize
    buffer = _empty((rows, -(-cols // unit) * unit), dtype, device)
    view = buffer[:, :cols]
    if plan.RECORDING[0]:
        rec = plan.recorder()
        if rec is not None:
            rec.alias(view, buffer)
    return view


_TORCH_DOT = {torch.float16: torch.float16,
              torch.bfloat16: torch.float32 if _INTERPRETED else torch.bfloat16}   # configs.dot_dtype in torch


def term_for(P, Q, q_strides, N, R, out, RM, rm_strides, lowrank_scale, *, dropout=False, backward=False):
    """A ``Term`` for gemm_lowrank(P, Q, ..., out=out) when its path is the TMA kernel on these operands (resolved or
    forced) or may be (the first call of a key, which times the TMA candidate where ``tma_eligible``: that candidate
    then runs with the Term, as every later call on the TMA path does) and RM has a descriptor layout
    (``_rm_layout``: in the dot dtype with 16-byte rows) or is fp32 (adapters kept in fp32 on a 16-bit base, PEFT's
    default: then the pass that writes L also writes RM's copy in the dot dtype, ``Term.rm``), else None: the kernel
    then loads L (fp32) and RM by pointers and rounds both itself, the same result. RM (R, N) is B (R, N) in
    forward, A^T from A's (K, R) rows in dX; its copy keeps the orientation whose stride is 1 (B's rows or A's
    rows), rows padded to 16 bytes: no torch op, one planned scratch buffer (docs/performance.md, "The low-rank
    term by TMA").

    A key not yet resolved in this process is looked up where ``choice.GEMM.resolve`` would find it without timing
    (``GemmChoice.known``: the job's store, the disk cache of choices): a key resolved there gets a Term only when
    its path is "tma"; a key that will be measured gets one (its TMA candidate reads it)."""
    M = P.shape[0]
    key = _gemm_key(P, N, R, dropout, backward)
    path = choice.GEMM.get(key)
    if path is None:
        path = choice.GEMM.forced() if choice.GEMM.forced is not None else choice.forced_path()
        if path is None and _measures():
            # resolved by another process or rank: its path, nothing timed. Else the measuring call: its TMA
            # candidate (timed where the operand checks below pass, as gemm_lowrank's tma_eligible, and then among
            # candidate_paths(True)) reads the Term; if cuBLAS wins, the copy was written once for nothing
            path = choice.GEMM.known(key, lambda: torch.cuda.get_device_name(P.device),
                                     choice.candidate_paths(True)) or "tma"
    if path != "tma" or P.dtype not in _TORCH_DOT:
        return None
    dot = _TORCH_DOT[P.dtype]
    copy_rm = _rm_layout(RM, rm_strides, dot) is None
    if copy_rm and RM.dtype != torch.float32:
        return None
    out_ok = (out.stride(1) == 1 and _tma_operands(P, Q, q_strides, out.stride(0), out.data_ptr()) if out is not None
              else _tma_operands(P, Q, q_strides, N, 0))
    if not out_ok:
        return None
    values = _padded(M, R, dot, P.device)
    factors = _empty((M,), torch.float32, P.device) if P.dtype == torch.float16 else None
    scale = 1.0 if dropout else float(lowrank_scale)
    if not copy_rm:
        return Term(values, factors, scale)
    if rm_strides[1] <= rm_strides[0]:   # B's (R, N) rows: the copy (R, N), "rows"
        rm = _padded(R, N, dot, P.device)
        strides = (rm.stride(0), 1)
    else:                                # A's (K, R) rows, RM = A^T: the copy (N, R), "rows_n"
        rm = _padded(N, R, dot, P.device)
        strides = (1, rm.stride(0))
    return Term(values, factors, scale, rm, strides, RM, tuple(rm_strides))


def second_term(term: Optional[Term], lowrank_scale) -> Optional[Term]:
    """A ``Term`` for a second GEMM (without dropout) of ``term``'s L and RM with another ``lowrank_scale``: DoRA's
    dY W with dropout (scale 0) beside its scaled term's GEMM. The pass that writes ``term`` writes it too
    (``lowrank_project(term2=)``): lowrank_scale * L rounded as ``term`` is (fp16: its own row factors), in a buffer of
    the same shape and row stride; RM's copy (fp32 adapters) is ``term``'s, written once. None without ``term``."""
    if term is None:
        return None
    M, R = term.values.shape
    values = _padded(M, R, term.values.dtype, term.values.device)
    factors = _empty((M,), torch.float32, values.device) if term.factors is not None else None
    return Term(values, factors, float(lowrank_scale), term.rm, term.rm_strides)


def ws_eligible(P, Q, q_strides, out, dropout_p) -> bool:
    """Whether the warp-specialised Gluon kernel (kernels/gemm_ws.py, opt-in: LORA_FAST_GEMM=ws) can take these
    operands: bf16, no dropout, on sm_90 exactly (warpgroup MMA; Gluon does not run under the interpreter), and
    what ``tma_eligible`` asks."""
    return (P.dtype == torch.bfloat16 and dropout_p == 0 and not _INTERPRETED and _capability(P.device) == (9, 0)
            and tma_eligible(P, Q, q_strides, out))


def _scratch(size: int, alignment: int, stream):
    """Global memory for the device-side tensor descriptors (triton's allocator protocol); torch's allocations
    are 512-byte aligned."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need an allocator in the launching thread's context (a ContextVar: autograd's
    device threads start without one); a user's own allocator is left in place."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _tma_gemm(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward,
              term=None):
    """The persistent TMA kernel (kernels/gemm_tma.py) on operands ``tma_eligible`` accepts."""
    M, K = P.shape
    R = L.shape[1]
    transposed = q_strides[0] == 1   # Q[k, n] at k + n * stride: the stored rows are Q's columns (W^T)
    q_row = q_strides[1] if transposed else q_strides[0]
    num_sms = 2 if _INTERPRETED else _sm_count(P.device)

    def grid(meta):
        return (min(num_sms, _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])),)

    # LORA_FAST_TMA_DESC=host: the descriptors built by the launch (kernels/descriptors.py; their shapes must be
    # positive, as cuTensorMapEncodeTiled asks), else by each program in scratch from Triton's allocator
    host = descriptors.mode() == "host" and M > 0 and N > 0 and K > 0 and R > 0
    if not _INTERPRETED and not host:
        _ensure_allocator()
        rec = plan.recorder()
        if rec is not None:
            rec.allocator = True
    block_r = configs.block_r(R)
    dropout = dropout_p > 0
    # the low-rank term by TMA when the pass that wrote L left its rounded copy (term_for) and RM has a descriptor
    # layout; the copy's scale must be the one this launch would fold in
    layout = None
    if term is not None and term.scale == (1.0 if dropout else float(lowrank_scale)):
        if term.rm is not None:   # fp32 RM: the same pass's copy in the dot dtype (Term.rm)
            RM, rm_strides = term.rm, term.rm_strides
        layout = _rm_layout(RM, rm_strides, _TORCH_DOT[P.dtype])
    use_term = layout is not None
    if use_term:
        L = term.values
    launch = _tma_launcher("dropout" if dropout else "dx" if backward else "forward", block_r, host,
                           not use_term and RM.dtype == torch.float32 and P.dtype != torch.float32)
    # the keep-mask's bytes by TMA: rows of 16-byte multiples (philox.mask_row_bytes pads them), an aligned base
    mask_tma = use_term and dropout and keep.stride(0) % 16 == 0 and keep.data_ptr() % 16 == 0
    launch(grid, P, Q, bias if bias is not None else out, L, RM, out, keep if dropout else out,
           term.factors if use_term and term.factors is not None else out,
           M, N, K, R, _m_bucket(M),
           P.stride(0), q_row, L.stride(0), L.stride(1), rm_strides[0], rm_strides[1], out.stride(0),
           keep.stride(0) if dropout else 0, float(lowrank_scale),
           BLOCK_R=block_r, NUM_SMS=num_sms, Q_TRANSPOSED=transposed, HAS_BIAS=bias is not None,
           HAS_DROPOUT=dropout_p > 0, DOT_DTYPE=configs.dot_dtype(P.dtype),
           INPUT_PRECISION=configs.input_precision(P.dtype), LOWRANK_TMA=use_term,
           RM_ROWS_N=layout == "rows_n", MASK_TMA=mask_tma,
           BIAS_TMA=use_term and bias is not None and bias.data_ptr() % 16 == 0, HOST_DESC=host, device=P.device,
           dtype=P.dtype)


def _fused_gemm(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward,
                term=None, *, k_loop=True):
    """The fused kernel; ``k_loop=False`` runs it with K = 0: out = bias + the low-rank term, nothing else."""
    M, K = P.shape
    R = L.shape[1]

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    if not k_loop:
        launch = _term_dropout if dropout_p > 0 else _term
    else:
        launch = _gemm_dropout if dropout_p > 0 else _gemm_dx if backward else _gemm
    dropout = dropout_p > 0
    launch(grid, P, Q, bias if bias is not None else out, L, RM, out, keep if dropout else out,
           M, N, K if k_loop else 0, R, _m_bucket(M),
           P.stride(0), P.stride(1), q_strides[0], q_strides[1], L.stride(0), L.stride(1),
           rm_strides[0], rm_strides[1], out.stride(0), out.stride(1), keep.stride(0) if dropout else 0,
           float(lowrank_scale),
           BLOCK_R=configs.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
           DOT_DTYPE=configs.dot_dtype(P.dtype), INPUT_PRECISION=configs.input_precision(P.dtype),
           device=P.device, dtype=P.dtype)


def _cublas_gemm(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward,
                 term=None):
    """bias + the low-rank term into ``out`` (the fused kernel without its K loop), then cuBLAS accumulates
    P @ Q into it (addmm, beta = 1): the same result up to one rounding of the low-rank term to out's dtype."""
    _fused_gemm(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward,
                k_loop=False)
    if P.shape[1]:
        out.addmm_(P, Q.as_strided((P.shape[1], N), q_strides))
        rec = plan.recorder()
        if rec is not None:
            rec.addmm_(out, P, Q, (P.shape[1], N), q_strides)


_ws_launchers = {}


def _ws_gemm(P, Q, q_strides, N, bias, L, RM, rm_strides, lowrank_scale, dropout_p, keep, out, backward,
             term=None):
    """The warp-specialised Gluon kernel (kernels/gemm_ws.py) on operands ``ws_eligible`` accepts; imported on first
    use, so that a triton without Gluon costs nothing until LORA_FAST_GEMM=ws asks for it."""
    from .gemm_ws import gemm_lowrank_ws_kernel

    M, K = P.shape
    R = L.shape[1]
    transposed = q_strides[0] == 1
    num_sms = _sm_count(P.device)
    block_r = configs.block_r(R)
    launch = _ws_launchers.get((backward, block_r))
    if launch is None:
        launch = _Launcher(gemm_lowrank_ws_kernel, functools.partial(configs.gemm_ws_configs, block_r=block_r),
                           ["M_BUCKET", "N", "K", "R"], {}, pointers=6, scalars=1)
        _ws_launchers[(backward, block_r)] = launch

    def grid(meta):
        return (min(num_sms, _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])),)

    _ensure_allocator()
    rec = plan.recorder()
    if rec is not None:
        rec.allocator = True
    launch(grid, P, Q, bias if bias is not None else out, L, RM, out, M, N, K, R, _m_bucket(M),
           P.stride(0), q_strides[1] if transposed else q_strides[0], L.stride(0), L.stride(1), rm_strides[0],
           rm_strides[1], out.stride(0), float(lowrank_scale),
           BLOCK_R=block_r, NUM_SMS=num_sms, Q_TRANSPOSED=transposed, HAS_BIAS=bias is not None,
           device=P.device, dtype=P.dtype)


_GEMM_PATHS = {"triton": _fused_gemm, "cublas": _cublas_gemm, "tma": _tma_gemm, "ws": _ws_gemm}


def project_input(x, A, dropout_p, seed, keep_out=None, term=None):
    """The forward's first pass, shared by the 16-bit, 4-bit and DoRA ops: S = dropout(x) @ A (M, R) fp32 with the
    keep-mask of ``seed`` (stored bit-packed into ``keep_out`` when given: ``new_keep_mask``). Returns (S, p,
    keep_scale): p the drop probability the mask applies (philox.quantize, idempotent, so callers may pass it
    quantised or not) and keep_scale = 1 / (1 - p). ``term``: also S's rounded copy for the TMA GEMM (``term_for``)."""
    p = philox.quantize(dropout_p)
    keep_scale = 1.0 / (1.0 - p)
    S, _ = lowrank_project(x, A, A.stride(0), A.stride(1), A.shape[1], out_scale=keep_scale, dropout_p=p, seed=seed,
                           keep_out=keep_out, term=term)
    return S, p, keep_scale


def new_keep_mask(M: int, K: int, device) -> torch.Tensor:
    """An uninitialised bit-packed keep-mask for an (M, K) input: uint8 (M, ``philox.mask_row_bytes(K)``), M x K / 8
    bytes (rows padded to 16 bytes), for ``lora_forward(keep_out=)`` to fill."""
    return torch.empty((M, philox.mask_row_bytes(K)), dtype=torch.uint8, device=device)


def lora_forward(x, weight, bias, A, B, scale, dropout_p=0.0, seed=None, out=None, zero_rows=None, keep_out=None):
    """Forward of the fused LoRA linear. x (M, K), weight (N, K), bias (N,) or None, A (K, R), B (R, N).

    Returns y (M, N) in x's dtype (written into ``out`` when given) and S = dropout(x) @ A (M, R) in fp32,
    which backward needs (with x). The keep-mask comes from ``seed`` (int64, one element) when dropout_p > 0;
    ``keep_out`` (``new_keep_mask(M, K)``): where the S pass also stores it bit-packed, for ``lora_backward(keep=)``.
    ``zero_rows``: an optional (M, 1) bool tensor, rows whose S is set to zero (no LoRA term: lora_linear_multi's
    rows of adapter -1 with one adapter; pass it to lora_backward too).
    """
    N = weight.shape[0]
    x, weight = _along_k(x, 1), _along_k(weight, 1)
    q_strides, rm_strides = (weight.stride(1), weight.stride(0)), (B.stride(0), B.stride(1))
    # the TMA GEMM's copy of scale * S, written by the S pass (not with zero_rows: S is changed after the pass)
    term = None if zero_rows is not None else term_for(x, weight, q_strides, N, A.shape[1], out, B, rm_strides, scale)
    S, _, _ = project_input(x, A, dropout_p, seed, keep_out, term)
    if zero_rows is not None:
        S.masked_fill_(zero_rows, 0.0)
        if plan.recorder() is not None:
            plan.recorder().fail()
    # Q = W^T: element (k, n) of W^T is weight[n, k]
    y = gemm_lowrank(x, weight, q_strides, N, bias, S, B, rm_strides, scale, dropout_p=0.0, out=out, term=term)
    return y, S


def lora_backward(dy, x, weight, A, B, S, scale, dropout_p=0.0, seed=None, *, need_dx=True, need_dA=True,
                  need_dB=True, zero_rows=None, dx_out=None, keep=None, dA_out=None, dB_out=None):
    """Backward of the fused LoRA linear: (dx, dA, dB), each None when not needed; dx written into ``dx_out``
    (an (M, K) tensor in x's dtype, a view of the caller's N-D gradient) when given.

    dS = dY B^T and dB = scale S^T dY in one pass over dY (or two when the partials of a large rank would
    cost more than re-reading dY); dX = dY W + scale * keep/(1-p) ⊙ (dS A^T) in one GEMM with the low-rank
    term fused in; dA = scale/(1-p) * (keep ⊙ x)^T dS. With dropout the keep-mask is ``keep``, the bits the
    forward stored (``lora_forward(keep_out=)``); without them it is drawn once from ``seed`` into bits
    (``rng.packed_keep_mask``, one launch) that both passes read. ``dA_out`` / ``dB_out``: where dA (K, R) and dB
    (R, N) are written when given (any strides: transposed views of PEFT's (R, K) / (N, R) layouts), else new
    tensors in A's / B's dtype and layout (``_empty_like``).
    """
    R = A.shape[1]
    K = x.shape[1]
    # dY and x are read along their rows; dX reads W as (N, K): along its dim 0
    dy, x, weight = _along_k(dy, 1), _along_k(x, 1), _along_k(weight, 0)
    dx = dA = dB = None
    dropout_p = philox.quantize(dropout_p)
    if need_dB:
        dB = dB_out if dB_out is not None else _empty_like(B)
    # dB rides on the dS pass (five launches per step) while 4 R < PROJ_BLOCK_M (ranks up to 31 on a GPU). Above,
    # dB takes its own pass over dY (six launches): the reason is the byte count of configs.PROJ_BLOCK_M's
    # comment (the (groups, R, N) fp32 partials grow with R, a second read of dY does not) and the dS pass's
    # registers at BLOCK_R 64 (the compile report), not a GPU timing: unmeasured on a GPU as yet
    fused_dB = need_dB and 4 * R < _proj_block_m()
    keep_scale = 1.0 / (1.0 - dropout_p)
    # the TMA GEMM's copy of dS (times the scale without dropout), written by the dS pass (not with zero_rows)
    term = None
    if need_dx and zero_rows is None:
        term = term_for(dy, weight, (weight.stride(0), weight.stride(1)), K, R, dx_out, A, (A.stride(1), A.stride(0)),
                        scale * keep_scale, dropout=dropout_p > 0, backward=True)
    dS, _ = lowrank_project(dy, B, B.stride(1), B.stride(0), R, partial_of=S if fused_dB else None,
                            grad=dB if fused_dB else None, grad_scale=scale, term=term)
    if zero_rows is not None:   # lora_forward's zero_rows: no gradient flows through those rows' LoRA term
        dS.masked_fill_(zero_rows, 0.0)
        if plan.recorder() is not None:
            plan.recorder().fail()
    if need_dB and not fused_dB:
        reduce_rows(dy, S, scale, dB, transpose=True)
    if dropout_p > 0 and keep is None and (need_dx or need_dA):
        keep = packed_keep_mask(seed, x.shape[0], K, dropout_p)
        if plan.recorder() is not None:
            plan.recorder().fail()   # a launch outside the launchers: a replay would leave it out
    if need_dx:
        # Q = W as (N, K); RM = A^T: element (r, k) is A[k, r]
        dx = gemm_lowrank(dy, weight, (weight.stride(0), weight.stride(1)), K, None, dS, A,
                          (A.stride(1), A.stride(0)), scale * keep_scale, dropout_p=dropout_p, keep=keep,
                          out=dx_out, backward=True, term=term)
    if need_dA:
        dA = dA_out if dA_out is not None else _empty_like(A)
        reduce_rows(x, dS, scale * keep_scale, dA, dropout_p=dropout_p, keep=keep)
    return dx, dA, dB
