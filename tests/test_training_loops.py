"""The op in modern training loops: torch.compile (no graph break), autocast, activation checkpointing,
determinism, CUDA graphs, DistributedDataParallel."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from lora_fast import LinearWithLoRA, lora_linear, replace_linear_with_lora
from tests.utils import assert_close, end_gloo_rank, make_inputs, spawn_gloo_ranks, write_atomically


def two_layer_model(device, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 24))
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=4, alpha=8, scaling="alpha/rank", dropout=dropout)
    for m in model.modules():
        if isinstance(m, LinearWithLoRA):
            nn.init.normal_(m.lora.B, std=0.2)
    return model.to(device)


def _run(model, x, seed):
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _compare(a, b, reduction, what):
    (ya, ga), (yb, gb) = a, b
    assert_close(ya, yb.double(), yb.double().abs().max().expand_as(yb), torch.float32, reduction, what,
                 record=False)
    for g1, g2 in zip(ga, gb):
        assert_close(g1, g2.double(), g2.double().abs().max().expand_as(g2), torch.float32, reduction, what,
                     record=False)


@pytest.mark.parametrize("backend_env,compiler", [("auto", "inductor"), ("reference", "aot_eager")])
def test_torch_compile_fullgraph(backend_env, compiler, device, monkeypatch):
    """fullgraph=True raises on any graph break; outputs and gradients equal eager's, dropout on."""
    if backend_env == "reference":
        monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = two_layer_model(device, dropout=0.25)
    x = torch.randn(2, 10, 32, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with inductor_config.patch(fallback_random=True):   # eager's RNG, so the same dropout seed
        _compare(_run(compiled, x, seed=5), _run(model, x, seed=5), 100, "compiled training")
    model.eval()
    with torch.no_grad():
        y_eager = model(x)
        y_compiled = compiled(x)
    _compare((y_compiled, []), (y_eager, []), 100, "compiled inference")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "empty batch"])
def test_custom_ops_return_the_layouts_their_fakes_declare(layout, device):
    """torch.compile (inductor) allocates and reads a custom op's outputs by the strides its fake declares, and
    asserts them: the real ops must return exactly those. Transposed factors (patch_peft's PEFT weights, a user's
    lora_A.weight.t()) once got gradients in their own layout from the real backward op and contiguous ones from its
    fake: inductor's size assert failed on a compiled patched model. The values are the eager kernels' bit for bit
    (the same kernels, other output buffers)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_fast import functional

    if functional.select_backend(torch.empty(1, device=device)) != "triton":
        pytest.skip("the custom ops run the kernels: the Triton backend is not available here")
    K, N, R, M = 24, 20, 4, 0 if layout == "empty batch" else 6
    x = torch.randn(M, 2 * K, device=device)[:, ::2] if layout != "contiguous" else torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device)
    if layout == "contiguous":
        A, B = torch.randn(K, R, device=device), torch.randn(R, N, device=device)
    elif layout == "sliced":   # rows of larger factors: neither dense nor contiguous
        A, B = torch.randn(2 * K, R, device=device)[::2], torch.randn(R, N + 3, device=device)[:, :N]
    else:   # PEFT's (R, K) / (N, R) weights, transposed
        A, B = torch.randn(R, K, device=device).t(), torch.randn(N, R, device=device).t()
    dy, S = torch.randn(M, N, device=device), torch.randn(M, R, device=device)
    seed = torch.randint(0, 2**31, (2,), device=device)
    fwd = (x, w, None, A, B, 2.0, 0.25, seed)
    bwd = (dy, x, w, A, B, S, 2.0, 0.0, torch.empty(0, dtype=torch.uint8, device=device), True, True, True)

    def layout_of(t):   # what inductor's size assert compares: no stride of a size-0 or size-1 dim, none when empty
        return t.shape, t.dtype, [s for d, s in zip(t.shape, t.stride()) if d > 1] if t.numel() else None

    for op, args in ((functional._lora_linear_fwd, fwd), (functional._lora_linear_bwd, bwd)):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert [layout_of(t) for t in real] == [layout_of(t) for t in fake], op
    eager = functional._backward_kernels(dy, x, w, A, B, S, 2.0, 0.0, None, True, True, True)
    for got, want in zip(real, eager):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend_env", ["reference", "auto"])
def test_autocast_bf16_like_nn_linear(backend_env, device, monkeypatch):
    if backend_env == "reference":
        monkeypatch.setenv("LORA_FAST_BACKEND", "reference")
    x, w, b, A, B = make_inputs((3, 7), 40, 24, 4, torch.float32, device)
    layer = nn.Linear(40, 24).to(device)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        base = layer(x)
        y = lora_linear(x, w, b, A, B, 2.0)
    assert base.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    # the truth: nn.Linear's maths on bf16-cast inputs plus the LoRA term, in float64
    xb, wb, bb = (t.to(torch.bfloat16).double() for t in (x, w, b))
    ref = xb @ wb.t() + bb + 2.0 * (xb @ A.double() @ B.double())
    mag = xb.abs() @ wb.abs().t() + bb.abs() + 2.0 * (xb.abs() @ A.double().abs() @ B.double().abs())
    assert_close(y, ref, mag, torch.bfloat16, 44, "autocast forward", record=False)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y16 = lora_linear(x, w.to(torch.bfloat16), b, A, B, 2.0)   # mixed inputs are cast as nn.Linear's are
    assert y16.dtype == torch.bfloat16


def test_dtype_mismatch_outside_autocast_is_an_error(device):
    x, w, b, A, B = make_inputs((5,), 16, 8, 2, torch.float32, device)
    with pytest.raises(RuntimeError):
        nn.functional.linear(x, w.to(torch.bfloat16))
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        lora_linear(x, w.to(torch.bfloat16), None, A, B, 1.0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_with_dropout(use_reentrant, device):
    model = two_layer_model(device, dropout=0.3)
    x = torch.randn(24, 32, device=device, requires_grad=True)

    def step(checkpoint):
        torch.manual_seed(11)
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant) if checkpoint else model(x)
        y.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]
        model.zero_grad(set_to_none=True)
        x.grad = None
        return grads

    for g1, g2 in zip(step(False), step(True)):
        assert torch.equal(g1, g2)


def test_bitwise_deterministic_backward(device):
    model = two_layer_model(device, dropout=0.2)
    x = torch.randn(40, 32, device=device)
    (_, g1), (_, g2) = _run(model, x, seed=3), _run(model, x, seed=3)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay():
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    model = two_layer_model("cuda", dropout=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(64, 32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):      # warm-up: autotuning and allocations happen outside the capture
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, params))


def _distributed_worker(rank, world_size, init_file, x, out_dir):
    """DDP, then FSDP2 (fully_shard), each on this rank's half of the batch; gradients saved for the parent."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shard = x.chunk(world_size)[rank]
        ddp = nn.parallel.DistributedDataParallel(two_layer_model("cpu"))
        ddp(shard).square().mean().backward()
        ddp_grads = [p.grad.clone() for p in ddp.parameters() if p.requires_grad]

        from torch.distributed.fsdp import fully_shard

        model = two_layer_model("cpu")
        for layer in model:
            if isinstance(layer, LinearWithLoRA):
                fully_shard(layer)
        fully_shard(model)
        model(shard).square().mean().backward()
        fsdp_grads = [p.grad.full_tensor() for p in model.parameters() if p.requires_grad]
        write_atomically((ddp_grads, fsdp_grads), os.path.join(out_dir, f"{rank}.pt"), torch.save)
        del ddp, model
    except BaseException:
        dist.destroy_process_group()
        raise
    end_gloo_rank()


def test_ddp_and_fsdp2_gloo_two_processes():
    """DDP and FSDP2 average the A/B gradients over ranks: equal to one process on the whole batch."""
    x = torch.randn(16, 32)
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_distributed_worker, (2, os.path.join(tmp, "init"), x, tmp), 2,
                         [os.path.join(tmp, f"{r}.pt") for r in range(2)])
        rank0 = torch.load(os.path.join(tmp, "0.pt"))
        rank1 = torch.load(os.path.join(tmp, "1.pt"))
    model = two_layer_model("cpu")
    model(x).square().mean().backward()
    single = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(single) == 4
    for name, grads, other in (("ddp", rank0[0], rank1[0]), ("fsdp2", rank0[1], rank1[1])):
        assert len(grads) == 4
        for g, g_other, g_one in zip(grads, other, single):
            assert torch.equal(g, g_other), name
            assert_close(g, g_one.double(), g_one.double().abs().max().expand_as(g_one), torch.float32, 64,
                         f"{name} grads", record=False)
