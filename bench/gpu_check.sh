#!/usr/bin/env bash
# The GPU step: the test suite natively on the GPU, then `python -m bench --quick` (layers, with the per-launch
# profile), `python -m bench.gemm` (the GEMM paths against torch.mm) and `python -m bench.model --quick` (a
# training step of Llama-3.2-1B's config); everything under OUTDIR (env.txt, *.log, <gpu>*.csv/.json/.md/.png).
# At most 9 minutes on one H200.
# Usage: bench/gpu_check.sh OUTDIR   (then copy OUTDIR/<gpu>.* into bench/results/ and commit them)
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c 'import torch, triton, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("triton", triton.__version__)' 2>&1
  python -c 'import peft; print("peft", peft.__version__)' 2>&1 || echo "peft missing: the bench skips its row"
  git rev-parse HEAD 2>&1 || echo "no git metadata: rows carry commit 'unknown'"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# At most 9 minutes in all (the device budget leaves time for a second try): the tests (120 s, each kernel's first
# config: autotuning every test shape would take longer), the layer bench (150 s; rows appended per shape, so a
# timeout keeps what finished), the GEMM alone against torch.mm (50 s), the whole-model step (140 s)
LORA_FAST_AUTOTUNE=0 timeout -k 10 120 python -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}
timeout -k 10 150 python -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
timeout -k 10 50 python -m bench.gemm --out "$OUT" 2>&1 | tee "$OUT/gemm.log"
gemm_rc=${PIPESTATUS[0]}
timeout -k 10 140 python -m bench.model --quick --out "$OUT" 2>&1 | tee "$OUT/model.log"
model_rc=${PIPESTATUS[0]}
# a captured training step after lora_fast.warmup (manual torch.cuda.graph and torch.compile reduce-overhead): 60 s
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  timeout -k 10 60 python -m bench.graph_check 2>&1 | tee "$OUT/graph.log"
  graph_rc=${PIPESTATUS[0]}
else
  echo "no CUDA device: graph check skipped" | tee "$OUT/graph.log"
  graph_rc=0
fi
echo "tests rc=$tests_rc bench rc=$bench_rc gemm rc=$gemm_rc model rc=$model_rc graph rc=$graph_rc (124: timed out)" \
  | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$gemm_rc" -eq 0 ] && [ "$model_rc" -eq 0 ] && [ "$graph_rc" -eq 0 ]
