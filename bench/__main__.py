"""python -m bench: lora-fast against F.linear alone and the LoRA layers users would pick instead.

With a CUDA device: times forward, backward and forward+backward of every implementation on real model
shapes, with the cost-model bound of each, and appends the rows to <out>/<gpu>.csv and .json, writing
<out>/<gpu>.md and .png. Without one: prints what a CPU can honestly measure (saved-for-backward bytes per
shape, largest error against float64 on small shapes) and times nothing.
"""

import argparse
import platform
import sys
import time
from typing import Dict, List

import torch
import triton
from rich.console import Console
from rich.table import Table

import bench  # noqa: F401  (chooses the Triton interpreter before triton is imported when there is no GPU)

from . import accuracy, cost_model, impls, results, saved, shapes, tables

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}
CPU_DEFAULTS = dict(tokens=(8192,), ranks=(16,), dtypes=("bfloat16",), dropouts=(0.0, 0.1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=sorted(shapes.MODELS), help="models (default: all)")
    p.add_argument("--rank", nargs="+", type=int, help=f"LoRA ranks (GPU default {shapes.RANKS}, CPU 16)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="data dtypes (GPU default both, CPU bf16)")
    p.add_argument("--tokens", nargs="+", type=int, help=f"M, tokens per call (GPU default {shapes.TOKENS}, CPU 8192)")
    p.add_argument("--dropout", nargs="+", type=float, help=f"LoRA dropout (default {shapes.DROPOUTS})")
    p.add_argument("--impl", nargs="+", choices=impls.IMPLS, help="implementations (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a GPU: Llama-3-8B shapes, M=8192, r=16, bf16, dropout 0")
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: gpu when CUDA is available, else cpu (default)")
    p.add_argument("--out", default=None, help="GPU results folder (default bench/results)")
    args = p.parse_args(argv)
    for name in ("rank", "tokens"):
        values = getattr(args, name) or ()
        if any(v < 1 for v in values):
            p.error(f"--{name}: expected integers >= 1, got {values}")
    if args.dropout and any(not 0.0 <= q <= 1.0 for q in args.dropout):
        p.error(f"--dropout: expected probabilities in [0, 1], got {args.dropout}")
    return args


def selection(args, cpu: bool) -> Dict[str, tuple]:
    """The grid the options pick: explicit options win over --quick, which wins over the mode's defaults."""
    sel = dict(models=tuple(shapes.MODELS), tokens=shapes.TOKENS, ranks=shapes.RANKS, dtypes=shapes.DTYPES,
               dropouts=shapes.DROPOUTS)
    if cpu:
        sel.update(CPU_DEFAULTS)
    if args.quick:
        sel.update(shapes.QUICK)
    for key, opt in (("models", "model"), ("tokens", "tokens"), ("ranks", "rank"), ("dtypes", "dtype"),
                     ("dropouts", "dropout")):
        if getattr(args, opt):
            sel[key] = tuple(getattr(args, opt))
    return sel


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _implementations(args, console: Console) -> list:
    """The rows asked for (--impl, else all), less PEFT's when peft cannot be imported (said once)."""
    names = list(args.impl or impls.IMPLS)
    peft_missing = impls.peft_available() if "peft" in names else None
    if peft_missing:
        console.print(f"[yellow]peft row skipped: {peft_missing}[/]")
        names.remove("peft")
    return names


def run_cpu(args, console: Console) -> int:
    sel = selection(args, cpu=True)
    names = _implementations(args, console)
    console.print(f"[bold]lora-fast bench, CPU mode[/] ({platform.processor() or platform.machine()}, torch "
                  f"{torch.__version__}, triton {triton.__version__})")
    console.print("Timings need a CUDA device and none is available: nothing is timed here (the Triton "
                  "interpreter's speed says nothing about a GPU). Measured: bytes saved for backward and errors "
                  "against float64.")
    eager = [n for n in names if n != "compile"]
    t0 = time.time()
    problems = saved.check_meta_against_real(eager)
    if problems:
        console.print("[red]meta and real tensors disagree on the saved set:[/]\n" + "\n".join(problems))
        return 1
    console.print(f"Checked: on (M=64, 96->80, r=8, bf16, dropout 0 and 0.1, bias on/off) the saved set on "
                  f"'meta' equals the CPU run's for {', '.join(eager)} (lora-fast: Triton interpreter) "
                  f"[{time.time() - t0:.1f} s].")

    keys = ["projection", "M", "r", "dtype", "p"]
    table_rows = []
    for case in shapes.grid(**sel):
        cells = []
        for n in names:
            if n == "compile":
                cells.append("GPU run")
                continue
            total, _ = saved.measure(n, case.M, case.K, case.N, case.rank, DTYPES[case.dtype], case.dropout,
                                     case.proj.bias, device="meta")
            cells.append(_mib(total))
        table_rows.append([case.proj.label, str(case.M), str(case.rank), SHORT[case.dtype], f"{case.dropout:g}",
                           *cells])
    for table in tables.fitted_tables("Bytes saved for backward (MiB, parameters excluded, x included when saved)",
                                      keys + names, table_rows, console.width, keys=len(keys),
                                      right=keys[1:] + names):
        console.print(table)
    console.print("How: each implementation's forward on 'meta' tensors of the real shape, saved tensors counted "
                  "by torch.autograd.graph.saved_tensors_hooks (storages once, parameters excluded); lora-fast: "
                  "its autograd.Function with the kernel launch replaced by its output allocation (checked above "
                  "against the interpreter). Dropout > 0 on CPU/meta takes torch's unfused dropout, which saves "
                  "a noise tensor in x's dtype; CUDA's fused dropout saves a 1-byte mask instead, so the book/peft "
                  "dropout columns are larger here than on a GPU (the GPU run measures its own). compile: "
                  "torch.compile on this CPU takes about a minute per shape; the GPU run measures it.")

    err = Table(title="Largest error against float64 (max |err| / max |ref|), small shapes "
                      f"{[s[:4] for s in accuracy.SMALL_SHAPES]} (M, K, N, r), dropout 0")
    for col in ("impl", "dtype", "y", "dx", "dA", "dB"):
        err.add_column(col, justify="right" if col not in ("impl", "dtype") else "left")
    for n in eager:
        for dname in sel["dtypes"]:
            e = accuracy.errors(n, DTYPES[dname])
            label = n + (" (Triton interpreter)" if n == "lora-fast" else "")
            err.add_row(label, dname, *(f"{e[k]:.2e}" if k in e else "-" for k in ("y", "dx", "dA", "dB")))
    console.print(err)
    console.print("Cost-model bound (no GPU here to measure ceilings; for scale, an H200's as measured earlier on "
                  "one: 790 TFLOP/s for a large bf16 matmul on random data, 4.3 TB/s for a device-to-device copy; "
                  "its datasheet says ~989 TFLOP/s dense bf16), forward+backward / F.linear at M=8192, r=16, bf16, "
                  "dropout 0; in brackets the estimate of python -m bench.cost_model, which assumes "
                  f"{cost_model.Assumptions().describe()}:")
    for proj in shapes.projections(sel["models"]):
        f = cost_model.bound("F.linear", "full", 8192, proj.in_features, proj.out_features, 16, "bfloat16",
                             790e12, 4.3e12, bias=proj.bias)
        fe = cost_model.estimate("F.linear", "full", 8192, proj.in_features, proj.out_features, 16, "bfloat16",
                                 790e12, 4.3e12, bias=proj.bias).seconds
        parts = []
        for n in names:
            if n == "F.linear":
                continue
            b = cost_model.bound(n, "full", 8192, proj.in_features, proj.out_features, 16, "bfloat16", 790e12,
                                 4.3e12, bias=proj.bias)
            e = cost_model.estimate(n, "full", 8192, proj.in_features, proj.out_features, 16, "bfloat16", 790e12,
                                    4.3e12, bias=proj.bias).seconds
            parts.append(f"{n} {b / f:.2f} (estimate {e / fe:.2f})")
        console.print(f"  {proj.label}: " + ", ".join(parts))
    return 0


def run_gpu(args, console: Console) -> int:
    import os

    from . import timing

    sel = selection(args, cpu=False)
    names = _implementations(args, console)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    gpu = torch.cuda.get_device_name()
    env = dict(time_utc=results.now_utc(), gpu=gpu, torch=torch.__version__, triton=triton.__version__,
               commit=results.git_commit())
    stem = os.path.join(out, results.slug(gpu))
    command = "python -m bench " + " ".join(sys.argv[1:])
    console.print(f"[bold]lora-fast bench on {gpu}[/], torch {env['torch']}, triton {env['triton']}, "
                  f"commit {env['commit']}; rows -> {stem}.csv/.json")
    ceilings = {}
    all_rows: List[Dict] = []
    compiled_cache: Dict = {}
    for case in shapes.grid(**sel):
        dtype = DTYPES[case.dtype]
        if case.dtype not in ceilings:
            ceilings[case.dtype] = timing.ceilings(dtype)
            c = ceilings[case.dtype]
            console.print(f"ceilings ({case.dtype}): GEMM {c['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s, copy "
                          f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s")
        x, weight, b, A, B = impls.make_tensors(case.M, case.K, case.N, case.rank, dtype, "cuda",
                                                bias=case.proj.bias)
        measured, bounds, flops = {}, {}, {}
        for n in names:
            try:
                forward = impls.build(n, weight, b, A, B, 2.0, case.dropout, compiled_cache=compiled_cache)
                forward(x)  # compiles / autotunes outside the saved-tensors hooks
                saved_total, _, y = saved.saved_bytes(forward, x, (weight, b, A, B))
                del y
                m = timing.measure(forward, x, [x, *forward.params])
            except Exception as e:  # a row that cannot run (e.g. compile failing) must not end the run
                console.print(f"[yellow]{n} skipped on {case.proj.label} M={case.M}: {type(e).__name__}: {e}[/]")
                continue
            m["saved_bytes"] = saved_total
            measured[n] = m
            if n == "lora-fast":
                m["gemm_path"] = _gemm_paths(case, x)
                _launch_table(console, case, forward, x, ceilings[case.dtype], stem, env)
            bounds[n] = {mode: cost_model.bound(n, mode, case.M, case.K, case.N, case.rank, case.dtype,
                                                ceilings[case.dtype]["gemm_flops_per_s"],
                                                ceilings[case.dtype]["copy_bytes_per_s"], bias=case.proj.bias,
                                                dropout=case.dropout) for mode in cost_model.MODES}
            flops[n] = {mode: cost_model.flops(n, mode, case.M, case.K, case.N, case.rank)
                        for mode in cost_model.MODES}
            est = cost_model.estimate(n, "full", case.M, case.K, case.N, case.rank, case.dtype,
                                      ceilings[case.dtype]["gemm_flops_per_s"],
                                      ceilings[case.dtype]["copy_bytes_per_s"], bias=case.proj.bias,
                                      dropout=case.dropout)
            console.print(f"  {n} full: measured {m['full'][0] * 1e3:.1f} us, bound {bounds[n]['full'] * 1e6:.1f} us, "
                          f"estimate {est.seconds * 1e6:.1f} us ({cost_model.Assumptions().describe()})")
        info = dict(model=case.proj.model, proj=case.proj.name, K=case.K, N=case.N, bias=case.proj.bias,
                    M=case.M, rank=case.rank, dtype=case.dtype, dropout=case.dropout)
        rows = results.assemble(info, measured, bounds, flops, ceilings[case.dtype], env)
        results.append_csv(stem + ".csv", rows)
        results.append_json(stem + ".json", rows)
        all_rows += rows
        _print_case(console, case, rows)
        del x, weight, b, A, B
        torch.cuda.empty_cache()
        # rewritten after every case, so that a run cut short by a timeout still leaves its summary
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write(results.markdown(all_rows, command))
        results.plot(all_rows, stem + ".png")
    console.print(f"wrote {stem}.md and {stem}.png")
    return 0


def _gemm_paths(case, x) -> str:
    """The paths kernels/choice.py measured and kept for this case's forward and dX GEMMs."""
    from lora_fast.kernels import choice, ops

    bucket = ops._m_bucket(case.M)
    fwd = choice.GEMM.get((x.device, x.dtype, bucket, case.N, case.K, case.rank, False, False))
    dx = choice.GEMM.get((x.device, x.dtype, bucket, case.K, case.N, case.rank, case.dropout > 0, True))
    return f"fwd {fwd or '?'}, dX {dx or '?'}"


LAUNCH_FIELDS = ("time_utc", "gpu", "torch", "triton", "commit", "model", "proj", "M", "K", "N", "rank", "dtype",
                 "dropout", "launch", "kernel", "bound_us", "measured_us", "x_bound")


def _launch_table(console: Console, case, forward, x, ceiling: Dict, stem: str, env: Dict) -> None:
    """lora-fast's launches, profiled, beside the cost model's bound of each; rows to <stem>-launches.csv."""
    from . import launches

    model = cost_model.kernels("lora-fast", case.M, case.K, case.N, case.rank, case.dtype, bias=case.proj.bias,
                               dropout=case.dropout, sms=torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        profiled = launches.profile_step(forward, x, forward.params)
    except RuntimeError as e:
        console.print(f"[yellow]launch profile skipped: {e}[/]")
        return
    rows, problem = launches.pair(model["forward"] + model["backward"], profiled, ceiling["gemm_flops_per_s"],
                                  ceiling["copy_bytes_per_s"])
    if problem:
        console.print(f"[yellow]launch profile: {problem}[/]")
        return
    t = Table(title=f"lora-fast launches, {case.proj.label}, M={case.M}, r={case.rank}, {case.dtype}, "
                    f"dropout {case.dropout:g} (profiled, mean of 5 steps)")
    for col in ("launch", "kernel", "bound us", "measured us", "x bound"):
        t.add_column(col, justify="left" if col in ("launch", "kernel") else "right")
    for r in rows:
        t.add_row(r["launch"], r["kernel"], f"{r['bound_us']:.1f}", f"{r['measured_us']:.1f}", f"{r['x_bound']:.2f}")
    console.print(t)
    info = dict(env, model=case.proj.model, proj=case.proj.name, M=case.M, K=case.K, N=case.N, rank=case.rank,
                dtype=case.dtype, dropout=case.dropout)
    results.append_csv(stem + "-launches.csv", [dict(info, **r) for r in rows], fields=LAUNCH_FIELDS)


def _print_case(console: Console, case, rows) -> None:
    columns = ("impl", "fwd ms", "bwd ms", "fwd+bwd ms", "bound ms", "x bound", "x F.linear", "x best other",
               "TFLOP/s", "peak MiB", "saved MiB", "GEMM path")
    by = {(r["impl"], r["mode"]): r for r in rows}
    cells = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        f, bw, full = by[(impl, "forward")], by[(impl, "backward")], by[(impl, "full")]
        cells.append([impl, f"{f['ms']:.3f}", f"{bw['ms']:.3f}", f"{full['ms']:.3f}", f"{full['bound_ms']:.3f}",
                      f"{full['ratio_to_bound']:.2f}", results._fmt(full["ratio_to_linear"], ".2f"),
                      results._fmt(full["ratio_to_best_other"], ".2f"), f"{full['tflops']:.0f}",
                      f"{full['peak_mib']:.0f}", f"{full['saved_mib']:.1f}", full.get("gemm_path") or ""])
    title = f"{case.proj.label}, M={case.M}, r={case.rank}, {case.dtype}, dropout {case.dropout:g}"
    for table in tables.fitted_tables(title, columns, cells, console.width):
        console.print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the terminal's width (80 columns, or $COLUMNS, into a pipe or a file): rich fits the tables to it
    console = Console()
    if args.mode == "gpu" and not torch.cuda.is_available():
        console.print("[red]--mode gpu: no CUDA device available[/]")
        return 2
    if args.mode == "gpu" or (args.mode == "auto" and torch.cuda.is_available()):
        return run_gpu(args, console)
    return run_cpu(args, console)


if __name__ == "__main__":
    sys.exit(main())
