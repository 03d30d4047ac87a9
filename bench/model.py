"""python -m bench.model: a whole training step of real LLM architectures (random weights, nothing downloaded)
with PEFT LoRA, PEFT patched by lora-fast, lora-fast's layers, and the frozen model as the floor.

With a CUDA device: median step time, tokens/s, peak memory, saved-for-backward bytes of the LoRA layers and the
loss per setup; rows appended to <out>/<gpu>-model.csv and .json, with <out>/<gpu>-model.md and .png. Without
one (CPU mode): checks on two-layer versions of the configs that the setups agree on loss and adapter gradients,
that the saved-bytes formula equals a real run's count, and prints that formula at the real configs. It times
nothing.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import triton
from rich.console import Console
from rich.table import Table

import bench  # noqa: F401  (chooses the Triton interpreter before triton is imported when there is no GPU)

from . import model_check, model_configs, model_results, results, tables
from . import model_setups as ms

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GPU_DEFAULTS = dict(dropouts=(0.0, 0.05), adapter_dtypes=("float32", "bfloat16"), checkpointing=("off", "on"),
                    warmup=3, steps=5)
# --quick: the target point (Llama-3.2-1B, bf16, seq 2048, r 16, dropout 0.05) and dropout 0 (where the rows
# must agree on the loss), fp32 adapters, no checkpointing, batch 2: about 3 minutes on one H200 (unmeasured)
QUICK = dict(models=("llama-3.2-1b",), dropouts=(0.05, 0.0), adapter_dtypes=("float32",), checkpointing=("off",),
             batch=2, warmup=3, steps=5)
MIB = 2**20
# where the GPU mode builds its models (the tests point it at the CPU, with torch.cuda's timers faked)
DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=sorted(model_configs.REAL),
                   help="built-in configs (default: all, unless --config is given)")
    p.add_argument("--config", nargs="+", default=[], metavar="PATH", help="transformers config.json files")
    p.add_argument("--setup", nargs="+", choices=ms.SETUPS, help="setups (default: all)")
    p.add_argument("--dropout", nargs="+", type=float, help="LoRA dropout (default 0 and 0.05)")
    p.add_argument("--adapter-dtype", nargs="+", choices=sorted(DTYPES), help="GPU: adapter dtypes (default both)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), help="GPU: activation checkpointing")
    p.add_argument("--batch", type=int, help="GPU: sequences per step (default per model: "
                   f"{model_configs.BATCH})")
    p.add_argument("--seq", type=int, help=f"tokens per sequence (default {model_configs.SEQ_LEN}, capped by the "
                   "model's positions: 1024 for GPT-2)")
    p.add_argument("--steps", type=int, help="GPU: timed steps (default 5)")
    p.add_argument("--warmup", type=int, help="GPU: warm-up steps (default 3; the kernels autotune there)")
    p.add_argument("--quick", action="store_true", help="GPU: ~3 minutes, Llama-3.2-1B, batch 2, fp32 adapters, "
                   "dropout 0.05 and 0, no checkpointing; CPU: Llama-3.2-1B only")
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: gpu when CUDA is available, else cpu (default)")
    p.add_argument("--out", default=None, help="GPU results folder (default bench/results)")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 1:
        p.error(f"--warmup: expected an integer >= 1 (the first step's loss is read there), got {args.warmup}")
    if args.dropout and any(not 0.0 <= q < 1.0 for q in args.dropout):
        p.error(f"--dropout: expected probabilities in [0, 1), got {args.dropout}")
    return args


def models(args) -> Dict[str, Dict]:
    """name -> config dict: the --model choices (all when neither --model nor --config is given) and --config files
    (named by their file name)."""
    names = args.model or (() if args.config else (("llama-3.2-1b",) if args.quick else tuple(model_configs.REAL)))
    out = {n: model_configs.REAL[n] for n in names}
    for path in args.config:
        out[os.path.splitext(os.path.basename(path))[0]] = model_configs.load_json(path)
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


# --- CPU mode ----------------------------------------------------------------------------------------------------

def run_cpu(args, console: Console) -> int:
    specs = models(args)
    dropouts = list(args.dropout or (0.0, 0.05))
    p_check = max(dropouts) if max(dropouts) > 0 else 0.05
    console.print(f"[bold]lora-fast whole-model bench, CPU mode[/] ({platform.processor() or platform.machine()}, "
                  f"torch {torch.__version__}, triton {triton.__version__}). No CUDA device: nothing is timed. "
                  "Checked on two-layer versions of the configs (hidden 64, 4 heads, vocabulary 256).")
    failed = 0
    table = Table(title="Agreement (norm-wise relative errors; float32 rows, lora-fast on its reference backend)")
    for col in ("model", "check", "loss", "dA", "dB", "bound", "ok"):
        table.add_column(col, justify="left" if col in ("model", "check") else "right")
    t0 = time.time()
    for i, (name, spec) in enumerate(specs.items()):
        small = model_configs.two_layer(spec)
        checks = model_check.agreement(name, small, dropout=p_check)
        if i == 0:
            checks.append(model_check.interpreter_case(name, small))
        for c in checks:
            failed += not c.ok
            table.add_row(name, c.what, *(f"{c.errors[k]:.1e}" if k in c.errors else "-" for k in ("loss", "dA", "dB")),
                          f"{c.bound:.1e}", "[green]yes[/]" if c.ok else "[red]NO[/]")
    console.print(table)
    console.print(f"[{time.time() - t0:.0f} s] Bound: 16 roundings of float32 (2^-24) times the longest reduction "
                  "(the vocabulary or the MLP width). 'changes dA' rows show 1/change against 1/bound: dropout must "
                  "move dA by more than rounding. PEFT's masks (torch's nn.Dropout) differ from lora-fast's (Philox), "
                  "so PEFT with dropout is not compared value by value.")

    t0 = time.time()
    saved = Table(title="Saved for backward in the LoRA layers, one forward (bytes): measured vs formula, "
                        "two-layer models, bf16 weights, batch 2 x 16 tokens")
    for col in ("model", "setup", "adapters", "dropout", "measured", "formula", "equal"):
        saved.add_column(col, justify="left" if col in ("model", "setup", "adapters") else "right")
    for name, spec in specs.items():
        for c in model_check.saved_checks(name, model_configs.two_layer(spec), dropouts=dropouts):
            failed += c.measured != c.formula
            saved.add_row(name, c.setup, c.adapter_dtype, f"{c.dropout:g}", f"{c.measured:,}", f"{c.formula:,}",
                          "[green]yes[/]" if c.measured == c.formula else "[red]NO[/]")
    console.print(saved)
    console.print(f"[{time.time() - t0:.0f} s] Measured: torch.autograd.graph.saved_tensors_hooks around each LoRA "
                  "layer's forward, storages counted once (q, k, v share x), parameters excluded; lora-fast's op "
                  "on its Triton kernels (interpreter), so its saved set is the GPU path's. On CPU torch's dropout "
                  "keeps a noise tensor in the adapters' dtype where CUDA keeps a 1-byte mask: the formula takes "
                  "the device type.")

    real = []
    for name, spec in specs.items():
        seq = min(args.seq or model_configs.SEQ_LEN, model_configs.max_positions(model_configs.make_config(spec)))
        layers = ms.structure(spec, torch.bfloat16, 1, seq)
        for a in (torch.float32, torch.bfloat16):
            for p in dropouts:
                v = {s: ms.saved_formula(s, layers, a, p, "cuda") for s in ("peft", "peft+patch", "lora-fast")}
                real.append([name, str(seq), str(a).replace("torch.", ""), f"{p:g}", _mib(v["peft"]),
                             _mib(v["peft+patch"]), _mib(v["lora-fast"]), f"{v['lora-fast'] / v['peft']:.2f}"])
    # split over two tables rather than cut when the console is narrow (80 columns into a file or a pipe)
    for table in tables.fitted_tables("Saved for backward in the LoRA layers per sequence at the real configs, bf16 "
                                      "weights, as on CUDA (formula, MiB)",
                                      ("model", "seq", "adapters", "dropout", "peft", "peft+patch", "lora-fast",
                                       "lora-fast / peft"), real, console.width, keys=4,
                                      right=("seq", "dropout", "peft", "peft+patch", "lora-fast", "lora-fast / peft")):
        console.print(table)
    console.print("Per sequence (batch 1); a step saves batch times this. Structure (which layers share an input, "
                  "which inputs need a gradient) from one forward of the real config on the 'meta' device.")
    if failed:
        console.print(f"[red]{failed} check(s) failed[/]")
    return 1 if failed else 0


# --- GPU mode ----------------------------------------------------------------------------------------------------

def gpu_rows(args, specs: Dict[str, Dict]) -> List[Dict]:
    """The rows to run, in order: per model, per checkpointing, the frozen floor, then each LoRA setup per adapter
    dtype and dropout."""
    sel = dict(GPU_DEFAULTS)
    if args.quick:
        sel.update(QUICK)
    for key, opt in (("dropouts", "dropout"), ("adapter_dtypes", "adapter_dtype"), ("checkpointing", "checkpointing"),
                     ("warmup", "warmup"), ("steps", "steps"), ("batch", "batch")):
        if getattr(args, opt) is not None:
            sel[key] = getattr(args, opt)
    setups = args.setup or ms.SETUPS
    rows = []
    for name, spec in specs.items():
        seq = min(args.seq or model_configs.SEQ_LEN, model_configs.max_positions(model_configs.make_config(spec)))
        batch = sel.get("batch") or model_configs.BATCH.get(name, model_configs.DEFAULT_BATCH)
        base = dict(model=name, dtype="bfloat16", batch=batch, seq=seq, rank=ms.RANK, alpha=ms.ALPHA,
                    warmup=sel["warmup"], steps=sel["steps"])
        for ckpt in sel["checkpointing"]:
            if "frozen" in setups:
                rows.append(dict(base, setup="frozen", adapter_dtype="-", dropout=0.0, checkpointing=ckpt == "on"))
            for p in sel["dropouts"]:
                for a in sel["adapter_dtypes"]:
                    for setup in setups:
                        if setup != "frozen":
                            rows.append(dict(base, setup=setup, adapter_dtype=a, dropout=p,
                                             checkpointing=ckpt == "on"))
    return rows


def measure_row(row: Dict, spec: Dict, layers_cache: Dict) -> Dict:
    """Build the row's model on CUDA, time its steps and measure its memory; returns the measured fields."""
    adapter = DTYPES.get(row["adapter_dtype"], torch.bfloat16)
    run = ms.build(row["setup"], spec, torch.bfloat16, adapter_dtype=adapter, dropout=row["dropout"],
                   checkpointing=row["checkpointing"], device=DEVICE)
    ms.set_adapters(run)
    ids = ms.random_batch(run.model.config.vocab_size, row["batch"], row["seq"], DEVICE)
    out: Dict = {}
    if not row["checkpointing"]:
        # a separate forward (its graph freed before the steps): the checkpointing hooks would shadow these
        measured, _ = ms.measure_saved(run, ids)
        key = (row["model"], row["batch"], row["seq"])
        if key not in layers_cache:
            layers_cache[key] = ms.structure(spec, torch.bfloat16, row["batch"], row["seq"])
        out["saved_mib"] = measured / MIB
        out["saved_formula_mib"] = ms.saved_formula(row["setup"], layers_cache[key], adapter, row["dropout"],
                                                    torch.device(DEVICE).type) / MIB
    opt = torch.optim.AdamW(run.params, lr=1e-4) if run.params else None

    def step() -> torch.Tensor:
        loss = ms.loss_of(run.model, ids)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(row["warmup"])]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(row["steps"]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step())
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms_step = statistics.median(times)
    out.update(ms=ms_step, ms_min=min(times), ms_max=max(times),
               tokens_per_s=row["batch"] * row["seq"] / (ms_step * 1e-3),
               peak_mib=torch.cuda.max_memory_allocated() / MIB, loss_first=losses[0].item(),
               loss_last=losses[-1].item(), status="ok")
    return out


def _versions() -> Dict[str, str]:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "missing"
    return dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                peft=peft_version)


def run_gpu(args, console: Console) -> int:
    from rich.progress import Progress

    specs = models(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    gpu = torch.cuda.get_device_name()
    env = dict(time_utc=results.now_utc(), gpu=gpu, commit=results.git_commit(), **_versions())
    stem = os.path.join(out, results.slug(gpu) + "-model")
    command = "python -m bench.model " + " ".join(sys.argv[1:])
    console.print(f"[bold]lora-fast whole-model bench on {gpu}[/], torch {env['torch']}, triton {env['triton']}, "
                  f"transformers {env['transformers']}, peft {env['peft']}, commit {env['commit']}; rows -> "
                  f"{stem}.csv/.json")
    todo = gpu_rows(args, specs)
    done: List[Dict] = []
    layers_cache: Dict = {}
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("rows", total=len(todo))
        for row in todo:
            row = dict(env, **row)
            label = f"{row['model']} {model_results.row_label(row)}"
            progress.update(task, description=label)
            try:
                row.update(measure_row(row, specs[row["model"]], layers_cache))
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of memory"
            except ImportError as e:
                row["status"] = f"missing package ({e})"
            except Exception as e:  # a failed row is reported (a bug in a setup, a driver error); the rest run
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            gc.collect()
            torch.cuda.empty_cache()
            if row["status"] != "ok":
                console.print(f"[red]{label}: {row['status']}[/] (row kept with its status; the others go on)")
            else:
                saved = row.get("saved_mib")
                console.print(f"{label}: {row['ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, peak "
                              f"{row['peak_mib']:,.0f} MiB, saved {'-' if saved is None else f'{saved:,.1f}'} MiB, "
                              f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}")
            done.append(row)
            model_results.add_ratios(done)
            # appended row by row, so that a timeout keeps what finished
            results.append_csv(stem + ".csv", [row], model_results.FIELDS)
            results.append_json(stem + ".json", [row], model_results.FIELDS)
            progress.advance(task)
    model_results.add_ratios(done)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(model_results.markdown(done, command))
    model_results.plot(done, stem + ".png")
    console.print(model_results.markdown(done, command))
    return agreement_report(done, console)


def agreement_report(rows: List[Dict], console: Console) -> int:
    """Rows that should compute the same loss (LoRA setups, dropout 0, same adapters and checkpointing): the first
    step's loss within 4 bf16 roundings (4 * 2^-8, relative) of PEFT's. Returns 1 when one is off."""
    bad = 0
    for r in rows:
        if r["status"] != "ok" or r["setup"] in ("frozen", "peft") or r["dropout"] != 0:
            continue
        twin = model_results._peft_twin(r, rows)
        if twin is None:
            continue
        diff = abs(r["loss_first"] - twin["loss_first"]) / abs(twin["loss_first"])
        if diff > 4 * 2.0**-8:
            bad += 1
            console.print(f"[red]{r['model']} {model_results.row_label(r)}: first loss {r['loss_first']:.5f} vs "
                          f"PEFT's {twin['loss_first']:.5f} (relative {diff:.2e}): this row computes something else[/]")
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    mode = args.mode
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "cpu"
    if mode == "gpu" and not torch.cuda.is_available():
        console.print("[red]--mode gpu: no CUDA device available[/]")
        return 2
    return run_gpu(args, console) if mode == "gpu" else run_cpu(args, console)


if __name__ == "__main__":
    sys.exit(main())
