"""The GPU launch path on a machine without a GPU: Triton's final launch is stubbed (bench/host_time.py's
stand-in driver compiles every kernel for sm_90 and records each launch instead of making it). Runs in a
subprocess with TRITON_INTERPRET=0, since the interpreter is chosen when the kernels are imported.

Checked: a cached launch plan passes the compiled kernel exactly the arguments Triton's own JIT passed on the
first call (grid, stream, every argument in order, constexprs and the tuned config included); every launch
is made with the tensors' device current, the caller's device restored after."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, torch
import bench.host_time as host

patches = []
def monkeypatch(obj, name, value):
    patches.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)

launcher = host._install(monkeypatch)
from lora_fast import lora_linear
from lora_fast.kernels import ops
from triton.tools.tensor_descriptor import TensorDescriptor

scratch_calls = [0]   # the device-side descriptors' global scratch (Triton's allocator, per launch)
cpu_scratch = ops._scratch
def counting_scratch(size, alignment, stream):
    scratch_calls[0] += 1
    return cpu_scratch(size, alignment, stream)
monkeypatch(ops, "_scratch", counting_scratch)
# the tensor maps Triton's launcher encodes for host-side descriptors (stubbed: cuTensorMapEncodeTiled needs libcuda)
import triton
fills = [0]
utils = triton.runtime.driver.active.utils
for fill_name in ("fill_tma_descriptor", "fill_tma_descriptor_tiled"):
    def counting_fill(*args, fill=getattr(utils, fill_name)):
        fills[0] += 1
        return fill(*args)
    monkeypatch(utils, fill_name, counting_fill)

def launches(fn):
    launcher.record = []
    fn()
    out, launcher.record = launcher.record, None
    return out

def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):   # fresh outputs each call: same layout
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.stride() == b.stride())
    return type(a) is type(b) and (a == b or repr(a) == repr(b))

K, N, R = 96, 80, 8
w = torch.randn(N, K).half(); b = torch.randn(N).half()
A = torch.randn(K, R).requires_grad_(); B = torch.randn(R, N).requires_grad_()
x = torch.randn(3, 7, K).half().requires_grad_(); dy = torch.randn(3, 7, N).half()
result = {}
# decode sizes and rank 1 (sizes of 1 are constexprs in Triton's specialisation), in and out beyond one
# split of the narrow passes (then S and dS take a finishing sum): every launch compiles for sm_90
for M, K2, N2, R2 in ((1, 600, 520, 1), (2, 600, 520, 16)):
    A2 = torch.randn(K2, R2).requires_grad_(); B2 = torch.randn(R2, N2).requires_grad_()
    x2 = torch.randn(M, K2).bfloat16().requires_grad_()
    y2 = lora_linear(x2, torch.randn(N2, K2).bfloat16(), None, A2, B2, 2.0, dropout_p=0.1)
    result[f"decode M={M} R={R2}"] = len(launches(lambda: y2.backward(torch.randn(M, N2).bfloat16())))
for p in (0.0, 0.25):
    def step():
        torch.manual_seed(0)
        y = lora_linear(x, w, b, A, B, 2.0, dropout_p=p)
        y.backward(dy)
    first, second = launches(step), launches(step)   # JIT + autotuner, then cached plans
    result[f"launches p={p}"] = [len(first), len(second)]
    result[f"same arguments p={p}"] = all(
        n1 == n2 and len(a1) == len(a2) and all(same(u, v) for u, v in zip(a1[:4] + a1[7:], a2[:4] + a2[7:]))
        and a1[4:6] == a2[4:6]
        for (n1, _, a1), (n2, _, a2) in zip(first, second))

# planned calls (functional._OpPlan, kernels/plan.py): from the third call of a layout on, the recorded launches
# replay; they must be the launchers' launches exactly, with each call's own tensors in every pointer argument
from lora_fast import functional
from lora_fast.kernels import choice, plan as kplan

replays = [0]
original_replay = kplan.Replay.__call__
def counting_replay(self, *inputs):
    out = original_replay(self, *inputs)
    replays[0] += out is not None
    return out
monkeypatch(kplan.Replay, "__call__", counting_replay)
addmms = []
original_addmm = torch.Tensor.addmm_
def recording_addmm(self, mat1, mat2, **kwargs):   # the cuBLAS path's torch op, recorded like a launch
    # with addmm_'s own shape rules (a replay once gave it the N-D input in place of the launchers' 2-D view)
    if mat1.dim() != 2 or mat2.dim() != 2 or tuple(self.shape) != (mat1.shape[0], mat2.shape[1]) \
            or mat1.shape[1] != mat2.shape[0]:
        raise RuntimeError(f"addmm_: {tuple(self.shape)} += {tuple(mat1.shape)} @ {tuple(mat2.shape)}")
    addmms.append(("addmm", 0, (self, mat1, mat2, 0, 0, 0, 0, [(t.shape, t.stride()) for t in (self, mat1, mat2)])))
    return self
monkeypatch(torch.Tensor, "addmm_", recording_addmm)

def roles(calls, named):
    """Each launch as (kernel, grid, arguments) with a tensor argument named by the input whose data pointer it
    holds, else by its layout (a fresh buffer)."""
    def name(a):
        if isinstance(a, TensorDescriptor):   # a host-side descriptor: of which tensor, with which layout
            return ("desc", name(a.base), list(a.shape), list(a.strides), list(a.block_shape))
        if isinstance(a, torch.Tensor):
            for n, t in named.items():
                if t is not None and a.data_ptr() == t.data_ptr() and a.dtype == t.dtype:
                    return n
            return ("fresh", str(a.dtype), a.numel())   # the launchers' (M, K) buffer is the replay's (B, T, K)
        return repr(a)
    # the launch metadata argument (4-6: Triton's JIT passes a LazyDict, a planned launch None without a profiler)
    return [(kname, [name(a) for i, a in enumerate(args) if not 4 <= i <= 6]) for kname, _, args in calls]

A32, B32 = A, B
alive = []   # every step's tensors stay alive: no address is reused, so a stale one would be named wrongly
# "tma-16": fp16 adapters, whose low-rank term the TMA kernel reads by TMA (the S and dS passes write its rounded
# copy into padded buffers, views that the recording aliases: ops.term_for); "tma-host": the same with host-side
# descriptors (LORA_FAST_TMA_DESC=host), which each replay must build around its own call's tensors
# "-stored": the factors as PEFT stores them (lora_linear_stored: A (R, K), B (N, R)), read through transposed views
# and given gradients in their own layout; "-views": lora_linear on such transposed views (the replay allocates dA
# and dB in the views' strides, ops._empty_like)
stored_grads = {}
PATHS = ("triton", "cublas", "tma", "tma-16", "tma-host", "triton-stored", "cublas-stored", "tma-stored",
         "triton-views")
for path in PATHS:
    choice.clear()
    monkeypatch(choice, "forced_path", lambda path=path: path.split("-")[0])
    os.environ["LORA_FAST_TMA_DESC"] = "host" if path == "tma-host" else "device"
    A, B = A32, B32
    if path in ("tma-16", "tma-host"):
        A, B = A32.detach().half().requires_grad_(), B32.detach().half().requires_grad_()
    stored = path.endswith("-stored") or path.endswith("-views")
    if stored:
        A, B = A32.detach().t().contiguous().requires_grad_(), B32.detach().t().contiguous().requires_grad_()
    for p in (0.0, 0.25):
        trace, replays[0], scratch_calls[0], fills[0] = [], 0, 0, 0
        for step in range(4):   # JIT and tuning, the recording, two replays
            xs3 = torch.randn(2, 5, K).half().requires_grad_()
            dys = torch.randn(2, 5, N).half()
            launcher.record, addmms[:] = [], []
            if path.endswith("-views"):
                ys = lora_linear(xs3, w, b, A.t(), B.t(), 2.0, dropout_p=p)
            else:
                ys = (functional.lora_linear_stored if stored else lora_linear)(xs3, w, b, A, B, 2.0, dropout_p=p)
            S_saved, seed_saved = ys.grad_fn.saved_tensors[4:6]
            fwd = launcher.record + addmms
            launcher.record, addmms[:] = [], []
            ys.backward(dys)
            bwd = launcher.record + addmms
            launcher.record = None
            named = dict(x=xs3, w=w, b=b, A=A, B=B, y=ys, dy=dys, dx=xs3.grad, dA=A.grad, dB=B.grad, S=S_saved,
                         seed=seed_saved)
            alive.append((named, fwd, bwd))
            trace.append(roles(fwd, named) + roles(bwd, named))
            if stored:   # the gradients' layout: the parameters' own (contiguous (R, K) and (N, R)), every step
                # (whether autograd keeps the buffers or copies them is test_planned's: the launch records here hold
                # references to them, so autograd copies)
                stored_grads.setdefault(f"{path} p={p}", []).append(
                    [A.grad.stride() == A.stride(), B.grad.stride() == B.stride()])
            A.grad = B.grad = None
        # the second call went through the launchers (and was recorded), the third and fourth replayed
        result[f"planned {path} p={p}"] = [replays[0] >= 4, trace[3] == trace[1] and trace[2] == trace[1],
                                          sum(1 for k, _ in trace[0] if k != "addmm")]
        # per step: the host descriptors' tensors by name (the GEMMs' P, Q, OUT, bias, L, RM, F, mask), and the
        # device-side descriptors' scratch allocations
        result[f"descriptors {path} p={p}"] = [[a[1] for _, args in t for a in args if isinstance(a, tuple)
                                                and a[0] == "desc"] for t in trace]
        result[f"scratch {path} p={p}"] = [scratch_calls[0], fills[0]]
        if path.endswith("-views"):   # the replayed backward allocates dA and dB in the views' strides
            result[f"strided {path} p={p}"] = sorted(
                line.strip().split(" = ")[1].split(".")[1].split("(")[0] for op in functional._PLANS.values()
                for rep in op.bwd.values() for line in rep._source.splitlines() if "_strided(" in line)
os.environ.pop("LORA_FAST_TMA_DESC")
result["stored grads"] = stored_grads
A, B = A32, B32

# saved-tensor hooks (save_on_cpu with pinned memory packs a contiguous copy): what backward unpacks then has other
# strides than the call's x, and those strides are arguments of the dA pass. Steps 0-1 without hooks, 2-4 with, 5
# without: the replays (steps 2-5) must launch what the launchers launch for the same steps
import contextlib
monkeypatch(choice, "forced_path", lambda: "triton")
strided = torch.randn(6, 2, 5, K + 8).half()
def hooked_steps():
    out, replays[0] = [], 0
    for step in range(6):
        xs = strided[step, ..., :K].detach().requires_grad_()   # row stride K + 8
        with (torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t) if 2 <= step <= 4
              else contextlib.nullcontext()):
            ys = lora_linear(xs, w, b, A, B, 2.0)
        launcher.record = []
        ys.backward(torch.ones_like(ys))
        out.append(roles(launcher.record, dict(x=xs, w=w, b=b, A=A, B=B)))
        launcher.record = None
        A.grad = B.grad = None
    return out, replays[0]
choice.clear()
planned_trace, planned_replays = hooked_steps()
# a replay reuses its small scratch (dS, the dB partials) call after call, but not inside a CUDA graph capture
(op,) = functional._PLANS.values()
def scratch_use(capturing):
    for rep in op.bwd.values():
        rep.capturing = capturing
    held = {t.data_ptr() for rep in op.bwd.values() for n, t in rep._run.__globals__.items() if n.startswith("scratch")}
    xs = strided[0, ..., :K].detach().requires_grad_()
    ys = lora_linear(xs, w, b, A, B, 2.0)
    launcher.record = []
    ys.backward(torch.ones_like(ys))
    used = {a.data_ptr() for _, _, args in launcher.record for a in args if isinstance(a, torch.Tensor)}
    launcher.record = None
    A.grad = B.grad = None
    return len(held), len(held & used)
result["scratch reuse"] = [scratch_use(None), scratch_use(lambda: True)]
os.environ["LORA_FAST_BACKEND"] = "triton"   # any value: the unplanned path (select_backend is stubbed)
choice.clear()
unplanned_trace, unplanned_replays = hooked_steps()
del os.environ["LORA_FAST_BACKEND"]
result["saved-tensor hooks"] = [planned_replays >= 6, unplanned_replays, planned_trace == unplanned_trace]
choice.clear()

# a layer whose tensors live on cuda:1 called while cuda:0 is current
S = torch.zeros(21, R)
out = torch.empty(21, N).half()
xs = torch.randn(21, K).half()
def on_device_1():
    ops._gemm(lambda meta: (1,), xs, w, b, S, B, out, out, 21, N, K, R, 32, xs.stride(0), xs.stride(1),
              w.stride(1), w.stride(0), S.stride(0), S.stride(1), B.stride(0), B.stride(1), out.stride(0),
              out.stride(1), 1.0, 0.0, BLOCK_R=16, HAS_BIAS=True, HAS_DROPOUT=False, DOT_DTYPE=ops.configs.dot_dtype(
              torch.float16), INPUT_PRECISION="ieee", device=torch.device("cuda", 1), dtype=torch.float16)
devices = [d for _, d, _ in launches(on_device_1) + launches(on_device_1)]
result["devices"] = devices
result["current after"] = torch.cuda.current_device()
for obj, name, value in reversed(patches):
    setattr(obj, name, value)
print("RESULT " + json.dumps(result))
'''


def test_launch_plans_and_devices():
    env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_FAST_AUTOTUNE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # forward: x A, the GEMM; backward: dY B^T (with dB finished in the same launch), the dX GEMM, the dA
    # reduction (finished in its launch)
    assert result["launches p=0.0"] == [5, 5] and result["launches p=0.25"] == [5, 5]
    assert result["same arguments p=0.0"] and result["same arguments p=0.25"]
    assert result["devices"] == [1, 1] and result["current after"] == 0
    # backward at decode size: dS (split in 3 along N = 520, summed by its last split) with dB, dX, dA
    assert result["decode M=1 R=1"] == 3 and result["decode M=2 R=16"] == 3
    # planned calls: the third and fourth call of each layout replay forward and backward (4 replays or more), with
    # the launchers' launches, arguments and tensor roles exactly; five launches on every GEMM path
    for path in ("triton", "cublas", "tma", "tma-16", "tma-host", "triton-stored", "cublas-stored", "tma-stored",
                 "triton-views"):
        for p in (0.0, 0.25):
            assert result[f"planned {path} p={p}"] == [True, True, 5], (path, p, result[f"planned {path} p={p}"])
            # host descriptors: none on the other paths; with them no scratch for the device-side ones (one per TMA
            # launch without: 2 GEMMs a step, 4 steps)
            descs = result[f"descriptors {path} p={p}"]
            if path != "tma-host":
                assert descs == [[]] * 4
                assert result[f"scratch {path} p={p}"] == [8 if path.startswith("tma") else 0, 0]
                continue
            # each descriptor of the 4 steps encoded by the launch (the first step's by Triton's JIT launch)
            assert result[f"scratch {path} p={p}"] == [0, sum(len(d) for d in descs)]
            # in argument order (P, Q, BIAS, L, RM, OUT, MASK, F): forward x, W, the bias, the term's L (the S pass's
            # copy: a fresh buffer), B, y, fp16's row factors; dX: dY, W, the term of dS, A, dX (fresh: autograd
            # hands it to x.grad afterwards), with dropout the keep-mask's bytes (the forward's, saved in the "seed"
            # slot), the row factors -- every step the same roles, replays included (each with its own call's
            # tensors: no stale address)
            names = [n if isinstance(n, str) else n[0] for n in descs[0]]
            assert names == (["x", "w", "b", "fresh", "B", "y", "fresh", "dy", "w", "fresh", "A", "fresh"]
                             + (["seed"] if p else []) + ["fresh"]), names
            assert descs[1] == descs[2] == descs[3] == descs[0], descs
    # lora_linear_stored: PEFT's layouts' gradients in those layouts, on the launchers' path and replayed
    assert result["stored grads"] == {f"{path} p={p}": [[True, True]] * 4 for p in (0.0, 0.25)
                                      for path in ("triton-stored", "cublas-stored", "tma-stored", "triton-views")}, \
        result["stored grads"]
    for p in (0.0, 0.25):   # dA and dB of each backward replay so far (the plans of p = 0 and, later, of 0.25)
        strided = result[f"strided triton-views p={p}"]
        assert len(strided) >= 2 and set(strided) == {"new_empty_strided"}, strided
    # a backward replay is keyed on the saved tensors' layout when saved-tensor hooks were active in forward
    assert result["saved-tensor hooks"] == [True, 0, True], result["saved-tensor hooks"]
    (held, used), (_, used_capturing) = result["scratch reuse"]
    assert held > 0 and used > 0 and used_capturing == 0, result["scratch reuse"]   # held: of both replays
