"""lora_fast.warmup: after it, training steps at warmed M buckets time, tune, compile and synchronise nothing
(what a CUDA-graph capture needs), and the model is left as it was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LinearWithLoRA, replace_linear_with_lora
from lora_fast.tuning import bucket_rows

ROOT = Path(__file__).resolve().parents[1]

# A stand-in sm_80 driver (bench/host_time.py's, its target set to sm_80: no TMA, whose scratch memory needs CUDA)
# with Triton's compiler replaced by a fake that counts compilations: every launch runs the whole host path
# (choice, tuning, plans) on CPU tensors, and nothing is compiled for real. After warm-up, any compilation,
# path timing, config benchmark or torch.cuda.synchronize is a violation.
SCRIPT = r'''
import json, os, sys, torch
from torch import nn
import triton, triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime import autotuner
import bench.host_time as host
from lora_fast.kernels import choice
real_forced = choice.forced_path
patches = []
def monkeypatch(obj, name, value):
    patches.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)
host._install(monkeypatch)
monkeypatch(choice, "forced_path", real_forced)   # host_time forces "triton": measure the paths here
triton.runtime.driver.active.get_current_target = lambda: GPUTarget("cuda", 80, 32)
monkeypatch(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
monkeypatch(torch.cuda, "get_device_name", lambda device=None: "stub sm_80")
state = {"frozen": False, "violations": [], "compiles": 0, "timed": 0, "tuned": 0}
def violation(what):
    if state["frozen"]:
        state["violations"].append(what)

class FakeKernel:
    function = packed_metadata = None
    def launch_metadata(self, *args):
        return None
    def run(self, *args):
        pass

def fake_compile(src, target=None, options=None, **kwargs):
    state["compiles"] += 1
    violation("compile " + str(getattr(src, "name", "?")))
    return FakeKernel()
monkeypatch(triton.compiler, "compile", fake_compile)

def path_timer(fn):
    state["timed"] += 1
    violation("path timing")
    fn()
    return {"_fused_gemm": 2.0, "_cublas_gemm": 1.0}[fn.func.__name__]
choice.GEMM.timer = path_timer

def tuner_bench(self, *args, config, **meta):
    state["tuned"] += 1
    violation("config benchmark")
    return [1.0, 1.0, 1.0]
monkeypatch(autotuner.Autotuner, "_bench", tuner_bench)
monkeypatch(torch.cuda, "synchronize", lambda *a, **k: violation("synchronize"))

import lora_fast
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 80)).half()
for p in model.parameters():
    p.requires_grad = False
lora_fast.replace_linear_with_lora(model, rank=8, alpha=16, dropout=0.1)

def step(M):
    model(torch.randn(M, 64).half()).float().square().mean().backward()

report = lora_fast.warmup(model, torch.randn(2, 10, 64).half())   # M = 20: bucket 32
result = {"report": report, "during": {k: v for k, v in state.items() if k != "violations"}}
state["frozen"] = True
for M in (20, 32, 27, 17, 29):          # the example's M, the bucket's top, and new exact Ms inside it
    step(M)
result["after"] = list(state["violations"])
step(40)                                # bucket 64, not warmed: measured (the check can see it)
result["unwarmed"] = sorted(set(state["violations"]))
choice.clear()                          # as a new process: the choices and configs come from the disk files
result["again"] = lora_fast.warmup(model, torch.randn(2, 10, 64).half())
for obj, name, value in reversed(patches):
    setattr(obj, name, value)
print("RESULT " + json.dumps(result))
'''


def test_nothing_is_timed_tuned_compiled_or_synchronised_after_warmup(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "LORA_FAST_AUTOTUNE": "1", "PYTHONPATH": str(ROOT),
           "LORA_FAST_CACHE_DIR": str(tmp_path)}
    env.pop("LORA_FAST_GEMM", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    report, during = result["report"], result["during"]
    assert report["layers"] == 2 and report["buckets"] == [32] and report["rows"] == bucket_rows(20)[::-1]
    # forward and dX of the second layer (the first layer's input needs no gradient): 3 keys, each timed
    assert report["timed"] == 3 and during["timed"] == 3 * 2
    assert report["tuned"] > 0 and during["tuned"] > 0 and during["compiles"] > 0
    assert result["after"] == [], result["after"]
    assert "path timing" in result["unwarmed"] and "config benchmark" in result["unwarmed"]
    assert result["again"]["timed"] == 0 and result["again"]["tuned"] == 0   # kept on disk (tune-*.json, gemm-*)
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.json")} == {"gemm", "tune"}


def test_bucket_rows_cover_the_bucket():
    assert bucket_rows(1) == [16, 15, 14, 12, 8, 4, 1] and bucket_rows(16) == bucket_rows(3)
    assert bucket_rows(20) == [32, 31, 30, 28, 24, 20, 17]
    for M in (100, 1000, 4096, 5000):
        rows = bucket_rows(M)
        top = rows[0]
        assert top == max(16, 1 << (M - 1).bit_length()) and rows[-1] == top // 2 + 1
        assert {r % 16 for r in rows} >= {0, 15, 14, 12, 8}


def test_warmup_leaves_the_model_as_it_was(device):
    """Gradients (the same objects), buffers, the random generator and training modes are unchanged; a call on
    a model without lora-fast layers is an error that names the remedy."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.BatchNorm1d(24), nn.Linear(24, 16)).to(device)
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=4, alpha=8, dropout=0.2)
    layers = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    grad = torch.randn_like(layers[0].lora.A)
    layers[0].lora.A.grad = grad
    x = torch.randn(6, 32, device=device)
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    report = lora_fast.warmup(model, x, tokens=[6])
    assert report["layers"] == 2 and report["calls"] == 2 * len(bucket_rows(6)) and report["buckets"] == [16]
    assert layers[0].lora.A.grad is grad and layers[1].lora.A.grad is None
    assert torch.equal(model[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert model.training
    with pytest.raises(ValueError, match="no lora-fast layer"):
        lora_fast.warmup(nn.Linear(4, 4).to(device), torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="tokens"):
        lora_fast.warmup(model, x, tokens=[0])
