#!/usr/bin/env bash
# The GPU step: the test suite natively on the GPU, then `python -m bench --quick`; everything under OUTDIR
# (env.txt, tests.log, bench.log, <gpu>.csv/.json/.md/.png: 7 files). About 8 minutes at most on one H200.
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

# tests: 200 s, on each kernel's first config (autotuning every test shape would take longer); the bench: 250 s (rows are appended per shape, so a timeout keeps what finished)
LORA_FAST_AUTOTUNE=0 timeout -k 10 200 python -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout -k 10 250 python -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc (124: timed out)" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
