"""The TMA GEMM's low-rank term by TMA (ops.term_for, issue 28) where the earlier code still read it by pointer loads:
the first, measuring call of a GEMM key, and DoRA's GEMMs. Runs under the interpreter on the CPU; the measured
choice with a stand-in timer (as tests/test_gemm_choice.py tests the choice without a GPU)."""

import functools

import pytest
import torch

from lora_fast import lora_linear
from lora_fast.kernels import choice, ops
from lora_fast.kernels.gemm_tma import gemm_lowrank_tma_kernel
from tests.utils import make_inputs


def _spy_tma_launches(monkeypatch, block_n):
    """Every TMA GEMM launch from now on, as (launcher, LOWRANK_TMA, RM_ROWS_N, MASK_TMA, BIAS_TMA, L's dtype, RM's
    dtype), appended to the returned list; the interpreted BLOCK_N ``block_n``."""
    monkeypatch.setitem(ops._TMA_INTERP, "BLOCK_N", block_n)
    seen = []
    real_call = ops._Launcher.__call__

    def spy(self, grid, *args, **kwargs):
        if self.kernel is gemm_lowrank_tma_kernel:
            seen.append((self, kwargs["LOWRANK_TMA"], kwargs["RM_ROWS_N"], kwargs["MASK_TMA"], kwargs["BIAS_TMA"],
                         args[3].dtype, args[4].dtype))
        return real_call(self, grid, *args, **kwargs)

    monkeypatch.setattr(ops._Launcher, "__call__", spy)
    return seen


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """The measured path choice on the CPU: keys are timed (ops._measures) by a stand-in timer that runs each candidate
    once and returns ``ms[name]`` (name: the path function, "_tma_gemm" or "_cublas_gemm"); returns (ms, the list of
    (candidate name, TMA launches it made)). Resolved keys are forgotten before and after."""
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(choice.ENV, raising=False)
    monkeypatch.setattr(ops, "_measures", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    choice.clear()
    ms, timed = {}, []

    def timer(fn):
        name = fn.func.__name__ if isinstance(fn, functools.partial) else fn.__name__
        timed.append((name, fn))
        fn()
        return ms[name]

    monkeypatch.setattr(choice.GEMM, "timer", timer)
    yield ms, timed
    choice.clear()


def _needs_hopper(device):
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("the TMA kernel needs sm_90 or newer")


@pytest.mark.parametrize("dtype,adapters,R,p,winner", [
    (torch.bfloat16, torch.float32, 5, 0.0, "tma"),    # PEFT's default: fp32 adapters on a bf16 base
    (torch.float16, torch.float32, 3, 0.25, "tma"),    # fp16's row factors, dX's keep-mask
    (torch.float16, torch.float16, 8, 0.0, "tma"),     # adapters in the dot dtype (A's rows 16 bytes): no copy of RM
    (torch.bfloat16, torch.float32, 5, 0.25, "cublas")], ids=str)
def test_the_measuring_call_times_what_later_calls_run(dtype, adapters, R, p, winner, measured, monkeypatch, device):
    """The first call of a key times the TMA candidate with the low-rank term by TMA (the S / dS pass's rounded copy of
    the term and, for fp32 adapters, of RM), the same launcher, flags and operand dtypes as a later call on the TMA
    path; before issue 28's leftover (a) it timed the pointer-load term (with fp32 adapters: their own, smaller
    config list). The first call's y, dx, dA, dB are bit for bit a later call's, whichever path wins (with cuBLAS
    winning the copy written for the timing changes nothing)."""
    _needs_hopper(device)
    ms, timed = measured
    ms.update(_tma_gemm=1.0 if winner == "tma" else 3.0, _cublas_gemm=2.0)
    launches = _spy_tma_launches(monkeypatch, 32)
    x, w, b, A, B = make_inputs((2, 19), 64, 40, R, dtype, device, adapter_dtype=adapters)
    dy = torch.randn(2, 19, 40, device=device).to(dtype)

    def step():
        torch.manual_seed(7)   # the same dropout seed in every call
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 1.5, dropout_p=p)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    measuring = {}
    real_timer = choice.GEMM.timer

    def timer(fn):   # the TMA launches each timed candidate makes
        start = len(launches)
        result = real_timer(fn)
        measuring.setdefault(timed[-1][0], []).extend(launches[start:])
        del launches[start:]
        return result

    monkeypatch.setattr(choice.GEMM, "timer", timer)
    first = step()
    first_runs = list(launches)   # the launches of the resolved path, after the timing
    launches.clear()
    second = step()
    assert [name for name, _ in timed] == ["_tma_gemm", "_cublas_gemm"] * 2   # forward's key, then dX's
    assert measuring["_cublas_gemm"] == []
    timed_tma = measuring["_tma_gemm"]
    # the term by TMA (the 16-bit config list: not the fp32-RM launcher), L in the dot dtype, RM in it too
    dot = ops._TORCH_DOT[dtype]
    assert [t[1:] for t in timed_tma] == [(True, False, False, b is not None, dot, dot),
                                          (True, R > 1, p > 0, False, dot, dot)], timed_tma
    if winner == "tma":
        assert timed_tma == first_runs == launches, (timed_tma, first_runs, launches)
    else:
        assert first_runs == launches == []
    for name, old, new in zip(("y", "dx", "dA", "dB"), first, second):
        assert torch.isfinite(old).all() and torch.equal(old, new), name


@pytest.mark.parametrize("dtype,adapters,R,p,bias,N", [
    (torch.bfloat16, torch.float32, 5, 0.0, True, 40),    # PEFT's default: fp32 adapters (A's rows of 20 bytes: a copy)
    (torch.float16, torch.float32, 3, 0.3, True, 40),     # dropout: the forward's (x - x_d) W^T + b, dX's two GEMMs
    (torch.bfloat16, torch.float32, 7, 0.3, False, 24),   # N <= 32: the dS pass unsplit (its copies in the row block)
    (torch.float16, torch.float16, 8, 0.0, False, 40)], ids=str)   # adapters in the dot dtype, A's rows 16 bytes
def test_dora_gemms_take_the_term_by_tma_and_change_nothing(dtype, adapters, R, p, bias, N, device, monkeypatch):
    """DoRA on the TMA GEMM (forced): its GEMMs into x's dtype read the low-rank term by TMA as lora_linear's (the S /
    dS pass's rounded copy of the term, fp32 A's and B's copies in the dot dtype: ops.term_for): the forward's
    (x - x_d) W^T + b (scale 0) with dropout, dX's GEMM of the scaled term, and with dropout dY W (scale 0) from the
    dS pass's second copy, 0 · dS rounded (ops.second_term; filled with NaN here before the pass, so a copy not
    written shows). y and every gradient (x, A, B, magnitude) are bit for bit those of the pointer-load term
    (kernels/dora.py's term_for returning None), and the second copy is 0 · dS in the dot dtype, signs of zero
    included (fp16: row factors 2**-100, fp16.py's for an all-zero row)."""
    from lora_fast import dora_linear, reference
    from lora_fast.kernels import dora as dora_kernels

    _needs_hopper(device)
    monkeypatch.setenv(choice.ENV, "tma")
    choice.clear()
    launches = _spy_tma_launches(monkeypatch, 32)
    seconds, projections = [], []
    real_second, real_project = dora_kernels.second_term, dora_kernels.lowrank_project

    def second_term(term, lowrank_scale):
        t = real_second(term, lowrank_scale)
        if t is not None:   # None in the pointer-load run (no term)
            t.values.fill_(float("nan"))
            if t.factors is not None:
                t.factors.fill_(float("nan"))
            seconds.append(t)
        return t

    def lowrank_project(*args, **kwargs):
        result = real_project(*args, **kwargs)
        projections.append((kwargs.get("term2"), result[0]))
        return result

    monkeypatch.setattr(dora_kernels, "second_term", second_term)
    monkeypatch.setattr(dora_kernels, "lowrank_project", lowrank_project)
    x, w, b, A, B = make_inputs((2, 19), 64, N, R, dtype, device, bias=bias, adapter_dtype=adapters)
    m = (reference.dora_weight_norm(w.float(), A.float(), B.float(), 1.5)
         * (1.0 + 0.3 * torch.randn(N, device=device))).to(adapters)
    dy = torch.randn(2, 19, N, device=device).to(dtype)

    def run():
        torch.manual_seed(5)   # the same dropout seed in both runs
        leaves = [t.detach().requires_grad_() for t in (x, A, B, m)]
        y = dora_linear(leaves[0], w, b, *leaves[1:], 1.5, dropout_p=p)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    try:
        with_term = run()
        by_tma = [t[1:] for t in launches]
        launches.clear()
        written = [(term2, dS) for term2, dS in projections if term2 is not None]
        monkeypatch.setattr(dora_kernels, "term_for", lambda *args, **kwargs: None)
        pointer_loads = run()
    finally:
        choice.clear()
    dot = ops._TORCH_DOT[dtype]
    dx_term = (True, R > 1, False, False, dot, dot)
    if p == 0:   # the forward's GEMM writes DoRA's fp32 sum (the cp.async kernel): dX's is the one TMA GEMM
        assert by_tma == [dx_term], by_tma
    else:        # forward (x - x_d) W^T + b; dX: the scaled term's GEMM, then dY W (scale 0, its own copy)
        assert by_tma == [(True, False, False, bias, dot, dot), dx_term, dx_term], by_tma
    assert len(written) == len(seconds) == (1 if p > 0 else 0) and all(t is s for (t, _), s in zip(written, seconds))
    for term2, dS in written:   # 0 · dS rounded to the dot dtype, bit for bit (signed zeros)
        assert term2.scale == 0.0
        bits = {2: torch.int16, 4: torch.int32}[term2.values.element_size()]
        assert torch.equal(term2.values.view(bits), (dS * 0.0).to(term2.values.dtype).view(bits))
        if term2.factors is not None:
            assert torch.equal(term2.factors, torch.full_like(term2.factors, 2.0 ** -100))
    assert all(not t[1] for t in launches)
    for name, old, new in zip(("y", "dx", "dA", "dB", "dm"), pointer_loads, with_term):
        assert torch.isfinite(old).all() and torch.equal(old, new), name


@pytest.mark.parametrize("winner", ["tma", "cublas"])
def test_dora_measuring_call_matches_later_calls(winner, measured, monkeypatch, device):
    """DoRA with dropout and fp32 adapters on an fp16 base, its keys measured (stand-in timer): the first call times
    the TMA candidate on the term by TMA (dX's scaled-term GEMM is the one of its key that is timed), and its dY W
    reads A's copy in the dot dtype on whichever path won (the cuBLAS path's term kernel too; the TMA path also the
    dS pass's second copy); y and every gradient are bit for bit a later call's, which takes the resolved path
    without timing (and, on cuBLAS, without a copy)."""
    from lora_fast import dora_linear, reference

    _needs_hopper(device)
    ms, timed = measured
    ms.update(_tma_gemm=1.0 if winner == "tma" else 3.0, _cublas_gemm=2.0)
    launches = _spy_tma_launches(monkeypatch, 32)
    x, w, b, A, B = make_inputs((23,), 64, 40, 3, torch.float16, device, adapter_dtype=torch.float32)
    m = reference.dora_weight_norm(w.float(), A, B, 1.5) * (1.0 + 0.3 * torch.randn(40, device=device))
    dy = torch.randn(23, 40, device=device).to(torch.float16)

    def run():
        torch.manual_seed(5)
        leaves = [t.detach().requires_grad_() for t in (x, A, B, m)]
        y = dora_linear(leaves[0], w, b, *leaves[1:], 1.5, dropout_p=0.3)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    first = run()
    assert [name for name, _ in timed] == ["_tma_gemm", "_cublas_gemm"] * 2   # the forward's key, then dX's
    # the TMA launches, LOWRANK_TMA: the forward's (x - x_d) W^T + b timed (then run again if TMA won), dX's
    # scaled-term GEMM timed (then run again), dY W (the second copy of dS) on the TMA path if it won
    assert [t[1] for t in launches] == ([True] * 5 if winner == "tma" else [True] * 2), launches
    timed.clear()
    second = run()
    assert timed == []
    for name, old, new in zip(("y", "dx", "dA", "dB", "dm"), first, second):
        assert torch.isfinite(old).all() and torch.equal(old, new), name


@pytest.mark.parametrize("on_disk", ["cublas", "tma", None], ids=str)
def test_term_for_reads_the_disk_cache_of_choices(on_disk, measured, monkeypatch, device):
    """The first call of a key in a process (nothing in memory) with its path already on disk (another process's
    measurement): term_for takes that path from the disk cache (choice.GemmChoice.known) and nothing is timed; on
    "cublas" the S and dS passes write no Term (no copy for nothing), on "tma" they write it and both GEMMs read the
    term by TMA. A key on no disk is measured as before, its TMA candidate on the Term (cuBLAS wins here). y, dx,
    dA, dB are bit for bit those of the same call with the taken path forced (LORA_FAST_GEMM)."""
    _needs_hopper(device)
    ms, timed = measured
    ms.update(_tma_gemm=3.0, _cublas_gemm=2.0)
    launches = _spy_tma_launches(monkeypatch, 32)
    terms = []   # whether each S / dS pass writes the Term
    real_project = ops.lowrank_project

    def lowrank_project(*args, **kwargs):
        terms.append(kwargs.get("term") is not None)
        return real_project(*args, **kwargs)

    monkeypatch.setattr(ops, "lowrank_project", lowrank_project)
    R, p = 5, 0.25
    x, w, b, A, B = make_inputs((2, 19), 64, 40, R, torch.bfloat16, device, adapter_dtype=torch.float32)
    dy = torch.randn(2, 19, 40, device=device).to(torch.bfloat16)
    keys = [ops._gemm_key(torch.empty(38, 64, dtype=torch.bfloat16, device=device), 40, R, False, False),
            ops._gemm_key(torch.empty(38, 40, dtype=torch.bfloat16, device=device), 64, R, True, True)]
    disk = choice.SharedTable(choice.GEMM._file("stand-in GPU"))   # another process's
    if on_disk is not None:
        for key in keys:
            disk.add(repr(key[1:]), on_disk)

    def step():
        torch.manual_seed(7)
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 1.5, dropout_p=p)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    got = step()
    taken = on_disk or "cublas"
    if on_disk is None:   # measured: each key's TMA candidate timed on the Term, then cuBLAS (the winner) runs
        assert [name for name, _ in timed] == ["_tma_gemm", "_cublas_gemm"] * 2
        assert [t[1] for t in launches] == [True, True]
    else:
        assert timed == []
        assert [t[1] for t in launches] == ([True, True] if on_disk == "tma" else [])
    assert terms == [taken == "tma" or on_disk is None] * 2
    assert [choice.GEMM.get(k) for k in keys] == [taken] * 2
    assert [choice.SharedTable(disk.path).get(repr(k[1:])) for k in keys] == [taken] * 2
    monkeypatch.setenv(choice.ENV, taken)
    choice.clear()
    forced = step()
    for name, old, new in zip(("y", "dx", "dA", "dB"), forced, got):
        assert torch.isfinite(old).all() and torch.equal(old, new), name
