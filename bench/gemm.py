"""python -m bench.gemm: the base GEMM alone, each lora-fast path against torch.mm (cuBLAS), forward and dX layouts.

GPU only (a CPU times nothing). For each shape M x K -> N (x (M, K), nn.Linear's weight (N, K)), bf16, rank 16:
  forward  y = x W^T (+ the low-rank term): torch.mm(x, W.t()), lora-fast's fused Triton GEMM, its cuBLAS path;
  dX       dX = dY W (+ the low-rank term):  torch.mm(dY, W), the same two paths.
Times from triton.testing.do_bench (median ms); TFLOP/s count the base GEMM's 2 M N K only, so a path's ratio to
torch.mm is the share of cuBLAS's throughput it keeps while also adding the low-rank term. The issue's targets:
the fused GEMM at >= 0.97x torch.mm at 4096 -> 4096 and 4096 -> 14336. Rows appended to <out>/<gpu>-gemm.csv.
"""

import argparse
import os
import sys

import torch

SHAPES = ((8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (8192, 14336, 4096))
FIELDS = ("time_utc", "gpu", "torch", "triton", "commit", "M", "K", "N", "rank", "dtype", "layout", "impl", "ms",
          "tflops", "x_torch_mm")


def run(shapes=SHAPES, rank: int = 16, dtype=torch.bfloat16, out_dir=None) -> list:
    import triton
    from triton.testing import do_bench

    from lora_fast.kernels import ops

    from . import results

    gpu = torch.cuda.get_device_name()
    env = dict(time_utc=results.now_utc(), gpu=gpu, torch=torch.__version__, triton=triton.__version__,
               commit=results.git_commit())
    rows = []
    for M, K, N in shapes:
        x = torch.randn(M, K, device="cuda").to(dtype)
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
        dy = torch.randn(M, N, device="cuda").to(dtype)
        A = (torch.randn(K, rank, device="cuda") / K**0.5).to(dtype)
        B = (torch.randn(rank, N, device="cuda") / rank**0.5).to(dtype)
        S = torch.randn(M, rank, device="cuda")
        dS = torch.randn(M, rank, device="cuda")
        y = torch.empty(M, N, device="cuda", dtype=dtype)
        dx = torch.empty(M, K, device="cuda", dtype=dtype)
        layouts = {
            "forward": dict(
                torch_mm=lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y),
                args=(x, w, (w.stride(1), w.stride(0)), N, None, S, B, (B.stride(0), B.stride(1)), 2.0, 0.0, None,
                      y, False)),
            "dX": dict(
                torch_mm=lambda dy=dy, w=w, dx=dx: torch.mm(dy, w, out=dx),
                args=(dy, w, (w.stride(0), w.stride(1)), K, None, dS, A, (A.stride(1), A.stride(0)), 2.0, 0.0,
                      None, dx, True)),
        }
        for layout, spec in layouts.items():
            base = do_bench(spec["torch_mm"])
            flops = 2.0 * M * N * K
            timed = {"torch.mm": base}
            for path, fn in ops._GEMM_PATHS.items():
                timed[f"lora-fast {path}"] = do_bench(lambda fn=fn, a=spec["args"]: fn(*a))
            for impl, ms in timed.items():
                rows.append(dict(env, M=M, K=K, N=N, rank=rank, dtype=str(dtype).replace("torch.", ""),
                                 layout=layout, impl=impl, ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                                 x_torch_mm=base / ms))
                print(f"{M}x{K}->{N} {layout:8s} {impl:18s} {ms:8.3f} ms {flops / (ms * 1e-3) / 1e12:7.1f} TFLOP/s "
                      f"{base / ms:5.3f}x torch.mm", flush=True)
        del x, w, dy, A, B, S, dS, y, dx, layouts
        torch.cuda.empty_cache()
        if out_dir:
            results.append_csv(os.path.join(out_dir, results.slug(gpu) + "-gemm.csv"),
                               [r for r in rows if (r["M"], r["K"], r["N"]) == (M, K, N)], fields=FIELDS)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m bench.gemm times GEMMs on a CUDA device; none is available here, so nothing is timed.")
        return 0
    run(out_dir=args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
