"""Launch configurations: one factory per kernel, per architecture, pruned by shared memory.

No device is queried here at import time; the launchers ask for the capability when they first run on a GPU.
Tile shapes are the ones the Triton matmul tutorial lists for Ampere and Hopper (its autotune sets), trimmed
to those that ``python -m lora_fast.compile_report`` shows compiling without spills (issue: compile report).
"""

import torch
import triton
import triton.language as tl

from .. import _env

# Shared memory per block (bytes), from NVIDIA's CUDA C programming guide, "Technical Specifications per
# Compute Capability" (opt-in maximum): 163 KB on sm_80, 227 KB on sm_90, 99 KB on sm_86/sm_89/sm_120.
SMEM_LIMIT = {(8, 0): 163 * 1024, (9, 0): 227 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (12, 0): 99 * 1024}
SMEM_LIMIT_DEFAULT = 99 * 1024

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM kernel, 16-bit inputs.
_GEMM_16BIT = {
    9: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    # removed 128x256x64 w8 s3 (32 B of spills at rank 64, compile report, triton 3.9), 64x64x32 w4 (8 B of
    # spills in the forward on triton 3.6, the GPU image's version, with 4 or 5 stages) and 64x256x32 w4 (8 B at
    # rank 64: bf16 forward with bias on triton 3.6, fp16 forward with the range guard on 3.9)
    8: [(128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
}
# dX with dropout: the low-rank term, masked by the keep-mask's bits the forward stored (rng.load_keep_bits),
# initialises the accumulator before the K loop. Compile report (triton 3.9), ranks 16 and 64, with the bits (issue
# 28): 128x256x64 w8 s3 is spill-free on sm_90 (fp16 spills 4 B at rank 16: gemm_configs leaves it out) and
# 128x128x64 w4 spills 68-152 B there; on sm_80 128x256x32 w8 s3 is spill-free and 128x128x32 w4 spills 4-64 B
# at rank 64. (With the mask drawn here by Philox only 128x64 / 64x128 / 64x64 tiles were spill-free on sm_80.)
_GEMM_16BIT_DROPOUT = {
    9: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    8: [(128, 256, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 5)],
}
# fp32 with input_precision="ieee" runs on CUDA cores; larger tiles spill (TRITON_NOTES: 64x64x32 spilled).
# Removed after the compile report: (64, 32, 32, 4, 3) spills on sm_80 at rank 64 (96 B), and (32, 64, 32, 4, 3)
# there too (128 B forward, 24 B dX with dropout). fp32 LoRA on a GPU is the rare case; 16-bit is the fast path.
_GEMM_FP32 = [(32, 32, 32, 4, 4)]

# Narrow kernels: BLOCK_M is fixed because partial buffers are sized by it; tuning picks BLOCK_K/warps/stages.
# the K range of one program of a narrow pass split along K is a multiple of this: every BLOCK_K of the
# configs (16 to 128) divides it, and it keeps a split's rows of P at least 512 B long in 16-bit
SPLIT_QUANTUM = 256
# The dB partials (row groups, R, N) fp32 are written and read back: 8 R / (rows per group) bytes per element of
# dY (proj_layout sizes the groups: 256 rows at M = 8192, so R / 64 of a bf16 dY read); the launcher fuses them
# only while 4 R < BLOCK_M, else dB takes a second pass over dY
PROJ_BLOCK_M = 128
# (BLOCK_M, BLOCK_K) of the dA reduction: 64 x 64 is 8 KB of x per stage in bf16; fp32 (CUDA-core dots) with
# dropout spilled ~10 KB at 64 x 64 and rank 64 on sm_80 (compile report), hence 32 x 32
REDUCE_BLOCKS_16BIT = (64, 64)
REDUCE_BLOCKS_FP32 = (32, 32)
# (BLOCK_K, num_warps, num_stages). Removed after the compile report (triton 3.9), x @ A with dropout in bf16:
# BLOCK_K 128 w4 s3 spilled ~4.4 KB on sm_90, 128 w8 s3 8 B on sm_80, 256 w8 s2 140-308 B on both.
_PROJ = [(64, 4, 3), (64, 4, 4), (64, 8, 3)]
# x @ A with the 8-bit-uniform keep-mask on sm_80, 16-bit, rank 64: 64 w8 s3 spilled 8 B (triton 3.9)
_PROJ_DROPOUT_SM80_DROPS = [(64, 8, 3)]
# dS = dY B^T with dB finished in the launch (the last group sums the partials), fp16 (the range guard) on sm_80,
# rank 16: 64 w4 s3 spilled 4 B (compile report, triton 3.9)
_PROJ_PARTIALS_SM80_FP16_DROPS = [(64, 4, 3)]
# the same pass with fp32 adapters (Q = B^T fp32, its tile range-guarded before the 16-bit cast; dB stored in
# fp32) on sm_80, rank 16 (compile report, triton 3.9): fp16 64 w4 s4 spilled 40 B (255 registers) and bf16
# 64 w8 s3 8 B (128 registers); the other configs of each list are clean
_PROJ_PARTIALS_Q32_SM80_DROPS = {torch.float16: [(64, 4, 4)], torch.bfloat16: [(64, 8, 3)]}
# fp32 on sm_80: BLOCK_K 64 w4 s2 spilled up to 2.7 KB, BLOCK_K 32 w4 8 B at rank 64, BLOCK_K 32 w8 4 B (s2,
# triton 3.9) or 8 B (s3, triton 3.6) in the dS pass at rank 64; BLOCK_K 16 with 8 warps is clean on both
_PROJ_FP32 = [(16, 8, 3)]
# elements of RM per copy program of the S / dS pass (lowrank.py's COPY_RM, fp32 adapters on the TMA GEMM's path):
# a 16 KB fp32 tile, 32 elements per thread at 4 warps (16 at 8), two 16-byte loads per 8 elements; RM is R x N
# (rank 16 at N = 4096: 16 programs beside the pass's hundreds). A size, not a measurement: unmeasured on a GPU
COPY_RM_ELEMENTS = 4096
_REDUCE = [(4, 3), (4, 4), (8, 3)]                                    # (num_warps, num_stages)
# fp32 (CUDA-core dots): 4 warps spilled 8 B with dropout (the saved bits) at rank 64 on sm_90 under triton 3.6, and
# 8 warps with 3 stages 4 B without dropout at rank 64 on sm_90 under triton 3.9 (compile report); 8 warps, 2
# stages compile clean on both versions, sm_80 and sm_90, ranks 16 and 64
_REDUCE_FP32 = [(8, 2)]

# Under the interpreter one small config: small blocks so that odd test shapes cross block edges.
INTERP_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERP_PROJ_BLOCK = dict(BLOCK_M=32, BLOCK_K=32)
INTERP_REDUCE_BLOCK = dict(BLOCK_M=32, BLOCK_K=32)


interpreting = _env.interpreting


def block_r(rank: int) -> int:
    """Rank padded to what tl.dot needs: a power of two, at least 16."""
    return max(16, 1 << (rank - 1).bit_length())   # next power of two, in plain Python (fast to call)


# Triton fixes interpretation when the kernels are decorated (at import): read once, not per launch
_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
               torch.bfloat16: tl.float32 if interpreting() else tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """Dtype of tl.dot operands for inputs of ``dtype``; bf16 is upcast under the interpreter (it mis-computes bf16)."""
    return _DOT_DTYPES[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch.get_float32_matmul_precision(): "highest" is IEEE fp32, else TF32, as torch does."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def smem_limit(capability) -> int:
    return SMEM_LIMIT.get(tuple(capability), SMEM_LIMIT_DEFAULT)


def _elt(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def gemm_configs(capability, dtype: torch.dtype, dropout: bool = False) -> list:
    """Autotune configs of ``gemm_lowrank_kernel`` for a compute capability (major, minor) and input dtype.

    ``dropout=True``: the configs for HAS_DROPOUT (dX with the keep-mask's bits in its low-rank term), which
    needs smaller 16-bit tiles to stay clear of spills.
    """
    arch = 9 if capability[0] >= 9 else 8
    if dtype == torch.float32:
        table = _GEMM_FP32
    else:
        table = _GEMM_16BIT_DROPOUT[arch] if dropout else _GEMM_16BIT[arch]
        if dtype == torch.float16 and dropout and arch == 9:
            # the fp16 range guard (fp16.py: a factor per row of dS) spills in dX with dropout at 128x256x64 on
            # sm_90 (compile report, triton 3.9: 48 B at rank 64 with Philox here, 4 B at rank 16 with the mask's
            # bits); bf16 needs no guard and keeps the config
            table = [c for c in table if c[:2] != (128, 256)]
    limit, elt = smem_limit(capability), _elt(dtype)
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in table
        if s * (bm * bk + bk * bn) * elt <= limit
    ]


def proj_configs(capability, dtype: torch.dtype, dropout: bool = False, partials: bool = False,
                 q_fp32: bool = False) -> list:
    """Autotune configs of ``lowrank_proj_kernel`` (BLOCK_M is PROJ_BLOCK_M, passed by the launcher); with
    ``dropout`` those of the pass that regenerates the keep-mask, with ``partials`` those of the dS pass that
    finishes dB, with ``q_fp32`` as well those for fp32 adapters (Q fp32) on a 16-bit ``dtype``."""
    table = _PROJ_FP32 if dtype == torch.float32 else _PROJ
    if dropout and dtype != torch.float32 and tuple(capability)[0] < 9:
        table = [c for c in table if c not in _PROJ_DROPOUT_SM80_DROPS]
    if partials and dtype == torch.float16 and tuple(capability)[0] < 9:
        table = [c for c in table if c not in _PROJ_PARTIALS_SM80_FP16_DROPS]
    if partials and q_fp32 and tuple(capability)[0] < 9:
        table = [c for c in table if c not in _PROJ_PARTIALS_Q32_SM80_DROPS.get(dtype, [])]
    limit, elt = smem_limit(capability), _elt(dtype)
    return [
        triton.Config(dict(BLOCK_K=bk), num_warps=w, num_stages=s)
        for bk, w, s in table
        if s * PROJ_BLOCK_M * bk * elt <= limit
    ]


def reduce_blocks(dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_K) of ``reduce_m_kernel``: fixed per dtype, since the launcher sizes its splits by them."""
    return REDUCE_BLOCKS_FP32 if dtype == torch.float32 else REDUCE_BLOCKS_16BIT


def reduce_configs(capability, dtype: torch.dtype) -> list:
    """Autotune configs of ``reduce_m_kernel`` (its blocks are fixed: ``reduce_blocks(dtype)``)."""
    table = _REDUCE_FP32 if dtype == torch.float32 else _REDUCE
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in table]


# sum_partials_kernel: an elementwise pass over (splits, rows, cols) fp32; 1024 elements per program with
# 4 warps is 8 per thread (two 16-byte loads per split), the usual size for a memory-bound elementwise kernel
FINISH_BLOCK = 1024


def finish_configs(capability, dtype: torch.dtype) -> list:
    """The one config of ``sum_partials_kernel`` (memory-bound; nothing to tune)."""
    return [triton.Config({}, num_warps=4, num_stages=1)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def proj_layout(M: int, K: int, R: int, block_m: int, sms: int, partials: bool):
    """(rows per program, columns per program) of a narrow pass over an (M, K) input on a GPU with ``sms``
    streaming multiprocessors, so that the programs (row groups x K splits) fill the GPU at every M and small M
    does not walk all of K in one program.

    Each K split beyond the first costs a partial dS (M x R fp32, summed by ops.finish). Without ``partials`` a
    row group is one BLOCK_M block and K is split just enough for two waves of the GPU. With ``partials`` (the
    dB partials of the dS pass) each row group also costs an (R, K) fp32 slice, so the power-of-two split count
    that moves the fewest partial bytes with at least one wave of programs is taken: at M = 8192, K = 4096,
    R = 16 on 132 SMs, 8 splits of 512 columns and 32 groups of 256 rows (12.6 MB of partials, against 18.9 MB
    with one group per 128-row block); at K = 14336, 23 MB against 61 MB. Columns per program are a multiple of
    SPLIT_QUANTUM (256: every BLOCK_K of the configs divides it).
    """
    row_blocks = _cdiv(M, block_m)
    programs = 2 * sms
    max_splits = _cdiv(K, SPLIT_QUANTUM)
    if not partials:
        splits = max(1, min(_cdiv(programs, row_blocks), max_splits))
        return block_m, _cdiv(_cdiv(K, splits), SPLIT_QUANTUM) * SPLIT_QUANTUM
    one_wave = min(programs // 2, row_blocks * max_splits)
    best = None
    splits = 1
    while True:
        group = _cdiv(row_blocks, min(row_blocks, _cdiv(programs, splits)))
        groups = _cdiv(row_blocks, group)
        cost = (M * R * splits if splits > 1 else 0) + groups * R * K
        key = (groups * splits < one_wave, cost)
        if best is None or key < best[0]:
            best = (key, group, splits)
        if splits >= max_splits:
            break
        splits = min(2 * splits, max_splits)
    _, group, splits = best
    return group * block_m, _cdiv(_cdiv(K, splits), SPLIT_QUANTUM) * SPLIT_QUANTUM


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SUBTILE, GROUP_M) of the persistent TMA GEMM (sm_90+), after
# Triton's tutorial 09 (128 x 256 x 64 / 128 x 128 x 64 in 16-bit, its epilogue in column slices) and CUTLASS's
# Hopper tiles (128 x 256 x 64 with 4 stages, 128 x 128 x 128 with 3). SUBTILE: the epilogue's column slices,
# through a BLOCK_M x BLOCK_N / SUBTILE shared buffer. The list is pruned per rank by tma_shared_bytes (the 128 x
# 256 x 64 4-stage tile fits at rank 16 only); every row compiled without spills on sm_90 (compile report, triton
# 3.9 and 3.6, ranks 16 and 64). Unmeasured on a GPU: the autotuner picks among them.
_GEMM_TMA_16BIT = [(128, 256, 64, 8, 4, 4, 8), (128, 256, 64, 8, 3, 2, 8), (128, 128, 128, 8, 3, 2, 8),
                   (128, 128, 64, 8, 4, 2, 8), (128, 128, 64, 4, 4, 1, 16), (64, 256, 64, 4, 4, 2, 8),
                   (64, 128, 64, 4, 4, 1, 8)]
# dX with dropout: the keep-mask's bits (rng.load_keep_bits) and the low-rank term before the K loop. With the mask
# read from the forward's bits (issue 28) every tile above compiles spill-free on sm_90 in bf16 and fp16 at ranks 16
# and 64 (compile report, triton 3.9; 128 x 256 x 64 with 4 stages at rank 16 only, as tma_shared_bytes prunes);
# with the mask drawn here by Philox, 128 x 128 outputs were the largest
_GEMM_TMA_16BIT_DROPOUT = _GEMM_TMA_16BIT
# Shared memory Triton adds beside the buffers counted in tma_shared_bytes: the pipeline's mbarriers (8 B per
# stage) and alignment; 32 B seen in every row of the compile report (sm_90, triton 3.9), 1 KB kept
_TMA_SMEM_RESERVE = 1024


def tma_shared_bytes(bm: int, bn: int, bk: int, stages: int, subtile: int, block_r: int, elt: int,
                     rm_fp32: bool = False) -> int:
    """Shared memory of one program of ``gemm_lowrank_tma_kernel``: the pipeline's P and Q tiles per stage, the
    epilogue's slice, and the low-rank term's (BLOCK_M, BLOCK_R) and (BLOCK_R, BLOCK_N) operands (warpgroup MMA
    reads them from shared memory; with the loop flattened across tiles they no longer alias the pipeline's
    buffers; by TMA, LOWRANK_TMA, they are the descriptors' boxes). fp16's (BLOCK_M,) fp32 row factors and the
    keep-mask's (BLOCK_M, BLOCK_N / 8) bytes, by TMA, add nothing: they are loaded before the K loop (the term
    first), where the pipeline's buffers are free (compile report, sm_90, triton 3.9: 225,312 B at 128 x 256 x 64
    with 4 stages, rank 16, with and without them; 229,400 B at 3 stages, rank 64). Matches the compiled kernels'
    metadata within _TMA_SMEM_RESERVE (compile report, sm_90).

    ``rm_fp32``: the term's operands by pointer loads from fp32 L and an fp32 RM (fp32 adapters without the S / dS
    pass's copy, ops.term_for: lora_forward / lora_backward's zero_rows): their fp32 tiles pass through
    shared memory beside the 16-bit ones, 4 more bytes per element. Compile report, sm_90, triton 3.9, bf16 rank 64:
    exactly the model at 128 x 128 x 64 (245,760 B, w8 s4; 262,144 B, w4 s4), 64 x 256 x 64 (303,104 B) and 64 x 128
    x 64 (188,416 B), below it elsewhere (278,528 B at 128 x 256 x 64 s3); the 16-bit model let those four past the
    limit, and two of them spilled."""
    term = block_r * (bm + bn) * (elt + (4 if rm_fp32 else 0))
    return (stages * (bm * bk + bk * bn) + bm * (bn // subtile)) * elt + term + _TMA_SMEM_RESERVE


def gemm_tma_configs(capability, dtype: torch.dtype, dropout: bool = False, block_r: int = 16,
                     rm_fp32: bool = False) -> list:
    """Autotune configs of ``gemm_lowrank_tma_kernel`` (16-bit inputs: ops.tma_eligible); with ``dropout`` those
    of dX with the mask. ``block_r``: the padded rank (``block_r(rank)``), whose operands take shared memory too;
    ``rm_fp32``: the term by pointer loads of an fp32 RM (``tma_shared_bytes``). Under the interpreter fp32 runs it
    too (the tests' exact dtype)."""
    table = _GEMM_TMA_16BIT_DROPOUT if dropout else _GEMM_TMA_16BIT
    limit, elt = smem_limit(capability), _elt(dtype)
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, SUBTILE=st), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s, st, gm in table
        if tma_shared_bytes(bm, bn, bk, s, st, block_r, elt, rm_fp32) <= limit
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the warp-specialised Gluon GEMM (kernels/gemm_ws.py, sm_90,
# bf16, opt-in): the consumer warps (num_warps, one or two warpgroups on a 128-row tile, after CUTLASS's cooperative
# Hopper kernels) and the stages of the producer's ring; pruned per rank by ws_shared_bytes. Unmeasured on a GPU.
_GEMM_WS_BF16 = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]


def ws_shared_bytes(bm: int, bn: int, bk: int, stages: int, block_r: int, elt: int) -> int:
    """Shared memory of ``gemm_lowrank_ws_kernel``: the ring's P and Q tiles, the whole output tile (its TMA store),
    RM's (BLOCK_R, BLOCK_N) tile and L's (BLOCK_M, BLOCK_R) tile, whose move into the MMA operand layout passes
    through shared memory (3,132-3,140 B above the rest at rank 16, compile report), plus the mbarriers
    (_TMA_SMEM_RESERVE)."""
    return (stages * (bm * bk + bk * bn) + bm * bn + block_r * (bn + bm)) * elt + _TMA_SMEM_RESERVE


def ws_maxnreg(num_warps: int) -> int:
    """The register cap per thread of the warp-specialised kernel (its launch option ``maxnreg``): the register file
    (65,536 per SM, one program per SM) shared by the consumer warps and the producer's warpgroup (4 warps), in
    setmaxnreg's steps of 8, at most 248 (below 255); the producer gives back what it does not keep
    (gemm_ws.PRODUCER_REGS) to the consumers."""
    return min(248, 65536 // ((num_warps + 4) * 32) // 8 * 8)


def gemm_ws_configs(capability, dtype: torch.dtype, block_r: int = 16) -> list:
    """Configs of ``gemm_lowrank_ws_kernel`` (bf16 on sm_90: ops.ws_eligible), NUM_STAGES and NUM_WARPS as
    constexprs (Gluon) beside num_warps."""
    limit, elt = smem_limit(capability), _elt(dtype)
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_STAGES=s, NUM_WARPS=w), num_warps=w,
                      num_stages=1, maxnreg=ws_maxnreg(w))
        for bm, bn, bk, w, s in _GEMM_WS_BF16
        if ws_shared_bytes(bm, bn, bk, s, block_r, elt) <= limit
    ]


# gemm_cost's per-SM rates, per clock: dense 16-bit tensor-core FLOPs (A100: 312 TFLOP/s / (108 SMs x 1.41 GHz)
# = 2,048; H100 SXM: 989 TFLOP/s / (132 x 1.83 GHz) = 4,096, NVIDIA's datasheets), fp32 CUDA-core FLOPs (64 and
# 128 FMA per clock per SM, CUDA C programming guide's throughput table) and bytes from L2 (~64 per clock per SM:
# the order of A100's 5,120 B/clk over its 108 SMs, NVIDIA's A100 whitepaper). A ranking, not a prediction.
_TENSOR_FLOPS_PER_CLK = {8: 2048, 9: 4096}
_FP32_FLOPS_PER_CLK = {8: 128, 9: 256}
_L2_BYTES_PER_CLK = 64


def gemm_cost(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
              capability, sms: int, dtype: torch.dtype) -> float:
    """Estimated clocks of a GEMM-shaped launch with one tile config, to rank configs before timing the best few
    (kernels/choice.py's Tuning): waves of output tiles (CTAs per SM bounded by shared memory, registers (the fp32
    accumulator plus ~64 per thread) and threads, CUDA programming guide limits for sm_80/sm_90) times the slower
    of a tile's multiply-adds at the SM's rate and its operand loads and output store at the SM's L2 bandwidth.
    Wave quantisation and padding waste (tiles past M or N still compute) are what separate configs at small M."""
    arch = 9 if capability[0] >= 9 else 8
    elt = _elt(dtype)
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    threads = 32 * num_warps
    registers = min(255, block_m * block_n // threads + 64)
    shared = max(1, num_stages * (block_m * block_k + block_k * block_n) * elt)
    per_sm = max(1, min(smem_limit(capability) // shared, 65536 // (registers * threads), 2048 // threads))
    sms = max(1, sms)
    waves = _cdiv(tiles, sms * per_sm)
    sharing = min(per_sm, _cdiv(tiles, sms))   # tiles one SM runs at once
    rate = (_FP32_FLOPS_PER_CLK if dtype == torch.float32 else _TENSOR_FLOPS_PER_CLK)[arch]
    compute = sharing * 2.0 * block_m * block_n * K / rate
    traffic = sharing * ((block_m + block_n) * K + block_m * block_n) * elt / _L2_BYTES_PER_CLK
    return waves * max(compute, traffic)
