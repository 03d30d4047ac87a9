"""lora_linear: the fused LoRA linear with autograd, and the choice of backend (triton | reference)."""

import functools
import os
from typing import Optional, Tuple

import torch

from . import _env, philox, reference
from ._checks import check_lora_linear, check_training

BACKENDS = ("triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)   # an import statement per call costs host time; the answer does not change
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(x: torch.Tensor) -> str:
    """The backend that serves ``x``: "triton" for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1),
    "reference" otherwise. ``LORA_FAST_BACKEND=triton|reference`` forces one.

    Raises: ValueError for an unknown LORA_FAST_BACKEND; RuntimeError when the forced triton backend cannot
    serve x (CPU tensor without the interpreter, float64, or triton not installed), or when TRITON_INTERPRET=1 was
    set after triton was imported (triton then does not interpret; the message says so). Never falls back
    silently.
    """
    forced = os.environ.get("LORA_FAST_BACKEND", "").strip().lower()
    if forced not in ("",) + BACKENDS:
        raise ValueError(f"LORA_FAST_BACKEND: expected one of {BACKENDS}, got {forced!r}")
    if forced == "reference":
        return "reference"
    reasons = []
    if not (x.is_cuda or (x.device.type == "cpu" and _env.interpreting())):
        reasons.append(f"x is on {x.device} (triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU)")
    if x.dtype not in _TRITON_DTYPES:
        reasons.append(f"x has dtype {x.dtype} (triton kernels take float16, bfloat16, float32)")
    if not reasons and not _triton_available():
        reasons.append("the triton package is not installed")
    if not reasons and not x.is_cuda:
        # never a silent fallback: the user asked for the interpreter and would not get it (CUDA tensors: checked
        # once, when the kernels are imported)
        _env.check_interpreter()
    if forced == "triton" and reasons:
        raise RuntimeError("LORA_FAST_BACKEND=triton cannot serve these inputs: " + "; ".join(reasons))
    return "reference" if reasons else "triton"


def _forward(x, weight, bias, A, B, scale: float, dropout_p: float, seed):
    """(y, S, keep) from the kernels for x (..., K): y (..., N) is a fresh tensor, not a view (FSDP2 and in-place
    users want that, as nn.Linear gives); S (M, R) fp32; keep the keep-mask the S pass drew, bit-packed (uint8
    (M, philox.mask_row_bytes(K)): M x K / 8 bytes) with dropout, else None. An empty batch launches nothing."""
    from . import kernels

    if x.dim() == 2:   # no reshape or view to dispatch (host time)
        x2d = x
        y = y2d = x.new_empty((x.shape[0], weight.shape[0]))
    else:
        x2d = x.reshape(-1, x.shape[-1])
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        y2d = y.view(-1, weight.shape[0])
    M, K = x2d.shape
    keep = kernels.new_keep_mask(M, K, x.device) if dropout_p > 0 else None
    if y.numel() == 0:
        # nothing to compute: an empty batch, or out_features = 0 (then dS = 0, so S is never read)
        return y, torch.zeros((M, A.shape[1]), dtype=torch.float32, device=x.device), \
            keep.zero_() if keep is not None else None
    _, S = kernels.lora_forward(x2d, weight, bias, A, B, scale, dropout_p, seed, out=y2d, keep_out=keep)
    return y, S, keep


def _backward_kernels(dy, x, weight, A, B, S, scale: float, dropout_p: float, keep, need_dx, need_dA, need_dB,
                      dA_out=None, dB_out=None):
    """(dx, dA, dB) from the kernels, None where not needed; zeros for an empty batch. dy (..., N), x (..., K);
    ``keep``: the forward's bit-packed keep-mask (read with dropout); ``dA_out`` / ``dB_out``: where the kernels
    write dA / dB when given (kernels.lora_backward)."""
    from . import kernels

    if x.numel() == 0 or dy.numel() == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(A) if need_dA else None,
                torch.zeros_like(B) if need_dB else None)
    if not (need_dx or need_dA or need_dB):
        return None, None, None
    flat = x.dim() == 2   # no reshape or view to dispatch (host time)
    dx, dA, dB = kernels.lora_backward(dy if flat else dy.reshape(-1, dy.shape[-1]),
                                       x if flat else x.reshape(-1, x.shape[-1]), weight, A, B, S,
                                       scale, dropout_p, need_dx=need_dx, need_dA=need_dA, need_dB=need_dB,
                                       keep=keep if dropout_p > 0 else None, dA_out=dA_out, dB_out=dB_out)
    return (dx.view(x.shape) if dx is not None and not flat else dx), dA, dB


def graph_gradients(f, inputs, needs, dy):
    """The gradients of y = f(*inputs) against ``dy`` for the inputs that need one, recorded on autograd's graph
    (``create_graph=True``) so that they can be differentiated again; None where not needed, zeros where y does
    not depend on the input. What a fused op's backward returns when autograd asks for a differentiable backward
    (``torch.autograd.grad(..., create_graph=True)``: hvp, hessian, MAML): ``f`` is the op's reference maths on
    the inputs saved in forward (which keep their own history), so the kernels, whose backward autograd cannot
    see through, are not used."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    out = [None] * len(inputs)
    if not wanted:
        return out
    with torch.enable_grad():
        y = f(*inputs)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return out


def _backward_graph(dy, x, weight, A, B, S, scale: float, dropout_p: float, keep, need_dx, need_dA, need_dB):
    """(dx, dA, dB) as ``_backward_kernels``, in torch ops recorded on the graph (``graph_gradients``): the
    reference maths on the saved inputs, the dropout mask unpacked from the forward's bits."""
    mask = philox.unpack_keep_mask(keep, x.shape[-1]).view(x.shape) if dropout_p > 0 else None

    def f(x_, A_, B_):
        return reference.lora_linear(x_, weight, None, A_, B_, scale, dropout_p=dropout_p, training=mask is not None,
                                     dropout_mask=mask)

    return tuple(graph_gradients(f, (x, A, B), (need_dx, need_dA, need_dB), dy))


def _gradients(ctx, dy, backward_kernels):
    """All five gradients (x, weight, bias, A, B) from what forward saved; None where not required. When
    autograd records the backward (create_graph=True: grad mode is on inside backward) the low-rank gradients
    come from torch ops it can differentiate (``_backward_graph``), else from the kernels; dW and db are
    torch ops either way."""
    x, weight, A, B, S, keep = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():
        backward_kernels = _backward_graph
    dx, dA, dB = backward_kernels(dy, x, weight, A, B, S, ctx.scale, ctx.dropout_p, keep, need_dx, need_dA, need_dB)
    # the frozen-layer gradients, when asked for (the book's code leaves W trainable): torch matmuls
    if need_dW:
        dW = (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
    else:
        dW = None
    db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype) if need_db and ctx.has_bias \
        else None
    return dx, dW, db, dA, dB


def _save(ctx, x, weight, bias, A, B, S, scale, dropout_p, keep):
    # x, S = dropout(x) A (M x r, fp32) and, with dropout, the keep-mask as bits (M x in_features / 8 bytes, rows
    # padded to 16: 1/16 of a 16-bit x), which the dX GEMM and the dA pass read instead of drawing it again;
    # weight, A, B are parameters (no new memory). Nothing of size M x out_features, no dropped copy of x.
    ctx.save_for_backward(x, weight, A, B, S, keep)
    ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None


class _LoRALinearFunction(torch.autograd.Function):
    """The eager path: fused forward/backward on x (..., K) (see _save for what is kept for backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, dropout_p, seed):
        y, S, keep = _forward(x, weight, bias, A, B, scale, dropout_p, seed)
        _save(ctx, x, weight, bias, A, B, S, scale, dropout_p, keep)
        return y

    @staticmethod
    def backward(ctx, dy):
        # differentiable when autograd records it (create_graph=True): see _gradients
        return (*_gradients(ctx, dy, _backward_kernels), None, None, None)


# The same op as torch.library custom ops, for torch.compile (no graph break) and other tracers. The names carry a
# version, raised whenever the ops' outputs or the backward's inputs change (v2: the forward returns the keep-mask's
# bits, the backward takes them instead of the seed): torch.compile's AOTAutograd cache keys on the traced graph,
# which names the op but not its registered autograd, so a graph compiled before the change would be reused with
# the old backward (wrong gradients) until the cache is cleared.
@torch.library.custom_op("lora_fast::lora_linear_fwd_v2", mutates_args=())
def _lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                     B: torch.Tensor, scale: float, dropout_p: float,
                     seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, S, keep = _forward(x, weight, bias, A, B, scale, dropout_p, seed)
    # custom ops return tensors only: an empty uint8 tensor stands for "no mask"
    return y, S, keep if keep is not None else x.new_empty(0, dtype=torch.uint8)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, A, B, scale, dropout_p, seed):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    keep_shape = (M, philox.mask_row_bytes(x.shape[-1])) if dropout_p > 0 else (0,)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, A.shape[1]), dtype=torch.float32),
            x.new_empty(keep_shape, dtype=torch.uint8))


@torch.library.custom_op("lora_fast::lora_linear_bwd_v2", mutates_args=())
def _lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     S: torch.Tensor, scale: float, dropout_p: float, keep: torch.Tensor, need_dx: bool,
                     need_dA: bool, need_dB: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # contiguous gradients, the layout the fake below declares (inductor asserts it, and with its size asserts off
    # would read a transposed buffer as contiguous): dA / dB written straight into contiguous buffers, not in A's /
    # B's layout as the eager paths do (a changed layout would also need a new op version, see above)
    dA_out = A.new_empty(A.shape) if need_dA else None
    dB_out = B.new_empty(B.shape) if need_dB else None
    grads = _backward_kernels(dy, x, weight, A, B, S, scale, dropout_p, keep, need_dx, need_dA, need_dB, dA_out,
                              dB_out)
    # custom ops return tensors only: an empty tensor stands for "not needed"; an empty batch's zeros_like keeps
    # its input's layout (contiguous() copies only then)
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)


@_lora_linear_bwd.register_fake
def _(dy, x, weight, A, B, S, scale, dropout_p, keep, need_dx, need_dA, need_dB):
    return tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                 for t, need in ((x, need_dx), (A, need_dA), (B, need_dB)))


def _op_backward_kernels(dy, x, weight, A, B, S, scale, dropout_p, keep, need_dx, need_dA, need_dB):
    grads = _lora_linear_bwd(dy, x, weight, A, B, S, scale, dropout_p, keep, need_dx, need_dA, need_dB)
    return tuple(g if need else None for g, need in zip(grads, (need_dx, need_dA, need_dB)))


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout_p, seed = inputs
    _save(ctx, x, weight, bias, A, B, output[1], scale, dropout_p, output[2])


def _op_backward(ctx, dy, dS, dkeep):
    return (*_gradients(ctx, dy, _op_backward_kernels), None, None, None)


torch.library.register_autograd("lora_fast::lora_linear_fwd_v2", _op_backward, setup_context=_op_setup_context)


# --- planned calls (issue 26: host time) ------------------------------------------------------------------------
# A call whose arguments' metadata (types, shapes, strides, dtypes, devices, 16-byte alignment of the data pointers),
# scale, dropout_p and training flag repeat an earlier call's needs none of the checks, backend and path decisions
# again: its _OpPlan holds the checked scale and dropout and the recorded launches (kernels/plan.py) of its forward
# and, per dY layout and set of gradients, of its backward. Built by the first call that passes the checks on the
# Triton backend; kernels/choice.clear() (a new LORA_FAST_GEMM) forgets them all.
_PLANS = None                 # kernels.plan.PLANS once the Triton backend has served a call (dict: key -> _OpPlan)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_RECORD_TRIES = 3             # recordings tried per forward / backward layout before it keeps the launchers' path
_BACKWARD_LAYOUTS = 8         # dY layouts (and gradient sets) replayed per plan


# os.environ's own dict (bytes keys on POSIX): a plain dict lookup where os.environ.get encodes the key and
# decodes the value (~0.5-1 us per call on the planned path)
_ENV_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("LORA_FAST_BACKEND") if hasattr(os.environ, "encodekey") else None


def _forced_backend() -> bool:
    """Whether LORA_FAST_BACKEND is set to anything (the planned path then steps aside for select_backend)."""
    if _ENV_DATA is not None and _BACKEND_KEY is not None:
        return bool(_ENV_DATA.get(_BACKEND_KEY))
    return bool(os.environ.get("LORA_FAST_BACKEND"))


def _meta(t):
    return (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


_TOP_SAVED_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (torch.autograd.graph.saved_tensors_hooks: save_on_cpu, non-reentrant
    checkpointing, a user's pack/unpack): what backward unpacks may then have another layout than what forward
    saved (save_on_cpu(pin_memory=True) packs into a contiguous buffer, for one). True when torch cannot say."""
    if _TOP_SAVED_HOOKS is None:
        return True
    try:
        return _TOP_SAVED_HOOKS(False) is not None
    except TypeError:   # an older signature without ignore_is_tracing
        return _TOP_SAVED_HOOKS() is not None


def _plan_key(x, weight, bias, A, B, scale, dropout_p, training, stored):
    """The metadata a planned call must repeat (see above); raises for what is not a strided tensor. ``stored``:
    A and B are the factors as PEFT stores them (lora_linear_stored), which a key of the same shapes and strides
    for lora_linear's own layout must not match."""
    # the numbers' types too: 1 == 1.0 == True in a dict key, and the checks accept a float where they refuse a bool
    return (_meta(x), _meta(weight), None if bias is None else _meta(bias), _meta(A), _meta(B), type(scale), scale,
            type(dropout_p), dropout_p, type(training), training, stored)


class _OpPlan:
    """The checked constants and the recorded launches of one metadata key (see _PLANS). ``stored``: the plan's A and
    B are PEFT's lora_A.weight (R, K) and lora_B.weight (N, R) (lora_linear_stored): the kernels read them through
    transposed views (the same data pointers: a replay passes the stored tensors themselves), and dA / dB are
    written into (R, K) / (N, R) buffers, the parameters' own layout."""

    __slots__ = ("scale", "p", "draw_seed", "y_shape", "keep_shape", "has_bias", "stored", "fwd", "fwd_tries", "bwd",
                 "bwd_tries")

    def __init__(self, scale: float, p: float, draw_seed: bool, y_shape, keep_shape, has_bias: bool, stored: bool):
        self.scale, self.p, self.draw_seed, self.y_shape, self.has_bias = scale, p, draw_seed, y_shape, has_bias
        self.stored = stored
        self.keep_shape = keep_shape   # the bit-packed keep-mask's (M, row bytes) with dropout, else None
        self.fwd, self.fwd_tries, self.bwd, self.bwd_tries = None, 0, {}, 0

    def forward(self, x, weight, bias, A, B, seed):
        """(y, S, keep) as _forward, by the recorded launches when there are."""
        rep = self.fwd
        if rep is not None:
            # shapes as separate ints: torch's argument parser reads a tuple (~1/3 more) or a torch.Size (~twice) slower
            y = x.new_empty(*self.y_shape)
            keep = None if self.keep_shape is None else x.new_empty(*self.keep_shape, dtype=torch.uint8)
            out = rep(x, weight, bias, A, B, seed, y, keep)
            if out is not None:
                return y, out[0], keep
        from .kernels import lora_forward, plan

        # the kernels' (K, R) / (R, N) factors: views of the stored ones (the same data pointers)
        Af, Bf = (A.t(), B.t()) if self.stored else (A, B)
        if rep is not None or self.fwd_tries >= _RECORD_TRIES or not plan.can_record(x.device):
            return _forward(x, weight, bias, Af, Bf, self.scale, self.p, seed)
        self.fwd_tries += 1

        N = self.y_shape[-1]
        y = x.new_empty(self.y_shape)
        keep = None if self.keep_shape is None else x.new_empty(self.keep_shape, dtype=torch.uint8)
        flat = x.dim() == 2
        x2d = x if flat else x.reshape(-1, x.shape[-1])
        y2d = y if flat else y.view(-1, N)
        with plan.Recorder((x, weight, bias, A, B, seed, y, keep)) as rec:
            rec.alias(x2d, x)
            rec.alias(y2d, y)
            rec.alias(Af, A)
            rec.alias(Bf, B)
            _, S = lora_forward(x2d, weight, bias, Af, Bf, self.scale, self.p, seed, out=y2d, keep_out=keep)
        self.fwd = rec.replay((S,))
        return y, S, keep

    def backward(self, ctx, dy):
        """The five gradients of _gradients, the low-rank ones by the recorded launches when there are."""
        x, weight, A, B, S, keep = ctx.saved_tensors
        need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():   # autograd records the backward (create_graph=True): see _gradients
            if self.stored:
                dx, dA, dB = _backward_graph(dy, x, weight, A.t(), B.t(), S, self.scale, self.p, keep, need_dx,
                                             need_dA, need_dB)
                dA, dB = (None if dA is None else dA.t()), (None if dB is None else dB.t())
            else:
                dx, dA, dB = _backward_graph(dy, x, weight, A, B, S, self.scale, self.p, keep, need_dx, need_dA,
                                             need_dB)
        elif need_dx or need_dA or need_dB:
            key = (dy.shape, dy.stride(), dy.dtype, dy.data_ptr() & 15, need_dx, need_dA, need_dB)
            if ctx.hooked:
                # the replay bakes in the saved tensors' strides and alignment: without hooks they are the
                # forward's inputs (the plan's key fixes them), with hooks the unpacked tensors' own. Strides and
                # alignment only (~3 us; an unpack that changed a shape or dtype would be wrong on either path)
                key += (x.stride(), x.data_ptr() & 15, weight.stride(), weight.data_ptr() & 15, A.stride(),
                        A.data_ptr() & 15, B.stride(), B.data_ptr() & 15, S.stride(), S.data_ptr() & 15,
                        None if keep is None else (keep.stride(), keep.data_ptr() & 15))
            rep = self.bwd.get(key)
            out = None
            if rep is not None:
                dx = x.new_empty(*x.shape) if need_dx else None
                if self.stored:   # the gradients in the parameters' layout (no copy by AccumulateGrad)
                    out = rep(dy, x, weight, A, B, S, keep, dx, A.new_empty(*A.shape) if need_dA else None,
                              B.new_empty(*B.shape) if need_dB else None)
                else:
                    out = rep(dy, x, weight, A, B, S, keep, dx, None, None)
            if out is not None:
                dA, dB = out
            elif rep is None and self.bwd_tries < _RECORD_TRIES and len(self.bwd) < _BACKWARD_LAYOUTS \
                    and self._can_record(x.device):
                dx, dA, dB = self._record_backward(key, dy, x, weight, A, B, S, keep, need_dx, need_dA, need_dB)
            elif self.stored:   # into buffers in the parameters' layout, as the replay
                dA = A.new_empty(*A.shape) if need_dA else None
                dB = B.new_empty(*B.shape) if need_dB else None
                dx, _, _ = _backward_kernels(dy, x, weight, A.t(), B.t(), S, self.scale, self.p, keep, need_dx,
                                             need_dA, need_dB, None if dA is None else dA.t(),
                                             None if dB is None else dB.t())
            else:
                dx, dA, dB = _backward_kernels(dy, x, weight, A, B, S, self.scale, self.p, keep, need_dx, need_dA,
                                               need_dB)
        else:
            dx = dA = dB = None
        dW = (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if need_dW else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype) \
            if need_db and self.has_bias else None
        return dx, dW, db, dA, dB

    @staticmethod
    def _can_record(device) -> bool:
        from .kernels import plan

        return plan.can_record(device)

    def _record_backward(self, key, dy, x, weight, A, B, S, keep, need_dx, need_dA, need_dB):
        from .kernels import lora_backward, plan

        flat = x.dim() == 2
        dx = x.new_empty(x.shape) if need_dx else None
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        x2d = x if flat else x.reshape(-1, x.shape[-1])
        dx2d = dx if dx is None or flat else dx.view(-1, x.shape[-1])
        keep = keep if self.p > 0 else None
        # stored factors: the kernels read their transposed views and write dA / dB through transposed views of
        # buffers in the parameters' layout, which the replay is given (roles) and returns
        dA_buf = A.new_empty(A.shape) if self.stored and need_dA else None
        dB_buf = B.new_empty(B.shape) if self.stored and need_dB else None
        Af, Bf = (A.t(), B.t()) if self.stored else (A, B)
        dA_out = None if dA_buf is None else dA_buf.t()
        dB_out = None if dB_buf is None else dB_buf.t()
        with plan.Recorder((dy, x, weight, A, B, S, keep, dx, dA_buf, dB_buf)) as rec:
            rec.alias(dy2d, dy)
            rec.alias(x2d, x)
            if dx is not None:
                rec.alias(dx2d, dx)
            rec.alias(Af, A)
            rec.alias(Bf, B)
            if dA_buf is not None:
                rec.alias(dA_out, dA_buf)
            if dB_buf is not None:
                rec.alias(dB_out, dB_buf)
            _, dA, dB = lora_backward(dy2d, x2d, weight, Af, Bf, S, self.scale, self.p, need_dx=need_dx,
                                      need_dA=need_dA, need_dB=need_dB, dx_out=dx2d, keep=keep, dA_out=dA_out,
                                      dB_out=dB_out)
        replay = rec.replay((dA, dB))
        if replay is not None:
            self.bwd[key] = replay
        else:   # failed recordings are what is bounded: each dY layout (up to _BACKWARD_LAYOUTS) may succeed
            self.bwd_tries += 1
        if self.stored:
            return dx, dA_buf, dB_buf
        return dx, dA, dB


class _PlannedFunction(torch.autograd.Function):
    """The eager path of a planned call: _LoRALinearFunction's maths and saved tensors, on the plan's launches."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, op, seed):
        y, S, keep = op.forward(x, weight, bias, A, B, seed)
        ctx.save_for_backward(x, weight, A, B, S, keep)   # as _save: the keep-mask's bits with dropout, not the seed
        ctx.op = op
        ctx.hooked = _saved_tensor_hooks()
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*ctx.op.backward(ctx, dy), None, None)


# autograd.Function.apply without its Python wrapper (bind_default_args, the functorch check, the dead-wrapper
# unwrap: the planned path checks for transforms itself and takes plain tensors only): ~4 us less per call
_planned_apply = super(torch.autograd.Function, _PlannedFunction).apply


def _planned(x, weight, bias, A, B, scale, dropout_p, training, stored=False):
    """lora_linear's (or, ``stored``, lora_linear_stored's) result when the call repeats a planned call's metadata
    (see _PLANS), else None."""
    # first what a tracer (torch.compile, torch.func) must never see: a data pointer read, a dict of plans
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or torch._C._is_any_autocast_enabled() or _forced_backend():
        return None
    try:
        key = _plan_key(x, weight, bias, A, B, scale, dropout_p, training, stored)
    except Exception:   # not a strided tensor (or no data pointer): the checks say what is wrong
        return None
    op = _PLANS.get(key)
    if op is None:
        return None
    seed = reference.draw_seed(x.device) if op.draw_seed else None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _planned_apply(x, weight, bias, A, B, op, seed)
    return op.forward(x, weight, bias, A, B, seed)[0]


def _new_plan(x, weight, bias, A, B, raw_scale, raw_dropout_p, training, scale, p, draw_seed, stored):
    """The _OpPlan of a call that passed the checks on the Triton backend (None for what is never planned: other
    tensor types, empty tensors, arguments that are not plain numbers). ``stored``: A and B are PEFT's stored
    factors (lora_linear_stored; the checks saw their transposed views)."""
    global _PLANS
    if not (type(raw_scale) in (float, int) and type(raw_dropout_p) in (float, int) and type(training) is bool
            and all(type(t) in _PLAIN for t in (x, weight, A, B)) and (bias is None or type(bias) in _PLAIN)
            and x.numel() and weight.shape[0]):
        return None
    try:
        key = _plan_key(x, weight, bias, A, B, raw_scale, raw_dropout_p, training, stored)
    except RuntimeError:   # no data pointer: a functorch wrapper that outlived its transform (apply unwraps it)
        return None
    from .kernels import plan

    _PLANS = plan.PLANS
    if len(_PLANS) >= 4096:   # a bound for programs that never repeat a layout
        plan.clear()
    K = x.shape[-1]
    keep_shape = (x.numel() // K, philox.mask_row_bytes(K)) if p > 0 else None
    op = _OpPlan(scale, p, draw_seed, (*x.shape[:-1], weight.shape[0]), keep_shape, bias is not None, stored)
    _PLANS[key] = op
    return op


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:   # a device type without autocast (meta)
        return False


def _autocast_inputs(x, weight, bias, A, B):
    """What nn.Linear does under torch.autocast: compute in the autocast dtype. fp32 adapters stay fp32 (the
    kernels cast their tiles, as for PEFT's fp32 adapters on a 16-bit base); others follow the autocast dtype."""
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (x, weight, bias)]
    if isinstance(A, torch.Tensor) and A.dtype not in (dtype, torch.float32):
        A, B = A.to(dtype), B.to(dtype)
    return (*cast, A, B)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
               training: bool = True) -> torch.Tensor:
    """scale * (dropout(x) @ A) @ B alone, unfused (``lora_fast.reference.lora_delta``): the term LinearWithLoRA
    adds beside a wrapped layer whose own call it must keep (a subclass forward, hooks). Shapes, dtypes, dropout
    and errors as ``lora_linear``; returns (..., out_features) in A's dtype."""
    return reference.lora_delta(x, A, B, scale, dropout_p=dropout_p, training=training)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, *, dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """Fused LoRA linear with autograd: y = x W^T + b + scale * (dropout(x) @ A) @ B.

    Maths: LoRA, Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models"), eq. 3, with dropout
    on the LoRA input as PEFT applies it (kept elements scaled by 1 / (1 - dropout_p)).

    Args:
        x: (..., in_features), any number of leading dims, float16/bfloat16/float32 (float64 on the reference
            backend); may be non-contiguous.
        weight: (out_features, in_features) in x's dtype, as nn.Linear stores it; may be a transposed view.
        bias: (out_features,) in weight's dtype, or None.
        A: (in_features, rank), rank >= 1; B: (rank, out_features); both x's dtype or float32 (PEFT keeps
            adapters in float32 on a 16-bit base). The kernels compute in x's dtype with fp32 accumulation.
        scale: finite real LoRA scale (alpha, alpha/rank, or alpha/sqrt(rank) for rsLoRA).
        dropout_p: probability in [0, 1] of dropping an element of the LoRA input (as nn.Dropout; 1 makes the
            LoRA term zero); applied when ``training``. The keep-mask comes from a counter-based Philox
            generator under a seed drawn from torch's generator for x's device: on one device the same
            ``torch.manual_seed`` drops the same elements on the Triton and the reference backend
            (``lora_fast.philox``); CPU and CUDA generators differ, so a CPU and a GPU run draw other masks.
            The generator's 8-bit uniforms apply p rounded to a multiple of 1/256 (``philox.quantize``: within
            2**-9 of the requested value, 0.1 -> 0.1016), kept elements scaled by exactly 1 / (1 - that p).
        training: False (eval) applies no dropout.

    Under ``torch.autocast`` x, weight and bias are cast to the autocast dtype, as nn.Linear's are. Under
    ``torch.compile`` the op is the custom op ``lora_fast::lora_linear_fwd_v2`` (with its backward op), so
    models trace with ``fullgraph=True``. Under ``torch.func`` transforms (``vmap(grad(...))`` for per-sample
    gradients, ``jacrev``, ...) the op runs the reference path (unfused torch ops), whatever the backend; with
    dropout, vmap needs ``randomness="different"`` or ``"same"`` as for nn.Dropout.

    Returns: (..., out_features) in x's dtype. Gradients flow to every input that requires one (x, weight,
        bias, A, B); with dropout the kernels draw the mask once, in forward, from a seed drawn from torch's
        generator for x's device (so ``torch.manual_seed`` makes runs reproducible), and save it as bits
        (M x in_features / 8 bytes) that the backward reads.

    Raises:
        TypeError: a non-tensor, an integer dtype, weight not in x's dtype, A/B dtypes that differ or are
            neither x's dtype nor float32, a non-real scale.
        ValueError: mismatched in/out dims, rank < 1, tensors on another device than x, a non-finite scale,
            dropout_p outside [0, 1], an unknown LORA_FAST_BACKEND.
        RuntimeError: LORA_FAST_BACKEND=triton with inputs the kernels cannot serve.
    """
    if _PLANS is not None:
        y = _planned(x, weight, bias, A, B, scale, dropout_p, training)
        if y is not None:
            return y
    return _lora_linear(x, weight, bias, A, B, scale, dropout_p, training, None)


def lora_linear_stored(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scale: float, *, dropout_p: float = 0.0,
                       training: bool = True) -> torch.Tensor:
    """``lora_linear(x, weight, bias, lora_A.t(), lora_B.t(), scale, ...)`` with the factors as PEFT stores them:
    ``lora_A`` (rank, in_features) and ``lora_B`` (out_features, rank), PEFT's ``lora_A[name].weight`` and
    ``lora_B[name].weight``. The same output and gradients (bit for bit: the kernels read the same memory), without
    the two transposed views autograd would record per call, and with the factors' gradients written in their own
    (rank, in) / (out, rank) layout: autograd's gradient accumulation takes them as they are, where a transposed
    gradient of a contiguous parameter is copied into the parameter's layout (one more kernel per factor and step).
    What ``patch_peft``'s layers call. Arguments, maths, returns and errors as ``lora_linear``; a factor of the
    wrong shape raises ValueError naming lora_A or lora_B and its shape as passed (the dtype and device errors name A
    and B: the transposed views)."""
    if _PLANS is not None:
        y = _planned(x, weight, bias, lora_A, lora_B, scale, dropout_p, training, True)
        if y is not None:
            return y
    if not (isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)):
        raise TypeError(f"lora_linear_stored: lora_A and lora_B must be tensors; got {type(lora_A).__name__} and "
                        f"{type(lora_B).__name__}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_linear_stored: lora_A (rank, in_features) and lora_B (out_features, rank) must be "
                         f"2-D; got shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    # the factors' shapes as passed (check_lora_linear would name the transposed views' shapes, which the caller
    # never saw); only where x and weight agree, else check_lora_linear names x
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() >= 1 and weight.dim() == 2 \
            and x.shape[-1] == weight.shape[1]:
        out_features, in_features = weight.shape
        if lora_A.shape[0] < 1 or lora_A.shape[1] != in_features:
            raise ValueError(f"lora_linear_stored: lora_A: expected shape (rank >= 1, in_features={in_features}), "
                             f"got {tuple(lora_A.shape)}")
        if lora_B.shape[0] != out_features or lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"lora_linear_stored: lora_B: expected shape (out_features={out_features}, "
                             f"rank={lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    return _lora_linear(x, weight, bias, lora_A.t(), lora_B.t(), scale, dropout_p, training, (lora_A, lora_B))


def _lora_linear(x, weight, bias, A, B, scale, dropout_p, training, stored):
    """lora_linear's unplanned path (checks, backend, a new plan); ``stored``: (lora_A, lora_B) when A and B are
    their transposed views (lora_linear_stored), else None."""
    autocast = isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type)
    if autocast:
        x, weight, bias, A, B = _autocast_inputs(x, weight, bias, A, B)
    raw_scale, raw_dropout_p = scale, dropout_p
    scale, dropout_p = check_lora_linear(x, weight, bias, A, B, scale, dropout_p)
    check_training(training)
    # in_features = 0 (y = bias) or out_features = 0: no matmul to fuse, the reference computes it exactly.
    # torch.func transforms (vmap, grad, jacrev, functional_call under them) run the reference path: plain torch
    # ops that every transform composes with (the kernels take no batched or wrapped tensors)
    if select_backend(x) == "reference" or x.shape[-1] == 0 or weight.shape[0] == 0 \
            or torch._C._are_functorch_transforms_active():
        return reference.lora_linear(x, weight, bias, A, B, scale, dropout_p=dropout_p, training=training)
    p = dropout_p if training else 0.0
    # drawn on x's device as the reference draws it: no host sync, and torch.manual_seed / CUDA-graph RNG state
    # govern it
    seed = reference.draw_seed(x.device) if p > 0 else None
    # the kernels' mask draws 8-bit uniforms: p is applied as its nearest multiple of 1/256 (lora_fast.philox)
    p = philox.quantize(p)
    if p >= 1.0:
        # every element dropped: the LoRA term and its gradients are exactly zero (the seed is still drawn, so
        # the generator advances as on the reference path)
        p, scale = 0.0, 0.0
    if torch.compiler.is_compiling():
        return _lora_linear_fwd(x, weight, bias, A, B, scale, p, seed)[0]
    op = None if autocast or _forced_backend() else \
        _new_plan(x, weight, bias, *(stored or (A, B)), raw_scale, raw_dropout_p, training, scale, p, seed is not None,
                  stored is not None)
    if op is not None:
        return _PlannedFunction.apply(x, weight, bias, *(stored or (A, B)), op, seed)
    # eager: an autograd.Function costs less host time per call than the custom-op dispatch
    return _LoRALinearFunction.apply(x, weight, bias, A, B, scale, p, seed)
