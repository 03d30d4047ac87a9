#!/usr/bin/env bash
# The GPU step (issue 29): `python -m bench.gemm` (the GEMM paths against torch.mm), `python -m bench --quick`
# (layers, with the per-launch profile), the test suite natively, `python -m bench.model --quick` (a training step
# of Llama-3.2-1B's config), a captured training step (bench.graph_check), host time (bench.host_time) and the
# multi-adapter op's target rows (bench.multi_adapter --short, issue 30); everything under OUTDIR (env.txt, *.log,
# <gpu>*.csv/.json/.md/.png, multi_adapter.json). At most 8 minutes on one H200.
# Usage: bench/gpu_check.sh OUTDIR   (then copy OUTDIR/<gpu>.* and multi_adapter.json into bench/results/ and commit)
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c 'import torch, triton, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("triton", triton.__version__)' 2>&1
  python -c 'import peft; print("peft", peft.__version__)' 2>&1 || echo "peft missing: the bench skips its row"
  git rev-parse HEAD 2>&1 || echo "no git metadata: rows carry commit 'unknown'"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# At most 8 minutes in all (the device budget of 15 minutes leaves time for a second try), in issue 29's order of
# priority, so that a timeout loses the least: the GEMM paths against torch.mm (45 s), the layer bench with the
# per-launch profile (120 s; rows appended per shape, so a timeout keeps what finished), the tests (85 s, each
# kernel's first config: autotuning every test shape would take longer), the TMA GEMM's tests again with host-side
# tensor descriptors (30 s: LORA_FAST_TMA_DESC=host, opt-in until a GPU has run them; issue 28), the whole-model
# step (85 s), a captured training step after lora_fast.warmup (40 s), host time on this machine's CPU (40 s), then
# the multi-adapter rows
# (up to 45 s, cut to what is left of 470 s since the start, so that the script ends within 8 minutes whatever the
# steps before it took: 445 s of their timeouts plus start-up)
timeout -k 5 45 python -m bench.gemm --out "$OUT" 2>&1 | tee "$OUT/gemm.log"
gemm_rc=${PIPESTATUS[0]}
timeout -k 5 120 python -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
LORA_FAST_AUTOTUNE=0 timeout -k 5 85 python -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}
LORA_FAST_TMA_DESC=host LORA_FAST_AUTOTUNE=0 timeout -k 5 30 python -m pytest tests/test_gemm_choice.py -q -k tma \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests_tma_host.log" | tail -20
tmahost_rc=${PIPESTATUS[0]}
timeout -k 5 85 python -m bench.model --quick --out "$OUT" 2>&1 | tee "$OUT/model.log"
model_rc=${PIPESTATUS[0]}
# manual torch.cuda.graph capture and torch.compile(mode="reduce-overhead") after lora_fast.warmup
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  timeout -k 5 40 python -m bench.graph_check 2>&1 | tee "$OUT/graph.log"
  graph_rc=${PIPESTATUS[0]}
else
  echo "no CUDA device: graph check skipped" | tee "$OUT/graph.log"
  graph_rc=0
fi
timeout -k 5 40 python -m bench.host_time --repeat 7 --number 10 --layer-rounds 8 2>&1 | tee "$OUT/host_time.log"
host_rc=${PIPESTATUS[0]}
# issue 30's GPU targets: fused vs one adapter on all rows (n = 8, 16) and vs PEFT's adapter_names loop (n = 8);
# rows are written as they finish (OUTDIR/multi_adapter.json), so a timeout keeps the first ones
left=$((470 - $(date +%s) + START))
if [ "$left" -ge 15 ]; then
  timeout -k 5 $((left < 45 ? left : 45)) python -m bench.multi_adapter --short --out "$OUT" \
    2>&1 | tee "$OUT/multi_adapter.log"
  multi_rc=${PIPESTATUS[0]}
else
  echo "multi-adapter bench skipped: ${left} s left of the 8 minutes" | tee "$OUT/multi_adapter.log"
  multi_rc=124
fi
echo "gemm rc=$gemm_rc bench rc=$bench_rc tests rc=$tests_rc tma-host tests rc=$tmahost_rc model rc=$model_rc" \
  "graph rc=$graph_rc host rc=$host_rc" \
  "multi rc=$multi_rc (124: timed out)" | tee -a "$OUT/env.txt"
[ "$gemm_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$tmahost_rc" -eq 0 ] && [ "$model_rc" -eq 0 ] \
  && [ "$graph_rc" -eq 0 ] \
  && [ "$host_rc" -eq 0 ] && [ "$multi_rc" -eq 0 ]
