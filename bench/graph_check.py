"""A captured training step after ``lora_fast.warmup`` (CUDA only): ``python -m bench.graph_check``.

Checks, on a two-layer bf16 model with LoRA (rank 16, dropout 0.1): after the warm-up nothing is timed or tuned
(kernels/choice.py's counters stay put) through an eager step, a manual ``torch.cuda.graph`` capture of forward +
backward + optimizer step, its replays, a second capture at a new exact M inside the warmed bucket, and three
steps of ``torch.compile(mode="reduce-overhead")``; every loss is finite and the replays move the adapters.
Exit status 0 when all hold; prints one line per check. Without CUDA it prints why and exits 0.
"""

import sys
import time

import torch
from torch import nn


def _counts():
    from lora_fast.kernels import choice

    return choice.GEMM.timed + choice.GEMM_4BIT.timed, choice.TUNING.tuned


def main() -> int:
    if not torch.cuda.is_available():
        print("graph_check: skipped (no CUDA device)")
        return 0
    import lora_fast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 512)).to("cuda", torch.bfloat16)
    for p in model.parameters():
        p.requires_grad = False
    lora_fast.replace_linear_with_lora(model, rank=16, alpha=32, dropout=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    x = torch.randn(4, 250, 1024, device="cuda", dtype=torch.bfloat16)   # M = 1000: bucket 1024
    start = time.perf_counter()
    report = lora_fast.warmup(model, x)
    torch.cuda.synchronize()
    print(f"warmup: {time.perf_counter() - start:.2f} s, {report}")
    warmed = _counts()
    failures = []

    def check(what, ok):
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    def step(inputs):
        loss = model(inputs).float().square().mean()
        loss.backward()
        opt.step()
        return loss

    def capture(inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # one eager step: the allocator's and the optimizer's first use
            opt.zero_grad(set_to_none=False)
            step(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            loss = step(inputs)
        return graph, loss

    graph, loss = capture(x)
    check("manual capture after warmup: nothing timed or tuned", _counts() == warmed)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    check("replays: finite loss, adapters updated",
          bool(torch.isfinite(loss)) and any(not torch.equal(a, p) for a, p in zip(before, params)))
    graph2, loss2 = capture(torch.randn(4, 241, 1024, device="cuda", dtype=torch.bfloat16))   # M = 964
    graph2.replay()
    torch.cuda.synchronize()
    check("capture at a new exact M in the warmed bucket: nothing timed or tuned",
          _counts() == warmed and bool(torch.isfinite(loss2)))
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        out = compiled(x)
        loss3 = out.float().square().mean()
        loss3.backward()
        opt.step()
    torch.cuda.synchronize()
    check('torch.compile(mode="reduce-overhead"): nothing timed or tuned, finite loss',
          _counts() == warmed and bool(torch.isfinite(loss3)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
