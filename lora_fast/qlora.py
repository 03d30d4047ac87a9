"""lora_linear_4bit: the fused LoRA linear on a frozen 4-bit base (QLoRA), with autograd and the choice of
backend and GEMM path.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen base weight
as 4-bit NormalFloat (or FP4) codes with one absmax per block, optionally double-quantized; bitsandbytes'
``Linear4bit`` holds it (``weight``: packed uint8, ``weight.quant_state``: the layout). lora-fast reads that
layout directly (``Packed4bit``): the Triton backend dequantizes inside the GEMM's tiles (or into a scratch
weight, per the GEMM path), the reference backend dequantizes by the layout's definition in torch ops
(``lora_fast.reference_4bit``; bitsandbytes' own CPU ``dequantize_4bit`` is wrong for some layouts).
bitsandbytes is needed only by these paths (``pip install -e ".[qlora]"``).
"""

import dataclasses
import functools
import numbers
import os
from typing import Optional, Tuple

import torch

from . import philox, reference, reference_4bit
from ._checks import check_lora_linear, check_training
from .functional import _autocast_enabled, _autocast_inputs, graph_gradients, select_backend

QUANT_TYPES = ("nf4", "fp4")
GEMM_4BIT_PATHS = ("auto", "fused", "dequant", "tma")
# opt-in: taken only when LORA_FAST_GEMM_4BIT names it, never timed by "auto". "tma": the fused path with the TMA
# variant of the 4-bit GEMM (kernels/nf4.py, sm_90+, 16-bit, aligned operands, else the cp.async kernel), which
# no GPU has run yet
GEMM_4BIT_OPT_IN = ("tma",)
# "auto" on a GPU: both paths' forward timed on the first call of a key and the faster kept, in memory and on disk
# (kernels/choice.py, the mechanism of the 16-bit GEMM's path). Where nothing can be timed (the interpreter) this
# rule stands in: the per-tile dequantizing GEMM up to this many rows of x, dequantize-then-GEMM above (the
# dequantization pass moves N K (0.5 + 2) bytes once per call: small next to the GEMM's 2 M N K flops at
# M >= 2048 rows, a large part of the call at small M).
FUSED_MAX_M = 2048
_TRITON_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Packed4bit:
    """A 4-bit weight in bitsandbytes' layout, as the kernels read it (see lora_fast/kernels/nf4.py).

    Fields: ``data`` the packed codes, uint8 (ceil(N K / 2),), two per byte, the even flat index in the high
    nibble; ``code`` the 16 fp32 values of the quantization type (bitsandbytes' NF4 or FP4 table);
    ``absmax`` one per ``blocksize`` consecutive elements of the row-major flattened (N, K) weight: fp32, or
    uint8 codes when ``nested``; ``shape`` (N, K); ``dtype`` the dtype bitsandbytes dequantizes to;
    ``quant_type`` "nf4" or "fp4". Double quantization (``nested``): ``code2`` (256 fp32, the 8-bit dynamic
    map), ``absmax2`` (fp32, one per ``blocksize2`` absmax codes) and ``offset`` (one fp32), with
    absmax = code2[q] * absmax2[j // blocksize2] + offset.
    """

    data: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: Tuple[int, int]
    dtype: torch.dtype
    quant_type: str
    code2: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize2: int = 0

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and its statistics (what the layer keeps in memory)."""
        parts = (self.data, self.absmax, self.absmax2, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @classmethod
    def from_bitsandbytes(cls, qweight: torch.Tensor, quant_state) -> "Packed4bit":
        """The layout of a bitsandbytes 4-bit weight: ``qweight`` (``Linear4bit.weight``, a Params4bit, or the
        packed tensor ``bitsandbytes.functional.quantize_4bit`` returns; any storage dtype) and its QuantState.

        Raises: ImportError without bitsandbytes; TypeError / ValueError naming ``qweight`` or ``quant_state``
        for what is not a 4-bit weight in bitsandbytes' standard layout (including the CPU-specific repacking
        that bitsandbytes applies to a Linear4bit called in eval mode without grad on AVX512-BF16 CPUs).
        """
        if not isinstance(qweight, torch.Tensor):
            raise TypeError(f"qweight: expected a torch.Tensor (Linear4bit.weight), got {type(qweight).__name__}")
        if quant_state is None:
            raise ValueError("quant_state: expected bitsandbytes' QuantState (Linear4bit.weight.quant_state), got "
                             "None: the weight is not quantized yet (bitsandbytes quantizes when the Linear4bit "
                             "is moved to a device)")
        missing = [a for a in ("absmax", "shape", "blocksize", "quant_type", "dtype") if not hasattr(quant_state, a)]
        if missing:
            raise TypeError(f"quant_state: expected a bitsandbytes QuantState, got {type(quant_state).__name__} "
                            f"without {missing}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state: the weight is in bitsandbytes' CPU-specific packing (made when a "
                             "Linear4bit runs in eval mode without grad on an AVX512-BF16 CPU); lora-fast reads "
                             "the standard layout only")
        if quant_state.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_state: quant_type: expected one of {QUANT_TYPES}, got {quant_state.quant_type!r}")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state: shape: expected (out_features, in_features), got {shape}")
        if quant_state.dtype not in _TRITON_WEIGHT_DTYPES:
            raise ValueError(f"quant_state: dtype: expected one of {_TRITON_WEIGHT_DTYPES}, got {quant_state.dtype}")
        blocksize = int(quant_state.blocksize)
        if blocksize < 1 or blocksize & (blocksize - 1):
            raise ValueError(f"quant_state: blocksize: expected a power of two, got {blocksize}")
        data = qweight.data if isinstance(qweight, torch.nn.Parameter) else qweight
        if data.dtype != torch.uint8:
            if data.dtype.is_floating_point is False and data.element_size() != 1:
                raise TypeError(f"qweight: expected packed codes (uint8 or a quant_storage dtype), got {data.dtype}")
            data = data.contiguous().view(torch.uint8)   # quant_storage (bf16, ...) for FSDP: the same bytes
        data = data.reshape(-1)
        N, K = shape
        if data.numel() != (N * K + 1) // 2:
            raise ValueError(f"qweight: expected {(N * K + 1) // 2} bytes of packed codes for shape {shape}, got "
                             f"{data.numel()}")
        blocks = -(-N * K // blocksize)
        absmax = quant_state.absmax
        if absmax.numel() != blocks:
            raise ValueError(f"quant_state: absmax: expected {blocks} values (one per {blocksize} weights), got "
                             f"{absmax.numel()}")
        device = data.device
        for name, t in (("absmax", absmax),):
            if t.device != device:
                raise ValueError(f"quant_state: {name}: expected qweight's device {device}, got {t.device}")
        code = _code_table(quant_state.quant_type, device)
        fields = dict(data=data, code=code, absmax=absmax.reshape(-1), blocksize=blocksize, shape=(N, K),
                      dtype=quant_state.dtype, quant_type=quant_state.quant_type)
        state2 = getattr(quant_state, "state2", None)
        if getattr(quant_state, "nested", False) and state2 is not None:
            if absmax.dtype != torch.uint8:
                raise ValueError(f"quant_state: absmax: expected uint8 codes for double quantization, got "
                                 f"{absmax.dtype}")
            blocksize2 = int(state2.blocksize)
            if blocksize2 < 1 or blocksize2 & (blocksize2 - 1):
                raise ValueError(f"quant_state: state2.blocksize: expected a power of two, got {blocksize2}")
            absmax2, code2 = state2.absmax.reshape(-1), state2.code.reshape(-1)
            if code2.numel() != 256 or absmax2.numel() != -(-blocks // blocksize2):
                raise ValueError(f"quant_state: state2: expected a 256-entry code and {-(-blocks // blocksize2)} "
                                 f"absmax values, got {code2.numel()} and {absmax2.numel()}")
            for name, t in (("state2.absmax", absmax2), ("state2.code", code2)):
                if t.device != device:
                    raise ValueError(f"quant_state: {name}: expected qweight's device {device}, got {t.device}")
            offset = getattr(quant_state, "offset", None)
            if isinstance(offset, torch.Tensor):
                if offset.numel() != 1:
                    raise ValueError(f"quant_state: offset: expected one value (the double quantization's offset, "
                                     f"added to every dequantized absmax), got shape {tuple(offset.shape)}")
            elif offset is None or isinstance(offset, bool) or not isinstance(offset, numbers.Real):
                raise ValueError(f"quant_state: offset: expected the double quantization's offset (a number or a "
                                 f"one-element tensor, added to every dequantized absmax), got "
                                 f"{'None' if offset is None else type(offset).__name__}")
            offset = torch.as_tensor(offset, device=device).to(torch.float32).reshape(1)
            fields.update(code2=code2.to(torch.float32), absmax2=absmax2.to(torch.float32), offset=offset,
                          blocksize2=blocksize2)
        elif not absmax.is_floating_point():
            raise ValueError(f"quant_state: absmax: expected floating-point values (no double quantization), got "
                             f"{absmax.dtype}")
        return cls(**fields)


_CODE_TABLES = {}


def _code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16-value table of ``quant_type`` on ``device`` (the table its dequantize_4bit uses)."""
    key = (quant_type, device)
    table = _CODE_TABLES.get(key)
    if table is None:
        table = reference_4bit.bitsandbytes_functional().get_4bit_type(quant_type, device=device).to(torch.float32)
        _CODE_TABLES[key] = table
    return table


def gemm_4bit_path(M: int) -> str:
    """The GEMM path of the Triton backend for M rows of x when nothing is timed: "fused" (each weight tile
    dequantized in registers before the MMA) or "dequant" (one dequantization pass into an (N, K) scratch weight,
    then the 16-bit op's kernels). ``LORA_FAST_GEMM_4BIT=auto|fused|dequant|tma`` (default auto: fused for
    M <= FUSED_MAX_M; on a GPU ``lora_linear_4bit`` measures instead, ``_measured_path``; "tma", opt-in: the
    fused path with the TMA GEMM where ``ops_4bit.tma_eligible_4bit`` allows).
    Raises ValueError for another value."""
    forced = _forced_4bit()
    if forced is not None:
        return forced
    return "fused" if M <= FUSED_MAX_M else "dequant"


def _forced_4bit() -> Optional[str]:
    forced = os.environ.get("LORA_FAST_GEMM_4BIT", "auto").strip().lower() or "auto"
    if forced not in GEMM_4BIT_PATHS:
        raise ValueError(f"LORA_FAST_GEMM_4BIT: expected one of {GEMM_4BIT_PATHS}, got {forced!r}")
    return None if forced == "auto" else forced


def _measured_path(x, packed, bias, A, B, scale) -> str:
    """auto on a GPU: the faster path for this key (device, dtype, M rounded up to a power of two, N, K, rank,
    quantization layout), timed once on the forward without dropout and remembered (kernels/choice.py)."""
    from .kernels import choice, ops, ops_4bit

    K = x.shape[-1]
    M = x.numel() // K
    key = (x.device, x.dtype, ops._m_bucket(M), packed.shape[0], K, A.shape[1], packed.quant_type, packed.blocksize,
           packed.nested)
    path = choice.GEMM_4BIT.get(key)
    if path is None:
        x2d = x.reshape(M, K)
        out = x.new_empty((M, packed.shape[0]))
        candidates = {p: functools.partial(ops_4bit.lora_forward_4bit, x2d, packed, bias, A, B, scale, 0.0, None,
                                           out=out, path=p) for p in ("fused", "dequant")}
        path = choice.GEMM_4BIT.resolve(key, lambda: torch.cuda.get_device_name(x.device), candidates)
    return path


def _forward(x, packed, bias, A, B, scale, dropout_p, seed, path):
    """(y, S, keep) from the kernels: keep the keep-mask the S pass drew, bit-packed (uint8 (M,
    philox.mask_row_bytes(K))) with dropout, else None."""
    from .kernels import ops, ops_4bit

    y = x.new_empty((*x.shape[:-1], packed.shape[0]))
    x2d = x.reshape(-1, x.shape[-1])
    keep = ops.new_keep_mask(x2d.shape[0], x2d.shape[1], x.device) if dropout_p > 0 else None
    _, S = ops_4bit.lora_forward_4bit(x2d, packed, bias, A, B, scale, dropout_p, seed,
                                      out=y.view(-1, packed.shape[0]), path=path, keep_out=keep)
    return y, S, keep


def _weight_sources(qweight, quant_state) -> dict:
    """{name: tensor} of what a 4-bit weight is made of, as the caller holds it (``qweight`` itself, the
    QuantState's absmax, and for double quantization state2's absmax and code and the offset): an in-place
    change to any of them (or to the Packed4bit fields viewing them) changes the weight."""
    state2 = getattr(quant_state, "state2", None)
    candidates = {"qweight": qweight, "quant_state.absmax": getattr(quant_state, "absmax", None),
                  "quant_state.offset": getattr(quant_state, "offset", None),
                  "quant_state.state2.absmax": getattr(state2, "absmax", None),
                  "quant_state.state2.code": getattr(state2, "code", None)}
    return {k: t for k, t in candidates.items() if isinstance(t, torch.Tensor)}


def _versions(packed: "Packed4bit", sources: dict) -> list:
    """[(name, tensor, version)] of the packed fields and their sources (``_weight_sources``): a tensor's
    ``.data`` has a version counter of its own, so both are kept."""
    named = dict(sources)
    for field in ("data", "absmax", "code2", "absmax2", "offset"):
        t = getattr(packed, field)
        if t is not None:
            named[f"Packed4bit.{field}"] = t
    seen, out = set(), []
    for name, t in named.items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t, t._version))
    return out


def _check_versions(versions: list) -> None:
    """Raise as autograd raises for a saved tensor changed in place, naming the 4-bit weight's part."""
    for name, t, version in versions:
        if t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{t.type()} {list(t.shape)}] ({name}, part of the 4-bit weight of lora_linear_4bit, which its "
                f"backward reads again) is at version {t._version}; expected version {version} instead. Change the "
                "4-bit weight only after the backward of every forward that used it")


class _LoRALinear4bitFunction(torch.autograd.Function):
    """Fused forward/backward on a 4-bit base, x (..., K). Saved for backward: x, S = dropout(x) A (M x r, fp32)
    and, with dropout, the keep-mask's bits (M x K / 8 bytes, rows padded to 16), as the 16-bit op; A and B are
    parameters; the packed weight is read again (no N x K copy)."""

    @staticmethod
    def forward(ctx, x, bias, A, B, packed, scale, dropout_p, seed, path, sources):
        y, S, keep = _forward(x, packed, bias, A, B, scale, dropout_p, seed, path)
        # the bits the S pass stored: the dX GEMM and the dA pass read them (no Philox in backward, no seed kept)
        ctx.save_for_backward(x, A, B, S, keep)
        # the packed weight is read again in backward, not saved: its tensors' version counters are, so that an
        # in-place change in between raises as autograd raises for a saved tensor
        ctx.versions = _versions(packed, sources)
        ctx.packed, ctx.scale, ctx.dropout_p, ctx.path, ctx.has_bias = packed, scale, dropout_p, path, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import ops_4bit

        x, A, B, S, keep = ctx.saved_tensors
        _check_versions(ctx.versions)
        need_dx, need_db, need_dA, need_dB = ctx.needs_input_grad[:4]
        dx = dA = dB = None
        if torch.is_grad_enabled():
            # autograd records the backward (create_graph=True): torch ops it can differentiate again, on deq(W)
            # from the kernels' dequantization (a constant: the 4-bit weight gets no gradient)
            weight = ops_4bit.dequantize(ctx.packed, x.dtype)
            mask = philox.unpack_keep_mask(keep, x.shape[-1]).view(x.shape) if ctx.dropout_p > 0 else None

            def f(x_, A_, B_):
                return reference.lora_linear(x_, weight, None, A_, B_, ctx.scale, dropout_p=ctx.dropout_p,
                                             training=mask is not None, dropout_mask=mask)

            dx, dA, dB = graph_gradients(f, (x, A, B), (need_dx, need_dA, need_dB), dy)
        elif need_dx or need_dA or need_dB:
            dx, dA, dB = ops_4bit.lora_backward_4bit(
                dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), ctx.packed, A, B, S, ctx.scale,
                ctx.dropout_p, keep, need_dx=need_dx, need_dA=need_dA,
                need_dB=need_dB, path=ctx.path)
            dx = dx.view(x.shape) if dx is not None else None
        db = None
        if need_db and ctx.has_bias:
            db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, db, dA, dB, None, None, None, None, None, None


def lora_linear_4bit(x: torch.Tensor, qweight: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                     A: torch.Tensor, B: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                     training: bool = True) -> torch.Tensor:
    """Fused LoRA linear on a frozen 4-bit base: y = x deq(W)^T + b + scale * (dropout(x) @ A) @ B.

    Maths: LoRA (Hu et al. 2021, eq. 3; dropout on the LoRA input as PEFT) on a 4-bit NormalFloat or FP4 base
    with block absmax, optionally double-quantized (QLoRA, Dettmers et al. 2023, sec. 3). deq(W) is exactly the
    layout's definition (code * absmax in fp32, rounded to ``quant_state.dtype``: ``reference_4bit.dequantize``,
    what bitsandbytes' ``dequantize_4bit`` computes on a GPU) cast to x's dtype, as bitsandbytes' ``matmul_4bit``
    computes it; the kernels form it
    tile by tile (or once into a scratch weight: ``gemm_4bit_path``) and never keep it.

    Args:
        x: (..., in_features) in the compute dtype (float16/bfloat16/float32; float64 on the reference backend).
        qweight: the packed 4-bit codes, bitsandbytes' layout (``Linear4bit.weight``, a Params4bit, or the
            first result of ``bitsandbytes.functional.quantize_4bit``); frozen (no gradient).
        quant_state: its bitsandbytes QuantState (``Linear4bit.weight.quant_state``): nf4 or fp4, any power-of-
            two blocksize, nested (double-quantized) or not, shape (out_features, in_features).
        bias: (out_features,) in x's dtype, or None. A: (in_features, rank); B: (rank, out_features); x's dtype
            or float32. scale, dropout_p, training: as ``lora_fast.lora_linear``.

    Backends as ``lora_linear`` (``select_backend``): Triton kernels for CUDA tensors (and CPU tensors under
    TRITON_INTERPRET=1), else the reference (``lora_fast.reference_4bit``). torch.compile and torch.func run
    the reference path. Under ``torch.autocast`` x and bias are cast to the autocast dtype.

    Returns: (..., out_features) in x's dtype; gradients for x, bias, A and B (the packed weight has none).

    Raises:
        ImportError: bitsandbytes is not installed.
        TypeError / ValueError: as ``lora_linear`` for x, bias, A, B, scale, dropout_p (shapes are checked
            against quant_state.shape), and naming ``qweight`` / ``quant_state`` for a weight that is not a
            4-bit weight in bitsandbytes' layout on x's device, or that requires grad.
        RuntimeError: LORA_FAST_BACKEND=triton with inputs the kernels cannot serve; in backward, on the kernels,
            when the 4-bit weight (qweight, its absmax, state2's absmax or code, the offset) was changed in place
            after the forward (version counters, as autograd checks saved tensors; the reference path saves the
            dequantized weight and is unaffected).
    """
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        x, _, bias, A, B = _autocast_inputs(x, None, bias, A, B)
    packed = Packed4bit.from_bitsandbytes(qweight, quant_state)
    if qweight.requires_grad:
        raise ValueError("qweight: the 4-bit base weight is frozen; it must not require grad (bitsandbytes' "
                         "Params4bit has requires_grad=False)")
    if isinstance(x, torch.Tensor) and packed.data.device != x.device:
        raise ValueError(f"qweight: expected a tensor on x's device {x.device}, got {packed.data.device}")
    # the shape checks of lora_linear against a stand-in weight of the dequantized shape (no memory: a stride-0
    # view of one element in x's dtype)
    stand_in = x.new_empty(()).expand(packed.shape) if isinstance(x, torch.Tensor) else None
    scale, dropout_p = check_lora_linear(x, stand_in, bias, A, B, scale, dropout_p)
    check_training(training)
    N, K = packed.shape
    if select_backend(x) == "reference" or x.numel() == 0 or N == 0 or K == 0 \
            or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return reference_4bit.lora_linear_4bit(x, qweight, quant_state, bias, A, B, scale, dropout_p=dropout_p,
                                               training=training)
    p = dropout_p if training else 0.0
    seed = reference.draw_seed(x.device) if p > 0 else None
    p = philox.quantize(p)   # what the kernels' 8-bit uniforms apply (as lora_linear)
    if p >= 1.0:
        p, scale = 0.0, 0.0   # every element dropped: the LoRA term and its gradients are zero
    path = _measured_path(x, packed, bias, A, B, scale) if x.is_cuda and _forced_4bit() is None \
        else gemm_4bit_path(x.numel() // K)
    return _LoRALinear4bitFunction.apply(x, bias, A, B, packed, scale, p, seed, path,
                                         _weight_sources(qweight, quant_state))
