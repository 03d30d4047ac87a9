"""The TMA variant of the 4-bit GEMM (kernels/nf4.py ``gemm_4bit_lowrank_tma_kernel``, opt-in:
LORA_FAST_GEMM_4BIT=tma): the same truths as tests/test_qlora.py (the layout's definition,
``reference_4bit.dequantize``, bit for bit; the float64 reference on it), in the forward and dX layouts, NF4 and
FP4, flat and nested absmax, with more output tiles than programs; and the host-side fallback to the cp.async
kernel for operands its tensor descriptors cannot take. Under the interpreter the descriptors are emulated (the
persistent loop on 2 "SMs", 32 x 32 x 32 tiles unless a test widens them)."""

import dataclasses

import pytest
import torch

from lora_fast import select_backend

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit paths need bitsandbytes (extras: qlora, test)")

from lora_fast.kernels import choice, ops_4bit  # noqa: E402
from lora_fast.qlora import GEMM_4BIT_OPT_IN, Packed4bit, gemm_4bit_path  # noqa: E402
from tests.test_qlora import _dequantize, _identity_probes, _quantize, check_4bit_op  # noqa: E402


@pytest.fixture(autouse=True)
def _tma_path(device, monkeypatch):
    assert select_backend(torch.empty(1, device=device)) == "triton"
    monkeypatch.setenv("LORA_FAST_GEMM_4BIT", "tma")


@pytest.fixture
def tma_calls(monkeypatch):
    """The layouts (True: forward, False: dX) the TMA variant was launched for, in order."""
    calls = []
    real = ops_4bit._gemm_4bit_tma

    def spy(P, packed, transpose, *args):
        calls.append(transpose)
        return real(P, packed, transpose, *args)
    monkeypatch.setattr(ops_4bit, "_gemm_4bit_tma", spy)
    return calls


def _on_hopper_or_interpreted(device):
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


# (quant, tile): the interpreter's 32-wide tiles (one absmax per tile row in both layouts; the absmax by loads: 2
# codes per row), and 64-wide tiles over blocks of 32 (two absmax groups per tile row: the forward's BLOCK_K and
# dX's BLOCK_N; the absmax by TMA, 4 fp32 per row)
TILE_CASES = [(("nf4", 64, True), None), (("fp4", 32, False), 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TILE_CASES, ids=str)
def test_tma_tiles_dequantize_bit_for_bit(dtype, case, device, monkeypatch, tma_calls):
    """x = I: the forward returns deq(W)^T; dY = I: dX returns deq(W) (products with 0 and 1, sums of zeros:
    exact), bit for bit against the layout's definition. N = 40 (a partial tile of rows; dY's rows of 80 bytes
    suit a descriptor), K = 128 (4 or 2 tiles along K, 8 or 2 output tiles on 2 programs)."""
    quant, tile = case
    if tile is not None:
        if device.type == "cuda":
            pytest.skip("tile sizes are forced only under the interpreter (a GPU autotunes them)")
        for launcher in (ops_4bit._gemm_tma_fwd, ops_4bit._gemm_tma_dx):
            monkeypatch.setattr(launcher, "interp_config", dict(launcher.interp_config, BLOCK_N=tile, BLOCK_K=tile))
    N, K, R = 40, 128, 3
    qweight, state = _quantize(N, K, dtype, *quant, device)
    weight = _dequantize(qweight, state)
    assert ops_4bit.absmax_box(Packed4bit.from_bitsandbytes(qweight, state)) == (4 if quant[1] == 32 else 0)
    _identity_probes(qweight, state, weight, N, K, R, dtype, device)
    if _on_hopper_or_interpreted(device):
        assert tma_calls == [True, True, False], "the forwards and dX did not all run the TMA variant"


# (dtype, bias, dropout_p, quant, in_features, absmax box): every quant type and nesting, both 16-bit dtypes, dX
# with its keep-mask; the absmax by loads (rows of 1 or 2 values) and by TMA (rows of 4 fp32, of 16 uint8 codes)
CASES = [(torch.float16, True, 0.0, ("nf4", 64, True), 128, 0),
         (torch.bfloat16, False, 0.25, ("fp4", 128, False), 128, 0),
         (torch.bfloat16, True, 0.1, ("nf4", 32, False), 128, 4),
         (torch.float16, False, 0.3, ("fp4", 64, True), 128, 0),
         (torch.bfloat16, True, 0.2, ("nf4", 32, True), 512, 16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-bias={c[1]}-p={c[2]}-{c[3]}-K={c[4]}")
def test_tma_matches_float64(case, device, tma_calls):
    """The op on the TMA variant (forward and backward) against float64 on the defined weight: x (2, 35, K),
    70 rows in 3 tiles by 2 column tiles (40 outputs) walked by 2 programs; dX's K columns in 4 or 16 tiles."""
    dtype, bias_on, p, quant, K, box = case
    N, R = 40, 5
    qweight, state = _quantize(N, K, dtype, *quant, device)
    assert ops_4bit.absmax_box(Packed4bit.from_bitsandbytes(qweight, state)) == box
    x = torch.randn(2, 35, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype) if bias_on else None
    A = (torch.randn(K, R, device=device) / K**0.5).to(dtype)
    B = (torch.randn(R, N, device=device) / R**0.5).to(dtype)
    check_4bit_op(x, qweight, state, bias, A, B, 1.5, p)
    if _on_hopper_or_interpreted(device):
        assert tma_calls == [True, False], "the forward and dX did not both run the TMA variant"


def test_tma_is_opt_in_and_checks_operands_on_the_host(device, monkeypatch):
    """"tma" is accepted by LORA_FAST_GEMM_4BIT and never timed by auto; ``tma_eligible_4bit`` takes 16-bit P with
    unit inner stride, 16-byte aligned base and rows, a weight of whole blocks in rows of a multiple of 32 codes."""
    assert "tma" in GEMM_4BIT_OPT_IN and "tma" not in choice.GEMM_4BIT.paths
    assert gemm_4bit_path(1) == gemm_4bit_path(10**6) == "tma"
    bf16 = torch.bfloat16
    packed = Packed4bit.from_bitsandbytes(*_quantize(40, 128, bf16, "nf4", 64, False, device))
    x = torch.randn(8, 128, device=device).to(bf16)
    hopper = _on_hopper_or_interpreted(device)
    assert ops_4bit.tma_eligible_4bit(x, packed) == hopper
    assert not ops_4bit.tma_eligible_4bit(x.float(), packed)                     # fp32: no TMA variant
    assert not ops_4bit.tma_eligible_4bit(torch.randn(8, 129, device=device).to(bf16)[:, 1:], packed)  # base + 2 B
    assert not ops_4bit.tma_eligible_4bit(torch.randn(8, 132, device=device).to(bf16)[:, :128], packed)  # 264 B rows
    assert not ops_4bit.tma_eligible_4bit(torch.randn(128, 8, device=device).to(bf16).t(), packed)   # column-major
    assert ops_4bit.tma_eligible_4bit(torch.randn(8, 136, device=device).to(bf16)[:, :128], packed) == hopper
    # rows that do not hold whole blocks (the per-element path); rows of 48 codes (24 bytes) in whole blocks of
    # 16, a block size bitsandbytes does not make (its smallest is 32), on a hand-made layout
    assert not ops_4bit.tma_eligible_4bit(torch.randn(8, 70, device=device).to(bf16),
                                          Packed4bit.from_bitsandbytes(*_quantize(40, 70, bf16, "nf4", 64, False,
                                                                                  device)))
    assert not ops_4bit.tma_eligible_4bit(x[:, :48], dataclasses.replace(packed, shape=(40, 48), blocksize=16))
    # the absmax by TMA where its (N, in_features / blocksize) rows are 16-byte multiples, from an aligned base
    assert ops_4bit.absmax_box(dataclasses.replace(packed, shape=(40, 128), blocksize=32)) == 4
    absmax = torch.randn(41 * 4, device=device).abs()
    assert ops_4bit.absmax_box(dataclasses.replace(packed, absmax=absmax[4:], blocksize=32)) == 4
    assert ops_4bit.absmax_box(dataclasses.replace(packed, absmax=absmax[1:161], blocksize=32)) == 0   # base + 4 B
    assert ops_4bit.absmax_box(dataclasses.replace(packed, absmax=absmax[::2], blocksize=32)) == 0     # strided
    codes = torch.zeros(40 * 16, dtype=torch.uint8, device=device)
    assert ops_4bit.absmax_box(dataclasses.replace(packed, absmax=codes, shape=(40, 512), blocksize=32)) == 16
    assert ops_4bit.absmax_box(dataclasses.replace(packed, absmax=codes, shape=(40, 256), blocksize=32)) == 0


@pytest.mark.parametrize("shape", [(37, 70, "nf4", 64), (37, 128, "fp4", 64)], ids=str)
def test_tma_falls_back_to_the_cp_async_kernel(shape, device, tma_calls):
    """Forced "tma" where descriptors cannot serve: K = 70 (blocks across rows) in both layouts; N = 37, whose dY
    rows (74 bytes) are not 16-byte multiples, in dX only. The results are the cp.async kernel's (float64)."""
    N, K, quant_type, blocksize = shape
    dtype = torch.bfloat16
    qweight, state = _quantize(N, K, dtype, quant_type, blocksize, True, device)
    x = torch.randn(19, K, device=device).to(dtype)
    A = (torch.randn(K, 4, device=device) / K**0.5).to(dtype)
    B = (torch.randn(4, N, device=device) / 2).to(dtype)
    check_4bit_op(x, qweight, state, None, A, B, 1.5, 0.2)
    expected = [] if K % blocksize or not _on_hopper_or_interpreted(device) else [True]
    assert tma_calls == expected
