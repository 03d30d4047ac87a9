"""kernels/choice.py's shared state with fake timers: one file shared by concurrent processes (only added to),
hostile or odd cache paths, and one choice per torch.distributed job (gloo ranks whose timers disagree)."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lora_fast.kernels import choice
from tests.utils import end_gloo_rank, spawn_gloo_ranks, write_atomically

KERNELS = Path(choice.__file__).parent

# one process of a job: choice.py loaded on its own (no torch import: 8 of them start in ~0.1 s each), 8 keys of
# its own resolved with a fake timer once the common start time is reached; prints how many keys it timed
PROCESS = r'''
import importlib, sys, time, types
package = types.ModuleType("lf_kernels")   # kernels/ as a bare package: choice.py and cache.py, no triton
package.__path__ = [sys.argv[1]]
sys.modules["lf_kernels"] = package
choice = importlib.import_module("lf_kernels.choice")
rank, start = int(sys.argv[2]), float(sys.argv[3])

def timer(fn):
    time.sleep(0.002)
    return {"triton": 1.0, "cublas": 2.0}[fn.__name__] * (1 + rank % 2)

def triton(): pass
def cublas(): pass
gemm = choice.GemmChoice(timer, versions="v1")
while time.time() < start:
    time.sleep(0.001)
for i in range(8):
    gemm.resolve((f"cuda:{rank}", "torch.bfloat16", 4096, 1024 * (rank + 1), 64 * (i + 1), 16, False, False),
                 "NVIDIA H200", {"triton": triton, "cublas": cublas})
print(gemm.timed)
'''


def _job(cache, processes=8):
    start = time.time() + 1.0
    env = {**os.environ, "LORA_FAST_CACHE_DIR": str(cache)}
    env.pop(choice.ENV, None)
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(KERNELS), str(rank), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(processes)]
    timed = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        timed.append(int(out.split()[-1]))
    return timed


def test_concurrent_processes_only_add(tmp_path):
    """8 processes x 8 keys at once: the file holds all 64 afterwards, and a second job times none."""
    assert _job(tmp_path) == [8] * 8
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("gemm-NVIDIA_H200-v1")
    table = json.loads(files[0].read_text())
    assert len(table) == 64 and set(table.values()) == {"triton"}
    assert "cuda" not in files[0].read_text()   # no device index on disk: all processes share every entry
    assert _job(tmp_path) == [0] * 8
    assert not list(tmp_path.glob("*.tmp"))


class _Timer:
    def __init__(self, ms):
        self.ms, self.calls = ms, 0

    def __call__(self, fn):
        self.calls += 1
        return self.ms[fn.__name__]


def triton():
    pass


def cublas():
    pass


CANDIDATES = {"triton": triton, "cublas": cublas}
KEY = ("cuda:0", "torch.float16", 64, 256, 128, 8, False, False)


def _gemm(timer=None):
    return choice.GemmChoice(timer or _Timer({"triton": 2.0, "cublas": 1.0}), versions="v1")


@pytest.mark.parametrize("content", [b"[" * 200_000 + b"]" * 200_000, b'{"a": ' * 100_000, b"\xff\xfe{",
                                     b'{"x": "' + b"y" * (choice.MAX_FILE_BYTES + 10) + b'"}', b'["cublas"]',
                                     b'{"k": {"nested": "triton"}}'], ids=["deep", "deep-open", "binary", "huge",
                                                                          "list", "nested"])
def test_unreadable_files_count_as_empty_and_are_replaced(tmp_path, monkeypatch, content):
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(choice.ENV, raising=False)
    gemm = _gemm()
    file = Path(gemm._file("NVIDIA H200"))
    file.write_bytes(content)
    (tmp_path / (file.name + ".k1ll3d.tmp")).write_bytes(b"{")   # a writer killed mid-write: removed on save
    assert gemm.resolve(KEY, "NVIDIA H200", CANDIDATES) == "cublas" and gemm.timed == 1
    assert json.loads(file.read_text()) == {repr(KEY[1:]): "cublas"}
    assert not list(tmp_path.glob("*.tmp"))


def test_directories_and_fifos_are_refused_never_blocked_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(choice.ENV, raising=False)
    gemm = _gemm()
    file = gemm._file("gpu-dir")
    os.mkdir(file)
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert gemm.resolve(KEY, "gpu-dir", CANDIDATES) == "cublas"
    assert os.path.isdir(file) and not list(tmp_path.glob("*.tmp"))
    fifo = gemm._file("gpu-fifo")
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(gemm.resolve(KEY[:-1] + (True,), "gpu-fifo",
                                                                         CANDIDATES)), daemon=True)
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        worker.start()
        worker.join(timeout=30)
    assert result == ["cublas"], "resolving blocked on a FIFO at the cache path"
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_dir_expands_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", "~/lf")
    assert choice.cache_dir() == str(tmp_path / "lf")
    monkeypatch.setenv("SOMEWHERE", str(tmp_path / "var"))
    monkeypatch.setenv("LORA_FAST_CACHE_DIR", "$SOMEWHERE/lf")
    assert choice.cache_dir() == str(tmp_path / "var" / "lf")
    monkeypatch.delenv("LORA_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert choice.cache_dir() == str(tmp_path / "xdg" / "lora_fast")


def _rank(rank, world, init_file, cache_root, out_file):
    """One rank: its own cache directory (another node), a timer that prefers another path than its neighbour's,
    the shared keys in its own order (no lockstep), and a few keys only it meets."""
    os.environ["LORA_FAST_CACHE_DIR"] = os.path.join(cache_root, str(rank))
    os.environ.pop(choice.ENV, None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ms = {"triton": 1.0, "cublas": 2.0} if rank % 2 == 0 else {"triton": 2.0, "cublas": 1.0}
        gemm = choice.GemmChoice(_Timer(ms), versions="v1")
        keys = [("cuda:0", "torch.bfloat16", 16 << i, 512, 256, 16, False, i % 2 == 1) for i in range(6)]
        keys = keys[rank:] + keys[:rank]
        keys += [("cuda:0", "torch.bfloat16", 16, 100 + rank, 256, 16, False, False)]
        got = {repr(k): gemm.resolve(k, "NVIDIA H200", CANDIDATES) for k in keys}
        gathered = [None] * world
        dist.all_gather_object(gathered, got)
        if rank == 0:
            write_atomically(gathered, out_file, lambda obj, path: Path(path).write_text(json.dumps(obj)))
    except BaseException:
        dist.destroy_process_group()
        raise
    end_gloo_rank()


def test_ranks_of_one_job_agree():
    """Two gloo ranks whose timers disagree (each prefers the path the other times slower) run the same path for
    every key they share, met in different orders; each rank's own file holds what the job agreed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        spawn_gloo_ranks(_rank, (2, os.path.join(tmp, "init"), tmp, out), 2, [out])
        gathered = json.load(open(out))
        for rank in range(2):
            disk = json.loads(next(Path(tmp, str(rank)).glob("*.json")).read_text())
            assert {repr(eval(k)[1:]): v for k, v in gathered[rank].items()} == disk
    shared = set(gathered[0]) & set(gathered[1])
    assert len(shared) == 6
    for key in shared:
        assert gathered[0][key] == gathered[1][key], key
    # a key only one rank met is that rank's own measurement
    assert {v for r, g in enumerate(gathered) for k, v in g.items() if k not in shared} == {"triton", "cublas"}


def test_cost_model_ranks_by_padding_and_waves():
    """configs.gemm_cost (what prunes the tile configs to choice.TOP_CONFIGS before timing): at M = 16 the
    smallest output tile first (a 128-row tile computes 112 padded rows), at M = 8192 the largest (fewest
    operand loads per multiply-add, the GPU full either way)."""
    import torch

    from lora_fast.kernels import configs

    table = configs.gemm_configs((9, 0), torch.bfloat16)

    def ranked(M):
        return sorted(table, key=lambda c: configs.gemm_cost(M, 4096, 4096, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                             c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, (9, 0),
                                                             132, torch.bfloat16))
    small, large = ranked(16)[0], ranked(8192)[0]
    assert (small.kwargs["BLOCK_M"], small.kwargs["BLOCK_N"]) == (64, 64)
    assert (large.kwargs["BLOCK_M"], large.kwargs["BLOCK_N"]) == (128, 256)
    assert len(table) > choice.TOP_CONFIGS


def test_bench_budget_and_memory_bound(monkeypatch):
    """choice.bench on a fake CUDA clock: one untimed call, one estimate, ~WARMUP_MS of warm-up calls, MIN_REPS to
    MAX_REPS timed calls in ~REP_MS, and one allocation: the L2 flush buffer of the device's L2 size."""
    import types

    import torch

    allocations, now = [], [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = now[0]

        def elapsed_time(self, end):
            return end.t - self.t

    def empty(*size, dtype=None, device=None):
        allocations.append((size, dtype, device))
        return types.SimpleNamespace(zero_=lambda: None)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=None: types.SimpleNamespace(L2_cache_size=50 << 20))
    monkeypatch.setattr(torch, "empty", empty)
    # call times that are binary fractions: the fake clock adds them exactly
    for ms, warm, reps in ((0.25, 4, 16), (8.0, 0, choice.MIN_REPS), (1 / 64, 64, choice.MAX_REPS)):
        calls = []

        def fn(ms=ms, calls=calls):
            calls.append(1)
            now[0] += ms
        allocations.clear()
        assert choice.bench(fn) == pytest.approx(ms)
        assert len(calls) == 2 + warm + reps
        assert allocations == [(((50 << 20) // 4,), torch.int32, "cuda")]   # 50 MB: the flush buffer only
    assert choice.bench(fn, quantiles=(0.5, 0.2, 0.8)) == pytest.approx([1 / 64] * 3)
