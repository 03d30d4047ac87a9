"""Fast CPU tests of the bench: cost model, saved-bytes counting (meta against real), the addmm-chain
baseline against float64, result files and plot from synthetic rows in a tmp dir, and the CPU mode's CLI."""

import csv
import json
import os

import pytest
import torch

from bench import __main__ as cli
from bench import accuracy, cost_model, impls, results, saved, shapes

H200 = (790e12, 4.3e12)  # the issue's ceilings, for the issue's worked numbers


# lora-fast's figures count its split sums, dB partials and finishing passes (1.07 and 1.20 without them)
@pytest.mark.parametrize("N, expected", [(4096, {"lora-fast": 1.09, "addmm-chain": 1.18, "peft": 1.36}),
                                         (1024, {"lora-fast": 1.24, "addmm-chain": 1.45, "peft": 1.76})])
def test_cost_model_reproduces_the_issue_ratios(N, expected):
    floor = cost_model.bound("F.linear", "full", 8192, 4096, N, 16, "bfloat16", *H200)
    for impl, ratio in expected.items():
        got = cost_model.bound(impl, "full", 8192, 4096, N, 16, "bfloat16", *H200) / floor
        assert got == pytest.approx(ratio, abs=0.02), impl


def test_cost_model_arithmetic():
    M, K, N, r = 8192, 4096, 1024, 16
    # F.linear forward is one GEMM: bytes x + W + y in bf16, flops 2MNK
    (k,) = cost_model.kernels("F.linear", M, K, N, r)["forward"]
    assert k.flops == 2 * M * N * K and k.bytes == 2 * (M * K + N * K + M * N)
    assert k.time(1e12, 1e9) == pytest.approx(k.bytes / 1e9)  # memory-bound at a slow copy rate
    full = cost_model.bound("lora-fast", "full", M, K, N, r, "float16", *H200)
    parts = sum(cost_model.bound("lora-fast", m, M, K, N, r, "float16", *H200) for m in ("forward", "backward"))
    assert full == pytest.approx(parts)
    assert cost_model.flops("book", "full", M, K, N, r) == 4 * M * N * K + 6 * M * r * (K + N)
    # dropout adds passes to the unfused rows only
    for impl, more in (("lora-fast", False), ("peft", True), ("addmm-chain", True)):
        b0 = cost_model.bound(impl, "full", M, K, N, r, "bfloat16", *H200)
        b1 = cost_model.bound(impl, "full", M, K, N, r, "bfloat16", *H200, dropout=0.1)
        assert (b1 > b0) == more, impl
    with pytest.raises(ValueError, match="mode"):
        cost_model.bound("peft", "sideways", M, K, N, r, "bfloat16", *H200)
    with pytest.raises(ValueError, match="impl"):
        cost_model.kernels("nope", M, K, N, r)


def test_cost_model_several_adapters_arithmetic():
    """bench.cost_model.multi_kernels (issue 30): what each way of training n adapters on one base launches, reads
    and computes, checked by hand."""
    M, K, N, r = 8192, 4096, 1024, 16
    e = 2
    a, b, idx = K * r * e, r * N * e, M * 8

    def total(impl, n, what):
        ks = cost_model.multi_kernels(impl, n, M, K, N, r)
        return sum(getattr(k, what) for k in ks["forward"] + ks["backward"])

    lora = cost_model.kernels("lora-fast", M, K, N, r)
    lora_flops = sum(k.flops for k in lora["forward"] + lora["backward"])
    for n in (1, 2, 8, 16):
        # the useful flops do not depend on n: the base GEMMs once, the low-rank products over the M rows
        for impl in cost_model.MULTI_IMPLS:
            assert total(impl, n, "flops") == pytest.approx(lora_flops), (impl, n)
        # lora_linear_multi: five launches whatever n; each extra adapter adds its A and B read by the passes that
        # use them (forward S and GEMM, backward dS and dX), written as gradients, and the index walked once more
        # by the gradient pass
        assert sum(len(v) for v in cost_model.multi_kernels("lora-fast-multi", n, M, K, N, r).values()) == 5
        assert total("lora-fast-multi", n, "bytes") - total("lora-fast-multi", 1, "bytes") == \
            (n - 1) * (3 * a + 3 * b + idx)
        # PEFT's loop: the base GEMM forward and dX once, 5 + 7 launches per adapter; n separate steps: 5 each
        assert sum(len(v) for v in cost_model.multi_kernels("peft-mixed", n, M, K, N, r).values()) == 2 + 12 * n
        assert sum(len(v) for v in cost_model.multi_kernels("lora-fast-separate", n, M, K, N, r).values()) == 5 * n
        # n separate steps read W n times forward and backward
        separate_w = sum(1 for k in cost_model.multi_kernels("lora-fast-separate", n, M, K, N, r)["forward"]
                         if k.name.startswith("y ="))
        assert separate_w == n
    # the bound: more adapters never cost lora_linear_multi less, and each launch's cost is added once
    t1 = cost_model.multi_bound("lora-fast-multi", 1, "full", M, K, N, r, "bfloat16", *H200)
    t8 = cost_model.multi_bound("lora-fast-multi", 8, "full", M, K, N, r, "bfloat16", *H200)
    assert t8 >= t1
    assert cost_model.multi_bound("peft-mixed", 8, "full", M, K, N, r, "bfloat16", *H200, launch_s=1e-6) == \
        pytest.approx(cost_model.multi_bound("peft-mixed", 8, "full", M, K, N, r, "bfloat16", *H200) + 98e-6)
    with pytest.raises(ValueError, match="n"):
        cost_model.multi_kernels("lora-fast-multi", 0, M, K, N, r)
    with pytest.raises(ValueError, match="impl"):
        cost_model.multi_kernels("nope", 2, M, K, N, r)


def test_cost_model_row_order_arithmetic():
    """bench.cost_model.multi_order_costs (issue 30 item 1): the low-rank dots and bytes of lora_linear_multi's
    kernels with rows unsorted or sorted by adapter, counted from the index, checked by hand on small batches."""
    # 256 rows alternating adapters 0 and 1: every tile holds both unsorted, one sorted
    idx = [0, 1] * 128
    assert cost_model.adapters_per_tile(idx, 128) == [2, 2]
    assert cost_model.adapters_per_tile(sorted(idx), 128) == [1, 1]
    assert cost_model.adapters_per_tile([-1, -1, 3, -1], 2) == [0, 1]
    K = N = 128
    r, e = 16, 2
    un = cost_model.multi_order_costs(idx, 2, K, N, r, order="unsorted")
    so = cost_model.multi_order_costs(idx, 2, K, N, r, order="sorted")
    # S: 4 tiles of 64 rows x 2 adapters, 128 / 64 = 2 steps along K; each tile reads each present A (K x r)
    assert un["S"]["dots"] == 4 * 2 * 2 and so["S"]["dots"] == 4 * 1 * 2
    assert un["S"]["flops"] == 2.0 * 16 * 64 * 64 * 16
    assert un["S"]["adapter_bytes"] == 8 * K * r * e and so["S"]["adapter_bytes"] == 4 * K * r * e
    # the GEMMs' term: 2 row tiles of 128 x 1 column tile, 2 adapters each unsorted
    assert un["y term"]["dots"] == 4 and so["y term"]["dots"] == 2
    assert un["y term"]["adapter_bytes"] == 4 * r * N * e
    # the reduction: 2 + 2 column blocks of 64; unsorted each adapter's programs walk the 4 row blocks (each holds
    # both adapters) reading the whole index; sorted each walks its own 128 rows (2 blocks) through the
    # permutation, plus its two segment bounds
    assert un["dA dB"]["dots"] == 2 * 4 * 4 and so["dA dB"]["dots"] == 2 * 2 * 4
    assert un["dA dB"]["index_bytes"] == 2 * 4 * 256 * 8
    assert so["dA dB"]["index_bytes"] == 4 * (2 * 2 * 8 + 256 * 8)
    # the sort: reads the index, writes the sorted index and the permutation; three launches
    assert "sort" not in un and so["sort"]["index_bytes"] == 256 * 8 * 3 + 3 * 8 and so["sort"]["launches"] == 3
    # rows of -1 are no adapter's: a batch of base rows only costs no low-rank dot in either order
    base = cost_model.multi_order_costs([-1] * 256, 2, K, N, r, order="sorted")
    assert all(v["dots"] == 0 for v in base.values())

    # the batches of the --order table: even and uneven are grouped (sorting changes no tile of the GEMMs), the
    # random one interleaves; sorting never adds a dot, and on the grouped batches saves none in the GEMMs
    M, n = 8192, 8
    for kind in cost_model.MULTI_BATCHES:
        b = cost_model.multi_batch_index(kind, M, n)
        assert len(b) == M and sorted(b) == sorted(cost_model.multi_batch_index("even" if kind == "random" else kind,
                                                                                 M, n))
        u = cost_model.multi_order_costs(b, n, 4096, 4096, 16, order="unsorted")
        o = cost_model.multi_order_costs(b, n, 4096, 4096, 16, order="sorted")
        for name in ("S", "dS", "y term", "dX term", "dA dB"):
            assert o[name]["dots"] <= u[name]["dots"], (kind, name)
            if kind != "random" and name != "dA dB":
                assert o[name]["dots"] == u[name]["dots"], (kind, name)
        if kind == "random":   # 128-row tiles of 8 adapters shuffled: all 8 present in each (checked by the count)
            tiles = cost_model.adapters_per_tile(b, 128)
            assert u["y term"]["dots"] == sum(tiles) * 32 and o["y term"]["dots"] == 64 * 32
    uneven = cost_model.multi_batch_index("uneven", M, 4)
    assert [uneven.count(a) for a in range(4)] == [4370, 2184, 1092, 546]   # 2**-a shares, the rest on adapter 0
    with pytest.raises(ValueError, match="order"):
        cost_model.multi_order_costs(idx, 2, K, N, r, order="gathered")
    with pytest.raises(ValueError, match="idx"):
        cost_model.multi_order_costs([0, 2], 2, K, N, r)
    with pytest.raises(ValueError, match="kind"):
        cost_model.multi_batch_index("sorted", M, n)


def test_cost_model_estimate_arithmetic():
    """bench.cost_model.estimate: the ideal bound plus what it leaves out, each term checked by hand."""
    M, K, N, r = 8192, 4096, 4096, 16
    A = cost_model.Assumptions
    # mask="seed" with no Philox time: nothing added (the default since issue 28, "bits", adds the mask's bytes)
    ideal = A(gemm_fraction=1.0, launch_s=0.0, mask="seed", philox_s_per_element=0.0)
    for impl in cost_model.IMPLS:
        for mode in cost_model.MODES:
            b = cost_model.bound(impl, mode, M, K, N, r, "bfloat16", *H200, dropout=0.1)
            e = cost_model.estimate(impl, mode, M, K, N, r, "bfloat16", *H200, dropout=0.1, assume=ideal)
            # nothing added: the bound itself (lora-fast's GEMMs on the fused path, the cheaper at cuBLAS's rate)
            assert e.seconds == pytest.approx(b, rel=1e-12), (impl, mode)
            # a cost per launch, one launch per kernel of the list
            launched = cost_model.estimate(impl, mode, M, K, N, r, "bfloat16", *H200, dropout=0.1,
                                           assume=A(gemm_fraction=1.0, launch_s=5e-6, mask="seed",
                                                    philox_s_per_element=0.0))
            assert launched.seconds - b == pytest.approx(5e-6 * e.launches, rel=1e-9), (impl, mode)
    assert cost_model.estimate("F.linear", "full", M, K, N, r, "bfloat16", *H200).launches == 2

    # one GEMM's two paths by hand: y = x W^T + s S B (bf16, no bias), compute-bound at these ceilings
    (gemm,) = [k for k in cost_model.kernels("lora-fast", M, K, N, r)["forward"] if k.out_bytes]
    y_bytes, term_read = 2 * M * N, 4 * M * r + 2 * r * N
    assert gemm.out_bytes == y_bytes and gemm.term_bytes == term_read and gemm.term_flops == 2 * M * r * N
    f, launch = 0.85, 3e-6
    t = cost_model.gemm_paths_time(gemm, *H200, A(gemm_fraction=f, launch_s=launch))
    assert t["fused"] == pytest.approx(gemm.flops / (H200[0] * f) + launch)
    base = 2 * M * N * K / H200[0]   # addmm at cuBLAS's rate, compute-bound
    assert t["cublas"] == pytest.approx((y_bytes + term_read + y_bytes) / H200[1] + base + 2 * launch)
    # the measured choice takes the cheaper path: cuBLAS's at 0.85 here (its extra y write and read cost less
    # than 15% of the GEMM), the fused kernel at 0.95
    assert t["cublas"] < t["fused"]
    e85 = cost_model.estimate("lora-fast", "forward", M, K, N, r, "bfloat16", *H200, assume=A(gemm_fraction=f))
    e95 = cost_model.estimate("lora-fast", "forward", M, K, N, r, "bfloat16", *H200, assume=A(gemm_fraction=0.95))
    assert e85.gemm_paths == ("cublas",) and e95.gemm_paths == ("fused",)
    assert e85.launches == e95.launches + 1

    # the mask: regenerated, Philox time in the dX GEMM only; bit-packed, M K / 8 bytes written by the S pass and
    # read by dX and dA (checked where every launch is memory-bound: an unbounded GEMM rate)
    fast = (1e30, H200[1])
    seed = A(gemm_fraction=1.0, launch_s=0.0, mask="seed", philox_s_per_element=2e-12)
    e0 = cost_model.estimate("lora-fast", "full", M, K, N, r, "bfloat16", *H200, assume=seed)
    e1 = cost_model.estimate("lora-fast", "full", M, K, N, r, "bfloat16", *H200, dropout=0.1, assume=seed)
    assert e1.seconds - e0.seconds == pytest.approx(2e-12 * M * K, rel=1e-9)
    bits = A(gemm_fraction=1.0, launch_s=0.0, mask="bits")
    e0 = cost_model.estimate("lora-fast", "full", M, K, N, r, "bfloat16", *fast, assume=bits)
    e1 = cost_model.estimate("lora-fast", "full", M, K, N, r, "bfloat16", *fast, dropout=0.1, assume=bits)
    assert e1.seconds - e0.seconds == pytest.approx(3 * M * K / 8 / H200[1], rel=1e-9)
    for bad in (dict(gemm_fraction=0.0), dict(gemm_fraction=1.2), dict(launch_s=-1.0), dict(mask="bytes")):
        with pytest.raises(ValueError):
            A(**bad)


def test_cost_model_cli_prints_bound_and_estimate(capsys):
    assert cost_model.main(["--gemm-fraction", "0.9", "--launch-us", "2"]) == 0
    out = capsys.readouterr().out
    assert "0.90 of cuBLAS" in out and "2.0 us per launch" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("lora-fast") and " full " in line)
    b = cost_model.bound("lora-fast", "full", 8192, 4096, 4096, 16, "bfloat16", 790e12, 4.3e12)
    e = cost_model.estimate("lora-fast", "full", 8192, 4096, 4096, 16, "bfloat16", 790e12, 4.3e12,
                            assume=cost_model.Assumptions(gemm_fraction=0.9, launch_s=2e-6))
    assert float(row[2]) == pytest.approx(b * 1e6, abs=0.05) and float(row[3]) == pytest.approx(e.seconds * 1e6,
                                                                                                abs=0.05)


@pytest.mark.parametrize("impl", ["F.linear", "book", "addmm-chain", "lora-fast"])
def test_saved_bytes_meta_equals_real(impl):
    assert saved.check_meta_against_real([impl], shape=(48, 40, 24, 4)) == []


def test_saved_bytes_values():
    M, K, N, r = 48, 40, 24, 4
    # lora-fast keeps x (bf16), S (M x r fp32) and, with dropout, the keep-mask's bits (K = 40: 5 bytes a row,
    # padded to 16); F.linear with W frozen nothing
    assert saved.measure("lora-fast", M, K, N, r, torch.bfloat16, 0.0, False, device="cpu")[0] == 2 * M * K + 4 * M * r
    assert saved.measure("lora-fast", M, K, N, r, torch.bfloat16, 0.1, True)[0] == 2 * M * K + 4 * M * r + M * 16
    assert saved.measure("F.linear", M, K, N, r, torch.bfloat16, 0.0, True, device="cpu")[0] == 0
    # the addmm chain with dropout: dropout(x), S and a bool mask
    assert saved.measure("addmm-chain", M, K, N, r, torch.bfloat16, 0.1, False)[0] == 2 * M * K + 2 * M * r + M * K


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_addmm_chain_matches_float64(dtype):
    # bound: a few unit roundoffs of the dtype on a reduction of <= 123 terms (see tests/utils.py)
    errs = accuracy.errors("addmm-chain", dtype)
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert set(errs) == {"y", "dx", "dA", "dB"}
    assert max(errs.values()) < 4 * unit, errs


def test_addmm_chain_dropout_gradients():
    # the keep-mask is recovered from the saved dropout(x): where it is zero (x is never exactly zero here)
    x, weight, b, A, B = impls.make_tensors(32, 24, 16, 4, torch.float64, "cpu", bias=True)
    torch.manual_seed(0)
    y = impls.AddmmChainLoRA.apply(x, weight, b, A, B, 0.5, 0.3)
    torch.manual_seed(0)
    x_drop, keep = torch.native_dropout(x.detach(), 0.3, True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    from lora_fast import reference

    ref = reference.lora_linear(leaves[0], weight, b, leaves[1], leaves[2], 0.5, dropout_p=0.3, dropout_mask=keep)
    dy = torch.randn_like(y)
    # float64 on both sides, summed in another order: a few ulps of the largest value, no more
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=64 * torch.finfo(torch.float64).eps * ref.abs().max().item())
    got = torch.autograd.grad(y, (x, A, B), dy)
    want = torch.autograd.grad(ref, leaves, dy)
    for g, w in zip(got, want):
        # float64 both ways: a few ulps of the largest gradient element (the sums are at most 32 terms long)
        torch.testing.assert_close(g, w, rtol=0, atol=64 * torch.finfo(torch.float64).eps * w.abs().max().item())


def _synthetic_rows():
    # synthetic measurements for the file and plot code only; never written outside tmp_path
    env = dict(time_utc="2000-01-01T00:00:00Z", gpu="Test GPU", torch="t", triton="t", commit="c")
    info = dict(model="m", proj="q", K=64, N=32, bias=False, M=16, rank=4, dtype="bfloat16", dropout=0.0)
    measured = {n: {"forward": (1.0 + i, 0.9 + i, 1.1 + i), "backward": (2.0 + i, 1.9 + i, 2.1 + i),
                    "full": (3.0 + i, 2.9 + i, 3.1 + i), "peak_bytes": 2**20, "saved_bytes": 2**19}
                for i, n in enumerate(["F.linear", "peft", "lora-fast"])}
    bounds = {n: {m: 1e-3 for m in cost_model.MODES} for n in measured}
    flops = {n: {m: 1e12 for m in cost_model.MODES} for n in measured}
    return results.assemble(info, measured, bounds, flops, {"gemm_flops_per_s": 1e15, "copy_bytes_per_s": 4e12},
                            env)


def test_rows_files_summary_and_plot(tmp_path):
    rows = _synthetic_rows()
    assert len(rows) == 9
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert by[("peft", "full")]["ratio_to_linear"] == pytest.approx(4.0 / 3.0)
    assert by[("peft", "full")]["ratio_to_best_other"] == pytest.approx(4.0 / 5.0)  # vs lora-fast
    assert by[("F.linear", "full")]["ratio_to_best_other"] is None
    assert by[("lora-fast", "forward")]["tflops"] == pytest.approx(1e12 / 3e-3 / 1e12)
    assert by[("lora-fast", "full")]["ratio_to_bound"] == pytest.approx(5.0)
    stem = str(tmp_path / results.slug("Test GPU"))
    for _ in range(2):  # appends
        results.append_csv(stem + ".csv", rows)
        results.append_json(stem + ".json", rows)
    with open(stem + ".csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 18 and read[0]["gpu"] == "Test GPU" and float(read[0]["ms"]) == rows[0]["ms"]
    with open(stem + ".json") as f:
        assert len(json.load(f)) == 18
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        results.append_csv(str(tmp_path / "other.csv"), rows)
    md = results.markdown(rows, "python -m bench --quick")
    assert "| lora-fast | 5.000 |" in md and "python -m bench --quick" in md and "Test GPU" in md
    results.plot(rows, stem + ".png")
    assert (tmp_path / "test-gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_and_shapes():
    args = cli.parse_args(["--quick"])
    sel = cli.selection(args, cpu=False)
    assert sel["models"] == ("llama3-8b",) and sel["tokens"] == (8192,) and sel["dropouts"] == (0.0,)
    assert cli.selection(cli.parse_args(["--quick", "--rank", "8"]), cpu=False)["ranks"] == (8,)
    assert cli.selection(cli.parse_args([]), cpu=True)["tokens"] == (8192,)
    # Mistral-7B's shapes are Llama-3-8B's: run once, labelled with both
    projs = shapes.projections(["llama3-8b", "mistral-7b"])
    assert len(projs) == 4 and projs[0].model == "llama3-8b+mistral-7b"
    with pytest.raises(ValueError, match="--model"):
        shapes.projections(["gpt5"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--rank", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU mode; a GPU machine runs the GPU mode")
def test_cpu_mode_prints_tables_and_times_nothing(capsys):
    # lora-fast's interpreted checks are covered above; here the table and the statement are under test
    rc = cli.main(["--model", "gpt2-124m", "--tokens", "2048", "--impl", "F.linear", "book", "addmm-chain"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Timings need a CUDA device" in out and "Bytes saved for backward" in out
    # gpt2 proj 3072->768 at M=2048, bf16, dropout 0.1: the book keeps dropout(x) and CPU dropout's bf16 noise
    # (2 x 12 MiB) and S (M x r bf16, 0.06 MiB)
    assert "gpt2-124m proj 3072->768" in out and "24.1" in out
    assert " ms" not in out
    # fitted to the console (80 columns into a capture): no cell cut, no line wider
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80


def test_fitted_tables_split_columns_instead_of_cutting():
    from rich.console import Console

    from bench.tables import fitted_tables

    columns = ["projection", "dtype", *(f"impl-{i}" for i in range(6))]
    rows = [["llama-3-8b q/o 4096->4096", "bf16", *(f"{1234.5 * i:,.1f}" for i in range(6))],
            ["gpt2-124m proj 3072->768", "bf16", *(f"{7.25 * i:,.2f}" for i in range(6))]]
    console = Console(width=60, record=True, file=open(os.devnull, "w"))
    tables = fitted_tables("Bytes", columns, rows, console.width, keys=2)
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert len(tables) > 1 and "Bytes; dtype bf16 (1/" in text   # the constant key column went to the title
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 60
    assert text.count("llama-3-8b q/o 4096->4096") == len(tables)   # the key column repeated in every part
    for row in rows:
        assert all(cell in text for cell in row[2:])


def test_launch_profile_pairs_with_the_cost_model():
    """bench.launches: the cost model names the Triton kernel of each lora-fast launch; a profile that lines up is
    paired in order with each launch's bound, one that does not is reported, never forced into pairs."""
    from bench import cost_model, launches

    model = cost_model.kernels("lora-fast", 8192, 4096, 4096, 16, "bfloat16", dropout=0.1)
    kernels = model["forward"] + model["backward"]
    assert all(k.launch in launches.KERNEL_NAMES for k in kernels)
    # two profiled steps of the same launches, as profile_step collects them
    names = [k.launch for k in kernels] * 2
    times = [10.0 + i for i in range(len(kernels))] + [12.0 + i for i in range(len(kernels))]
    profiled = launches.average_steps(names, times, repeats=2)
    assert [t for _, t in profiled] == [11.0 + i for i in range(len(kernels))]
    rows, problem = launches.pair(kernels, profiled, 790e12, 4.3e12)
    assert problem == "" and len(rows) == len(kernels)
    gemm = next(r for r in rows if r["launch"].startswith("y = "))
    bound_us = 2.0 * 8192 * 4096 * 4096 / 790e12 * 1e6 * (1 + 16 / 4096)
    assert gemm["kernel"] == cost_model.GEMM and abs(gemm["bound_us"] - bound_us) <= 1e-9 * bound_us
    assert gemm["x_bound"] == gemm["measured_us"] / gemm["bound_us"]
    rows, problem = launches.pair(kernels, profiled[:-1], 790e12, 4.3e12)
    assert rows == [] and "part at launch" in problem
    with pytest.raises(RuntimeError, match="different kernels"):
        launches.average_steps(names[:-1] + [cost_model.GEMM], times, repeats=2)


def test_host_instructions_arithmetic(tmp_path, monkeypatch):
    """bench.host_time --instructions: each sample's callgrind dump total, less the dump of the same switching
    around no calls, per call, in thousands; callgrind itself is replaced by a counter of fn's calls (valgrind is
    not on CI)."""
    from bench import host_time

    monkeypatch.setenv(host_time._CALLGRIND, str(tmp_path))
    calls, dumps = [0], [0]
    per_call, switching = 7_000, 1_234   # instructions of one call and of the on/off switching itself

    def fake_callgrind(*args):
        if args == ("-z",):
            calls[0] = 0
        elif args == ("-d",):
            dumps[0] += 1
            (tmp_path / f"callgrind.out.{dumps[0]}").write_text(
                f"desc: Trigger: dump\nsummary: 0\ntotals: {switching + per_call * calls[0]}\n")

    monkeypatch.setattr(host_time, "_callgrind", fake_callgrind)
    cleared = torch.zeros(1, requires_grad=True)

    def fn():
        assert cleared.grad is None   # the gradients are cleared before each call
        cleared.grad = torch.ones(1)
        calls[0] += 1

    out = host_time._instructions(fn, repeat=3, number=5, clear=(cleared,))
    assert out["cpu_min"] == out["cpu_median"] == per_call / 1e3
    assert out["wall_min"] is None and dumps[0] == 4   # one empty sample, three measured


def test_host_layer_ratios_are_paired():
    """bench.host_time's decoder-layer statistics: a row's ratio pairs each of its samples with PEFT's sample of the
    same round and path (a slow spell that doubles both leaves the ratio alone), mins are mins and medians are
    medians of the samples, and quartiles come with two samples or more."""
    import random
    import statistics

    from bench import host_time

    rng = random.Random(1)
    # the triton path's rounds fall in slow spells more often than the cublas path's
    spells = {(r, p): rng.choice([1.0, 3.0, 3.0] if p == "triton" else [1.0, 1.0, 1.5])
              for r in range(9) for p in ("triton", "cublas")}

    def sample(r, p, cost):
        t = cost * spells[r, p]
        return (r, p, {"cpu_min": t, "cpu_median": t, "wall_min": None, "wall_median": t + 1})

    keys = {("frozen", "-"): 500.0, ("peft", "-"): 1000.0, ("lora-fast", "triton"): 600.0,
            ("lora-fast", "cublas"): 700.0, ("peft+patch", "cublas"): 800.0}
    diffs = {k: [sample(r, p, cost) for r in range(9) for p in ("triton", "cublas")
                 if k[1] in ("-", p)] for k, cost in keys.items()}
    out = host_time._paired(diffs)
    assert out["lora-fast", "triton"]["ratio"] == pytest.approx(0.6, rel=1e-12)
    assert out["lora-fast", "cublas"]["ratio"] == pytest.approx(0.7, rel=1e-12)
    assert out["peft+patch", "cublas"]["ratio_quartiles"] == pytest.approx((0.8, 0.8), rel=1e-12)
    # quartiles within the samples' range (statistics.quantiles' default extrapolates past it with few samples)
    two = host_time._paired({("peft", "-"): [sample(0, "triton", 1000.0), sample(1, "triton", 1000.0)],
                             ("lora-fast", "triton"): [sample(0, "triton", 560.0), sample(1, "triton", 620.0)]})
    q1, q3 = two["lora-fast", "triton"]["ratio_quartiles"]
    assert 0.56 <= q1 <= q3 <= 0.62
    assert "ratio" not in out["peft", "-"] and "ratio" not in out["frozen", "-"]
    for k in keys:
        values = [s[2]["cpu_median"] for s in diffs[k]]
        assert out[k]["cpu_min"] == min(values) <= out[k]["cpu_median"]
        assert out[k]["cpu_median"] == statistics.median(values)
        assert out[k]["wall_min"] is None
    # the unpaired ratio of medians would read the spells, not the costs
    med = {k: out[k]["cpu_median"] for k in keys}
    assert abs(med["lora-fast", "triton"] / med["peft", "-"] - 0.6) > 0.1
    one = host_time._paired({k: v[:1] for k, v in diffs.items() if k[1] in ("-", "triton")})
    assert "ratio_quartiles" not in one["lora-fast", "triton"]
