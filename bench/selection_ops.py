"""How often one training step of a model with several adapters per batch sorts its rows and reads the index
range to the host (issue 30): ``python -m bench.selection_ops``.

A counting run, never a timing: the model's wrapped layers run the opt-in multi-adapter kernels
(LORA_FAST_MULTI=triton, the Triton interpreter on a CPU) in the sorted row order under ``use_adapter_names``,
and torch.profiler's CPU events count the aten ops of one forward and one backward (those called from Python,
not those another aten op calls inside it): the sort's (``aten::sort``, ``aten::arange``,
``aten::searchsorted``), the index range check's (``aten::aminmax``) and every host read of a device scalar
(``aten::item``: ``.item()``, ``int(t)``; a device sync each on CUDA; ``.tolist()`` of a device tensor would
show as a copy instead, and this path calls none), any stacking of adapters (``aten::stack``: none since the
layers pass their factors unstacked, issue 30) and the per-adapter constant tables uploaded (``tables``). The
same counts for bare ``lora_linear_multi`` calls with a raw index and with an ``AdapterRows`` (``op_calls``) show
what stays per call.
"""

import argparse
import collections
import os
from typing import Dict

import torch

COUNTED = ("aten::sort", "aten::arange", "aten::searchsorted", "aten::aminmax", "aten::item", "aten::stack")


def _count(fn) -> Dict[str, int]:
    """{counted aten op: calls} while ``fn()`` runs (torch.profiler, CPU events), and "tables": the calls of
    kernels.multi.adapter_params (the (5, n) per-adapter constant table: one host-to-device copy each)."""
    from unittest import mock

    from torch.profiler import ProfilerActivity, profile

    from lora_fast.kernels import multi

    tables = []
    real = multi.adapter_params
    with mock.patch.object(multi, "adapter_params", lambda *a: tables.append(1) or real(*a)), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    # the ops called from Python (or from a non-aten region such as an autograd Function), not those an aten op
    # calls inside (aten::sort on a CPU builds its indices with aten::arange)
    calls = collections.Counter(e.name for e in prof.events()
                                if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    return dict({name: calls.get(name, 0) for name in COUNTED}, tables=len(tables))


def model_step(layers: int = 4, batch: int = 6, seq: int = 5, width: int = 32, seed: int = 0) -> Dict[str, dict]:
    """Counts of one forward and one backward of ``layers`` wrapped nn.Linear (width x width) carrying adapters
    "default" (rank 4), "b" (rank 2), "c" (rank 8), the batch's samples spread over them and "__base__", x of
    shape (batch, seq, width). Returns {"forward": counts, "backward": counts, "layers": layers}."""
    from lora_fast import replace_linear_with_lora, use_adapter_names

    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*blocks)
    replace_linear_with_lora(model, 4, 8.0)
    for m in model:
        if hasattr(m, "add_adapter"):
            m.add_adapter("b", 2, 2.0)
            m.add_adapter("c", 8, 16.0)
            with torch.no_grad():
                for p in m.adapter_parameters():
                    p.normal_(0, 0.2)
    cycle = ["b", "__base__", "default", "c"]
    names = [cycle[i % len(cycle)] for i in range(batch)]
    x = torch.randn(batch, seq, width)
    out = {}
    with use_adapter_names(model, names):
        model(x)   # the first call compiles / warms nothing on the CPU, but keeps the counted run alike to later ones
        holder = {}
        out["forward"] = _count(lambda: holder.setdefault("y", model(x)))
        out["backward"] = _count(lambda: holder["y"].square().sum().backward())
    out["layers"] = layers
    return out


def op_calls(calls: int = 4, M: int = 30, K: int = 32, N: int = 24, n: int = 3, seed: int = 0) -> Dict[str, dict]:
    """Counts of ``calls`` forward calls of the bare op on one index: with the raw int64 tensor, and with one
    ``adapter_rows`` built before (its build counted apart)."""
    from lora_fast import adapter_rows, lora_linear_multi

    torch.manual_seed(seed)
    x = torch.randn(M, K)
    weight, A, B = torch.randn(N, K) / K**0.5, torch.randn(n, K, 4) / K**0.5, torch.randn(n, 4, N)
    idx = torch.randint(-1, n, (M,))
    out = {"raw": _count(lambda: [lora_linear_multi(x, weight, None, A, B, 0.5, idx) for _ in range(calls)])}
    holder = {}
    out["adapter_rows build"] = _count(lambda: holder.setdefault("rows", adapter_rows(idx, n)))
    out["AdapterRows"] = _count(lambda: [lora_linear_multi(x, weight, None, A, B, 0.5, holder["rows"])
                                         for _ in range(calls)])
    out["calls"] = calls
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["LORA_FAST_MULTI"] = "triton"
    os.environ["LORA_FAST_MULTI_ORDER"] = "sorted"
    counts = model_step(args.layers)
    print(f"model step, {counts['layers']} wrapped layers, use_adapter_names, sorted, LORA_FAST_MULTI=triton:")
    for mode in ("forward", "backward"):
        print(f"  {mode:9s} " + "  ".join(f"{k.split('::')[-1]}={v}" for k, v in counts[mode].items()))
    try:
        ops = op_calls()
    except ImportError as e:   # a lora_fast without adapter_rows (before issue 30's shared selection)
        print(f"bare op: {e}")
        return
    print(f"bare lora_linear_multi, {ops['calls']} forward calls on one index:")
    for mode in ("raw", "adapter_rows build", "AdapterRows"):
        print(f"  {mode:18s} " + "  ".join(f"{k.split('::')[-1]}={v}" for k, v in ops[mode].items()))


if __name__ == "__main__":
    main()
