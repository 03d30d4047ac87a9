"""The GEMM path choice (kernels/choice.py): both paths against float64, and the choice logic with a fake timer."""

import json
import os

import pytest
import torch

from lora_fast import lora_linear
from lora_fast.kernels import choice, dropout_keep_mask
from tests.utils import check_op, make_inputs


@pytest.fixture
def forced(monkeypatch):
    """Force a path for one test; the resolved keys are forgotten before and after."""
    def force(path):
        monkeypatch.setenv(choice.ENV, path)
        choice.clear()
    yield force
    monkeypatch.delenv(choice.ENV, raising=False)
    choice.clear()


@pytest.mark.parametrize("path", choice.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# the first two shapes have rows TMA descriptors refuse (45 or 33 elements): "tma" falls back to the cp.async kernel;
# the third is aligned for every dtype (48 and 40 elements), so "tma" runs the persistent kernel
@pytest.mark.parametrize("lead,K,N,R,bias", [((37,), 45, 70, 3, True), ((2, 17), 64, 33, 16, False),
                                             ((2, 9), 48, 40, 4, True)], ids=str)
def test_paths_match_float64(path, dtype, lead, K, N, R, bias, device, forced):
    forced(path)
    inputs = make_inputs(lead, K, N, R, dtype, device, bias=bias)
    check_op(lambda *a: lora_linear(*a), *inputs, scale=1.5)
    bucket = 64 if len(lead) == 1 or lead[1] > 9 else 32
    assert choice.GEMM.get((device, dtype, bucket, N, K, R, False, False)) == path


def test_tma_takes_aligned_operands_only(monkeypatch, forced):
    """ops.tma_eligible: unit inner strides and 16-byte aligned bases and rows; a forced "tma" on operands it
    refuses runs the cp.async kernel (chosen before launch), with the same result."""
    from lora_fast.kernels import ops

    bf16 = torch.bfloat16
    x, w, out = torch.randn(8, 48).to(bf16), torch.randn(40, 48).to(bf16), torch.empty(8, 40, dtype=bf16)
    assert not ops.tma_eligible(x.float(), w.float(), (1, 48), out.float())   # 16-bit only
    assert ops.tma_eligible(x, w, (1, 48), out)                     # forward: Q = W^T from W's rows
    assert ops.tma_eligible(out, w, (48, 1), x)                     # dX: Q = W as stored
    assert not ops.tma_eligible(x[:, 1:], w, (1, 48), out)          # base 2 bytes past an aligned one
    assert not ops.tma_eligible(x, w, (1, 48), out[:, ::2])         # strided output
    assert ops.tma_eligible(x, w[:, :45], (1, 48), out)             # a narrower view: rows still 48 apart
    w45 = torch.randn(40, 45).to(bf16)
    assert not ops.tma_eligible(torch.randn(8, 45).to(bf16), w45, (1, 45), out)   # rows of 90 bytes
    forced("tma")
    calls = []
    real = ops._GEMM_PATHS["triton"]
    monkeypatch.setitem(ops._GEMM_PATHS, "triton", lambda *a, **k: (calls.append(1), real(*a, **k)))
    inputs = make_inputs((8,), 45, 40, 4, bf16, x.device)
    check_op(lambda *a: lora_linear(*a), *inputs, scale=1.5)
    assert calls, "a misaligned forced tma launch did not fall back to the cp.async kernel"


@pytest.mark.parametrize("subtile,dtype,p", [(1, torch.bfloat16, 0.3), (2, torch.float16, 0.3),
                                             (4, torch.bfloat16, 0.0), (4, torch.float16, 0.0)], ids=str)
def test_tma_epilogue_slices_and_tiles_across_programs(subtile, dtype, p, device, forced, monkeypatch):
    """The persistent TMA kernel's epilogue in 1, 2 or 4 column slices (bias added before the split), with more
    tiles than programs (6 tiles of 32 x 32 on the interpreter's 2 "SMs": the flattened loop crosses tiles), the
    forward and dX, with and without the dX keep-mask; fp16's range guard puts the low-rank term before the loop."""
    from lora_fast.kernels import ops

    forced("tma")
    monkeypatch.setitem(ops._TMA_INTERP, "SUBTILE", subtile)
    calls = []
    real = ops._GEMM_PATHS["tma"]
    monkeypatch.setitem(ops._GEMM_PATHS, "tma", lambda *a, **k: (calls.append(1), real(*a, **k)))
    inputs = make_inputs((70,), 64, 64, 5, dtype, device)
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)

    def op(*args):
        torch.manual_seed(7)
        return lora_linear(*args, dropout_p=p)
    check_op(op, *inputs, 1.5, dropout_p=p, mask=dropout_keep_mask(seed, 70, 64, p) if p else None)
    assert len(calls) == 2, "the forward and dX did not both run the TMA kernel"


def test_ws_is_opt_in_and_falls_back_where_it_cannot_run(forced, monkeypatch, device):
    """LORA_FAST_GEMM=ws (kernels/gemm_ws.py) is never timed by the automatic choice; forced, it runs only where
    ops.ws_eligible allows (bf16, no dropout, sm_90, not interpreted: Gluon has no interpreter) and the TMA kernel
    otherwise, with the same result."""
    from lora_fast.kernels import ops

    assert "ws" not in choice.PATHS and "ws" in choice.OPT_IN
    forced("ws")
    assert choice.forced_path() == "ws"
    bf16 = torch.bfloat16
    x, w, out = (torch.randn(8, 48, device=device).to(bf16), torch.randn(40, 48, device=device).to(bf16),
                 torch.empty(8, 40, dtype=bf16, device=device))
    on_hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    assert ops.ws_eligible(x, w, (1, 48), out, 0.0) == on_hopper
    assert not ops.ws_eligible(x, w, (1, 48), out, 0.1)                       # no dropout in the Gluon kernel
    assert not ops.ws_eligible(x.half(), w.half(), (1, 48), out.half(), 0.0)   # bf16 only
    ran = []
    for name in ("ws", "tma"):
        real = ops._GEMM_PATHS[name]
        monkeypatch.setitem(ops._GEMM_PATHS, name, lambda *a, _n=name, _f=real, **k: (ran.append(_n), _f(*a, **k)))
    check_op(lambda *a: lora_linear(*a), *make_inputs((2, 24), 48, 40, 4, bf16, device), scale=1.5)
    assert ran == (["ws", "ws"] if on_hopper else ["tma", "tma"])


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the Gluon warp-specialised GEMM runs on sm_90 only, and Gluon has no CPU interpreter")
@pytest.mark.parametrize("lead,K,N,R,bias", [((300,), 192, 320, 16, True), ((2, 130), 256, 136, 64, False)], ids=str)
def test_ws_kernel_matches_float64_on_hopper(lead, K, N, R, bias, forced, device):
    """The Gluon kernel's numerics (forward and dX, bf16): several tiles per program, partial edge tiles."""
    forced("ws")
    check_op(lambda *a: lora_linear(*a), *make_inputs(lead, K, N, R, torch.bfloat16, device, bias=bias), scale=1.5)
    assert choice.GEMM.get((device, torch.bfloat16, 512, N, K, R, False, False)) == "ws"


@pytest.mark.parametrize("path", choice.PATHS)
def test_paths_with_dropout_and_a_transposed_weight(path, device, forced):
    """dX with the keep-mask in its low-rank term; the weight a transposed view (no copy on either path)."""
    forced(path)
    p = 0.3
    x, w, b, A, B = make_inputs((29,), 40, 36, 4, torch.float32, device)
    w = w.t().contiguous().t()      # (N, K) with strides (1, N)
    torch.manual_seed(99)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    mask = dropout_keep_mask(seed, 29, 40, p)

    def op(*args):
        torch.manual_seed(99)
        return lora_linear(*args, dropout_p=p)
    check_op(op, x, w, b, A, B, 2.0, dropout_p=p, mask=mask)


class _Timer:
    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, fn):
        fn()
        self.calls.append(fn.__name__)
        return self.ms[fn.__name__]


def _candidates(log):
    def triton():
        log.append("triton")

    def cublas():
        log.append("cublas")
    return {"triton": triton, "cublas": cublas}


def test_choice_measures_once_remembers_and_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(choice.ENV, raising=False)
    log = []
    timer = _Timer({"triton": 1.0, "cublas": 0.5})
    gemm = choice.GemmChoice(timer, versions="v1")
    key = ("cuda:0", "bf16", 8192, 4096, 4096, 16, False, False)
    assert gemm.resolve(key, "NVIDIA H200", _candidates(log)) == "cublas"
    assert timer.calls == ["triton", "cublas"] and gemm.get(key) == "cublas"
    files = list(tmp_path.glob("*.json"))   # beside each: its lock file (*.json.lock)
    assert len(files) == 1 and "NVIDIA_H200" in files[0].name and "v1" in files[0].name
    assert json.loads(files[0].read_text()) == {repr(key[1:]): "cublas"}   # no device index on disk
    # another key is timed on its own; the faster path wins
    other = key[:-1] + (True,)
    timer.ms = {"triton": 0.2, "cublas": 0.5}
    assert gemm.resolve(other, "NVIDIA H200", _candidates(log)) == "triton"
    # a second process (a fresh object) reads the file and times nothing
    timer2 = _Timer({"triton": 9.0, "cublas": 9.0})
    gemm2 = choice.GemmChoice(timer2, versions="v1")
    assert gemm2.resolve(key, "NVIDIA H200", _candidates(log)) == "cublas"
    assert gemm2.resolve(other, "NVIDIA H200", _candidates(log)) == "triton"
    assert timer2.calls == []
    # new versions time afresh, in their own file
    timer3 = _Timer({"triton": 0.1, "cublas": 0.5})
    gemm3 = choice.GemmChoice(timer3, versions="v2")
    assert gemm3.resolve(key, "NVIDIA H200", _candidates(log)) == "triton"
    assert timer3.calls == ["triton", "cublas"] and len(list(tmp_path.glob("*.json"))) == 2


def test_known_takes_what_resolve_would_without_timing(tmp_path, monkeypatch):
    """GemmChoice.known (ops.term_for's lookup before a key's first call): the path a rank published in the job's
    store (a stand-in store here), else the disk entry when it names one of the candidates, else None; it times
    nothing and leaves memory, files and store as they were, and resolve then returns the same path untimed."""
    import torch.distributed as dist

    from lora_fast.kernels import cache

    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(choice.ENV, raising=False)
    store = dist.HashStore()
    monkeypatch.setattr(cache, "_job_store", lambda: store)
    timer = _Timer({"tma": 1.0, "cublas": 0.5, "triton": 0.1})
    gemm = choice.GemmChoice(timer, versions="v1")
    keys = [("cuda:0", "bf16", 64, 40, 64 + i, 5, False, False) for i in range(4)]
    other = choice.SharedTable(gemm._file("gpu"))   # another process's writes
    for key, path in zip(keys, ("cublas", "triton", "cublas", "cublas")):
        other.add(repr(key[1:]), path)
    name = os.path.basename(gemm._file("gpu"))
    store.set(f"lora_fast/{name}/{keys[2][1:]!r}", "tma")     # a rank's choice wins over this node's disk
    store.set(f"lora_fast/{name}/{keys[3][1:]!r}", "bogus")   # not a path: ignored
    fresh = ("cuda:0", "bf16", 64, 40, 99, 5, False, False)
    on_disk = tmp_path.joinpath(name).read_text()
    candidates = ("tma", "cublas")
    assert [gemm.known(k, "gpu", candidates) for k in keys + [fresh]] == ["cublas", None, "tma", "cublas", None]
    assert gemm.known(keys[1], lambda: "gpu", ("triton", "cublas")) == "triton"
    assert timer.calls == [] and all(gemm.get(k) is None for k in keys + [fresh])
    assert tmp_path.joinpath(name).read_text() == on_disk and not store.check([f"lora_fast/{name}/{fresh[1:]!r}"])

    def path(p):
        def run():
            pass
        run.__name__ = p
        return run
    calls = {p: path(p) for p in candidates}
    assert [gemm.resolve(k, "gpu", calls) for k in (keys[0], keys[2], keys[3])] == ["cublas", "tma", "cublas"]
    assert timer.calls == []
    assert gemm.resolve(keys[1], "gpu", calls) == "cublas" and timer.calls == ["tma", "cublas"]   # re-timed


def test_choice_obeys_the_environment_and_survives_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    timer = _Timer({"triton": 1.0, "cublas": 0.5})
    key = ("cuda:0", "fp16", 16, 1024, 4096, 8, False, True)
    monkeypatch.setenv(choice.ENV, "triton")
    gemm = choice.GemmChoice(timer, versions="v1")
    assert gemm.resolve(key, "gpu", _candidates([])) == "triton" and timer.calls == []
    monkeypatch.setenv(choice.ENV, "bogus")
    gemm.clear()
    with pytest.raises(ValueError, match="LORA_FAST_GEMM"):
        gemm.resolve(key, "gpu", _candidates([]))
    monkeypatch.setenv(choice.ENV, "auto")
    (tmp_path / os.path.basename(gemm._file("gpu"))).write_text("{not json")
    gemm.clear()
    assert gemm.resolve(key, "gpu", _candidates([])) == "cublas"
    assert json.loads((tmp_path / os.path.basename(gemm._file("gpu"))).read_text()) == {repr(key[1:]): "cublas"}
    # nothing is timed where no GPU can time (the interpreter): the fused kernel unless forced
    gemm.clear()
    assert gemm.resolve(key + ("interp",), "gpu", _candidates([]), measure=False) == "triton"


def test_the_4bit_choice_has_its_own_paths_file_and_switch(tmp_path, monkeypatch):
    """choice.GEMM_4BIT (QLoRA's fused / dequant): its own file, not forced by LORA_FAST_GEMM, "fused" when
    nothing is timed; the faster path wins when timed."""
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(choice.ENV, "cublas")
    timer = _Timer({"fused": 2.0, "dequant": 1.0})
    gemm4 = choice.GemmChoice(timer, versions="v1", paths=choice.GEMM_4BIT.paths, default="fused",
                              forced=lambda: None, prefix="gemm4bit")
    key = ("cuda:0", "bf16", 8192, 4096, 4096, 16, "nf4", 64, True)

    def fused():
        pass

    def dequant():
        pass
    assert gemm4.resolve(key, "gpu", {"fused": fused, "dequant": dequant}) == "dequant"
    assert [f.name for f in tmp_path.glob("*.json")] == [os.path.basename(gemm4._file("gpu"))]
    assert os.path.basename(gemm4._file("gpu")).startswith("gemm4bit-")
    gemm4.clear()
    assert gemm4.resolve(key + ("x",), "gpu", {"fused": fused, "dequant": dequant}, measure=False) == "fused"
    assert choice.GEMM_4BIT.paths == ("fused", "dequant") and choice.GEMM_4BIT.default == "fused"


def _tma_launches(device, forced, monkeypatch, block_n, record):
    """Force the TMA GEMM path (skipped below sm_90), with the interpreted BLOCK_N ``block_n``; returns the list that
    gets ``record(kwargs)`` of every TMA GEMM launch from then on."""
    from lora_fast.kernels import ops
    from lora_fast.kernels.gemm_tma import gemm_lowrank_tma_kernel

    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("the TMA kernel needs sm_90 or newer")
    forced("tma")
    monkeypatch.setitem(ops._TMA_INTERP, "BLOCK_N", block_n)
    seen = []
    real_call = ops._Launcher.__call__

    def spy(self, grid, *args, **kwargs):
        if self.kernel is gemm_lowrank_tma_kernel:
            seen.append(record(kwargs))
        return real_call(self, grid, *args, **kwargs)

    monkeypatch.setattr(ops._Launcher, "__call__", spy)
    return seen


@pytest.mark.parametrize("dtype,adapters,R,p,bias,block_n", [
    (torch.bfloat16, "dot", 5, 0.0, True, 32), (torch.float16, "dot", 5, 0.0, False, 32),
    (torch.bfloat16, "dot", 16, 0.3, False, 128), (torch.float16, "dot", 12, 0.3, True, 128),
    # fp32 adapters (PEFT's default): B and A's rows cast to the dot dtype by the S and dS passes' extra programs
    (torch.float16, "fp32", 5, 0.0, True, 32), (torch.float16, "fp32", 3, 0.3, False, 128),
    (torch.float16, "fp32", 16, 0.3, True, 32), (torch.bfloat16, "fp32", 7, 0.3, True, 128),
    (torch.bfloat16, "fp32", 1, 0.0, False, 32)], ids=str)
def test_tma_lowrank_term_by_tma_is_bit_identical(dtype, adapters, R, p, bias, block_n, device, forced, monkeypatch):
    """The TMA kernel's low-rank term by TMA (LOWRANK_TMA: the S and dS passes' rounded copy of scale * S or dS, B
    and A's rows by descriptors; with dropout the keep-mask's bytes, the bias by TMA too) gives the output of the
    same kernel with the pointer loads bit for bit: forward and dX, M and N not multiples of the 32 x 32 tile, R not
    a multiple of 8 (A's rows padded to 16 bytes in storage), with and without bias and the dX keep-mask; fp16 with
    rows of S far beyond fp16's range (its power-of-two row factors, fp16.py). BLOCK_N 128: the keep-mask's 16 bytes
    per tile row by TMA, the tile wider than the 64 or 72 columns. Adapters in the dot dtype (fp32 for bf16 under the
    interpreter), or fp32 (PEFT's default) with A's rows of R * 4 bytes (not 16-byte multiples): then the passes
    also write RM's copy in the dot dtype (Term.rm, bit for bit RM's cast; fp32 for bf16 interpreted, where the
    interpreter computes bf16 wrongly, TRITON_NOTES), and the pointer-load kernel reads fp32 B and A."""
    from lora_fast import philox
    from lora_fast.kernels import ops

    def flag(kwargs):
        assert kwargs["BIAS_TMA"] == (kwargs["LOWRANK_TMA"] and kwargs["HAS_BIAS"])
        return kwargs["LOWRANK_TMA"], kwargs["RM_ROWS_N"], kwargs["MASK_TMA"]

    flags = _tma_launches(device, forced, monkeypatch, block_n, flag)
    M, K, N, scale = 70, 64, 72, 1.5
    x = torch.randn(M, K, device=device).to(dtype)
    weight = torch.randn(N, K, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    dot = ops._TORCH_DOT[dtype]   # the term's path without a copy needs RM in the dot dtype (fp32 for bf16 interpreted)
    if adapters == "dot":
        A = torch.empty(K, 8 * -(-R // 8), device=device, dtype=dot)[:, :R]   # rows of 16 bytes, R columns
    else:
        A = torch.empty(K, R, device=device, dtype=torch.float32)
    A.copy_(torch.randn(K, R, device=device) / K ** 0.5)
    B = (torch.randn(R, N, device=device) / R ** 0.5).to(dot if adapters == "dot" else torch.float32)
    if dtype == torch.float16:   # |scale * S| ~ 1e5 (past fp16's 65504 before the row factors), the term ~ 10
        A.mul_(3e4)
        B = (B.float() * 1e-4).to(B.dtype)
    dy = torch.randn(M, N, device=device).to(dtype)

    # forward: y = x W^T + b + scale * S B
    q, rm = (weight.stride(1), weight.stride(0)), (B.stride(0), B.stride(1))
    term = ops.term_for(x, weight, q, N, R, None, B, rm, scale)
    assert term is not None and term.values.stride(0) * term.values.element_size() % 16 == 0
    # a copy of B exactly when it is not in the dot dtype with 16-byte rows (fp32 B: N * 4 = 288 bytes are)
    assert (term.rm is not None) == (B.dtype != dot)
    S, _ = ops.lowrank_project(x, A, A.stride(0), A.stride(1), R, term=term)
    S_plain, _ = ops.lowrank_project(x, A, A.stride(0), A.stride(1), R)
    assert torch.equal(S, S_plain), "writing the term changed S"
    if term.rm is not None:
        assert term.rm.stride(0) * term.rm.element_size() % 16 == 0 and term.rm_strides == (term.rm.stride(0), 1)
        assert torch.equal(term.rm, B.to(dot)), "B's copy is not B cast to the dot dtype"
    if dtype == torch.float16:
        assert (S.abs().amax(1) * scale > 65504).any() and term.factors.max() > 1, "no row beyond fp16's range"
    new, old = torch.empty(M, N, dtype=dtype, device=device), torch.empty(M, N, dtype=dtype, device=device)
    ops._tma_gemm(x, weight, q, N, b, S, B, rm, scale, 0.0, None, new, False, term)
    ops._tma_gemm(x, weight, q, N, b, S, B, rm, scale, 0.0, None, old, False)
    assert flags == [(True, False, False), (False, False, False)]
    assert torch.isfinite(old).all() and torch.equal(new, old)

    # dX = dY W + scale / (1 - p) * keep ⊙ (dS A^T); the term of dS unscaled with dropout
    flags.clear()
    keep_scale = 1.0 / (1.0 - philox.quantize(p))
    keep = None
    if p:
        seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
        keep = ops.packed_keep_mask(seed, M, K, p)
    q, rm = (weight.stride(0), weight.stride(1)), (A.stride(1), A.stride(0))
    term = ops.term_for(dy, weight, q, K, R, None, A, rm, scale * keep_scale, dropout=p > 0, backward=True)
    assert term is not None
    # A's rows (K, R): R * 4 bytes for fp32 A, never 16-byte multiples at these ranks: always a copy then
    assert (term.rm is not None) == (adapters == "fp32")
    dS, _ = ops.lowrank_project(dy, B, B.stride(1), B.stride(0), R, term=term)
    assert torch.equal(dS, ops.lowrank_project(dy, B, B.stride(1), B.stride(0), R)[0]), "writing the term changed dS"
    if term.rm is not None:   # A's rows (K, R) (R = 1: the (1, K) row of A^T), rows padded to 16 bytes
        rows_n = R > 1
        assert term.rm_strides == ((1, term.rm.stride(0)) if rows_n else (term.rm.stride(0), 1))
        assert torch.equal(term.rm, (A if rows_n else A.t()).to(dot)), "A's copy is not A cast to the dot dtype"
    new, old = torch.empty(M, K, dtype=dtype, device=device), torch.empty(M, K, dtype=dtype, device=device)
    ops._tma_gemm(dy, weight, q, K, None, dS, A, rm, scale * keep_scale, philox.quantize(p), keep, new, True, term)
    ops._tma_gemm(dy, weight, q, K, None, dS, A, rm, scale * keep_scale, philox.quantize(p), keep, old, True)
    assert flags == [(True, R > 1 or adapters == "dot", p > 0), (False, False, False)]
    assert torch.isfinite(old).all() and torch.equal(new, old)


@pytest.mark.parametrize("dtype,term,p,bias,block_n", [(torch.bfloat16, True, 0.0, True, 32),
                                                       (torch.float16, False, 0.3, True, 32),
                                                       (torch.float16, True, 0.3, False, 128),
                                                       (torch.bfloat16, True, 0.3, True, 128)], ids=str)
def test_tma_host_descriptors_are_bit_identical(dtype, term, p, bias, block_n, device, forced, monkeypatch):
    """LORA_FAST_TMA_DESC=host (kernels/descriptors.py: the TMA kernel's descriptors built by the launch and passed
    as arguments) gives the forward's y and the backward's dX, dA, dB of the device-side descriptors bit for bit: every
    descriptor the kernel reads (P, Q, OUT; the bias, the term's L and RM, fp16's row factors with the term by TMA;
    the keep-mask's bytes at BLOCK_N 128 with dropout) or the pointer loads (fp32 adapters on fp16). A bad value of
    the switch is a ValueError that names it."""
    from lora_fast.kernels import descriptors, ops

    seen = _tma_launches(device, forced, monkeypatch, block_n,
                         lambda kwargs: (kwargs["HOST_DESC"], kwargs["LOWRANK_TMA"], kwargs["MASK_TMA"]))
    M, K, N, R, scale = 70, 64, 72, 5, 1.5
    x = torch.randn(M, K, device=device).to(dtype)
    weight = torch.randn(N, K, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    adapters = ops._TORCH_DOT[dtype] if term else torch.float32
    if not term:   # the pointer loads of the term (fp32 adapters take it by TMA too since the passes copy RM)
        monkeypatch.setattr(ops, "term_for", lambda *args, **kwargs: None)
    A = torch.empty(K, 8, device=device, dtype=adapters)[:, :R]   # rows of 16 bytes: A's rows by TMA in dX
    A.copy_(torch.randn(K, R, device=device) / K ** 0.5)
    B = (torch.randn(R, N, device=device) / R ** 0.5).to(adapters)
    dy = torch.randn(M, N, device=device).to(dtype)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    results = {}
    for mode in ("device", "host"):
        monkeypatch.setenv(descriptors.ENV, mode)
        keep = ops.new_keep_mask(M, K, device) if p else None
        y, S = ops.lora_forward(x, weight, b, A, B, scale, p, seed, keep_out=keep)
        grads = ops.lora_backward(dy, x, weight, A, B, S, scale, p, seed, keep=keep)
        results[mode] = (y, *grads)
    host = descriptors.mode() == "host"
    assert host and seen == [(False, term, False), (False, term, term and p > 0 and block_n >= 128)] + [
        (True, term, False), (True, term, term and p > 0 and block_n >= 128)], seen
    for name, old, new in zip(("y", "dx", "dA", "dB"), results["device"], results["host"]):
        assert torch.isfinite(old).all() and torch.equal(old, new), name
    monkeypatch.setenv(descriptors.ENV, "hots")
    with pytest.raises(ValueError, match="LORA_FAST_TMA_DESC.*device, host.*'hots'"):
        ops.lora_forward(x, weight, b, A, B, scale, p, seed, keep_out=ops.new_keep_mask(M, K, device) if p else None)


@pytest.mark.parametrize("dtype,R,p", [(torch.float16, 5, 0.25), (torch.bfloat16, 3, 0.0)], ids=str)
def test_fp32_adapters_on_the_tma_term_path_change_nothing(dtype, R, p, device, forced, monkeypatch):
    """lora_linear with fp32 adapters (PEFT's default) on a 16-bit base, forced onto the TMA kernel: the output and
    every gradient bit for bit those of the same calls with the pointer-load term (ops.term_for returning None), and
    the S / dS passes did write RM's copy (Term.rm: fp16's B and A's rows; bf16 interpreted, fp32 dots: A's rows of
    R * 4 bytes, not 16-byte multiples)."""
    from lora_fast.kernels import ops

    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("the TMA kernel needs sm_90 or newer")
    forced("tma")
    x, w, b, A, B = make_inputs((2, 19), 64, 40, R, dtype, device, adapter_dtype=torch.float32)
    dy = torch.randn(2, 19, 40, device=device).to(dtype)
    copies = []
    real_term_for = ops.term_for

    def spy(*args, **kwargs):
        term = real_term_for(*args, **kwargs)
        copies.append(term is not None and term.rm is not None)
        return term

    def run():
        torch.manual_seed(3)   # the same dropout seed in both runs
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 1.5, dropout_p=p)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    monkeypatch.setattr(ops, "term_for", spy)
    with_term = run()
    monkeypatch.setattr(ops, "term_for", lambda *args, **kwargs: None)
    pointer_loads = run()
    assert copies == ([True, True] if dtype == torch.float16 else [False, True])
    for new, old in zip(with_term, pointer_loads):
        assert torch.isfinite(old).all() and torch.equal(new, old)
