"""The CPU mode's checks of the whole-model benchmark (nothing timed): the setups compute the same loss and adapter
gradients, and the saved-bytes formula equals what a real run saves.

Agreement runs in float32 on two-layer versions of the configs, with the same base weights, the same nonzero
adapters and the same token ids in every setup, against PEFT in float64; lora-fast runs its reference backend
there (plain torch ops; the Triton interpreter would take minutes per model, and the kernels are checked against
float64 by the test suite), except the one case ``interpreter_case`` that runs the kernels in the interpreter.
"""

import dataclasses
import functools
import math
from typing import Dict, List, Optional, Sequence

import torch

from . import model_setups as ms

LORA_SETUPS = ("peft", "peft+patch", "lora-fast")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
# depth factor of the error bound: roundings a value meets on its way through a two-layer model and back (per
# block: norm, attention's three products and softmax, the MLP's two products; the head and the loss; then the
# same chain backwards), rounded up
CHAIN = 16


def tolerance(spec: Dict, dtype: torch.dtype) -> float:
    """Norm-wise relative bound of a float32 (bfloat16) run against float64: CHAIN roundings, each at most the
    dtype's unit roundoff times the longest reduction of the model (Higham's gamma_n ~ n u per product)."""
    widths = [v for k, v in spec.items() if k in ("hidden_size", "intermediate_size", "n_embd", "n_inner",
                                                   "vocab_size") and isinstance(v, int)]
    return CHAIN * max(widths) * UNIT_ROUNDOFF[dtype]


def one_thread(fn):
    """Run ``fn`` with torch on one CPU thread (restored after): the two-layer models' products are tiny, and on a
    shared machine two OpenMP threads made each one ~30 ms instead of ~20 us (measured here, load ~5 on 2 cores)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


@dataclasses.dataclass
class Result:
    """One setup's loss and adapter gradients {layer: (dA, dB)} (float64 copies)."""

    setup: str
    loss: float
    grads: Dict[str, tuple]


@one_thread
def run_once(spec: Dict, setup: str, dtype: torch.dtype, *, dropout: float = 0.0, checkpointing: bool = False,
             batch: int = 2, seq: int = 16, seed: int = 3, backend: Optional[str] = "reference") -> Result:
    """Forward, loss and backward of ``setup`` (no optimizer step: the gradients are compared), with the adapters
    of ``model_setups.set_adapters`` in ``dtype`` and torch seeded with ``seed`` right before the forward (the
    LoRA dropout masks of peft+patch and lora-fast then coincide)."""
    run = ms.build(setup, spec, dtype, adapter_dtype=dtype, dropout=dropout, checkpointing=checkpointing)
    ms.set_adapters(run)
    ids = ms.random_batch(spec["vocab_size"], batch, seq, "cpu")
    with ms.lora_fast_backend(backend):
        torch.manual_seed(seed)
        loss = ms.loss_of(run.model, ids)
        loss.backward()
    grads = {n: (a.detach().double(), b.detach().double()) for n, (a, b) in run.adapter_grads().items()}
    return Result(setup, loss.item(), grads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius); inf when b is zero and a is not."""
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def compare(got: Result, ref: Result) -> Dict[str, float]:
    """Largest relative errors of ``got`` against ``ref``: loss, dA and dB (worst layer); raises ValueError when
    the two wrap different layers."""
    if set(got.grads) != set(ref.grads):
        raise ValueError(f"{got.setup} wraps other layers than {ref.setup}: "
                         f"{sorted(set(got.grads) ^ set(ref.grads))}")
    return dict(loss=abs(got.loss - ref.loss) / abs(ref.loss),
                dA=max(rel(got.grads[n][0], ref.grads[n][0]) for n in ref.grads),
                dB=max(rel(got.grads[n][1], ref.grads[n][1]) for n in ref.grads))


@dataclasses.dataclass
class Check:
    """A named comparison: its errors, the bound and whether every error is within it."""

    model: str
    what: str
    errors: Dict[str, float]
    bound: float

    @property
    def ok(self) -> bool:
        return all(e <= self.bound for e in self.errors.values())


@one_thread
def agreement(name: str, spec: Dict, *, dtype: torch.dtype = torch.float32, setups: Sequence[str] = LORA_SETUPS,
              dropout: float = 0.05) -> List[Check]:
    """The checks of one (two-layer) model:
    - dropout 0: every setup against PEFT in float64 (loss, dA, dB);
    - dropout ``dropout``: peft+patch against lora-fast (both draw lora-fast's Philox masks from the same seeds);
      PEFT's loss differs from its dropout-0 loss (the masks act; PEFT's nn.Dropout masks are torch's, another
      draw than lora-fast's, so its values are not compared);
    - activation checkpointing on against off, with dropout (the recompute replays the RNG state).
    """
    bound = tolerance(spec, dtype)
    ref = run_once(spec, "peft", torch.float64)
    checks = []
    for setup in setups:
        checks.append(Check(name, f"{setup} vs PEFT float64, dropout 0", compare(run_once(spec, setup, dtype), ref),
                            bound))
    with_dropout = {s: run_once(spec, s, dtype, dropout=dropout) for s in setups}
    if {"peft+patch", "lora-fast"} <= set(setups):
        checks.append(Check(name, f"peft+patch vs lora-fast, dropout {dropout}",
                            compare(with_dropout["peft+patch"], with_dropout["lora-fast"]), bound))
    for setup in setups:
        # a dropout that did nothing would leave dA = dropout(x)^T dS as it was: the change must exceed the rounding
        # bound (it is ~sqrt(p / (1 - p)) of dA's size; the loss of a random model moves too little to tell)
        change = compare(with_dropout[setup], ref)["dA"]
        checks.append(Check(name, f"{setup}: dropout {dropout} changes dA (1 / change shown)",
                            {"dA": 1.0 / change if change > 0 else math.inf}, 1.0 / bound))
    for setup in setups:
        ckpt = run_once(spec, setup, dtype, dropout=dropout, checkpointing=True)
        checks.append(Check(name, f"{setup} checkpointing on vs off, dropout {dropout}",
                            compare(ckpt, with_dropout[setup]), bound))
    return checks


@one_thread
def interpreter_case(name: str, spec: Dict) -> Check:
    """lora-fast on the Triton kernels (in the interpreter) against PEFT in float64, float32, dropout 0."""
    ref = run_once(spec, "peft", torch.float64, batch=1, seq=8)
    got = run_once(spec, "lora-fast", torch.float32, batch=1, seq=8, backend="triton")
    return Check(name, "lora-fast (Triton interpreter) vs PEFT float64, dropout 0", compare(got, ref),
                 tolerance(spec, torch.float32))


@dataclasses.dataclass
class SavedCheck:
    model: str
    setup: str
    adapter_dtype: str
    dropout: float
    measured: int
    formula: int


@one_thread
def saved_checks(name: str, spec: Dict, *, dtype: torch.dtype = torch.bfloat16, batch: int = 2, seq: int = 16,
                 setups: Sequence[str] = ms.SETUPS, adapter_dtypes=(torch.float32, torch.bfloat16),
                 dropouts=(0.0, 0.05), cases: Optional[Sequence[tuple]] = None) -> List[SavedCheck]:
    """Measured (saved_tensors_hooks on a real CPU forward; lora-fast's op on its kernels in the Triton
    interpreter, so its saved set is the GPU path's) against ``saved_formula`` on the structure read from 'meta',
    for each (setup, adapter dtype, dropout) of ``cases`` (default: every combination of the three lists)."""
    layers = ms.structure(spec, dtype, batch, seq)
    ids = ms.random_batch(spec["vocab_size"], batch, seq, "cpu")
    if cases is None:
        cases = [(s, a, p) for s in setups for a in adapter_dtypes for p in (dropouts if s != "frozen" else (0.0,))]
    out = []
    for setup, adapter_dtype, p in cases:
        run = ms.build(setup, spec, dtype, adapter_dtype=adapter_dtype, dropout=p)
        with ms.lora_fast_backend("triton"):
            measured, _ = ms.measure_saved(run, ids)
        out.append(SavedCheck(name, setup, str(adapter_dtype).replace("torch.", ""), p, measured,
                              ms.saved_formula(setup, layers, adapter_dtype, p, "cpu")))
    return out
