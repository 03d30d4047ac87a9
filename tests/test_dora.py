"""DoRA: the float64 reference against PEFT's DoRA layer, the fused op (Triton interpreter on CPU) against the
float64 reference, LinearWithDoRA (merge, unmerge, adapter files), PEFT interop and saved-for-backward bytes.

Error model (see tests/utils.py): the op computes y = x W^T + b + (g - 1) ⊙ (x_d W^T) + g ⊙ s x_d A B with
g = m / norm (without dropout x_d = x and the two base terms are one). Its magnitude bound is that formula on
|x|, |W|, |b|, |A|, |B|, |s| with |g - 1| and |g| as the column factors, and the gradients' bounds are its
backward on |dY|; the norm itself is an fp32 reduction over K whose relative error (fp32, plus one rounding of A
into a 16-bit dot for W A) enters g as about one unit roundoff, within tolerance's roundings.
"""

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from lora_fast import (
    LinearWithDoRA,
    LinearWithLoRA,
    dora_linear,
    dora_linear_4bit,
    initialize_dora_magnitudes,
    load_lora,
    load_peft_adapter,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    patch_peft,
    philox,
    reference,
    reference_4bit,
    replace_linear_with_lora,
    save_lora,
    save_peft_adapter,
    unmerge_lora,
)
from tests.utils import UNIT_ROUNDOFF, assert_close, linear_magnitude, make_inputs, saved_bits_and_grads, tolerance

M, K, N = 37, 45, 29


def _mask(seed_value, shape, p):
    """The keep-mask lora-fast draws after torch.manual_seed(seed_value) for an input of ``shape``."""
    torch.manual_seed(seed_value)
    seed = reference.draw_seed(torch.device("cpu"))
    return philox.keep_mask(seed, max(1, torch.Size(shape).numel() // shape[-1]) if shape[-1] else 0, shape[-1],
                            p).view(shape)


def _dora_inputs(shape, dtype, R, *, bias=True, adapter_dtype=None, device="cpu"):
    x, W, b, A, B = make_inputs(shape, K, N, R, dtype, "cpu", bias=bias, adapter_dtype=adapter_dtype)
    # the magnitude near the norm (as trained), with a spread so that g - 1 is not ~0
    norm = reference.dora_weight_norm(W, A, B, 1.0)
    m = (norm * (1.0 + 0.3 * torch.randn(N))).to(A.dtype)
    return x, W, b, A, B, m


def _formula(x, W, b, A, B, c1, c2, s, keep, p):
    """x W^T + b + c1 ⊙ (x_d W^T) + c2 ⊙ s x_d A B (float64), x_d = keep ⊙ x / (1 - p)."""
    x_d = x * keep.to(x.dtype) / (1 - p) if p > 0 else x
    y = x @ W.t() + c1 * (x_d @ W.t()) + c2 * s * (x_d @ A @ B)
    return y + b if b is not None else y


def _check(x, W, b, A, B, m, s, *, p=0.0, seed_value=1234, dtype=None, train_weight=False):
    """The fused op's forward and gradients (x, A, B, m; W when ``train_weight``; bias) against float64."""
    dtype = dtype or x.dtype
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, W, b, A, B, m)]
    leaves[1].requires_grad_(train_weight)
    torch.manual_seed(seed_value)
    y = dora_linear(*leaves[:6], s, dropout_p=p, training=True)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    y.backward(dy)
    keep = _mask(seed_value, x.shape, p) if p > 0 else torch.ones_like(x, dtype=torch.bool)
    p = philox.quantize(p)   # the probability the kernels' mask applies (kept elements scaled by 1 / (1 - p))
    # float64 reference through reference.dora_linear (the norm detached) and the magnitude bound
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, W, b, A, B, m)]
    ref = reference.dora_linear(*ref_leaves, s, dropout_p=p, training=True, dropout_mask=keep if p > 0 else None)
    ref.backward(dy.double())
    g = (m.double() / reference.dora_weight_norm(W.double(), A.double(), B.double(), s))
    abs_leaves = [None if t is None else t.detach().double().abs().requires_grad_() for t in (x, W, b, A, B)]
    mag = _formula(*abs_leaves, (g - 1).abs(), g.abs(), abs(s), keep, p)
    mag.backward(dy.double().abs())
    U_abs = _formula(abs_leaves[0].detach(), abs_leaves[1].detach(), None, abs_leaves[3].detach(),
                     abs_leaves[4].detach(), torch.zeros(()), torch.ones(()), abs(s), keep, p)
    if p == 0:
        U_abs = U_abs + x.double().abs() @ W.double().abs().t()   # x_d W^T and x W^T are one term
    norm = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    dm_mag = (dy.double().abs().reshape(-1, N) * U_abs.reshape(-1, N)).sum(0) / norm
    rows = max(1, x.numel() // K)
    R = A.shape[1]
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert_close(y, ref.detach(), mag.detach(), dtype, K + R, "dora forward")
    checks = [("dora dx", 0, N + R), ("dora dA", 3, rows), ("dora dB", 4, rows)]
    if b is not None:
        checks.append(("dora dbias", 2, rows))
    if train_weight:
        checks.append(("dora dW", 1, rows))
    for name, i, n in checks:
        assert leaves[i].grad is not None and leaves[i].grad.dtype == leaves[i].dtype, name
        assert_close(leaves[i].grad, ref_leaves[i].grad, abs_leaves[i].grad, dtype, n, name)
    assert leaves[5].grad is not None and leaves[5].grad.dtype == m.dtype
    assert_close(leaves[5].grad, ref_leaves[5].grad, dm_mag, dtype, rows + K + R, "dora dm")
    if not train_weight:
        assert leaves[1].grad is None


def _arch(device=None):
    return nn.Sequential(nn.Linear(K, N, device=device), nn.ReLU(), nn.Linear(N, 7, device=device))


def test_meta_device_idiom_gives_the_model_built_on_the_loaded_base():
    """Build on meta, wrap with DoRA, to_empty(), reset every module, load the base, initialise the magnitudes:
    the same model (every tensor, and the outputs) as wrapping the loaded base; a forward before the
    magnitudes are initialised raises (never NaN), and so does merging."""
    base = _arch()
    torch.manual_seed(5)
    expected = replace_linear_with_lora(copy.deepcopy(base), 4, 2.0, use_dora=True)
    with torch.device("meta"):
        model = replace_linear_with_lora(_arch(), 4, 2.0, use_dora=True)
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    for module in model.modules():
        if isinstance(module, LinearWithLoRA):
            module.reset_parameters()      # the adapters only (A kaiming, B zeros), in wrapping order
    x = torch.randn(3, K)
    with pytest.raises(RuntimeError, match="magnitude m is not initialised"):
        model(x)
    with pytest.raises(RuntimeError, match="magnitude m is not initialised"):
        merge_lora(copy.deepcopy(model))
    model.load_state_dict({"0.linear.weight": base[0].weight, "0.linear.bias": base[0].bias,
                           "2.linear.weight": base[2].weight, "2.linear.bias": base[2].bias}, strict=False)
    initialize_dora_magnitudes(model)
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(model(x), expected(x))
    # a full state dict (m included) also counts as initialised, without initialize_dora_magnitudes
    with torch.device("meta"):
        again = replace_linear_with_lora(_arch(), 4, 2.0, use_dora=True)
    again.to_empty(device="cpu")
    again.load_state_dict(want)
    assert torch.equal(again(x), expected(x))
    # reset_parameters never computes m from the (possibly unloaded) base
    layer = expected[0]
    layer.reset_parameters()
    assert torch.isnan(layer.m).all()
    with pytest.raises(RuntimeError, match="initialize_magnitude"):
        layer(x)
    layer.initialize_magnitude()
    assert torch.equal(layer.m, torch.linalg.vector_norm(base[0].weight.detach(), dim=1))


# --- the float64 reference is PEFT's DoRA ------------------------------------------------------------------------
class _MaskDropout(nn.Module):
    """Dropout with a given keep-mask (so PEFT and the reference drop the same elements)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def _peft_dora(K_, N_, R, bias, p, dtype=torch.float64):
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(K_, N_, bias=bias)).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=3 * R, target_modules=["0"], use_dora=True,
                                                      lora_dropout=p))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, R ** -0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.randn(N_, dtype=dtype))
    return model, layer


@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_reference_is_peft_dora(bias, p):
    model, layer = _peft_dora(K, N, 4, bias, p)
    model.train()
    x = torch.randn(3, 11, K, dtype=torch.float64)
    keep = torch.rand(x.shape) >= p
    if p > 0:
        layer.lora_dropout["default"] = _MaskDropout(keep, p)
    A_mod, B_mod = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    x1 = x.clone().requires_grad_()
    y_peft = model(x1)
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    x2 = x.clone().requires_grad_()
    A, B = A_mod.detach().t().clone().requires_grad_(), B_mod.detach().t().clone().requires_grad_()
    m = mag.detach().clone().requires_grad_()
    base = layer.base_layer
    y = reference.dora_linear(x2, base.weight, base.bias, A, B, m, layer.scaling["default"], dropout_p=p,
                              training=True, dropout_mask=keep if p > 0 else None)
    y.backward(dy)
    for name, ours, theirs in (("y", y, y_peft), ("dx", x2.grad, x1.grad), ("dA", A.grad, A_mod.grad.t()),
                               ("dB", B.grad, B_mod.grad.t()), ("dm", m.grad, mag.grad)):
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-12 * theirs.abs().max().item(), f"{name}: {err}"


# --- the fused op against float64 --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,adapter_dtype,R,bias,p", [
    (torch.float32, None, 1, True, 0.0),
    (torch.float32, None, 16, False, 0.25),
    (torch.bfloat16, torch.float32, 4, True, 0.0),     # PEFT's fp32 adapters on a 16-bit base
    (torch.bfloat16, torch.float32, 16, True, 0.25),
    (torch.float16, None, 4, False, 0.0),
    (torch.float16, torch.float32, 4, True, 0.3),
])
def test_fused_matches_float64(dtype, adapter_dtype, R, bias, p):
    x, W, b, A, B, m = _dora_inputs((M,), dtype, R, bias=bias, adapter_dtype=adapter_dtype)
    _check(x, W, b, A, B, m, 0.75, p=p)


def test_fused_strided_3d_and_trainable_weight():
    x, W, b, A, B, m = _dora_inputs((2, 9, 2), torch.float32, 3)
    x = x.reshape(2, 9, 2 * K)[..., ::2]                     # 3-D, non-contiguous
    W_t = W.t().contiguous().t()                             # a transposed view (as a Conv1D's weight)
    _check(x, W_t, b, A, B, m, -1.5, p=0.2, train_weight=True)
    _check(x, W_t, b, A, B, m, 2.0, p=0.0, train_weight=True)


def test_empty_batch_and_eval():
    x, W, b, A, B, m = _dora_inputs((M,), torch.float32, 4)
    x0 = x[:0].clone().requires_grad_()
    m_ = m.clone().requires_grad_()
    y = dora_linear(x0, W, b, A, B, m_, 1.0)
    y.sum().backward()
    assert y.shape == (0, N) and torch.equal(m_.grad, torch.zeros_like(m))
    # eval: no dropout, the same as p = 0
    torch.manual_seed(3)
    y_eval = dora_linear(x, W, b, A, B, m, 1.0, dropout_p=0.5, training=False)
    ref = reference.dora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), m.double(), 1.0)
    assert (y_eval.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_autocast_computes_in_the_autocast_dtype():
    x, W, b, A, B, m = _dora_inputs((M,), torch.float32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dora_linear(x, W, b, A, B, m, 0.5)
    assert y.dtype == torch.bfloat16
    # as nn.Linear under autocast: x, W, b in bf16; the fp32 adapters and magnitude stay fp32
    cast = [t.to(torch.bfloat16).double() for t in (x, W, b)]
    ref = reference.dora_linear(*cast, A.double(), B.double(), m.double(), 0.5)
    g = m.double() / reference.dora_weight_norm(cast[1], A.double(), B.double(), 0.5)
    mag = _formula(cast[0].abs(), cast[1].abs(), cast[2].abs(), A.double().abs(), B.double().abs(), (g - 1).abs(),
                   g.abs(), 0.5, None, 0.0)
    assert_close(y, ref, mag, torch.bfloat16, K + 4, "dora autocast", record=False)


@pytest.mark.parametrize("dtype,R,s", [(torch.float32, 1, 1.3), (torch.bfloat16, 16, 1.3), (torch.float32, 3, 1e6),
                                       (torch.float16, 8, 1e4)])
def test_norm_kernel_is_exact_with_no_expansion(dtype, R, s):
    """The norm pass against float64 on W + s (A B)^T itself, at scales where the LoRA term dominates W (the
    expansion ||W||^2 + 2 s (W A) . B + s^2 ... lost the precision there), and g = m / norm."""
    from lora_fast.kernels import dora as kernels

    x, W, b, A, B, m = _dora_inputs((M,), dtype, R, adapter_dtype=torch.float32)
    Wt = W.t().contiguous().t()   # a transposed view: strides are read, nothing copied
    norm, g = kernels.dora_norm(Wt, A, B, m, s)
    ref = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    # each element of W + s (A B)^T: an fp32 dot of R terms plus one addition, squared and summed over K in fp32
    # (relative to the norm: Higham's gamma over R + K terms); scale * B rounded once to fp32
    rel = 2.0**-24 * (R + K + 4)
    assert ((norm.double() - ref).abs() <= rel * ref).all()
    assert ((g.double() - m.double() / ref).abs() <= 2 * rel * (m.double() / ref).abs()).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_norm_scales_rows_past_fp32s_range(monkeypatch, backend):
    """Rows of W + s (A B)^T whose squares leave fp32's range: entries 1e20 .. 1e30 (squares past 3.4e38), near
    1e-30 (squares below fp32's smallest subnormal), and a row whose first K block is ~1e-31 and its last
    ~1e24 (the per-row unit grows across blocks). The fp32 norm, g and the op's output against float64: the
    per-row power-of-two unit keeps the plain rows' relative bound (Higham's gamma over R + K terms)."""
    from lora_fast.kernels import dora as kernels

    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    s = 0.7
    x, W, b, A, B, _ = _dora_inputs((M,), torch.float32, 4, adapter_dtype=torch.float32)
    c = torch.ones(N, dtype=torch.float64)
    c[:6] = 10.0 ** torch.linspace(20, 30, 6, dtype=torch.float64)
    c[6:10] = 10.0 ** torch.linspace(-31, -29, 4, dtype=torch.float64)
    W = (W.double() * c[:, None]).float()
    B = (B.double() * c).float()
    first = kernels.INTERP_NORM_BLOCK["BLOCK_K"]   # the interpreter's K block: row 10's first block is tiny
    W[10, :first] *= 1e-30
    W[10, first:] *= 1e24
    B[:, 10] = 0
    ref = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    m = (ref * (1.0 + 0.3 * torch.rand(N, dtype=torch.float64))).float()
    if backend == "triton":
        norm, g = kernels.dora_norm(W, A, B, m, s)
        # the 4-bit norm pass shares the scaled sum: rows 0 .. 5 of deq(W) + s (A B)^T are ~1e20 .. 1e30 there
        from lora_fast import qlora

        lin = _linear4bit(K, N, torch.float32, "nf4", False, 64)
        packed = qlora.Packed4bit.from_bitsandbytes(lin.weight.data, lin.weight.quant_state)
        Wq = reference_4bit.dequantize(lin.weight.data, lin.weight.quant_state).double()
        ref4 = reference.dora_weight_norm(Wq, A.double(), B.double(), s)
        norm4, _ = kernels.dora_norm_4bit(packed, A, B, m, s, torch.float32)
        assert ((norm4.double() - ref4).abs() <= 2.0**-24 * (4 + K + 4) * ref4).all()
    else:
        norm = reference.dora_weight_norm(W, A, B, s)
        g = reference.dora_scale(m, norm)
    rel = 2.0**-24 * (4 + K + 4)   # as test_norm_kernel_is_exact_with_no_expansion
    assert torch.isfinite(norm).all() and (norm > 0).all()
    assert ((norm.double() - ref).abs() <= rel * ref).all()
    assert ((g.double() - m.double() / ref).abs() <= 2 * rel * (m.double() / ref)).all()
    y = dora_linear(x, W, b, A, B, m, s)
    want = reference.dora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), m.double(), s)
    gd = (m.double() / ref).abs()
    mag = gd * (linear_magnitude(x, W) + abs(s) * (x.double().abs() @ A.double().abs() @ B.double().abs())) \
        + b.double().abs()
    assert_close(y, want, mag, torch.float32, K + 8, "dora extreme rows forward", record=False)


def test_norm_follows_every_write_to_the_weight():
    """No cache: after writes that a cache keyed on (pointer, version) missed (weight.data.copy_, two .data
    assignments reusing freed memory, an in-place update of another tensor sharing the storage) the output
    equals a fresh computation on a new tensor holding the same values."""
    x, W, b, A, B, m = _dora_inputs((M,), torch.float32, 4)

    def run(weight):
        return dora_linear(x, weight, b, A, B, m, 0.7)

    def fresh(weight):
        return run(weight.detach().clone())

    weight = nn.Parameter(W.clone())
    run(weight)
    weight.data.copy_(torch.randn_like(W))
    assert torch.equal(run(weight), fresh(weight))
    for _ in range(2):
        weight.data = torch.randn_like(W)
        assert torch.equal(run(weight), fresh(weight))
    storage = torch.randn(2 * N * K)
    view = storage[:N * K].view(N, K)
    run(view)
    other = storage[:N * K]                # another tensor on the same storage, its own version counter
    other.data.mul_(-3.0)
    assert torch.equal(run(view), fresh(view))


def test_inference_tensors_run_on_the_kernels():
    """A weight made under torch.inference_mode (as loaders make them) runs on the kernels path, in inference
    mode and, frozen, outside it with adapters that train."""
    x, W, b, A, B, m = _dora_inputs((M,), torch.float32, 4)
    with torch.inference_mode():
        Wi, bi = W.clone(), b.clone()
        y_inf = dora_linear(x, Wi, bi, A, B, m, 0.7)
    assert torch.equal(y_inf, dora_linear(x, W, b, A, B, m, 0.7))
    Ar = A.clone().requires_grad_()
    y = dora_linear(x, Wi, bi, Ar, B, m, 0.7)
    y.sum().backward()
    Ar2 = A.clone().requires_grad_()
    dora_linear(x, W, b, Ar2, B, m, 0.7).sum().backward()
    assert torch.equal(y, y_inf) and torch.equal(Ar.grad, Ar2.grad)


def _scaled_check(x, W, b, A, B, m, s, p, dtype, grads=True, dx_floor=0.0):
    """Forward, dx, dA, dB and dm against float64 with the bound of the grouped formula that both backends
    compute, y = (x - x_d) W^T + b + g ⊙ (x_d W^T + s x_d A B) (x_d = x without dropout): |g| multiplies the
    magnitude of the term it scales, so a low-rank term many times the output does not widen the bound.
    ``dx_floor``: an absolute term added to dx's bound (the caller says which rounding it stands for)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, W, b, A, B, m)]
    leaves[1].requires_grad_(False)
    torch.manual_seed(77)
    y = dora_linear(*leaves, s, dropout_p=p, training=True)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    y.backward(dy)
    keep = _mask(77, x.shape, p) if p > 0 else torch.ones_like(x, dtype=torch.bool)
    pq = philox.quantize(p)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, W, b, A, B, m)]
    ref_leaves[1].requires_grad_(False)
    ref = reference.dora_linear(*ref_leaves, s, dropout_p=pq, training=True, dropout_mask=keep if p > 0 else None)
    ref.backward(dy.double())
    norm = reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    g = reference.dora_scale(m.double(), norm)
    xa, Wa, Aa, Ba = (t.detach().double().abs() for t in (x, W, A, B))
    xa = xa.requires_grad_()
    Aa, Ba = Aa.requires_grad_(), Ba.requires_grad_()
    xd = xa * keep.double() / (1 - pq) if p > 0 else xa
    rest = (xa - xd).abs() if p > 0 else torch.zeros_like(xa)
    inner = xd @ Wa.t() + abs(s) * (xd @ Aa @ Ba)
    mag = rest @ Wa.t() + g.abs() * inner + (b.double().abs() if b is not None else 0)
    mag.backward(dy.double().abs())
    assert torch.isfinite(y).all()
    assert_close(y, ref.detach(), mag.detach(), dtype, K + 8, "dora scaled forward", record=False)
    dx_bound = xa.grad
    if p > 0:
        # dx with dropout is formed as PEFT's backward groups it (both backends): dY W + keep/(1-p) ⊙
        # ((g - 1) ⊙ dY W + g ⊙ s dY B^T A^T), two GEMMs each rounded to x's dtype, whose sum cancels on kept
        # elements as g -> 0 (dY W (1 - 1/(1-p))): its bound is that grouping's own, not the forward's
        xb = x.detach().double().abs().requires_grad_()
        xbd = xb * keep.double() / (1 - pq)
        grouped = xb @ Wa.t() + (g - 1).abs() * (xbd @ Wa.t()) + g.abs() * abs(s) * (xbd @ Aa.detach() @ Ba.detach())
        grouped.backward(dy.double().abs())
        dx_bound = xb.grad
    # assert_close bounds by tolerance * magnitude: the floor enters as floor / tolerance added to the magnitude
    dx_bound = dx_bound + dx_floor / tolerance(dtype, N + 8)
    for name, got, want, bound, n in (("dx", leaves[0].grad, ref_leaves[0].grad, dx_bound, N + 8),
                                      ("dA", leaves[3].grad, ref_leaves[3].grad, Aa.grad, M + 8),
                                      ("dB", leaves[4].grad, ref_leaves[4].grad, Ba.grad, M + 8))[:3 if grads else 0]:
        assert_close(got, want, bound, dtype, n, "dora scaled " + name, record=False)
    inv = torch.where(norm > 0, 1 / norm.clamp_min(1e-300), torch.zeros_like(norm))
    dm_mag = (dy.double().abs() * inner.detach()).sum(0) * inv
    assert_close(leaves[5].grad, ref_leaves[5].grad, dm_mag, dtype, M + K + 8, "dora scaled dm", record=False)
    return y, ref


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,s,p", [(torch.float32, 1e4, 0.0), (torch.float32, 1e6, 0.25),
                                       (torch.float16, 1e6, 0.0), (torch.bfloat16, 1e4, 0.25)])
def test_low_rank_term_dominates_at_large_scales(monkeypatch, backend, dtype, s, p):
    """m = ||W_n|| (PEFT's initial value) with s up to 1e6: g ~ 1 / s and the low-rank term s x A B is far
    beyond the output (beyond fp16's range at 1e6); the output is in range and finite, fp32 within 1e-5."""
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    x, W, b, A, B, _ = _dora_inputs((M,), dtype, 4, adapter_dtype=torch.float32)
    m = torch.linalg.vector_norm(W.float(), dim=1)
    y, ref = _scaled_check(x, W, b, A, B, m, s, p, dtype)
    if dtype == torch.float32:
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,g,p", [(torch.float16, 1e-4, 0.0), (torch.float16, 1e-6, 0.25),
                                       (torch.bfloat16, 1e-6, 0.0)])
def test_small_g_keeps_the_low_rank_gradients_exact(monkeypatch, backend, dtype, g, p):
    """A magnitude ~1e-4 or ~1e-6 times the norm (g = m / norm that small, unit dY): g ⊙ dY lies among fp16's
    subnormals (below 2**-14, spacing 2**-24), yet dA, dB (PEFT's fp32 adapters on fp16; bf16 adapters on bf16)
    and dm keep the dtype's usual relative bound, since g enters them in fp32 as PEFT's fp32 magnitude does.
    dx (in x's dtype, as small as g) takes g ⊙ dY rounded once to x's dtype in its base term, as PEFT's dx does:
    in the subnormal range that rounding is absolute, at most half the smallest subnormal spacing u_s (2**-25 in
    fp16, 2**-134 in bf16) per element, which reaches dx through |W| (u_s * colsum |W|) and dx's own rounding
    (u_s): that is the absolute term its bound adds (bf16 and fp32 keep fp32's range: negligible there)."""
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    adapter = torch.float32 if dtype == torch.float16 else dtype
    x, W, b, A, B, _ = _dora_inputs((M,), dtype, 4, adapter_dtype=adapter)
    norm = reference.dora_weight_norm(W.double(), A.double(), B.double(), 0.9)
    m = (norm * g * (1.0 + 0.3 * torch.rand(N, dtype=torch.float64))).float()
    half_subnormal = torch.finfo(dtype).smallest_normal * UNIT_ROUNDOFF[dtype]
    floor = half_subnormal * (1.0 + W.double().abs().sum(0))
    _scaled_check(x, W, b, A, B, m, 0.9, p, dtype, dx_floor=floor)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.0), (torch.float32, 0.25), (torch.bfloat16, 0.0)])
def test_zero_norm_rows_give_g_one(monkeypatch, backend, dtype, p):
    """Rows where W_n + s (A B)^T_n = 0 (zero rows of W with B's column zero, as in a released MoE checkpoint
    and at initialisation): g = 1 there, the output is the plain LoRA output (finite, the bias), the magnitude
    gets no gradient on those rows, and the other rows are unchanged; merge_lora gives the same layer."""
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    x, W, b, A, B, m = _dora_inputs((M,), dtype, 4, adapter_dtype=torch.float32)
    zero = torch.tensor([0, 5, N - 1])
    W[zero] = 0
    B[:, zero] = 0
    y, ref = _scaled_check(x, W, b, A, B, m, 0.8, p, dtype)
    assert torch.isfinite(y).all()
    if p == 0:
        assert torch.equal(y[:, zero], b[zero].expand(M, -1).to(y.dtype))
    layer = LinearWithDoRA(nn.Linear(K, N).to(dtype), 4, 0.8)
    with torch.no_grad():
        layer.linear.weight.copy_(W)
        layer.linear.bias.copy_(b)
        layer.lora.A.copy_(A)
        layer.lora.B.copy_(B)
        layer.m.copy_(m)
    y_layer = layer.eval()(x).detach()
    merge_lora(layer)
    assert torch.isfinite(layer.linear.weight).all()
    assert torch.equal(layer.linear.weight[zero], W[zero])
    ref_eval = reference.dora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), m.double(), 0.8)
    mag = linear_magnitude(x, layer.linear.weight, b) + linear_magnitude(x, W, b)
    assert_close(layer(x).detach(), ref_eval, mag, dtype, K + 8, "dora zero rows merged", record=False)
    assert_close(y_layer, ref_eval, mag, dtype, K + 8, "dora zero rows eval", record=False)


# --- LinearWithDoRA ----------------------------------------------------------------------------------------------
def _layer(dtype=torch.float32, bias=True, dropout=0.0):
    linear = nn.Linear(K, N, bias=bias).to(dtype)
    layer = LinearWithDoRA(linear, 4, 2.0, dropout=dropout, scaling="alpha/rank")
    with torch.no_grad():
        layer.lora.B.normal_(0, 0.5)
        layer.m.mul_(1.0 + 0.2 * torch.randn(N))
    return layer


def test_layer_initialises_m_to_the_row_norms_and_matches_hooked_path():
    linear = nn.Linear(K, N)
    layer = LinearWithDoRA(linear, 3, 1.0)
    assert layer.m.shape == (N,) and layer.m.dtype == torch.float32
    assert torch.allclose(layer.m, linear.weight.norm(dim=1))
    x = torch.randn(5, K)
    with torch.no_grad():
        assert torch.allclose(layer(x), linear(x), rtol=0, atol=1e-5 * linear(x).abs().max().item())
    layer = _layer()
    fused = layer(x)
    handle = layer.linear.register_forward_hook(lambda mod, inp, out: out)
    assert not layer.fused()
    hooked = layer(x)
    handle.remove()
    assert (fused - hooked).abs().max() <= 1e-5 * fused.abs().max()
    assert {n for n, _ in layer.named_parameters()} == {"linear.weight", "linear.bias", "lora.A", "lora.B", "m"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge(dtype):
    layer = _layer(dtype).eval()
    W = layer.linear.weight.detach().clone()
    x = torch.randn(6, K).to(dtype)
    with torch.no_grad():
        before = layer(x)
        merge_lora(layer)
        merged = layer(x)
    ref = reference.dora_linear(x.double(), W.double(), layer.linear.bias.double(), layer.lora.A.double(),
                                layer.lora.B.double(), layer.m.double(), layer.lora.scale, training=False)
    norm = reference.dora_weight_norm(W.double(), layer.lora.A.double(), layer.lora.B.double(), layer.lora.scale)
    g = layer.m.double() / norm
    mag = _formula(x.double().abs(), W.double().abs(), layer.linear.bias.double().abs(), layer.lora.A.double().abs(),
                   layer.lora.B.double().abs(), (g - 1).abs(), g.abs(), layer.lora.scale, None, 0.0)
    assert_close(merged, ref, mag, dtype, K + 4, "dora merged", record=False)
    assert_close(before, ref, mag, dtype, K + 4, "dora unmerged", record=False)
    # a merged layer's magnitude took no part in its forward: training it raises (A and B frozen here)
    layer.lora.A.requires_grad_(False), layer.lora.B.requires_grad_(False)
    with pytest.raises(RuntimeError, match="merged"):
        layer(x).float().sum().backward()
    unmerge_lora(layer)
    assert torch.equal(layer.linear.weight, W)
    y = layer(x)
    y.float().sum().backward()
    assert layer.m.grad is not None


def test_replace_mark_and_save_load_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 7))
    base = copy.deepcopy(model)
    replace_linear_with_lora(model, 2, 4.0, use_dora=True, dropout=0.1)
    assert all(isinstance(model[i], LinearWithDoRA) for i in (0, 2))
    model[0].m.requires_grad_(False)
    mark_only_lora_as_trainable(model)
    assert model[0].m.requires_grad and not model[0].linear.weight.requires_grad
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora.B.normal_()
            layer.m.mul_(1.5)
    sd = lora_state_dict(model)
    assert set(sd) == {f"{i}.{k}" for i in (0, 2) for k in ("lora.A", "lora.B", "m")}
    save_lora(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    load_lora(fresh, tmp_path / "a.safetensors")
    assert isinstance(fresh[0], LinearWithDoRA) and fresh[0].dropout == 0.1
    x = torch.randn(4, K)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # the file's kind must match an already wrapped layer
    lora_model = replace_linear_with_lora(copy.deepcopy(base), 2, 4.0)
    with pytest.raises(ValueError, match="use_dora"):
        load_lora(lora_model, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="use_dora"):
        replace_linear_with_lora(copy.deepcopy(base), 2, 4.0, use_dora="yes")


# --- PEFT interop ------------------------------------------------------------------------------------------------
def test_patched_peft_dora_matches_peft_with_a_shared_mask():
    p = 0.25   # a multiple of 1/256: the kernels apply it exactly (philox.quantize), as PEFT's dropout does
    model, layer = _peft_dora(K, N, 4, True, p, dtype=torch.float32)
    model.train()
    reference_model = copy.deepcopy(model)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.0"] and report.skipped == {}
    x = torch.randn(M, K)
    reference_model.base_model.model[0].lora_dropout["default"] = _MaskDropout(_mask(99, x.shape, p), p)
    dy = torch.randn(M, N)
    grads = []
    for mod, seed in ((model, 99), (reference_model, None)):
        if seed is not None:
            torch.manual_seed(seed)
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        lay = mod.base_model.model[0]
        grads.append([y, xi.grad, lay.lora_A["default"].weight.grad, lay.lora_B["default"].weight.grad,
                      lay.lora_magnitude_vector["default"].weight.grad])
    for name, ours, theirs in zip(("y", "dx", "dA", "dB", "dm"), *grads):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), name


def test_peft_files_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model, layer = _peft_dora(K, N, 4, True, 0.0, dtype=torch.float32)
    model.eval()
    model.save_pretrained(tmp_path / "theirs")
    base = nn.Sequential(nn.Linear(K, N))
    base.load_state_dict({"0.weight": layer.base_layer.weight, "0.bias": layer.base_layer.bias})
    ours = load_peft_adapter(copy.deepcopy(base).requires_grad_(False), tmp_path / "theirs")
    assert isinstance(ours[0], LinearWithDoRA)
    assert torch.equal(ours[0].m, layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, K)
    with torch.no_grad():
        expected = model(x)
        assert (ours.eval()(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    save_peft_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert again.peft_config["default"].use_dora
    with torch.no_grad():
        assert (again(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    # a DoRA adapter does not load into LoRA layers, nor a mixed model save
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(replace_linear_with_lora(copy.deepcopy(base), 4, 1.0), tmp_path / "theirs")
    mixed = nn.Sequential(LinearWithDoRA(nn.Linear(K, N), 2, 1.0), LinearWithLoRA(nn.Linear(N, 3), 2, 1.0))
    with pytest.raises(ValueError, match="use_dora"):
        save_peft_adapter(mixed, tmp_path / "mixed")


# --- bad input and memory ----------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    x, W, b, A, B, m = _dora_inputs((4,), torch.float32, 2)
    with pytest.raises(ValueError, match=r"magnitude: expected shape \(out_features=29,\)"):
        dora_linear(x, W, b, A, B, m[:-1], 1.0)
    with pytest.raises(TypeError, match="magnitude: expected A's dtype"):
        dora_linear(x, W, b, A, B, m.half(), 1.0)
    with pytest.raises(ValueError, match="magnitude: expected a 1-D tensor"):
        dora_linear(x, W, b, A, B, m[None], 1.0)
    with pytest.raises(ValueError, match="magnitude: expected a tensor on x's device"):
        dora_linear(x, W, b, A, B, m.to("meta"), 1.0)
    with pytest.raises(TypeError, match="magnitude: expected a torch.Tensor"):
        dora_linear(x, W, b, A, B, [1.0] * N, 1.0)
    with pytest.raises(ValueError, match="rank"):
        LinearWithDoRA(nn.Linear(K, N), 0, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, W, b, A, B, m, 1.0, dropout_p=1.5)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_no_more_than_peft(p):
    from bench.saved import saved_bytes

    model, layer = _peft_dora(64, 48, 8, True, p, dtype=torch.bfloat16)
    # PEFT's default: fp32 adapters and magnitude on a bf16 base
    layer.lora_A.float(), layer.lora_B.float(), layer.lora_magnitude_vector.float()
    model.train()
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    params = [q for q in model.parameters()]
    peft_bytes, _, y_peft = saved_bytes(model, x.clone().requires_grad_(), params)
    patch_peft(model)
    ours_bytes, ours_tensors, y_ours = saved_bytes(model, x.clone().requires_grad_(), params)
    # ours: x (bf16), S (M x r fp32), V (M x N bf16), g (N fp32), with dropout the keep-mask's bits (M rows of
    # philox.mask_row_bytes(64) = 16 bytes: ceil(64 / 8) rounded up to 16)
    expected = 40 * 64 * 2 + 40 * 8 * 4 + 40 * 48 * 2 + 48 * 4 + (40 * 16 if p else 0)
    assert ours_bytes == expected, ours_tensors
    assert ours_bytes <= peft_bytes


# --- bench rows --------------------------------------------------------------------------------------------------
def test_bench_rows_meta_saved_bytes_and_cost_model():
    from bench import accuracy, cost_model, saved

    pytest.importorskip("peft")
    # meta against the interpreter (python -m bench checks PEFT's rows the same way)
    assert saved.check_meta_against_real(["lora-fast-dora"], shape=(48, 40, 24, 4)) == []
    for p in (0.0, 0.1):
        ours = saved.measure("lora-fast-dora", 48, 40, 24, 4, torch.bfloat16, p, True)[0]
        # x, S, V, g and with dropout the keep-mask's bits (48 rows of 16 bytes: 40 columns, rows padded to 16)
        assert ours == 2 * 48 * 40 + 4 * 48 * 4 + 2 * 48 * 24 + 4 * 24 + (48 * 16 if p else 0)
        assert ours <= saved.measure("peft-dora", 48, 40, 24, 4, torch.bfloat16, p, True)[0]
    errors = accuracy.errors("lora-fast-dora", torch.float32, shapes=((37, 45, 29, 3, True),))
    assert set(errors) == {"y", "dx", "dA", "dB"} and max(errors.values()) < 1e-5
    # the roofline model (no GPU here): H200 ceilings, bf16, M = 8192, r = 16, 4096 -> 4096, dropout 0
    h200 = (790e12, 4.3e12)

    def bound(impl):
        return cost_model.bound(impl, "full", 8192, 4096, 4096, 16, "bfloat16", *h200)

    # the fp32 unscaled sum (written and read once: no 16-bit overflow, no cancelling (g - 1) term) and the norm
    # pass over W on every call
    assert bound("lora-fast-dora") / bound("lora-fast") == pytest.approx(1.155, abs=0.01)
    assert bound("peft-dora") / bound("lora-fast-dora") == pytest.approx(1.52, abs=0.01)


# --- QDoRA: DoRA on a bitsandbytes 4-bit base --------------------------------------------------------------------
def _linear4bit(in_f, out_f, compute_dtype, quant_type, nested, blocksize):
    bnb = pytest.importorskip("bitsandbytes")
    plain = nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(plain.state_dict())
    layer.weight.blocksize = blocksize
    layer = layer.to("cpu")
    assert layer.weight.quant_state.blocksize == blocksize
    return layer


def _truth_4bit(lin, x, A, B, m, s):
    """float64 DoRA on the weight dequantized by the layout's definition (reference_4bit.dequantize: no
    bitsandbytes CPU kernel in the truth), its leaves (x, A, B, m) and the leaves (|x|, |A|, |B|) of the
    magnitude bound |g| ⊙ (|x| |W|^T + |s| |x| |A| |B|) + |b|, with the bound of dm per output feature."""
    W = reference_4bit.dequantize(lin.weight.data, lin.weight.quant_state).double()
    b = lin.bias.detach().double()
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, m)]
    y = reference.dora_linear(leaves[0], W, b, leaves[1], leaves[2], leaves[3], s)
    norm = reference.dora_weight_norm(W, A.double(), B.double(), s)
    g = reference.dora_scale(m.detach().double(), norm)
    abs_leaves = [t.detach().double().abs().requires_grad_() for t in (x, A, B)]
    inner = abs_leaves[0] @ W.abs().t() + abs(s) * (abs_leaves[0] @ abs_leaves[1] @ abs_leaves[2])
    return y, leaves, g.abs() * inner + b.abs(), abs_leaves, inner, norm


def _check_4bit_grads(y, dy, truth, leaves, mag, abs_leaves, inner, norm, got, dtype, K_, N_):
    """got: (dx, dA, dB, dm) against the float64 truth's gradients within the bounds of |dY| through the formula."""
    truth.backward(dy.double())
    mag.backward(dy.double().abs())
    rows = dy.shape[0]
    bounds = (abs_leaves[0].grad, abs_leaves[1].grad, abs_leaves[2].grad,
              (dy.double().abs() * inner.detach()).sum(0) / norm)
    for name, g_, want, bound, n in zip(("dx", "dA", "dB", "dm"), got, [t.grad for t in leaves], bounds,
                                        (N_ + 8, rows + 8, rows + 8, rows + K_ + 8)):
        assert g_ is not None, name
        assert_close(g_, want, bound, dtype, n, "qdora " + name, record=False)


def _loaded_in_4bit(lin):
    model = nn.Sequential(lin)
    model.is_loaded_in_4bit = True   # what transformers sets: PEFT then wraps with its bnb.Linear4bit class
    return model


QDORA_CONFIGS = [(torch.float32, "nf4", False, 64), (torch.bfloat16, "fp4", True, 128),
                 (torch.float16, "nf4", True, 32)]


@pytest.mark.parametrize("compute,quant_type,nested,blocksize", QDORA_CONFIGS)
def test_qdora_patch_peft_matches_float64_and_peft(compute, quant_type, nested, blocksize):
    """PEFT's DoRA on a Linear4bit, patched onto dora_linear_4bit (kernels under the interpreter): the output and
    the gradients of x, A, B and the magnitude against float64 on the dequantized weight; PEFT's own forward
    against the same truth as the anchor."""
    peft = pytest.importorskip("peft")
    Kq, Nq, R = 128, 24, 4
    lin = _linear4bit(Kq, Nq, compute, quant_type, nested, blocksize)
    model = peft.get_peft_model(_loaded_in_4bit(lin), peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0"],
                                                                     use_dora=True))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, R ** -0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.randn(Nq))
    x = torch.randn(9, Kq).to(compute)
    A_mod, B_mod = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag_mod = layer.lora_magnitude_vector["default"].weight
    s = layer.scaling["default"]
    truth, leaves, mag, abs_leaves, inner, norm = _truth_4bit(lin, x, A_mod.t(), B_mod.t(), mag_mod, s)
    with torch.no_grad():
        y_peft = model(x)
    # PEFT adds (g - 1) ⊙ base + g ⊙ s x A B to the rounded base output: the base output's roundings enter with
    # weight 1 and |g - 1| (not g), so its magnitude is (|g| + 1) ⊙ inner + |b| (a wrong formula still errs by
    # O(1) relative, hundreds of times this bound); ours is bounded by |g| ⊙ inner + |b| below
    g = reference.dora_scale(mag_mod.detach().double(), norm)
    peft_mag = (g.abs() + 1) * inner.detach() + lin.bias.detach().double().abs()
    assert_close(y_peft, truth.detach(), peft_mag, compute, Kq + R, "peft qdora forward", record=False)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.0"], report.skipped
    xl = x.clone().requires_grad_()
    y = model(xl)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    y.backward(dy)
    assert y.dtype == x.dtype
    assert_close(y, truth.detach(), mag.detach(), compute, Kq + R, "qdora forward", record=False)
    _check_4bit_grads(y, dy, truth, leaves, mag, abs_leaves, inner, norm,
                      (xl.grad, A_mod.grad.t(), B_mod.grad.t(), mag_mod.grad), compute, Kq, Nq)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_qdora_layer_wraps_4bit_bases(monkeypatch, tmp_path, backend):
    """replace_linear_with_lora(use_dora=True) on a Linear4bit: m = ||deq(W)_n|| (not the packed bytes), the
    output and gradients against float64 on both backends, merge refused by name, and a PEFT DoRA adapter
    saved from a 4-bit model loads into a 4-bit model (load_peft_adapter) with the same outputs."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    Kq, Nq, R = 64, 24, 3
    lin = _linear4bit(Kq, Nq, torch.float32, "nf4", True, 64)
    model = replace_linear_with_lora(nn.Sequential(copy.deepcopy(lin)), R, 1.5, use_dora=True)
    layer = model[0]
    assert isinstance(layer, LinearWithDoRA)
    _, _, _, _, _, norm0 = _truth_4bit(lin, torch.zeros(1, Kq), layer.lora.A, layer.lora.B, layer.m, 1.5)
    assert (layer.m.double() - norm0).abs().max() <= 2.0**-24 * (Kq + 4) * norm0.max()
    with torch.no_grad():
        layer.lora.B.normal_(0, R ** -0.5)
        layer.m.mul_(1.0 + 0.3 * torch.randn(Nq))
    x = torch.randn(7, Kq).requires_grad_()
    truth, leaves, mag, abs_leaves, inner, norm = _truth_4bit(lin, x, layer.lora.A, layer.lora.B, layer.m, 1.5)
    y = model(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(y, truth.detach(), mag.detach(), torch.float32, Kq + R, "qdora layer forward", record=False)
    _check_4bit_grads(y, dy, truth, leaves, mag, abs_leaves, inner, norm,
                      (x.grad, layer.lora.A.grad, layer.lora.B.grad, layer.m.grad), torch.float32, Kq, Nq)
    with pytest.raises(ValueError, match="4-bit base"):
        merge_lora(model)
    # a Linear4bit not quantized yet (bitsandbytes quantizes on the move to a device): m waits for the move
    bnb = pytest.importorskip("bitsandbytes")
    early = LinearWithDoRA(bnb.nn.Linear4bit(Kq, Nq, compute_dtype=torch.float32), R, 1.5)
    with pytest.raises(RuntimeError, match="not quantized yet"):
        early.initialize_magnitude()
    early.to("cpu")
    with pytest.raises(RuntimeError, match="magnitude m is not initialised"):
        early(x)
    early.initialize_magnitude()
    assert torch.isfinite(early(x)).all()
    # PEFT's own DoRA adapter on the same 4-bit layer, saved and loaded into a fresh 4-bit model
    theirs = peft.get_peft_model(_loaded_in_4bit(copy.deepcopy(lin)),
                                 peft.LoraConfig(r=R, lora_alpha=6, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        theirs.base_model.model[0].lora_B["default"].weight.normal_(0, R ** -0.5)
        theirs.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.randn(Nq))
    theirs.save_pretrained(tmp_path / "qdora")
    ours = load_peft_adapter(nn.Sequential(copy.deepcopy(lin)), tmp_path / "qdora")
    assert isinstance(ours[0], LinearWithDoRA)
    xe = torch.randn(5, Kq)
    plin = theirs.base_model.model[0]
    truth, _, mag, _, _, _ = _truth_4bit(lin, xe, plin.lora_A["default"].weight.t(),
                                         plin.lora_B["default"].weight.t(),
                                         plin.lora_magnitude_vector["default"].weight, plin.scaling["default"])
    with torch.no_grad():
        assert_close(ours.eval()(xe), truth.detach(), mag.detach(), torch.float32, Kq + R, "qdora loaded",
                     record=False)


def _snapshot(model):
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    state = {k: v if isinstance(v, nn.parameter.UninitializedParameter) else v.detach().clone() for k, v in tensors}
    return [(n, type(m)) for n, m in model.named_modules()], state


def _assert_unchanged(model, snap):
    modules, state = _snapshot(model)
    assert modules == snap[0]
    assert state.keys() == snap[1].keys()
    for k, v in state.items():
        assert v is snap[1][k] if isinstance(v, nn.parameter.UninitializedParameter) else torch.equal(v, snap[1][k])


@pytest.mark.parametrize("use_dora", [False, True])
def test_failed_wrap_leaves_the_model_as_it_was(use_dora):
    """A layer that cannot be wrapped (an uninitialised LazyLinear after a plain one; for DoRA, a 4-bit base in
    a layout lora-fast does not read) raises before any layer is replaced: module types and state unchanged."""
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.LazyLinear(5))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="not initialised"):
        replace_linear_with_lora(model, 4, 1.0, use_dora=use_dora)
    _assert_unchanged(model, snap)
    if use_dora:
        model = nn.Sequential(nn.Linear(K, N), _linear4bit(N, 64, torch.float32, "nf4", False, 64))
        model[1].weight.quant_state.packing_format_for_cpu = True
        snap = _snapshot(model)
        with pytest.raises(ValueError, match="CPU-specific packing"):
            replace_linear_with_lora(model, 4, 1.0, use_dora=True)
        _assert_unchanged(model, snap)


def test_failed_peft_dora_load_leaves_the_model_as_it_was(tmp_path):
    """load_peft_adapter of a DoRA adapter whose second target cannot be wrapped (a 4-bit base in a layout
    lora-fast does not read): the error comes before the first layer is wrapped."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(K, N), nn.Linear(N, 64)),
                                 peft.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")
    model = nn.Sequential(nn.Linear(K, N), _linear4bit(N, 64, torch.float32, "nf4", False, 64))
    model[1].weight.quant_state.packing_format_for_cpu = True
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="CPU-specific packing"):
        load_peft_adapter(model, tmp_path / "dora")
    _assert_unchanged(model, snap)


def _dequantize_by_definition(qweight, quant_state):
    """float64 deq(W) from the layout's definition (kernels/nf4.py's docstring), independent of bitsandbytes'
    CPU dequantize_4bit (wrong for blocks that straddle rows in 0.50.2): element i of the row-major (N, K) weight
    is code_table[nibble i] * absmax[i // blocksize], rounded to the quantized dtype; nested absmax =
    code2[q] * absmax2[j // blocksize2] + offset (each step rounded in fp32)."""
    from lora_fast.qlora import Packed4bit

    packed = Packed4bit.from_bitsandbytes(qweight, quant_state)
    N, K = packed.shape
    data = packed.data.to(torch.int64)
    codes = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:N * K]
    if packed.nested:
        absmax = (packed.code2[packed.absmax.to(torch.int64)]
                  * packed.absmax2[torch.arange(packed.absmax.numel()) // packed.blocksize2]) + packed.offset
    else:
        absmax = packed.absmax.to(torch.float32)
    flat = packed.code[codes] * absmax[torch.arange(N * K) // packed.blocksize]
    return flat.to(packed.dtype).double().view(N, K)


@pytest.mark.parametrize("nested", [False, True])
def test_qdora_blocks_straddling_rows(nested):
    """in_features 48 at blocksize 64 (blocks straddle rows: the kernels' per-element path, norm and GEMMs):
    dora_linear_4bit against float64 on the weight dequantized by the layout's definition."""
    Kq, Nq, R = 48, 20, 3
    lin = _linear4bit(Kq, Nq, torch.float32, "nf4", nested, 64)
    W = _dequantize_by_definition(lin.weight, lin.weight.quant_state)
    A = (torch.randn(Kq, R) / Kq ** 0.5).requires_grad_()
    B = (torch.randn(R, Nq) / R ** 0.5).requires_grad_()
    m = (torch.linalg.vector_norm(W, dim=1).float() * (1 + 0.3 * torch.randn(Nq))).requires_grad_()
    x = torch.randn(6, Kq).requires_grad_()
    bias = lin.bias.detach()
    y = dora_linear_4bit(x, lin.weight, lin.weight.quant_state, bias, A, B, m, 0.9)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, m)]
    truth = reference.dora_linear(leaves[0], W, bias.double(), leaves[1], leaves[2], leaves[3], 0.9)
    norm = reference.dora_weight_norm(W, A.double(), B.double(), 0.9)
    g = reference.dora_scale(m.detach().double(), norm)
    abs_leaves = [t.detach().double().abs().requires_grad_() for t in (x, A, B)]
    inner = abs_leaves[0] @ W.abs().t() + 0.9 * (abs_leaves[0] @ abs_leaves[1] @ abs_leaves[2])
    mag = g.abs() * inner + bias.double().abs()
    assert_close(y, truth.detach(), mag.detach(), torch.float32, Kq + R, "qdora straddling forward", record=False)
    _check_4bit_grads(y, dy, truth, leaves, mag, abs_leaves, inner, norm, (x.grad, A.grad, B.grad, m.grad),
                      torch.float32, Kq, Nq)


# --- the keep-mask drawn once per step (issue 28) -----------------------------------------------------------------
@pytest.mark.parametrize("base", ["16-bit", "4-bit"])
def test_backward_reads_the_saved_bits(base):
    """With dropout the forward's x A pass stores the keep-mask as bits (philox.pack_keep_mask's layout, the torch
    mirror's mask bit for bit), saved for backward instead of the seed; the backward's masked add and dA pass
    read them (no Philox): one flipped saved bit changes dX in exactly that element and dA in exactly that row,
    to the float64 reference's values with the flipped mask; dB and dm do not read the mask."""
    M_, K_, N_, R, p, s = 23, 64, 29, 4, 0.3, 1.5
    x, b = torch.randn(M_, K_), torch.randn(N_)
    W = torch.randn(N_, K_) / K_**0.5
    A, B = torch.randn(K_, R) / K_**0.5, torch.randn(R, N_) / R**0.5
    if base == "4-bit":
        bnb_functional = pytest.importorskip("bitsandbytes.functional")
        qweight, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
        W = reference_4bit.dequantize(qweight, state).to(torch.float32)
    m = (reference.dora_weight_norm(W, A, B, s) * (1.0 + 0.3 * torch.randn(N_))).to(A.dtype)
    dy = torch.randn(M_, N_)
    m0, k0 = int(torch.randint(M_, ())), int(torch.randint(K_, ()))

    def forward(x_, A_, B_, m_):
        if base == "4-bit":
            return dora_linear_4bit(x_, qweight, state, b, A_, B_, m_, s, dropout_p=p)
        return dora_linear(x_, W, b, A_, B_, m_, s, dropout_p=p)

    def run(flip):
        return saved_bits_and_grads(forward, (x, A, B, m), dy, (m0, k0) if flip else None)

    (bits,), grads = run(False)
    _, flipped = run(True)
    mask = _mask(5, x.shape, p)
    used = -(-K_ // 8)   # the mask's bytes per row (the row's padding bytes are never read)
    assert bits.shape == (M_, philox.mask_row_bytes(K_))
    assert torch.equal(bits[:, :used], philox.pack_keep_mask(mask)[:, :used])
    (dx, dA, dB, dm), (fdx, fdA, fdB, fdm) = grads, flipped
    assert (dx != fdx).nonzero().tolist() == [[m0, k0]]
    assert (dA != fdA).any(1).nonzero().flatten().tolist() == [k0]
    assert torch.equal(dB, fdB) and torch.equal(dm, fdm)
    # the flipped run's dX and dA: the float64 reference's with the flipped mask (g does not depend on the mask)
    mask[m0, k0] = ~mask[m0, k0]
    pq = philox.quantize(p)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, A)]
    ref = reference.dora_linear(ref_leaves[0], W.double(), b.double(), ref_leaves[1], B.double(), m.double(), s,
                                dropout_p=pq, training=True, dropout_mask=mask)
    ref.backward(dy.double())
    g = m.double() / reference.dora_weight_norm(W.double(), A.double(), B.double(), s)
    abs_leaves = [t.detach().double().abs().requires_grad_() for t in (x, W, b, A, B)]
    mag = _formula(*abs_leaves, (g - 1).abs(), g.abs(), abs(s), mask, pq)
    mag.backward(dy.double().abs())
    assert_close(fdx, ref_leaves[0].grad, abs_leaves[0].grad, torch.float32, N_ + R, "dora dx, flipped bit")
    assert_close(fdA, ref_leaves[1].grad, abs_leaves[3].grad, torch.float32, M_, "dora dA, flipped bit")


@pytest.mark.parametrize("base", ["16-bit", "4-bit"])
def test_checkpointing_recomputes_the_same_mask(base):
    """Activation checkpointing re-runs the forward under the same RNG state: the S pass draws the same seed and
    stores the same bits, so every gradient equals the plain run's bit for bit."""
    M_, K_, N_, R, p, s = 19, 64, 24, 4, 0.3, 1.5
    x = torch.randn(M_, K_)
    W = torch.randn(N_, K_) / K_**0.5
    A, B = torch.randn(K_, R) / K_**0.5, torch.randn(R, N_)
    if base == "4-bit":
        bnb_functional = pytest.importorskip("bitsandbytes.functional")
        qweight, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
        W = reference_4bit.dequantize(qweight, state).to(torch.float32)
    m = reference.dora_weight_norm(W, A, B, s) * (1.0 + 0.3 * torch.rand(N_))
    dy = torch.randn(M_, N_)

    def op(x_, A_, B_, m_):
        if base == "4-bit":
            return dora_linear_4bit(x_, qweight, state, None, A_, B_, m_, s, dropout_p=p)
        return dora_linear(x_, W, None, A_, B_, m_, s, dropout_p=p)

    def step(checkpoint):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
        torch.manual_seed(11)
        y = torch.utils.checkpoint.checkpoint(op, *leaves, use_reentrant=False) if checkpoint else op(*leaves)
        y.backward(dy)
        return [t.grad for t in leaves]

    for g1, g2 in zip(step(False), step(True)):
        assert torch.equal(g1, g2)
