"""The whole-model benchmark's CPU harness (bench/model*.py): setups agree on loss and adapter gradients, a setup
that computes something else is caught, the saved-bytes formula equals a real run's count (lora-fast's op on its
Triton kernels in the interpreter), the formula at a real config, the GPU rows' selection and the result files."""

import csv
import json
import math

import pytest
import torch

pytest.importorskip("peft", reason="the whole-model bench compares against PEFT")
pytest.importorskip("transformers", reason="the whole-model bench builds transformers models")

from bench import model as cli
from bench import model_check, model_configs, model_results, results
from bench import model_setups as ms

LLAMA = model_configs.two_layer(model_configs.REAL["llama-3.2-1b"], hidden=32, heads=4, vocab=128)
GPT2 = model_configs.two_layer(model_configs.REAL["gpt2"], hidden=32, heads=4, vocab=128)


def test_setups_agree_on_loss_and_gradients():
    checks = model_check.agreement("llama", LLAMA)
    failed = [(c.what, c.errors, c.bound) for c in checks if not c.ok]
    assert not failed, failed
    # every kind of check ran: three setups against float64, dropout acting, checkpointing
    assert sum("vs PEFT float64" in c.what for c in checks) == 3
    assert sum("changes dA" in c.what for c in checks) == 3
    assert sum("checkpointing" in c.what for c in checks) == 3
    # and the float32 rows are not merely equal to each other: they carry rounding against float64 but stay far
    # below the bound (a loose bound would hide a wrong answer)
    errs = [c.errors["dA"] for c in checks if "vs PEFT float64" in c.what]
    assert all(0 < e < c.bound / 10 for e, c in zip(errs, checks))


def test_a_setup_that_computes_something_else_is_caught(monkeypatch):
    ref = model_check.run_once(LLAMA, "peft", torch.float64)
    monkeypatch.setattr(ms, "ALPHA", 2 * ms.ALPHA)  # scale alpha/rank doubled: another model
    wrong = model_check.run_once(LLAMA, "lora-fast", torch.float32)
    errors = model_check.compare(wrong, ref)
    bound = model_check.tolerance(LLAMA, torch.float32)
    # the gradients are off by O(1); the loss of a random model moves less, but still beyond rounding
    assert min(errors["dA"], errors["dB"]) > 100 * bound and errors["loss"] > bound, errors


def test_peft_and_lora_fast_wrap_the_same_layers():
    peft_run = ms.build("peft", GPT2, torch.float32)
    fast_run = ms.build("lora-fast", GPT2, torch.float32)
    assert set(peft_run.lora_layers) == set(fast_run.lora_layers) == set(ms.target_names(ms.build_base(GPT2,
                                                                                                  torch.float32,
                                                                                                  "cpu")))
    assert "lm_head" not in fast_run.lora_layers and len(fast_run.lora_layers) == 8  # 4 Conv1D per GPT-2 block


# lora-fast's rows run its kernels in the Triton interpreter (~2 s each): one per model, Conv1D (GPT-2) included
@pytest.mark.parametrize("spec, cases", [
    (LLAMA, [("frozen", torch.float32, 0.0), ("peft", torch.float32, 0.0), ("peft", torch.float32, 0.05),
             ("peft", torch.bfloat16, 0.0), ("peft", torch.bfloat16, 0.05), ("lora-fast", torch.float32, 0.05)]),
    (GPT2, [("peft", torch.float32, 0.05), ("peft", torch.bfloat16, 0.0), ("peft+patch", torch.bfloat16, 0.0)]),
], ids=["llama", "gpt2"])
def test_saved_formula_equals_measured(spec, cases):
    checks = model_check.saved_checks("m", spec, cases=cases, batch=1, seq=12)
    assert len(checks) == len(cases)
    for check in checks:
        assert check.measured == check.formula, check
        assert (check.measured > 0) == (check.setup != "frozen"), check


def test_saved_formula_at_the_real_llama_config():
    # Llama-3.2-1B: 16 blocks, hidden H 2048, MLP width F 8192, r 16, one 2048-token sequence, bf16 x
    M, H, F, L, r = 2048, 2048, 8192, 16, 16
    layers = ms.structure(model_configs.REAL["llama-3.2-1b"], torch.bfloat16, 1, M)
    assert len(layers) == 7 * L and sum(not x.requires_grad for x in layers) == 3  # the first q, k, v
    # fused: x once per input (q/k/v share one, gate/up one), S in fp32 per layer, with dropout each layer's
    # keep-mask as bits (M x in_features / 8 bytes: q, k, v, o, gate, up read H features, down F)
    fused = L * (M * (3 * H + F) * 2 + 7 * M * r * 4)
    assert ms.saved_formula("lora-fast", layers, torch.float32, 0.0, "cuda") == fused
    assert ms.saved_formula("peft+patch", layers, torch.bfloat16, 0.05, "cuda") == fused + L * M * (6 * H + F) // 8
    # PEFT, fp32 adapters, dropout: a dropped fp32 copy of x per layer, its 1-byte mask (none where x needs no
    # gradient), and lora_A's output
    peft = L * (M * (6 * H + F) * 4 + 7 * M * r * 4) + (L * M * (6 * H + F) - 3 * M * H)
    assert ms.saved_formula("peft", layers, torch.float32, 0.05, "cuda") == peft
    assert ms.saved_formula("frozen", layers, torch.float32, 0.05, "cuda") == 0


def test_gpu_rows_selection():
    args = cli.parse_args(["--quick"])
    rows = cli.gpu_rows(args, cli.models(args))
    assert [(r["setup"], r["dropout"]) for r in rows] == [
        ("frozen", 0.0), ("peft", 0.05), ("peft+patch", 0.05), ("lora-fast", 0.05),
        ("peft", 0.0), ("peft+patch", 0.0), ("lora-fast", 0.0)]
    assert {(r["model"], r["batch"], r["seq"], r["adapter_dtype"], r["checkpointing"]) for r in rows} == {
        ("llama-3.2-1b", 2, 2048, "float32", False), ("llama-3.2-1b", 2, 2048, "-", False)}
    full = cli.gpu_rows(cli.parse_args(["--model", "gpt2"]), {"gpt2": model_configs.REAL["gpt2"]})
    assert len(full) == 2 * (1 + 2 * 2 * 3) and {r["seq"] for r in full} == {1024}  # GPT-2's 1024 positions
    with pytest.raises(SystemExit):
        cli.parse_args(["--dropout", "1.0"])


def _row(setup, tokens_per_s, peak, loss, status="ok", dropout=0.0):
    return dict(time_utc="2026-01-01T00:00:00Z", gpu="Test GPU", torch="t", triton="3", transformers="5", peft="0",
                commit="abc", model="llama-3.2-1b", setup=setup, dtype="bfloat16", adapter_dtype="float32",
                dropout=dropout, checkpointing=False, batch=2, seq=2048, rank=16, alpha=32, warmup=3, steps=5,
                ms=4096 * 1e3 / tokens_per_s if tokens_per_s else None, ms_min=None, ms_max=None,
                tokens_per_s=tokens_per_s, peak_mib=peak, saved_mib=1.0, saved_formula_mib=1.0, loss_first=loss,
                loss_last=loss, status=status)


def test_result_files_table_plot_and_loss_check(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    from rich.console import Console

    rows = [_row("peft", 10000.0, 9000.0, 11.80), _row("lora-fast", 12500.0, 8000.0, 11.81),
            _row("peft+patch", None, None, None, status="out of memory")]
    model_results.add_ratios(rows)
    assert rows[1]["tokens_per_s_vs_peft"] == pytest.approx(1.25) and rows[1]["peak_mib_vs_peft"] == -1000.0
    assert rows[2]["tokens_per_s_vs_peft"] is None
    stem = str(tmp_path / "test-gpu-model")
    for _ in range(2):  # appended, not overwritten
        results.append_csv(stem + ".csv", rows, model_results.FIELDS)
        results.append_json(stem + ".json", rows, model_results.FIELDS)
    with open(stem + ".csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 6 and tuple(read[0]) == model_results.FIELDS and read[2]["status"] == "out of memory"
    with open(stem + ".json") as f:
        assert len(json.load(f)) == 6
    md = model_results.markdown(rows, "python -m bench.model --quick")
    assert "| lora-fast fp32 p=0 | 327.7 | 12,500 | 1.25 |" in md and "out of memory" in md
    model_results.plot(rows, stem + ".png")
    assert (tmp_path / "test-gpu-model.png").stat().st_size > 0
    console = Console(file=open(tmp_path / "log.txt", "w"))
    assert cli.agreement_report(rows, console) == 0
    rows[1]["loss_first"] = 11.80 * (1 + 8 * 2.0**-8)  # beyond 4 bf16 roundings: computes something else
    assert cli.agreement_report(rows, console) == 1
    assert math.isclose(rows[0]["loss_first"], 11.80)


class _FakeEvent:
    """torch.cuda.Event on the CPU: records perf_counter; elapsed_time in ms."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_gpu_mode_flow_on_cpu(tmp_path, monkeypatch):
    # the GPU mode's whole flow (rows, steps, saved bytes, files, a failing setup) on a two-layer model on the CPU,
    # torch.cuda's timers and memory counters faked: this checks the code path, it measures nothing
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    config = tmp_path / "tiny-llama.json"
    config.write_text(json.dumps(LLAMA))
    monkeypatch.setattr(cli, "DEVICE", "cpu")
    monkeypatch.setenv("LORA_FAST_BACKEND", "reference")  # the interpreter would take minutes for whole steps
    for name, fake in (("Event", _FakeEvent), ("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                       ("max_memory_allocated", lambda: 123 * 2**20), ("empty_cache", lambda: None),
                       ("get_device_name", lambda: "Fake GPU")):
        monkeypatch.setattr(torch.cuda, name, fake)
    build = ms.build

    def failing_build(setup, *args, **kwargs):
        if setup == "peft+patch" and kwargs.get("dropout"):
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return build(setup, *args, **kwargs)

    monkeypatch.setattr(ms, "build", failing_build)
    argv = ["--mode", "gpu", "--quick", "--config", str(config), "--batch", "1", "--seq", "16", "--warmup", "1",
            "--steps", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: see model_check.one_thread
    try:
        assert cli.main(argv) == 0  # the dropout-0 rows agree on the first loss
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "fake-gpu-model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setup"], r["dropout"], r["status"]) for r in rows] == [
        ("frozen", "0.0", "ok"), ("peft", "0.05", "ok"), ("peft+patch", "0.05", "out of memory"),
        ("lora-fast", "0.05", "ok"), ("peft", "0.0", "ok"), ("peft+patch", "0.0", "ok"), ("lora-fast", "0.0", "ok")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["model"] == "tiny-llama" and float(r["tokens_per_s"]) > 0 and float(r["peak_mib"]) == 123 for r in ok)
    # saved bytes measured in the flow equal the formula for the CPU's dropout (lora-fast's rows run its reference
    # backend here, which saves another set than its kernels: test_saved_formula_equals_measured covers those)
    assert all(r["saved_mib"] == r["saved_formula_mib"] for r in ok if r["setup"] in ("frozen", "peft"))
    assert all(float(r["saved_mib"]) > 0 for r in ok if r["setup"] != "frozen")
    assert float(next(r for r in ok if r["setup"] == "frozen")["saved_mib"]) == 0
    lora0 = [float(r["loss_first"]) for r in ok if r["dropout"] == "0.0"]
    assert max(lora0) - min(lora0) <= 4 * 2.0**-8 * max(lora0)
    md = (tmp_path / "fake-gpu-model.md").read_text()
    assert "out of memory" in md and "tiny-llama" in md
    assert (tmp_path / "fake-gpu-model.png").stat().st_size > 0


def test_checkpointing_recomputes_the_lora_layers():
    # the checkpointing rows really checkpoint: the backward runs the LoRA layers' forwards again
    calls = {False: 0, True: 0}
    for ckpt in (False, True):
        run = ms.build("lora-fast", LLAMA, torch.float32, checkpointing=ckpt)

        def count(module, args, output, ckpt=ckpt):
            calls[ckpt] += 1

        for m in run.lora_layers.values():
            m.register_forward_hook(count)
        with ms.lora_fast_backend("reference"):
            ms.loss_of(run.model, ms.random_batch(LLAMA["vocab_size"], 1, 8, "cpu")).backward()
    assert calls[False] == len(run.lora_layers) and calls[True] > calls[False]
