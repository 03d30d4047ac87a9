"""LoRA dropout fused into the kernels: statistics, exactness against the reference with the same mask,
eval mode, memory saved for backward, and gradient checkpointing."""

import math

import pytest
import torch
import torch.utils.checkpoint

from lora_fast import LinearWithLoRA, lora_linear, philox, reference
from lora_fast.kernels import dropout_keep_mask
from tests.utils import assert_close, check_op, linear_magnitude, make_inputs, reference_grads, saved_bits_and_grads


def _seeded_op(p, seed_value):
    """lora_linear whose dropout seed is the one the test also hands to dropout_keep_mask."""
    def op(x, w, b, A, B, scale):
        torch.manual_seed(seed_value)
        return lora_linear(x, w, b, A, B, scale, dropout_p=p)
    return op


def _mask_for(seed_value, x, p):
    """The mask the op draws after torch.manual_seed(seed_value): the seed is its first draw on x's device."""
    torch.manual_seed(seed_value)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    K = x.shape[-1]
    return dropout_keep_mask(seed, x.numel() // K, K, p).view(x.shape)


def _binomial_ok(kept, p):
    rate, n = kept.float().mean().item(), kept.numel()
    return abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), rate    # 5 standard deviations


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p, device):
    """The kernels' keep-mask (the function every kernel calls) over 262,144 elements, and per Philox stream."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    keep = dropout_keep_mask(seed, 1024, 256, p)
    q = philox.quantize(p)          # the probability the uniform integers apply (within half a level of p)
    assert abs(q - p) <= 2.0 ** -(philox.UNIFORM_BITS + 1) and (q * 2**philox.UNIFORM_BITS).is_integer()
    ok, rate = _binomial_ok(keep, q)
    assert ok, rate
    # column k % PER_COUNTER == field comes from one field of one of randint4x's four words
    for field in range(philox.PER_COUNTER):
        ok, rate = _binomial_ok(keep[:, field::philox.PER_COUNTER], q)
        assert ok, (field, rate)
    # neighbouring elements are independent: the rate of (keep[k], keep[k+1]) both kept is (1-p)^2
    both = (keep[:, :-1] & keep[:, 1:]).float().mean().item()
    n = keep[:, :-1].numel()
    q = (1 - p) ** 2
    assert abs(both - q) <= 5 * math.sqrt(q * (1 - q) / n) * 2, both


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_op_keeps_and_scales_exactly(p, device):
    """Through the op: y = dropout(x) (W = 0, A = B = I), kept values scaled by exactly 1 / (1 - p)."""
    M, K = 2048, 16
    x = torch.randn(M, K, device=device)
    eye = torch.eye(K, device=device)
    y = lora_linear(x, torch.zeros(K, K, device=device), None, eye, eye, 1.0, dropout_p=p)
    kept = y != 0
    q = philox.quantize(p)
    ok, rate = _binomial_ok(kept, q)
    assert ok, rate
    # kept values scaled by exactly 1 / (1 - q), q the probability applied (one fp32 product, as torch does it)
    assert torch.equal(y[kept], (x * (1.0 / (1.0 - q)))[kept])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,K,N,R", [((37,), 123, 77, 3), ((2, 21), 64, 40, 16)], ids=str)
def test_matches_reference_with_the_same_mask(dtype, lead, K, N, R, device):
    p = 0.3
    inputs = make_inputs(lead, K, N, R, dtype, device)
    mask = _mask_for(1234, inputs[0], p)
    assert 0.6 < mask.float().mean().item() < 0.8
    check_op(_seeded_op(p, 1234), *inputs, scale=2.0, dropout_p=p, mask=mask)


def test_eval_mode_and_p_zero(device):
    layer = LinearWithLoRA(torch.nn.Linear(40, 30), 4, 2.0, dropout=0.5).to(device)
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(5, 40, device=device)
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    no_dropout = lora_linear(x, layer.linear.weight, layer.linear.bias, layer.lora.A, layer.lora.B, 2.0)
    assert torch.equal(y1, no_dropout)
    layer.train()
    t1, t2 = layer(x), layer(x)
    assert not torch.equal(t1, t2)
    with torch.no_grad():
        layer.lora.B.zero_()
    base = torch.nn.functional.linear(x, layer.linear.weight, layer.linear.bias)
    truth = x.double() @ layer.linear.weight.double().t() + layer.linear.bias.double()
    mag = linear_magnitude(x, layer.linear.weight, layer.linear.bias)
    for y in (layer(x), layer(x)):
        assert_close(y.detach(), truth, mag, torch.float32, 40, "B = 0 with dropout", record=False)
        assert_close(y.detach(), base.double(), mag, torch.float32, 2 * 40, "B = 0 vs F.linear", record=False)


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_saved_for_backward(device):
    """The usual LoRA case: x is an activation that needs a gradient, the base weight is frozen."""
    M, K, N, R = 96, 64, 48, 8
    x, w, b, A, B = make_inputs((M,), K, N, R, torch.float32, device)
    for t in (x, A, B):
        t.requires_grad_()
    on = _saved_bytes(lambda: lora_linear(x, w, b, A, B, 2.0, dropout_p=0.1))
    off = _saved_bytes(lambda: lora_linear(x, w, b, A, B, 2.0, dropout_p=0.0))
    ref_on = _saved_bytes(lambda: reference.lora_linear(x, w, b, A, B, 2.0, dropout_p=0.1))
    # the keep-mask as bits (rows of K / 8 bytes padded to 16) is all that dropout adds to what the fused op saves
    mask_bytes = M * philox.mask_row_bytes(K)
    assert mask_bytes == M * K // 8 + M * 8     # K = 64: 8 bytes of bits and 8 of padding per row
    assert on == off + mask_bytes
    # the reference keeps a mask and a dropped copy of x; the fused op keeps x and the bits
    assert ref_on - on >= M * K * x.element_size() - mask_bytes


def test_checkpointing_gives_the_same_mask(device):
    x, w, b, A, B = make_inputs((33,), 48, 40, 4, torch.float32, device)
    grads = []
    for checkpoint in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        torch.manual_seed(7)

        def f(x_, A_, B_):
            return lora_linear(x_, w, b, A_, B_, 2.0, dropout_p=0.4)

        y = torch.utils.checkpoint.checkpoint(f, *leaves, use_reentrant=False) if checkpoint else f(*leaves)
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_two_forward_calls_draw_different_masks(device):
    x = torch.randn(64, 32, device=device)
    eye = torch.eye(32, device=device)
    w = torch.zeros(32, 32, device=device)
    y1 = lora_linear(x, w, None, eye, eye, 1.0, dropout_p=0.5)
    y2 = lora_linear(x, w, None, eye, eye, 1.0, dropout_p=0.5)
    assert not torch.equal(y1 != 0, y2 != 0)


@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 64), (3, 4)])
def test_reference_mask_is_the_kernels_mask(shape, device):
    """lora_fast.philox (torch ops) evaluates the kernels' Philox keep-mask bit for bit, for any seed."""
    K = shape[-1]
    M = math.prod(shape[:-1])
    for p in (0.05, 0.5, 0.9):
        for seed in (torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device),
                     torch.tensor([2**62 - 1], dtype=torch.int64, device=device)):
            assert torch.equal(philox.keep_mask(seed, M, K, p), dropout_keep_mask(seed, M, K, p))


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_same_seed_same_mask_on_both_backends(p, device, monkeypatch):
    """One torch.manual_seed gives one dropout mask on the kernels and on the reference path: the outputs and the
    gradients of A agree to rounding (with p = 0.5 two different masks differ by O(1) here)."""
    x, w, b, A, B = make_inputs((4, 9), 24, 20, 4, torch.float32, device)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LORA_FAST_BACKEND", backend)
        leaf = A.clone().requires_grad_()
        torch.manual_seed(1234)
        y = lora_linear(x, w, b, leaf, B, 2.0, dropout_p=p)
        y.sum().backward()
        results[backend] = (y.detach(), leaf.grad)
    mask = _mask_for(1234, x, p)
    ref, ref_grads = reference_grads(x, w, b, A, B, 2.0, torch.ones(4, 9, 20, device=device), dropout_p=p, mask=mask)
    mag, mag_grads = reference_grads(x, w, b, A, B, 2.0, torch.ones(4, 9, 20, device=device), dropout_p=p, mask=mask,
                                     absolute=True)
    for backend, (y, dA) in results.items():
        assert_close(y, ref, mag, torch.float32, 24 + 4, f"{backend} forward", record=False)
        assert_close(dA, ref_grads[3], mag_grads[3], torch.float32, 36, f"{backend} dA", record=False)


def test_dropout_one_drops_everything(device):
    """p = 1 (valid for nn.Dropout and PEFT's lora_dropout): in training the LoRA term and the gradients of A and
    B are exactly zero on both backends; in eval the layer is the full LoRA layer."""
    x, w, b, A, B = make_inputs((6,), 16, 12, 3, torch.float32, device)
    truth = x.double() @ w.double().t() + b.double()
    for fn in (lora_linear, reference.lora_linear):
        leaves = [t.clone().requires_grad_() for t in (A, B)]
        y = fn(x, w, b, *leaves, 2.0, dropout_p=1.0)
        assert_close(y.detach(), truth, linear_magnitude(x, w, b), torch.float32, 16, "p = 1", record=False)
        y.sum().backward()
        assert torch.equal(leaves[0].grad, torch.zeros_like(A)) and torch.equal(leaves[1].grad, torch.zeros_like(B))
        assert torch.equal(fn(x, w, b, A, B, 2.0, dropout_p=1.0, training=False),
                           fn(x, w, b, A, B, 2.0, dropout_p=0.0))
    layer = LinearWithLoRA(torch.nn.Linear(16, 12).to(device), 3, 2.0, dropout=1.0)
    assert torch.isfinite(layer(x)).all()


def test_quantized_probability(device):
    """p is applied as the nearest multiple of 2**-UNIFORM_BITS: tiny p drops nothing, p near 1 drops all, and the
    op's output equals the reference's under the quantised p (the reference quantises the same way)."""
    levels = 2**philox.UNIFORM_BITS
    assert philox.quantize(0.5) == 0.5 and philox.quantize(1.0) == 1.0 and philox.quantize(0.0) == 0.0
    assert philox.quantize(0.4 / levels) == 0.0 and philox.quantize(1 - 0.4 / levels) == 1.0
    x = torch.randn(16, 32, device=device)
    eye = torch.eye(32, device=device)
    w = torch.zeros(32, 32, device=device)
    assert torch.equal(lora_linear(x, w, None, eye, eye, 1.0, dropout_p=0.4 / levels), x)
    assert torch.equal(lora_linear(x, w, None, eye, eye, 1.0, dropout_p=1 - 0.4 / levels), torch.zeros_like(x))


@pytest.mark.parametrize("path,dtype", [("triton", torch.float32), ("cublas", torch.float32),
                                        ("tma", torch.float16)], ids=str)
def test_backward_reads_the_saved_bits(path, dtype, device, monkeypatch):
    """The forward saves the keep-mask it drew as bits (philox.pack_keep_mask's layout), bit for bit the torch
    mirror's mask; the dX GEMM (each path) and the dA pass read those bits: one flipped bit changes dX in exactly
    that element and dA in exactly that row, to the float64 reference's values with the flipped mask."""
    from lora_fast.kernels import choice

    monkeypatch.setenv(choice.ENV, path)
    choice.clear()
    # K = 72: 9 bytes of bits per row, the last tile of each pass partial; 16-bit rows 16-byte aligned (TMA)
    M, K, N, R, p, scale = 37, 72, 40, 4, 0.3, 2.0
    x, w, b, A, B = make_inputs((M,), K, N, R, dtype, device)
    dy = torch.randn(M, N, device=device).to(dtype)
    m0, k0 = int(torch.randint(M, ())), int(torch.randint(K, ()))

    def run(flip):
        return saved_bits_and_grads(lambda x_, A_, B_: lora_linear(x_, w, b, A_, B_, scale, dropout_p=p), (x, A, B),
                                    dy, (m0, k0) if flip else None)

    try:
        (bits,), grads = run(False)
        _, flipped = run(True)
    finally:
        choice.clear()
    torch.manual_seed(5)
    mask = philox.keep_mask(reference.draw_seed(device), M, K, p)
    # the mask's bytes (ceil(K / 8) per row; the row's padding bytes are never read), padding bits 0
    used = -(-K // 8)
    assert bits.shape == (M, philox.mask_row_bytes(K))
    assert torch.equal(bits[:, :used], philox.pack_keep_mask(mask)[:, :used])
    assert torch.equal(philox.unpack_keep_mask(bits, K), mask)
    (dx, dA, dB), (fdx, fdA, fdB) = grads, flipped
    changed_x = (dx != fdx).nonzero().tolist()
    changed_a = (dA != fdA).any(1).nonzero().flatten().tolist()
    assert changed_x == [[m0, k0]] and changed_a == [k0] and torch.equal(dB, fdB)
    mask[m0, k0] = ~mask[m0, k0]
    _, ref = reference_grads(x, w, b, A, B, scale, dy, dropout_p=p, mask=mask)
    _, mag = reference_grads(x, w, b, A, B, scale, dy, dropout_p=p, mask=mask, absolute=True)
    assert_close(fdx, ref[0], mag[0], dtype, N + R, "dx, flipped bit", record=False)
    assert_close(fdA, ref[3], mag[3], dtype, M, "dA, flipped bit", record=False)
