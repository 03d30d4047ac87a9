"""lora_linear_multi: several LoRA adapters in one batch, each row with its own adapter (issue 30).

Backends: the reference path (torch ops, ``lora_fast.reference.lora_linear_multi``: a row gather, the two small
matmuls and a scatter per adapter present, as PEFT's ``adapter_names`` loop) serves by default. The fused
kernels (lora_fast/kernels/multi.py) are a new kernel family that no GPU has run yet, so they are opt-in:
``LORA_FAST_MULTI=triton`` uses them wherever ``select_backend`` gives "triton" (a CUDA tensor, or the Triton
interpreter on CPU), and raises where it cannot. With one adapter the Triton path runs lora_linear's own
kernels, so a batch of one adapter gives bit for bit what ``lora_linear`` gives on either backend.
"""

import contextlib
import contextvars
import numbers
import os
import weakref
from typing import Optional, Sequence, Union

import torch

from . import philox, reference
from ._checks import check_index_range, check_lora_linear_multi, check_training
from .functional import _autocast_enabled, _autocast_inputs, graph_gradients, select_backend

MULTI_BACKENDS = ("reference", "triton")
# how the Triton path visits the rows (LORA_FAST_MULTI_ORDER): "unsorted" in their order, each tile looping over the
# adapters present in it; "sorted" in adapter order through a permutation (issue 30, docs/multi-adapter.md). The
# default is "sorted": by bench/cost_model.py --adapters ... --order it never issues more low-rank dots than
# unsorted and issues n times fewer on randomly interleaved batches (the bench's "mixed" rows), reads fewer index
# bytes for n >= 2, and costs three small torch launches (the sort: per call with a raw index, once per
# AdapterRows, so once per model forward through the layers); no GPU has timed either (issue 30 item 1)
MULTI_ORDERS = ("unsorted", "sorted")
DEFAULT_ORDER = "sorted"


def multi_order() -> str:
    """How the multi-adapter kernels visit the rows: ``LORA_FAST_MULTI_ORDER``, "sorted" (the default: a stable
    sort of adapter_index, three small torch launches per call with a raw index, once per ``AdapterRows``,
    reused by the backward; a tile then holds one
    adapter but at segment edges, and each adapter's gradient programs read its own rows only) or "unsorted"
    (rows in their order, a tile looping over every adapter present in it).
    Both give each row exactly its own adapter's products; y, dx and S are bit for bit the same, dA and dB
    are summed in another grouping. Raises ValueError for another value."""
    wanted = os.environ.get("LORA_FAST_MULTI_ORDER", "").strip().lower() or DEFAULT_ORDER
    if wanted not in MULTI_ORDERS:
        raise ValueError(f"LORA_FAST_MULTI_ORDER: expected one of {MULTI_ORDERS}, got {wanted!r}")
    return wanted


class AdapterRows:
    """A prepared per-row adapter selection for ``lora_linear_multi`` (issue 30): the validated index and, for
    the sorted row order, its stable sort, computed once and shared by every call that passes this object (the
    layers of one model forward, and each call's backward) instead of once per call. Build it with
    ``adapter_rows(adapter_index, n)``; it is immutable (read-only attributes; what it computes lazily is a pure
    function of the index and is kept).

    Attributes:
        index: the int64 index it was built from (detached, its shape: x.shape[:-1] of the calls that take it),
            values in [-1, n) (checked once when built).
        n: the number of adapters it was checked against (A.shape[0] of the calls that take it).
        shape: ``tuple(index.shape)``.

    The sorted order's tensors (``sorted_rows()``: sorted index and permutation (M,) int64, segment starts
    (n + 1,) int64, ``kernels.multi.sort_rows``) are computed on the index's device at the first call that
    needs them (three small torch launches, no host sync) and kept. An index modified in place after the object
    was built makes every later use raise ValueError (its version counter is compared), never a stale sort.
    Its tensors are never inference tensors (made with inference mode off, ``_normal_tensors``): a selection first
    used under ``torch.inference_mode`` serves a later call with autograd, whose backward saves them."""

    __slots__ = ("_index", "_n", "_version", "_flat", "_sorted")

    def __init__(self, index: torch.Tensor, n: int, *, _checked: bool = False):
        if not _checked:
            raise TypeError("AdapterRows: build it with lora_fast.adapter_rows(adapter_index, n)")
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_n", n)
        object.__setattr__(self, "_version", index._version)
        object.__setattr__(self, "_flat", None)
        object.__setattr__(self, "_sorted", None)

    def __setattr__(self, name, value):
        raise AttributeError("AdapterRows is immutable: build another with adapter_rows(...)")

    def __reduce__(self):
        # copy, deepcopy and pickle build it again through adapter_rows (its checks; nothing computed is carried)
        return adapter_rows, (self._index, self._n)

    @property
    def index(self) -> torch.Tensor:
        return self._index

    @property
    def n(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple:
        return tuple(self._index.shape)

    def __repr__(self) -> str:
        return f"AdapterRows(shape={self.shape}, n={self._n}, device={self._index.device})"

    def check(self, leading_shape, n: int, device) -> None:
        """Raise ValueError unless this selection serves a call with x.shape[:-1] == ``leading_shape``, ``n``
        adapters and x on ``device``, and its index was not modified in place since it was built."""
        if self._index._version != self._version:
            raise ValueError("adapter_index: the AdapterRows' index was modified in place after adapter_rows() "
                             "checked and sorted it; build the selection again with adapter_rows()")
        if self._n != n:
            raise ValueError(f"adapter_index: an AdapterRows built for n={self._n} adapters, but A holds {n}; "
                             "build it with adapter_rows(adapter_index, A.shape[0])")
        if self.shape != tuple(leading_shape):
            raise ValueError(f"adapter_index: expected x's leading shape {tuple(leading_shape)}, got an "
                             f"AdapterRows of shape {self.shape}")
        if self._index.device != device:
            raise ValueError(f"adapter_index: expected a selection on x's device {device}, got "
                             f"{self._index.device}")

    def flat(self) -> torch.Tensor:
        """The index as (M,) int64 with unit stride (the kernels read it so): a view when the index is
        contiguous, else one copy, made once."""
        if self._flat is None:
            with _normal_tensors():
                object.__setattr__(self, "_flat", self._index.reshape(-1).contiguous())
        return self._flat

    def sorted_rows(self) -> tuple:
        """``kernels.multi.sort_rows(flat, n)``: (sorted index, permutation, segment starts), computed once."""
        if self._sorted is None:
            from .kernels import multi

            flat = self.flat()
            with _normal_tensors():
                object.__setattr__(self, "_sorted", multi.sort_rows(flat, self._n))
        return self._sorted


def _normal_tensors():
    """A context in which new tensors are normal ones (not inference tensors, which keep no version counter and
    cannot be saved for a backward): inference mode off inside ``torch.inference_mode``, else nothing."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def adapter_rows(adapter_index: torch.Tensor, n: int) -> AdapterRows:
    """Prepare a per-row adapter selection once, to pass as ``lora_linear_multi``'s ``adapter_index`` to many
    calls (every layer of a model sees the same rows): the range check (one device sync) happens here instead
    of in every call, and the sorted row order's sort once, at the first call that needs it.

    Args:
        adapter_index: int64 tensor, the leading shape of the calls' x, values in [-1, n) (-1: no adapter).
        n: the number of adapters of the calls (A.shape[0]), >= 1.

    Returns: an immutable ``AdapterRows``. The calls give bit for bit what they give with the raw index.
    Raises: TypeError for a non-tensor, another dtype or a non-integer n; ValueError for n < 1 or values
        outside [-1, n). A call that gets it raises ValueError for another leading shape, n or device, or an
        index modified in place since."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index: expected dtype torch.int64, got {adapter_index.dtype}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected at least one adapter, got {n}")
    if adapter_index.is_inference():
        # no version counter to watch: a copy of its values (a normal tensor) that no later write can reach
        with _normal_tensors():
            index = adapter_index.clone()
    else:
        index = adapter_index.detach()   # shares the version counter: an in-place change is seen
    check_index_range(index, int(n))
    return AdapterRows(index, int(n), _checked=True)


# --- one selection per model forward (use_adapter_names, patch_peft's adapter_names) -------------------------------
# The cache of the forward in progress: opened by a forward pre-hook on the model, closed by its forward hook
# (also on an exception); None outside a model forward, where each layer builds its own selection.
_SCOPE: contextvars.ContextVar = contextvars.ContextVar("lora_fast_adapter_rows", default=None)


# entries of one scope at most: a forward needs one per distinct slot mapping and per distinct scales; a scope
# left open (a BaseException such as KeyboardInterrupt skips the closing hook) is emptied past it, never grows
_SCOPE_ENTRIES = 256


class _Scope:
    __slots__ = ("cache", "depth", "opened")

    def __init__(self):
        self.cache, self.depth = {}, 0
        self.opened = []   # id() of the modules whose forward opened it, outermost first

    def put(self, key, value):
        if len(self.cache) >= _SCOPE_ENTRIES:
            self.cache.clear()
        self.cache[key] = value
        return value


def current_rows_scope():
    """The scope in force (an opaque object), or None: ``use_adapter_names`` restores it on leaving its block."""
    return _SCOPE.get()


def restore_rows_scope(scope) -> None:
    """Make ``scope`` (from ``current_rows_scope``) the one in force again, emptying one left open since."""
    left = _SCOPE.get()
    if left is not scope:
        if left is not None:
            left.cache.clear()
        _SCOPE.set(scope)


def open_rows_scope(module=None, args=None) -> None:
    """Forward pre-hook: the selections built from here to the matching ``close_rows_scope`` are shared (a
    nested model forward joins the scope open). Nothing under torch.compile (the op runs its reference there)."""
    if torch.compiler.is_compiling():
        return
    scope = _SCOPE.get()
    if scope is not None and module is not None and id(module) in scope.opened:
        # this module's forward opened the scope and did not close it: that forward was interrupted past its
        # closing hook (a BaseException such as KeyboardInterrupt), so nothing of it is in progress; a new scope
        scope.cache.clear()
        scope = None
    if scope is None:
        scope = _Scope()
        _SCOPE.set(scope)
    scope.depth += 1
    if module is not None:
        scope.opened.append(id(module))


def close_rows_scope(module=None, args=None, output=None) -> None:
    """Forward hook (always called): ends the scope opened by ``open_rows_scope``; its selections are dropped
    (the autograd graph keeps what each call's backward needs)."""
    if torch.compiler.is_compiling():
        return
    scope = _SCOPE.get()
    if scope is None:
        return
    scope.depth -= 1
    if module is not None and id(module) in scope.opened:
        del scope.opened[len(scope.opened) - 1 - scope.opened[::-1].index(id(module))]
    if scope.depth <= 0:
        scope.cache.clear()
        _SCOPE.set(None)


def sample_rows(slots: Sequence[int], leading_shape, n: int, device) -> AdapterRows:
    """The selection of a per-sample adapter choice (``adapter_names`` mapped to a layer's adapter slots):
    slots[i] in [-1, n) for sample i (x's first dim), the same for every row of that sample. Checked on the host
    and uploaded without a device sync. Within a model forward (``open_rows_scope``) layers with the same slots,
    shape, n and device share one object (one index upload, one sort); another slot mapping gets its own."""
    slots = tuple(slots)
    if any(not -1 <= s < n for s in slots):
        raise ValueError(f"adapter_names: slots {slots} outside [-1, {n})")   # the layers' own mapping: a bug
    scope = _SCOPE.get()
    key = (slots, tuple(leading_shape), n, device)
    if scope is not None and not torch.compiler.is_compiling():
        rows = scope.cache.get(key)
        if rows is not None:
            return rows
    # uploaded without waiting for the device (torch.tensor(..., device="cuda") would synchronize the stream)
    with _normal_tensors():   # within torch.inference_mode too: AdapterRows watches the index's version counter
        index = torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True)
        index = index.view(-1, *([1] * (len(leading_shape) - 1))).expand(leading_shape)
    rows = AdapterRows(index, n, _checked=True)
    if scope is not None and not torch.compiler.is_compiling():
        scope.put(key, rows)
    return rows


def _adapter_params(scales, dropout_ps, device) -> torch.Tensor:
    """``kernels.multi.adapter_params``' (5, n) fp32 table (one host-to-device copy); within a model forward's
    scope, one per distinct (scales, dropout ps, device), shared by the layers (read-only: saved for backward
    and read by the kernels, never written)."""
    from .kernels import multi

    scope = _SCOPE.get()
    if scope is None:
        return multi.adapter_params(scales, dropout_ps, device)
    # by the floats' bits (0.0 == -0.0, but a -0.0 scale's table must stay its own)
    key = ("params", tuple(float(v).hex() for v in scales), tuple(float(v).hex() for v in dropout_ps), device)
    table = scope.cache.get(key)
    if table is None:
        # a normal tensor: a scope may outlive a forward under torch.inference_mode (a forward interrupted by a
        # KeyboardInterrupt never runs its closing hook), and a later call with autograd saves the table
        with _normal_tensors():
            table = scope.put(key, multi.adapter_params(scales, dropout_ps, device))
    return table


def multi_backend(x: torch.Tensor) -> str:
    """The backend of lora_linear_multi for ``x``: "reference" unless ``LORA_FAST_MULTI=triton`` (opt-in: the
    multi-adapter kernels are unmeasured on a GPU) and then "triton".

    Raises: ValueError for an unknown LORA_FAST_MULTI; RuntimeError when LORA_FAST_MULTI=triton but the kernels
    cannot serve x (``select_backend``'s reasons, or LORA_FAST_BACKEND=reference). Never falls back silently.
    """
    wanted = os.environ.get("LORA_FAST_MULTI", "").strip().lower() or "reference"
    if wanted not in MULTI_BACKENDS:
        raise ValueError(f"LORA_FAST_MULTI: expected one of {MULTI_BACKENDS}, got {wanted!r}")
    if wanted == "reference":
        return "reference"
    if select_backend(x) != "triton":
        raise RuntimeError("LORA_FAST_MULTI=triton cannot serve these inputs: the kernels need a CUDA tensor (or "
                           "TRITON_INTERPRET=1 on CPU) of dtype float16/bfloat16/float32, and LORA_FAST_BACKEND "
                           "not set to reference")
    return "triton"


def _output(x, N):
    """(x2d, y, y2d): x as (M, K) and a fresh y (..., N) with its (M, N) view."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = x.new_empty((*x.shape[:-1], N))
    return x2d, y, y.view(-1, N)


def _frozen_gradients(ctx, dy, x, weight):
    """dW and db as lora_linear's backward gives them (torch matmuls), None where not required."""
    need_dW, need_db = ctx.needs_input_grad[1:3]
    dy2d = dy.reshape(-1, dy.shape[-1])
    dW = (dy2d.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if need_dW else None
    db = dy2d.sum(0, dtype=torch.float32).to(weight.dtype) if need_db and ctx.has_bias else None
    return dW, db


def _graph_backward(ctx, dy, x, weight, A, B, idx, keep, factors=()):
    """(dx, dA, dB) on autograd's graph (create_graph=True): the reference maths on the saved inputs, the mask
    the forward's bits (``keep``, None without dropout) unpacked (functional.graph_gradients). With per-adapter
    ``factors`` (A_0 .. A_{n-1}, B_0 .. B_{n-1}; A and B None): dA and dB are tuples of their gradients
    (``_MultiFunction``'s inputs 12 on)."""
    idx = idx.reshape(x.shape[:-1])
    mask = philox.unpack_keep_mask(keep, x.shape[-1]).view(x.shape) if keep is not None else None
    active = mask is not None and any(p > 0 for p in ctx.dropout_ps)

    def op(x_, A_, B_):
        if isinstance(A_, torch.Tensor) and A_.dim() == 2:   # _OneAdapterFunction with one unstacked adapter
            A_, B_ = (A_,), (B_,)
        return reference.lora_linear_multi(x_, weight, None, A_, B_, list(ctx.scales), idx,
                                           dropout_p=list(ctx.dropout_ps), training=active, dropout_mask=mask)

    if factors:
        n = len(factors) // 2
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[_FACTORS:])
        dx, *grads = graph_gradients(lambda x_, *f: op(x_, f[:n], f[n:]), (x, *factors), needs, dy)
        return dx, tuple(grads[:n]), tuple(grads[n:])
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    return tuple(graph_gradients(op, (x, A, B), needs, dy))


class _OneAdapterFunction(torch.autograd.Function):
    """n = 1 on the Triton path: lora_linear's kernels (kernels.lora_forward / lora_backward), S and dS zeroed
    on the rows of adapter -1 (one masked fill each way). Saves x, weight, A, B, S (M, R) fp32, idx and, with
    dropout, the keep-mask the S pass drew, bit-packed (M x K / 8 bytes, ``kernels.new_keep_mask``; on rows of
    adapter -1 it is drawn with the adapter's p, and never read there: their dS is zero), not the seed.
    A (1, in, r) and B (1, r, out) stacked, or the adapter's own A (in, r) and B (r, out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, idx, scale, dropout_p, seed):
        from . import kernels

        x2d, y, y2d = _output(x, weight.shape[0])
        zero_rows = (idx.reshape(-1) < 0)[:, None]
        keep = kernels.new_keep_mask(*x2d.shape, x.device) if dropout_p > 0 else None
        A1, B1 = (A[0], B[0]) if A.dim() == 3 else (A, B)
        _, S = kernels.lora_forward(x2d, weight, bias, A1, B1, scale, dropout_p, seed, out=y2d,
                                    zero_rows=zero_rows, keep_out=keep)
        ctx.save_for_backward(x, weight, A, B, S, idx, keep)
        ctx.scales, ctx.dropout_ps, ctx.has_bias = (scale,), (dropout_p,), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from . import kernels

        x, weight, A, B, S, idx, keep = ctx.saved_tensors
        need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            dx, dA, dB = _graph_backward(ctx, dy, x, weight, A, B, idx, keep)
        else:
            stacked = A.dim() == 3
            dx, dA, dB = kernels.lora_backward(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight,
                                               A[0] if stacked else A, B[0] if stacked else B, S, ctx.scales[0],
                                               ctx.dropout_ps[0],
                                               need_dx=need_dx, need_dA=need_dA, need_dB=need_dB,
                                               zero_rows=(idx.reshape(-1) < 0)[:, None], keep=keep)
            dx = dx.view(x.shape) if dx is not None else None
            dA = dA[None] if dA is not None and stacked else dA
            dB = dB[None] if dB is not None and stacked else dB
        return (dx, *_frozen_gradients(ctx, dy, x, weight), dA, dB, None, None, None, None)


# _MultiFunction's inputs: x, weight, bias, A, B, idx, scales, dropout_ps, seed, order, prepared, table, then the
# per-adapter factors from this position on
_FACTORS = 12


class _MultiFunction(torch.autograd.Function):
    """n >= 1 adapters on the Triton path (kernels/multi.py): 2 launches forward, 3 backward, whatever n (plus,
    when ``order`` is "sorted", the sort's three small torch launches in forward: per call for a raw index,
    none for a ``prepared`` AdapterRows sorted by an earlier call). The adapters are A (n, in, R) and B
    (n, R, out) stacked, or (A and B None) ``factors`` A_0 .. A_{n-1} (in, r_a), B_0 .. B_{n-1} (r_a, out), read
    where they live through ``table`` (``kernels.multi.adapter_table``; built here when None), each getting its
    own gradient. Saves x, weight, the factors (parameters: no new memory), S (M, R) fp32, idx (M,) int64, the
    (5, n) fp32 table of per-adapter constants and, with dropout, the keep-mask the forward's S pass drew,
    bit-packed (uint8 (M, philox.mask_row_bytes(K)): M x K / 8 bytes, whatever n; read by the dX GEMM and the dA
    pass, which run no Philox), not the seed; sorted, also the sorted index and the permutation (M,) int64 each
    and the (n + 1,) segment starts; keeps the adapter table, (13, n) int64 (on ctx: a layer's is shared by its
    calls): nothing of size M x out_features, nothing that grows with n but the tables and the segments."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, idx, scales, dropout_ps, seed, order=DEFAULT_ORDER, prepared=None,
                table=None, *factors):
        from .kernels import multi, new_keep_mask

        n = len(factors) // 2
        As, Bs = (A, B) if A is not None else (factors[:n], factors[n:])
        if table is None:
            table = multi.adapter_table(As, Bs)
        x2d, y, y2d = _output(x, weight.shape[0])
        params = _adapter_params(scales, dropout_ps, x.device)
        has_dropout = any(p > 0 for p in dropout_ps)
        if prepared is not None:
            # an AdapterRows: its unit-stride index and sort, made once for every call that shares it
            idx1d = prepared.flat()
            rows = prepared.sorted_rows() if order == "sorted" else None
        else:
            idx1d = idx.reshape(-1).contiguous()   # the kernels read it with unit stride
            rows = multi.sort_rows(idx1d, len(As)) if order == "sorted" else None
        keep = new_keep_mask(*x2d.shape, x.device) if has_dropout else None
        S = multi.multi_forward(x2d, weight, bias, As, Bs, idx1d, params, has_dropout, seed, y2d, rows, keep, table)
        ctx.save_for_backward(x, weight, A, B, S, idx1d, params, keep, *factors, *(rows or ()))
        ctx.scales, ctx.dropout_ps, ctx.has_bias = tuple(scales), tuple(dropout_ps), bias is not None
        ctx.table, ctx.n_factors = table, len(factors)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import multi

        x, weight, A, B, S, idx, params, keep, *rest = ctx.saved_tensors
        factors, rows = rest[:ctx.n_factors], rest[ctx.n_factors:]
        n = len(factors) // 2
        As, Bs = (A, B) if A is not None else (factors[:n], factors[n:])
        need_dx = ctx.needs_input_grad[0]
        needs = ctx.needs_input_grad[_FACTORS:] if factors else ctx.needs_input_grad[3:5]
        need_dA, need_dB = (any(needs[:n]), any(needs[n:])) if factors else needs
        if torch.is_grad_enabled():
            dx, dA, dB = _graph_backward(ctx, dy, x, weight, A, B, idx, keep, factors)
        else:
            table = ctx.table
            if table.key != multi.table_key(As, Bs):
                # a factor's storage was replaced (``.data = ...``) since the forward: its addresses are stale
                table = multi.adapter_table(As, Bs)
            dx, dA, dB = multi.multi_backward(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight,
                                              As, Bs, S, idx, params, keep,
                                              need_dx=need_dx, need_dA=need_dA, need_dB=need_dB,
                                              order=tuple(rows) or None, table=table)
            dx = dx.view(x.shape) if dx is not None else None
        frozen = _frozen_gradients(ctx, dy, x, weight)
        if not factors:
            return (dx, *frozen, dA, dB, None, None, None, None, None, None, None)
        per_factor = (*(dA or (None,) * n), *(dB or (None,) * n))
        return (dx, *frozen, None, None, None, None, None, None, None, None, None,
                *(g if need else None for g, need in zip(per_factor, needs)))


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      A: Union[torch.Tensor, Sequence[torch.Tensor]], B: Union[torch.Tensor, Sequence[torch.Tensor]],
                      scale, adapter_index: Union[torch.Tensor, AdapterRows], *, dropout_p=0.0,
                      training: bool = True) -> torch.Tensor:
    """Several LoRA adapters in one batch, with autograd: row m of x gets
    y_m = x_m W^T + b + scale[a] * (dropout_a(x_m) @ A[a]) @ B[a], a = adapter_index[m], and the base layer alone
    where a = -1. Maths: LoRA (Hu et al. 2021, eq. 3) per row, with PEFT's dropout on the LoRA input; what PEFT
    computes for a mixed batch (``model(..., adapter_names=[...])``, "__base__" = -1) and what training several
    adapters on one frozen base needs (each adapter's gradients from its own rows only).

    Args:
        x: (..., in_features), float16/bfloat16/float32 (float64 on the reference backend); may be non-contiguous.
        weight: (out_features, in_features) in x's dtype, as nn.Linear stores it; bias: (out_features,) or None.
        A: (n, in_features, rank), n >= 1 adapters; B: (n, rank, out_features); both x's dtype or float32.
            Adapters of different ranks are padded with zero columns of A / rows of B to the largest rank (exact:
            the padding adds zero products). Or, unstacked: A a sequence (list, tuple) of n tensors A[a]
            (in_features, rank_a) and B one of n tensors B[a] (rank_a, out_features), ranks free, any strides
            (PEFT's ``lora_A.weight.t()`` too), all of one dtype (x's or float32): the kernels read each where it
            lives (no stack, no padding, no copy; ``kernels.multi.adapter_table``) and each gets its own gradient,
            of its shape and dtype. The same result as the stacked, padded adapters: bit for bit on the kernels,
            within rounding on the reference path (its matmuls' summation length differs).
        scale: the LoRA scale of every adapter: one finite number, or n of them (a sequence or a (n,) tensor).
        adapter_index: int64 tensor of shape x.shape[:-1], values in [-1, n); -1: no adapter on that row. Or
            an ``AdapterRows`` (``adapter_rows(adapter_index, n)``): the same rows, checked and (sorted order)
            sorted once for all the calls that share it; bit for bit the same result and gradients.
        dropout_p: drop probability in [0, 1] of the LoRA input, one for all adapters or one per adapter; active
            when ``training``. One seed per call, drawn as lora_linear draws it; row m's mask is the element
            mask lora_linear would draw for that row under that seed with p = dropout_p[a], quantised to a
            multiple of 1/256 (``philox.quantize``); kept elements scaled by 1 / (1 - that p).
        training: False (eval) applies no dropout.

    Backend: the reference path (torch ops) unless ``LORA_FAST_MULTI=triton`` (opt-in, see ``multi_backend``);
    there the rows are visited in adapter order through a stable sort of adapter_index (``multi_order``;
    ``LORA_FAST_MULTI_ORDER=unsorted``: in their own order).
    A raw index's range is checked on the host (one device sync per call) and, sorted, the index is sorted per
    call (three small torch launches); an ``AdapterRows`` does both once, where it is built. Under torch.func
    transforms and
    torch.compile the reference path runs. With one adapter (n = 1) the result is bit for bit lora_linear's on
    either backend.

    Returns: (..., out_features) in x's dtype. Gradients flow to x, weight, bias, A (n, in, r) and B (n, r, out)
        (unstacked: to each A[a] and B[a]); an adapter with no rows gets zero gradients. Deterministic (no
        atomics).

    Raises:
        TypeError: a non-tensor, a non-floating x/weight/A/B, weight not in x's dtype, A/B dtypes that differ or
            are neither x's dtype nor float32, adapter_index not int64, a non-real scale or dropout_p; unstacked:
            A and B not both sequences of tensors, or A[a] / B[a] of another dtype than A[0] (named by position).
        ValueError: mismatched shapes (A not 3-D, B not (n, rank, out), adapter_index not x.shape[:-1]), tensors
            on another device than x, index values outside [-1, n), a non-finite scale, dropout_p outside
            [0, 1], a per-adapter sequence of another length than n, an unknown LORA_FAST_MULTI or
            LORA_FAST_MULTI_ORDER; an AdapterRows built for another n, leading shape or device, or whose index
            was modified in place since it was built; unstacked: sequences of different lengths, A[a] not
            (in_features, rank >= 1), B[a] not (A[a]'s rank, out_features), a factor on another device.
        RuntimeError: LORA_FAST_MULTI=triton with inputs the kernels cannot serve.
    """
    return _lora_linear_multi(x, weight, bias, A, B, scale, adapter_index, dropout_p, training)


# per owner (a LinearWithLoRA, a PEFT LoRA layer), the adapter tables of its recent adapter selections (issue 30):
# weak on the owner (a deleted layer takes its tables with it; deepcopy and pickle do not copy them). A table is a
# pure function of its key (each factor's address, shape and strides, dtype, device): reused while the key is
# equal, it reads the factors' current values, so writes that bypass the version counter (``p.data.copy_``) are
# seen, unlike the kept stacks this replaces
_TABLES = weakref.WeakKeyDictionary()
_TABLES_PER_OWNER = 8   # adapter selections per layer (a serving loop's usual batch compositions)


def _owned_table(owner, A, B):
    """The ``kernels.multi.adapter_table`` of the unstacked adapters A, B, kept for ``owner`` (see ``_TABLES``);
    built (one host-to-device copy, no sync) when none of its kept tables has their key."""
    from .kernels import multi

    key = multi.table_key(A, B)
    kept = _TABLES.setdefault(owner, [])
    for i, table in enumerate(kept):
        if table.key == key:
            if i:
                kept.insert(0, kept.pop(i))
            return table
    with _normal_tensors():   # saved by calls outside torch.inference_mode too
        table = multi.adapter_table(A, B, key)
    kept.insert(0, table)
    del kept[_TABLES_PER_OWNER:]
    return table


def _lora_linear_multi(x, weight, bias, A, B, scale, adapter_index, dropout_p=0.0, training=True, owner=None):
    """``lora_linear_multi``; ``owner``: an object (a layer) on which the adapter table of unstacked adapters is
    kept across calls (``_owned_table``), or None (a table per call)."""
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
            x, weight, bias, A, B = _autocast_inputs(x, weight, bias, A, B)
        else:
            x, weight, bias, _, _ = _autocast_inputs(x, weight, bias, None, None)
            dtype = torch.get_autocast_dtype(x.device.type)
            if any(isinstance(t, torch.Tensor) and t.dtype not in (dtype, torch.float32) for t in (*A, *B)):
                A, B = [t.to(dtype) for t in A], [t.to(dtype) for t in B]
    prepared = None
    if isinstance(adapter_index, AdapterRows):
        prepared, adapter_index = adapter_index, adapter_index.index
    scales, dropout_ps = check_lora_linear_multi(x, weight, bias, A, B, scale, adapter_index, dropout_p,
                                                 check_range=prepared is None)
    if prepared is not None:
        prepared.check(x.shape[:-1], len(A), x.device)
    check_training(training)
    order = multi_order()   # checked on either backend: a wrong value is never ignored
    if multi_backend(x) == "reference" or x.numel() == 0 or weight.shape[0] == 0 \
            or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return reference.lora_linear_multi(x, weight, bias, A, B, scales, adapter_index, dropout_p=dropout_ps,
                                           training=training)
    ps = [p if training else 0.0 for p in dropout_ps]
    # drawn on x's device as lora_linear and the reference draw it (only when some adapter drops)
    seed = reference.draw_seed(x.device) if any(p > 0 for p in ps) else None
    ps = [philox.quantize(p) for p in ps]
    # an adapter whose every element is dropped: its LoRA term and gradients are exactly zero (as lora_linear)
    scales = [0.0 if p >= 1.0 else s for s, p in zip(scales, ps)]
    ps = [0.0 if p >= 1.0 else p for p in ps]
    stacked = isinstance(A, torch.Tensor)
    if len(A) == 1:
        return _OneAdapterFunction.apply(x, weight, bias, A if stacked else A[0], B if stacked else B[0],
                                         adapter_index, scales[0], ps[0], seed if ps[0] > 0 else None)
    if stacked:
        return _MultiFunction.apply(x, weight, bias, A, B, adapter_index, scales, ps, seed, order, prepared)
    table = _owned_table(owner, A, B) if owner is not None else None
    return _MultiFunction.apply(x, weight, bias, None, None, adapter_index, scales, ps, seed, order, prepared, table,
                                *A, *B)
