"""Several adapters in one batch (issue 30): the fused ``lora_linear_multi`` against PEFT's adapter_names loop
and against n separate ``lora_linear`` calls, and one adapter on all M rows (the floor the issue's target is
set against: n adapters <= 1.15x one adapter at 4096^2).

    python -m bench.multi_adapter [--quick] [--out DIR]     # CUDA only: times with triton.testing.do_bench
    python -m bench.multi_adapter --short [--out DIR]       # CUDA only: the issue's two targets' rows (~30 s)
    python -m bench.multi_adapter --dry-run                  # any machine: every row's forward and backward once
                                                             # on tiny shapes (the interpreter on CPU), no times

Rows per (n adapters, split, layout): M = 8192 rows, in = out = 4096, rank 16, bf16 base and adapters, no bias;
split "even" (M / n rows each) or "uneven" (adapter a gets a share proportional to 2**-a); layout "mixed" (rows
shuffled: the fused kernels' worst case) or "grouped" (rows sorted by adapter, as PEFT's sub-batches are).
Implementations: "fused" (lora_linear_multi, LORA_FAST_MULTI=triton), "peft_loop" (the reference path: per
adapter a row gather, two matmuls and a scatter, as PEFT's _mixed_batch_forward), "separate" (n lora_linear
calls on each adapter's rows, gathered and scattered), "one_adapter" (lora_linear on all M rows). The fused op's
time includes its host-side index check (one device sync per call).

``--short`` (bench/gpu_check.sh's entry) keeps the rows of issue 30's two GPU targets: n = 8 and 16, the even
split, mixed rows (the fused kernels' worst case), "fused", "peft_loop" and "one_adapter" (once: it does not
depend on n), in that order, so that a timeout keeps the first rows: fused <= 1.15x one_adapter, and fused >= 2x
faster than peft_loop at n = 8. Rows are printed (one JSON line each) and written to ``--out`` as they finish.
"""

import argparse
import json
import os
import sys

import torch


def _split(M: int, n: int, split: str) -> list:
    if split == "even":
        counts = [M // n + (a < M % n) for a in range(n)]
    else:
        weights = [2.0**-a for a in range(n)]
        counts = [int(M * w / sum(weights)) for w in weights]
        counts[0] += M - sum(counts)
    return counts


def make_index(M: int, n: int, split: str, layout: str, device) -> torch.Tensor:
    counts = _split(M, n, split)
    idx = torch.cat([torch.full((c,), a, dtype=torch.int64) for a, c in enumerate(counts)])
    if layout == "mixed":
        idx = idx[torch.randperm(M)]
    return idx.to(device)


def implementations(x, weight, A, B, scales, idx):
    """{name: (forward(x) -> y, trainable tensors)}; A (n, K, R), B (n, R, N) require grad."""
    from lora_fast import lora_linear, lora_linear_multi, reference

    n = A.shape[0]
    rows = [(idx == a).nonzero().squeeze(1) for a in range(n)]

    def fused(x_):
        return lora_linear_multi(x_, weight, None, A, B, scales, idx)

    def peft_loop(x_):
        return reference.lora_linear_multi(x_, weight, None, A, B, scales, idx)

    def separate(x_):
        y = x_.new_empty((x_.shape[0], weight.shape[0]))
        parts = [lora_linear(x_.index_select(0, r), weight, None, A[a], B[a], scales[a]) for a, r in enumerate(rows)]
        return y.index_copy(0, torch.cat(rows), torch.cat(parts))

    A1, B1 = A[0].detach().clone().requires_grad_(), B[0].detach().clone().requires_grad_()

    def one_adapter(x_):
        return lora_linear(x_, weight, None, A1, B1, scales[0])

    return {"fused": (fused, [A, B]), "peft_loop": (peft_loop, [A, B]), "separate": (separate, [A, B]),
            "one_adapter": (one_adapter, [A1, B1])}


def run(args) -> list:
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench.multi_adapter: times need a CUDA device (the interpreter's say nothing); --dry-run checks "
                 "the rows on any machine")
    os.environ["LORA_FAST_MULTI"] = "triton"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    M, K, N, R = (64, 48, 40, 4) if dry else (8192, 4096, 4096, 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ns = (8, 16) if args.short else (1, 8, 16) if args.quick or dry else (1, 2, 4, 8, 16)
    splits = ("even",) if args.quick or args.short else ("even", "uneven")
    layouts = ("mixed",) if args.short else ("mixed", "grouped")
    kept = ("fused", "peft_loop", "one_adapter") if args.short else ("fused", "peft_loop", "separate", "one_adapter")
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    rows = []
    for n in ns:
        A = (torch.randn(n, K, R, device=device) / K**0.5).to(dtype).requires_grad_()
        B = (torch.randn(n, R, N, device=device) / R**0.5).to(dtype).requires_grad_()
        scales = [2.0] * n
        for split in splits:
            for layout in layouts:
                idx = make_index(M, n, split, layout, device)
                for name, (forward, trainable) in implementations(x, weight, A, B, scales, idx).items():
                    if name not in kept or (args.short and name == "one_adapter" and n != ns[0]):
                        continue
                    row = dict(n=n, split=split, layout=layout, impl=name, M=M, K=K, N=N, rank=R, dtype=str(dtype),
                               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
                    if dry:
                        y = forward(x)
                        y.float().square().mean().backward()
                        assert y.shape == (M, N) and all(t.grad is not None for t in trainable), row
                        for t in trainable:
                            t.grad = None
                        row["status"] = "ran"
                    else:
                        from bench.timing import measure

                        row.update({k: v for k, v in measure(forward, x, trainable).items()})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write(args.out, rows)
    return rows


def _write(out, rows) -> None:
    """multi_adapter.json in ``out`` (None: nothing), rewritten after every row so that a timeout keeps them."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "multi_adapter.json"), "w") as f:
            json.dump(rows, f, indent=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="n = 1, 8, 16 and the even split only")
    mode.add_argument("--short", action="store_true", help="the issue's targets only: n = 8, 16, even, mixed; fused, "
                      "peft_loop, one_adapter (bench/gpu_check.sh)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, each row run once, no times")
    p.add_argument("--out", default=None, help="folder for multi_adapter.json")
    return p


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
