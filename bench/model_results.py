"""Result rows of the whole-model benchmark's GPU run: the fields, a markdown summary and a matplotlib plot (CSV and
JSON appending are bench.results' with these fields)."""

import os
from typing import Dict, List, Optional, Sequence

FIELDS = ("time_utc", "gpu", "torch", "triton", "transformers", "peft", "commit", "model", "setup", "dtype",
          "adapter_dtype", "dropout", "checkpointing", "batch", "seq", "rank", "alpha", "warmup", "steps", "ms",
          "ms_min", "ms_max", "tokens_per_s", "peak_mib", "saved_mib", "saved_formula_mib", "loss_first",
          "loss_last", "tokens_per_s_vs_peft", "peak_mib_vs_peft", "status")


def row_label(r: Dict) -> str:
    """The setup as the table and the plot name it: "lora-fast fp32 p=0.05 ckpt"."""
    if r["setup"] == "frozen":
        return "frozen" + (" ckpt" if r["checkpointing"] else "")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["adapter_dtype"], r["adapter_dtype"])
    return f"{r['setup']} {short} p={r['dropout']:g}" + (" ckpt" if r["checkpointing"] else "")


def _peft_twin(r: Dict, rows: Sequence[Dict]) -> Optional[Dict]:
    for o in rows:
        if (o["setup"] == "peft" and o["status"] == "ok" and o["model"] == r["model"] and
                o["adapter_dtype"] == r["adapter_dtype"] and o["dropout"] == r["dropout"] and
                o["checkpointing"] == r["checkpointing"] and o["batch"] == r["batch"] and o["seq"] == r["seq"]):
            return o
    return None


def add_ratios(rows: List[Dict]) -> None:
    """Fill tokens_per_s_vs_peft and peak_mib_vs_peft (this row minus PEFT's) from the PEFT row of the same
    model, adapter dtype, dropout, checkpointing and batch; None where there is none."""
    for r in rows:
        twin = _peft_twin(r, rows) if r["status"] == "ok" and r["setup"] != "frozen" else None
        r["tokens_per_s_vs_peft"] = r["tokens_per_s"] / twin["tokens_per_s"] if twin else None
        r["peak_mib_vs_peft"] = r["peak_mib"] - twin["peak_mib"] if twin else None


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: Sequence[Dict], command: str) -> str:
    """One table per model: step time, tokens/s, peak memory, saved bytes, loss; the failed setups listed."""
    if not rows:
        return "No rows.\n"
    r0 = rows[0]
    lines = [f"# lora-fast whole-model training: {r0['gpu']}", "",
             f"`{command}` at {r0['time_utc']}, torch {r0['torch']}, triton {r0['triton']}, transformers "
             f"{r0['transformers']}, peft {r0['peft']}, commit {r0['commit']}. One step: forward, causal-LM cross "
             f"entropy, backward, AdamW on the adapters (frozen: no optimizer); median of {r0['steps']} steps after "
             f"{r0['warmup']} warm-up steps; peak = torch.cuda.max_memory_allocated over the timed steps (weights "
             f"included); saved = bytes the LoRA layers save for backward in one forward without checkpointing "
             f"(measured; formula in brackets). Weights {r0['dtype']}, r={r0['rank']}, alpha={r0['alpha']}, "
             "all linear layers but the output head.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        lines += [f"**{model}**, batch {rs[0]['batch']} x {rs[0]['seq']} tokens", "",
                  "| setup | ms/step | tokens/s | x PEFT | peak MiB | - PEFT MiB | saved MiB | loss first | "
                  "loss last |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            if r["status"] != "ok":
                lines.append(f"| {row_label(r)} | {r['status']} | | | | | | | |")
                continue
            saved = "-" if r["saved_mib"] is None else f"{r['saved_mib']:.0f} ({r['saved_formula_mib']:.0f})"
            lines.append(f"| {row_label(r)} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{_f(r['tokens_per_s_vs_peft'], '.2f')} | {r['peak_mib']:,.0f} | "
                         f"{_f(r['peak_mib_vs_peft'], '+,.0f')} | {saved} | {r['loss_first']:.4f} | "
                         f"{r['loss_last']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[Dict], path: str) -> None:
    """PNG: tokens/s (left) and peak memory (right) per setup, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    labels = list(dict.fromkeys(row_label(r) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(labels) * max(1, len(models)) + 4), 5))
    width = 0.8 / max(1, len(models))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "peak_mib", "peak memory (MiB)")):
        for i, model in enumerate(models):
            vals = {row_label(r): r[key] for r in ok if r["model"] == model}
            xs = [j + i * width for j, lab in enumerate(labels) if lab in vals]
            ax.bar(xs, [vals[lab] for lab in labels if lab in vals], width, label=model)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LoRA training step on {ok[0]['gpu'] if ok else '?'}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
