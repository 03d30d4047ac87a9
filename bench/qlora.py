"""python -m bench.qlora: LoRA on a 4-bit base (QLoRA) -- weight bytes per layer, and GPU timings.

Without a CUDA device (any machine): the bytes each layer's frozen weight takes in 16 bits and in bitsandbytes'
4-bit layouts (NF4/FP4: half a byte per weight, plus one fp32 absmax per block of 64; with double quantization
one byte per block plus one fp32 per 256 blocks and an fp32 offset), on the real model shapes; the formula is
checked against a real bitsandbytes quantization (``Packed4bit.nbytes``) on a small layer first. Nothing is timed.

With a CUDA device: forward, backward and forward+backward times (triton.testing.do_bench, as ``python -m
bench``) of PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit over bitsandbytes' Linear4bit), lora-fast's
``lora_linear_4bit`` on both GEMM paths (fused per-tile dequantization; dequantize-then-GEMM) and lora-fast's
16-bit ``lora_linear`` on the same (dequantized) weight, for the Llama-3-8B shapes, nf4 with double
quantization, bf16, rank 16; rows are printed and written to ``<out>/qlora-<gpu>.json``. No GPU run has been
made yet: no number of this bench is a measurement so far.
"""

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

import bench  # noqa: F401  (the interpreter is chosen before triton is imported when there is no GPU)

from . import results, shapes

QLORA_IMPLS = ("lora-fast-16bit", "peft-qlora", "lora-fast-qlora", "lora-fast-qlora-fused", "lora-fast-qlora-dequant")


def weight_bytes(N: int, K: int, *, bits16: bool = False, blocksize: int = 64, nested: bool = True,
                 blocksize2: int = 256) -> int:
    """Bytes of an (N, K) frozen weight: 2 N K in 16 bits; in bitsandbytes' 4-bit layout ceil(N K / 2) of
    packed codes plus the block statistics (fp32 absmax per block; nested: a uint8 code per block, an fp32
    absmax per ``blocksize2`` blocks and one fp32 offset). The code tables (16 and 256 fp32 values shared by
    every layer) are left out."""
    if bits16:
        return 2 * N * K
    blocks = -(-N * K // blocksize)
    stats = blocks + 4 * -(-blocks // blocksize2) + 4 if nested else 4 * blocks
    return (N * K + 1) // 2 + stats


def check_formula() -> List[str]:
    """Problems found comparing ``weight_bytes`` with a real bitsandbytes quantization (empty: none)."""
    import bitsandbytes.functional as bnb_functional

    from lora_fast.qlora import Packed4bit

    problems = []
    for N, K, nested, blocksize in ((96, 80, True, 64), (96, 80, False, 64), (33, 130, True, 128)):
        q, state = bnb_functional.quantize_4bit(torch.randn(N, K), blocksize=blocksize, compress_statistics=nested,
                                                quant_type="nf4")
        real = Packed4bit.from_bitsandbytes(q, state).nbytes
        if real != weight_bytes(N, K, blocksize=blocksize, nested=nested):
            problems.append(f"({N}, {K}) blocksize {blocksize} nested {nested}: bitsandbytes {real} B, formula "
                            f"{weight_bytes(N, K, blocksize=blocksize, nested=nested)} B")
    return problems


def run_cpu(models) -> int:
    problems = check_formula()
    if problems:
        print("the byte formula disagrees with bitsandbytes:\n" + "\n".join(problems))
        return 1
    print("Weight bytes per layer (MiB; checked against a real bitsandbytes quantization on small layers). "
          "Nothing is timed without a GPU.\n")
    print("| projection | 16-bit | nf4, blocksize 64 | nf4 + double quant | bytes per weight (double quant) |")
    print("|---|---:|---:|---:|---:|")
    for proj in shapes.projections(models):
        N, K = proj.out_features, proj.in_features
        b16, b4, b4n = (weight_bytes(N, K, bits16=True), weight_bytes(N, K, nested=False), weight_bytes(N, K))
        print(f"| {proj.label} | {b16 / 2**20:,.1f} | {b4 / 2**20:,.2f} | {b4n / 2**20:,.2f} | "
              f"{b4n / (N * K):.4f} |")
    return 0


def _peft_qlora(qweight, state, A, B, scale, K, N, dtype):
    """PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit) over a bitsandbytes Linear4bit holding ``qweight``,
    its adapters sharing A's and B's storage (lora_A.weight = A^T, lora_B.weight = B^T)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from torch import nn

    r = A.shape[1]
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type=state.quant_type, device="meta")
    base.weight = bnb.nn.Params4bit(qweight, requires_grad=False, quant_state=state, bnb_quantized=True,
                                    blocksize=state.blocksize, quant_type=state.quant_type, module=base)
    # PEFT's scaling is lora_alpha / r
    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0)
    layer = PeftLinear4bit(base, "default", config, r=r, lora_alpha=scale * r, lora_dropout=0.0)
    layer.lora_A["default"].weight = nn.Parameter(A.detach().t())
    layer.lora_B["default"].weight = nn.Parameter(B.detach().t())
    return layer.train(), [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def qlora_impls(K: int, N: int, rank: int, dtype: torch.dtype, device, names=QLORA_IMPLS) -> tuple:
    """(tensors, {name: (forward, trainable, LORA_FAST_GEMM_4BIT value or None)}) for one layer: an (N, K) weight
    quantized by bitsandbytes (nf4, blocksize 64, double quantization), A (K, r) and B (r, N) in ``dtype``.
    "lora-fast-16bit" runs lora_linear on the dequantized weight (the 16-bit layer the targets compare with);
    the "peft-qlora" entry is left out, with its reason in tensors["skipped"], when PEFT cannot build it."""
    import bitsandbytes.functional as bnb_functional

    from lora_fast import lora_linear, reference_4bit
    from lora_fast.qlora import lora_linear_4bit

    scale = 2.0
    weight16 = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    qweight, state = bnb_functional.quantize_4bit(weight16, blocksize=64, compress_statistics=True,
                                                  quant_type="nf4")
    # by the layout's definition: bitsandbytes' own CPU dequantization is wrong for some layouts (reference_4bit)
    weight = reference_4bit.dequantize(qweight, state).to(dtype)
    A = (torch.randn(K, rank, device=device) * K**-0.5).to(dtype).requires_grad_()
    B = (torch.randn(rank, N, device=device) * rank**-0.5).to(dtype).requires_grad_()
    tensors = dict(qweight=qweight, state=state, weight=weight, A=A, B=B, skipped={})

    def qlora(x):
        return lora_linear_4bit(x, qweight, state, None, A, B, scale)

    impls = {"lora-fast-16bit": (lambda x: lora_linear(x, weight, None, A, B, scale), [A, B], None),
             "lora-fast-qlora": (qlora, [A, B], None),
             "lora-fast-qlora-fused": (qlora, [A, B], "fused"),
             "lora-fast-qlora-dequant": (qlora, [A, B], "dequant")}
    if "peft-qlora" in names:
        try:
            layer, params = _peft_qlora(qweight, state, A, B, scale, K, N, dtype)
            impls["peft-qlora"] = (layer, params, None)
        except ImportError as err:
            tensors["skipped"]["peft-qlora"] = str(err)
    return tensors, {n: impls[n] for n in names if n in impls}


def run_gpu(models, ranks, tokens, out_dir) -> int:
    import triton

    from . import timing

    gpu = torch.cuda.get_device_name()
    env = dict(time_utc=results.now_utc(), gpu=gpu, torch=torch.__version__, triton=triton.__version__,
               commit=results.git_commit())
    rows: List[Dict] = []
    for proj in shapes.projections(models):
        K, N = proj.in_features, proj.out_features
        for rank in ranks:
            tensors, impls = qlora_impls(K, N, rank, torch.bfloat16, "cuda")
            for name, reason in tensors["skipped"].items():
                print(f"{name} skipped: {reason}")
            for M in tokens:
                x = torch.randn(M, K, device="cuda").to(torch.bfloat16).requires_grad_()
                for name, (forward, params, path) in impls.items():
                    saved_path = os.environ.get("LORA_FAST_GEMM_4BIT")
                    os.environ["LORA_FAST_GEMM_4BIT"] = path or saved_path or "auto"
                    try:
                        measured = timing.measure(forward, x, [x, *params])
                    finally:
                        if saved_path is None:
                            os.environ.pop("LORA_FAST_GEMM_4BIT")
                        else:
                            os.environ["LORA_FAST_GEMM_4BIT"] = saved_path
                    rows.append(dict(env, model=proj.model, proj=proj.name, K=K, N=N, M=M, rank=rank,
                                     dtype="bfloat16", quant="nf4, blocksize 64, double quant", impl=name,
                                     **{f"{mode}_ms": measured[mode][0] for mode in ("forward", "backward", "full")},
                                     peak_mib=measured["peak_bytes"] / 2**20))
                    print(f"{proj.label} M={M} r={rank} {name}: forward {measured['forward'][0]:.3f} ms, "
                          f"forward+backward {measured['full'][0]:.3f} ms", flush=True)
                del x
            del tensors, impls
            torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"qlora-{results.slug(gpu)}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.qlora", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=sorted(shapes.MODELS), default=["llama3-8b"])
    p.add_argument("--rank", nargs="+", type=int, default=[16])
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        return run_gpu(args.model, args.rank, args.tokens, args.out)
    return run_cpu(args.model)


if __name__ == "__main__":
    sys.exit(main())
