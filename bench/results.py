"""Result rows of a GPU run: assembly, CSV and JSON (appended), a markdown summary and a matplotlib plot.

One row per (case, implementation, mode); each row carries the GPU name, dtype, shape, torch and triton
versions and the git commit, so rows from many runs can share one file.
"""

import csv
import datetime
import json
import os
import re
import subprocess
from typing import Dict, List, Optional, Sequence

FIELDS = ("time_utc", "gpu", "torch", "triton", "commit", "model", "proj", "K", "N", "bias", "M", "rank",
          "dtype", "dropout", "impl", "mode", "ms", "ms_p20", "ms_p80", "tflops", "peak_mib", "saved_mib",
          "ratio_to_linear", "ratio_to_best_other", "bound_ms", "ratio_to_bound", "gemm_tflops_ceiling",
          "copy_tbps_ceiling", "gemm_path")


def git_commit(root: Optional[str] = None) -> str:
    """HEAD's hash (+"-dirty" with uncommitted changes), or LORA_FAST_COMMIT, or "unknown" without git."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORA_FAST_COMMIT", "unknown")


def slug(name: str) -> str:
    """A file name for a GPU name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def assemble(case_info: Dict, measured: Dict[str, Dict], bounds: Dict[str, Dict[str, float]],
             flops: Dict[str, Dict[str, float]], ceilings: Dict[str, float], env: Dict[str, str]) -> List[Dict]:
    """Rows of one case. ``measured[impl]`` = {"forward"|"backward"|"full": (median, p20, p80) ms,
    "peak_bytes": int, "saved_bytes": int, optional "gemm_path": the GEMM paths lora-fast chose};
    ``bounds[impl][mode]`` and ``flops[impl][mode]`` in s and FLOPs.
    Ratios: to F.linear's median of the same mode, and to the fastest other LoRA row (F.linear excluded: it
    is not a LoRA layer; a DoRA row against the other DoRA rows); None where that row is missing."""
    rows = []
    lora_impls = [i for i in measured if i != "F.linear"]
    for impl, m in measured.items():
        for mode in ("forward", "backward", "full"):
            ms, p20, p80 = m[mode]
            linear = measured.get("F.linear", {}).get(mode)
            # DoRA rows are compared with DoRA rows, LoRA rows with LoRA rows (the names say which)
            others = [measured[o][mode][0] for o in lora_impls if o != impl and ("dora" in o) == ("dora" in impl)]
            bound_ms = bounds[impl][mode] * 1e3
            rows.append(dict(
                env, **case_info, impl=impl, mode=mode, ms=ms, ms_p20=p20, ms_p80=p80,
                tflops=flops[impl][mode] / (ms * 1e-3) / 1e12,
                peak_mib=m["peak_bytes"] / 2**20, saved_mib=m["saved_bytes"] / 2**20,
                ratio_to_linear=ms / linear[0] if linear else None,
                ratio_to_best_other=ms / min(others) if (others and impl != "F.linear") else None,
                bound_ms=bound_ms, ratio_to_bound=ms / bound_ms,
                gemm_tflops_ceiling=ceilings["gemm_flops_per_s"] / 1e12,
                copy_tbps_ceiling=ceilings["copy_bytes_per_s"] / 1e12, gemm_path=m.get("gemm_path")))
    return rows


def append_csv(path: str, rows: Sequence[Dict], fields: Sequence[str] = FIELDS) -> None:
    """Append rows (``fields`` order, default FIELDS) to ``path``, writing the header when the file is new.
    Raises ValueError if an existing file has another header."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != tuple(fields):
            raise ValueError(f"{path}: existing header {header} differs from {list(fields)}; use another --out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})


def append_json(path: str, rows: Sequence[Dict], fields: Sequence[str] = FIELDS) -> None:
    """Append rows (their ``fields``) to the JSON list in ``path`` (created when missing)."""
    existing = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(existing + [{k: r.get(k) for k in fields} for r in rows], f, indent=1)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(rows: Sequence[Dict], command: str) -> str:
    """Summary of the forward+backward rows: one table per case, the machine and the command."""
    full = [r for r in rows if r["mode"] == "full"]
    if not full:
        return "No rows.\n"
    r0 = full[0]
    lines = [f"# lora-fast bench: {r0['gpu']}", "",
             f"`{command}` at {r0['time_utc']}, torch {r0['torch']}, triton {r0['triton']}, commit {r0['commit']}. "
             f"Ceilings measured in this run: GEMM {r0['gemm_tflops_ceiling']:.0f} TFLOP/s, copy "
             f"{r0['copy_tbps_ceiling']:.2f} TB/s. Forward+backward, median of triton.testing.do_bench.", ""]
    cases: Dict[tuple, List[Dict]] = {}
    for r in full:
        cases.setdefault((r["model"], r["proj"], r["K"], r["N"], r["M"], r["rank"], r["dtype"], r["dropout"]),
                         []).append(r)
    for (model, proj, K, N, M, rank, dtype, dropout), rs in cases.items():
        lines += [f"**{model} {proj} {K}->{N}**, M={M}, r={rank}, {dtype}, dropout {dropout}", "",
                  "| impl | ms | bound ms | x bound | x F.linear | x best other | TFLOP/s | peak MiB | saved MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            lines.append(f"| {r['impl']} | {r['ms']:.3f} | {r['bound_ms']:.3f} | {r['ratio_to_bound']:.2f} | "
                         f"{_fmt(r['ratio_to_linear'], '.2f')} | {_fmt(r['ratio_to_best_other'], '.2f')} | "
                         f"{r['tflops']:.0f} | {r['peak_mib']:.0f} | {r['saved_mib']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[Dict], path: str) -> None:
    """PNG: forward+backward time / F.linear's per case, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full" and r["ratio_to_linear"] is not None]
    labels: List[str] = []
    for r in full:
        label = f"{r['proj']} {r['K']}->{r['N']}\nM={r['M']} r={r['rank']} {r['dtype']} p={r['dropout']}"
        if label not in labels:
            labels.append(label)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4.5))
    for impl in dict.fromkeys(r["impl"] for r in full):
        pts = [(labels.index(f"{r['proj']} {r['K']}->{r['N']}\nM={r['M']} r={r['rank']} {r['dtype']} "
                             f"p={r['dropout']}"), r["ratio_to_linear"]) for r in full if r["impl"] == impl]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("forward+backward time / F.linear")
    ax.set_title(f"LoRA linear on {full[0]['gpu'] if full else '?'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
