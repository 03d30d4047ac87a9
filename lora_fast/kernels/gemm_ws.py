"""A warp-specialised fused LoRA GEMM for Hopper (sm_90), written in Gluon: opt-in (LORA_FAST_GEMM=ws) until a GPU
has run it.

    OUT[M, N] = P[M, K] @ Q[K, N] (+ bias[N]) + lowrank_scale * (L[M, R] @ RM[R, N])

The operands and maths of gemm_tma.py (forward y: P = x, Q = W^T read from W's (N, K) rows; dX without dropout:
P = dY, Q = W as stored), bf16 only, laid out as the Hopper GEMMs of CUTLASS and Triton's Gluon tutorials do:

- a producer partition of one warp with a small register budget (setmaxnreg) issues the TMA loads of P and Q into
  a ring of NUM_STAGES shared buffers; each stage has a "ready" mbarrier (the TMA transaction count) and an
  "empty" one (the consumers are done with it);
- the default partition, NUM_WARPS / 4 consumer warpgroups working on one tile together (cooperative), starts
  each tile's accumulator with the low-rank term (its RM tile through a small shared buffer), then issues one
  asynchronous warpgroup MMA per stage, keeping one in flight and releasing the stage before it; the epilogue
  adds the bias and leaves through a shared buffer by a TMA store, while the producer already fills the ring
  with the next tile's operands;
- persistent: one program per SM walks the output tiles in grouped order (GROUP_M).

Gluon does not run under the Triton interpreter (it asks for a GPU driver), so this kernel's numerics are checked
on a GPU only (tests/test_gemm_choice.py, skipped without one); on this repository's CPU machines the compile
report checks the code it becomes (warp specialisation with setmaxnreg, TMA, HGMMA, no spills, shared memory).
dX with dropout and fp16 (its range guard, fp16.py) are not implemented here: ops.ws_eligible sends them to the
TMA kernel. The Gluon API used (warp_specialize with register budgets, mbarriers, TMA, warpgroup_mma) is the
same in triton 3.6 and 3.9 but for the TMA copies' names (async_copy_global_to_shared / _shared_to_global in
3.6, async_load / async_store in 3.9), bridged below.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# triton 3.9 renamed the TMA copies (the old names raise there); 3.6 has the old names only
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

# registers per thread of the producer warp (its warpgroup, in setmaxnreg's steps of 8): it holds tile indices
# and loop counters only; 24 is the smallest budget setmaxnreg takes, 40 leaves room for the address arithmetic
PRODUCER_REGS = gl.constexpr(40)


@gluon.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """(pid_m, pid_n) of ``tile_id`` in grouped order (Triton's matmul tutorial), as gemm.grouped_tile."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = gl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@gluon.jit
def _producer(p_desc, q_desc, p_bufs, q_bufs, ready, empty, M, N, K, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr,
              Q_TRANSPOSED: gl.constexpr):
    """One warp: the TMA loads of every tile's K steps into the ring, waiting for each stage to be released."""
    BLOCK_M: gl.constexpr = p_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = p_desc.block_type.shape[1]
    NUM_STAGES: gl.constexpr = p_bufs.shape[0]
    if Q_TRANSPOSED:
        BLOCK_N: gl.constexpr = q_desc.block_type.shape[0]
    else:
        BLOCK_N: gl.constexpr = q_desc.block_type.shape[1]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        for ki in range(k_tiles):
            s = step % NUM_STAGES
            # a fresh mbarrier counts as having completed the phase before its first: the first lap does not wait
            mbarrier.wait(empty.index(s), ((step // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), p_desc.block_type.nbytes + q_desc.block_type.nbytes)
            _tma_load(p_desc, [pid_m * BLOCK_M, ki * BLOCK_K], ready.index(s), p_bufs.index(s))
            if Q_TRANSPOSED:
                _tma_load(q_desc, [pid_n * BLOCK_N, ki * BLOCK_K], ready.index(s), q_bufs.index(s))
            else:
                _tma_load(q_desc, [ki * BLOCK_K, pid_n * BLOCK_N], ready.index(s), q_bufs.index(s))
            step += 1


@gluon.jit
def _consumer(p_desc, q_desc, out_desc, p_bufs, q_bufs, ready, empty, rm_smem, out_smem, BIAS_ptr, L_ptr, RM_ptr,
              M, N, K, R, stride_lm, stride_lr, stride_rr, stride_rn, lowrank_scale,
              BLOCK_R: gl.constexpr, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, Q_TRANSPOSED: gl.constexpr,
              HAS_BIAS: gl.constexpr, NUM_WARPS: gl.constexpr):
    """The consumer warpgroups: low-rank start, asynchronous warpgroup MMAs over the ring, bias, TMA store."""
    BLOCK_M: gl.constexpr = p_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = p_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = out_desc.block_type.shape[1]
    NUM_STAGES: gl.constexpr = p_bufs.shape[0]
    dtype: gl.constexpr = out_desc.dtype
    # the accumulator's layout: NUM_WARPS / 4 warpgroups stacked along M, one wgmma of 16 x BLOCK_N x 16 each
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    lo_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # global loads of the low-rank operands: rows of L (fp32) and of RM
    load_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NUM_WARPS, 1], [1, 0])
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        # the low-rank term starts the accumulator: lowrank_scale folded into L (fp32) before its one rounding;
        # RM's tile goes through shared memory (warpgroup MMA reads B there), the last tile's MMAs are finished
        offs_lm = off_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, load_layout))
        offs_lr = gl.arange(0, BLOCK_R, gl.SliceLayout(0, load_layout))
        lo = gl.load(L_ptr + offs_lm[:, None].to(gl.int64) * stride_lm + offs_lr[None, :] * stride_lr,
                     mask=(offs_lm < M)[:, None] & (offs_lr < R)[None, :], other=0.0)
        lo = gl.convert_layout((lo * lowrank_scale).to(dtype), lo_layout)
        offs_rr = gl.arange(0, BLOCK_R, gl.SliceLayout(1, load_layout))
        offs_rn = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, load_layout))
        rm = gl.load(RM_ptr + offs_rr[:, None] * stride_rr + offs_rn[None, :].to(gl.int64) * stride_rn,
                     mask=(offs_rr < R)[:, None] & (offs_rn < N)[None, :], other=0.0)
        rm_smem.store(rm.to(dtype))
        fence_async_shared()
        acc = warpgroup_mma(lo, rm_smem, gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout), use_acc=False)

        for ki in range(k_tiles):
            s = step % NUM_STAGES
            mbarrier.wait(ready.index(s), (step // NUM_STAGES) & 1)
            if Q_TRANSPOSED:
                q = q_bufs.index(s).permute((1, 0))
            else:
                q = q_bufs.index(s)
            acc = warpgroup_mma(p_bufs.index(s), q, acc, is_async=True)
            # one MMA left in flight: the one before it is done, so its stage goes back to the producer
            acc, _, _ = warpgroup_mma_wait(1, deps=[acc, p_bufs.index(s), q])
            mbarrier.arrive(empty.index((step + NUM_STAGES - 1) % NUM_STAGES), pred=ki > 0)
            step += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((step + NUM_STAGES - 1) % NUM_STAGES), pred=k_tiles > 0)

        if HAS_BIAS:
            offs_n = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, acc_layout))
            bias = gl.load(BIAS_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc = acc + bias.to(gl.float32)[None, :]
        tma.store_wait(0)   # the last tile's store has left out_smem
        out_smem.store(acc.to(dtype))
        fence_async_shared()
        _tma_store(out_desc, [off_m, off_n], out_smem)
    tma.store_wait(0)


@gluon.jit
def gemm_lowrank_ws_kernel(
    # pointers
    P_ptr, Q_ptr, BIAS_ptr, L_ptr, RM_ptr, OUT_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides (P and OUT by rows; Q by the rows of the tensor it points to: W's (N, K) rows in forward and dX)
    stride_pm, stride_qrow, stride_lm, stride_lr, stride_rr, stride_rn, stride_om,
    # scalars
    lowrank_scale,
    # meta-parameters
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_R: gl.constexpr,
    GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_SMS: gl.constexpr, Q_TRANSPOSED: gl.constexpr,
    HAS_BIAS: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    dtype: gl.constexpr = P_ptr.dtype.element_ty
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
    out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    rm_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_R, BLOCK_N], dtype)
    p_desc = tma.make_tensor_descriptor(P_ptr, [M, K], [stride_pm, 1], [BLOCK_M, BLOCK_K], p_layout)
    if Q_TRANSPOSED:
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
        q_desc = tma.make_tensor_descriptor(Q_ptr, [N, K], [stride_qrow, 1], [BLOCK_N, BLOCK_K], q_layout)
    else:
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], dtype)
        q_desc = tma.make_tensor_descriptor(Q_ptr, [K, N], [stride_qrow, 1], [BLOCK_K, BLOCK_N], q_layout)
    out_desc = tma.make_tensor_descriptor(OUT_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N], out_layout)

    p_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + p_desc.block_type.shape, p_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_layout)
    rm_smem = gl.allocate_shared_memory(dtype, [BLOCK_R, BLOCK_N], rm_layout)
    out_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], out_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    gl.warp_specialize([
        (_consumer, (p_desc, q_desc, out_desc, p_bufs, q_bufs, ready, empty, rm_smem, out_smem, BIAS_ptr, L_ptr,
                     RM_ptr, M, N, K, R, stride_lm, stride_lr, stride_rr, stride_rn, lowrank_scale, BLOCK_R,
                     NUM_SMS, GROUP_M, Q_TRANSPOSED, HAS_BIAS, NUM_WARPS)),
        (_producer, (p_desc, q_desc, p_bufs, q_bufs, ready, empty, M, N, K, NUM_SMS, GROUP_M, Q_TRANSPOSED)),
    ], [1], [PRODUCER_REGS])
