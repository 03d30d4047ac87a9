"""Compile report (issue 4): the kernels compile for sm_80 and sm_90 with tensor cores and without spills.

The kernels are compiled by ``triton.compile`` for GPU targets on this CPU machine (no GPU, no driver) in
spawned processes that import them with TRITON_INTERPRET=0, so the tests run the same under the interpreter.
"""

import functools
import io
import json
import shlex

import pytest
import torch
import triton

from lora_fast import compile_report as cr
from lora_fast.kernels import configs

# CI set (3 minutes on 2 cores): every config of every launcher on both targets, rank 16 (BLOCK_R 16), in
# bf16 and fp32 (IEEE, torch's default precision) and, per kernel, the flag set with the most code in it
# (forward with bias, dX and the projection with dropout, the dS projection with the fused dB partials).
# fp16 compiles to the same tiles as bf16 (the tensor-core instructions differ only in their type);
# `python -m lora_fast.compile_report` covers fp16, rank 64 and every flag set.
CI_DTYPES = ("bf16", "fp32")
CI_RANKS = (16,)


@pytest.fixture(scope="session")
def report():
    """Jobs and rows of the CI set, compiled once per test session (two processes: the CI machine's cores)."""
    jobs = cr.make_jobs(targets=tuple(cr.TARGETS), kernels=cr.KERNELS, dtypes=CI_DTYPES, ranks=CI_RANKS,
                        variants="heaviest")
    return jobs, cr.run_jobs(jobs, workers=2)


def _torch_dtype(name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def test_report_covers_every_config_the_launchers_use(report):
    jobs, rows = report
    # the CI set has the heaviest flags: dX and x @ A with dropout, which ops launches with their own lists
    factory = {"fwd_gemm": configs.gemm_configs, "dx_gemm": functools.partial(configs.gemm_configs, dropout=True),
               # the projections' heaviest flag set has fp32 adapters (Q) on a 16-bit x: their own lists
               "xa_proj": functools.partial(configs.proj_configs, dropout=True, q_fp32=True),
               "dyb_proj": functools.partial(configs.proj_configs, partials=True, q_fp32=True),
               "da_reduce": configs.reduce_configs, "grad_finish": configs.finish_configs}
    for target, capability in cr.TARGETS.items():
        for kernel, configs_fn in factory.items():
            for dtype in CI_DTYPES:
                config_list = configs_fn(capability, _torch_dtype(dtype))
                assert config_list, f"no config for {kernel} {dtype} on {target}"
                keys = set().union(*(c.kwargs for c in config_list))
                expected = [(c.num_warps, c.num_stages, c.kwargs) for c in config_list]
                got = [(j.num_warps, j.num_stages, {k: v for k, v in j.config.items() if k in keys})
                       for j in jobs if (j.kernel, j.target, j.dtype) == (kernel, target, dtype)]
                assert got == expected, (kernel, target, dtype)
    assert len(rows) == len(jobs)


def test_every_row_passes_the_checks(report):
    _, rows = report
    failing = [(r.kernel, r.variant, r.target, r.dtype, r.config, r.num_warps, r.num_stages, r.failures)
               for r in rows if r.failures]
    assert not failing, "\n" + "\n".join(map(str, failing))
    for r in rows:
        assert 0 < r.registers <= 255, r
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        # the elementwise kernels (grad_finish, dequant_4bit, DoRA's) may need no shared memory; every dot does
        assert (r.kernel in cr.ELEMENTWISE_KERNELS or 0 < r.shared) \
            and r.shared <= configs.smem_limit(cr.TARGETS[r.target]), r


def test_16bit_gemms_use_tensor_cores(report):
    _, rows = report
    gemm_rows = [r for r in rows if r.kernel in cr.GEMM_KERNELS and r.dtype in ("fp16", "bf16")]
    assert gemm_rows
    for r in gemm_rows:
        assert r.mma_name == {"sm_90": "HGMMA", "sm_80": "HMMA"}[r.target], r
        assert r.mma > 0, r


def test_ieee_fp32_gemm_uses_no_tensor_core(report):
    # input_precision="ieee" must stay on CUDA cores: a tensor-core instruction here would mean TF32 crept in
    _, rows = report
    fp32 = [r for r in rows if r.kernel in cr.GEMM_KERNELS and r.dtype == "fp32/ieee"]
    assert fp32
    assert all(r.mma == 0 for r in fp32), [(r.kernel, r.target, r.config, r.mma) for r in fp32 if r.mma]


def test_specialisation_follows_the_launch():
    """Unit strides become the constant 1, aligned pointers and sizes get divisibility 16, as Triton's JIT does."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    config = configs.gemm_configs((9, 0), torch.bfloat16)[0]
    job = cr.Job("fwd_gemm", "bias", "bf16", "sm_90", 16, dict(config.kwargs, HAS_BIAS=True, HAS_DROPOUT=False),
                 config.num_warps, config.num_stages)
    fn, args = cr.launch_args(job)
    signature, constexprs, attrs = cr.specialise(fn, args, cr.constexpr_names(fn),
                                                 make_backend(GPUTarget("cuda", 90, 32)))
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    aligned = [["tt.divisibility", 16]]
    # forward: x (M, K) contiguous, Q = W^T of a contiguous (N, K) weight -> stride_pk = stride_qk = 1
    for name in ("stride_pk", "stride_qk", "stride_lr", "stride_rn", "stride_on"):
        assert signature[name] == "constexpr" and constexprs[index[name]] == 1, name
    for name in ("P_ptr", "Q_ptr", "OUT_ptr"):
        assert signature[name] == "*bf16" and attrs[index[name]] == aligned, name
    assert signature["L_ptr"] == "*fp32"
    assert signature["stride_qn"] == "i32" and attrs[index["stride_qn"]] == aligned
    assert signature["lowrank_scale"] == "fp32" and index["lowrank_scale"] not in attrs
    assert constexprs[index["BLOCK_R"]] == 16 and constexprs[index["HAS_BIAS"]] is True
    assert constexprs[index["DOT_DTYPE"]] == triton.language.bfloat16


def test_checks_flag_spills_shared_memory_and_missing_tensor_cores():
    job = cr.Job("dx_gemm", "dropout", "bf16", "sm_80", 16, {}, 8, 3)
    clean = cr.Row("dx_gemm", "dropout", "bf16", "sm_80", 16, 16, "128x256x64", 8, 3, registers=200,
                   spill_stores=0, spill_loads=0, shared=configs.smem_limit((8, 0)), mma=64, mma_name="HMMA")
    assert cr.check(clean, job) == []
    for change, words in ((dict(spill_loads=4), "spills"), (dict(shared=configs.smem_limit((8, 0)) + 1), "shared"),
                          (dict(mma=0), "no HMMA")):
        row = cr.Row(**{**clean.__dict__, **change})
        failures = cr.check(row, job)
        assert len(failures) == 1 and words in failures[0], (change, failures)
    # fp32 GEMMs and the narrow kernels may run on CUDA cores
    narrow = cr.Job("da_reduce", "-", "bf16", "sm_80", 16, {}, 4, 3)
    assert cr.check(cr.Row(**{**clean.__dict__, "mma": 0}), narrow) == []


def test_hopper_gemms_shared_memory_model_and_register_budgets(report):
    """The TMA and warp-specialised GEMMs: the configs are pruned by a shared-memory model that bounds what the
    compiler allocates (so no config passes the limit at any rank), the 128 x 256 x 64 TMA tile keeps 4 stages at
    rank 16 (its epilogue in slices), and the Gluon kernel gives its producer a register budget (USETMAXREG)."""
    _, rows = report
    hopper = [r for r in rows if r.kernel in cr.TMA_KERNELS + cr.WS_KERNELS and r.dtype == "bf16"]
    assert {r.kernel for r in hopper} == set(cr.TMA_KERNELS + cr.WS_KERNELS)
    for r in hopper:
        bm, bn, bk = map(int, r.config.split("x"))
        if r.kernel in cr.TMA_KERNELS:
            subtile = next(c.kwargs["SUBTILE"] for c in configs.gemm_tma_configs((9, 0), torch.bfloat16,
                                                                                 dropout="dropout" in r.variant)
                           if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                               c.num_stages) == (bm, bn, bk, r.num_warps, r.num_stages))
            model = configs.tma_shared_bytes(bm, bn, bk, r.num_stages, subtile, 16, 2)
        else:
            stages = next(c.kwargs["NUM_STAGES"] for c in configs.gemm_ws_configs((9, 0), torch.bfloat16)
                          if (c.kwargs["BLOCK_N"], c.num_warps) == (bn, r.num_warps))
            model = configs.ws_shared_bytes(bm, bn, bk, stages, 16, 2)
            assert r.setmaxnreg, (r.kernel, r.config)
        assert r.shared <= model, (r.kernel, r.config, r.num_stages, r.shared, model)
    def big_four_stage(block_r):
        return [c for c in configs.gemm_tma_configs((9, 0), torch.bfloat16, block_r=block_r)
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) == (128, 256, 4)]
    assert big_four_stage(16) and not big_four_stage(64)   # rank 64's operands take the 4th stage's room
    job = cr.Job("fwd_gemm_ws", "W^T", "bf16", "sm_90", 16, {}, 8, 1)
    ws_row = cr.Row("fwd_gemm_ws", "W^T", "bf16", "sm_90", 16, 16, "128x128x64", 8, 1, registers=168,
                    spill_stores=0, spill_loads=0, shared=1024, mma=5, mma_name="HGMMA", tma_loads=2, setmaxnreg=0)
    assert cr.check(ws_row, job) == ["no USETMAXREG in the warp-specialised GEMM"]


def test_command_line_writes_json_and_exits_nonzero_on_a_failing_row(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_jobs(jobs, workers=0, progress=None):
        calls.append(jobs)
        rows = [cr.Row(j.kernel, j.variant, j.dtype, j.target, j.rank, 16, "-", j.num_warps, j.num_stages,
                       registers=40, spill_stores=0, spill_loads=0, shared=1024, mma=4, mma_name="HGMMA")
                for j in jobs]
        rows[-1].failures = ["spills 8 B stored / 8 B loaded"]
        return rows

    monkeypatch.setattr(cr, "run_jobs", fake_run_jobs)
    out = tmp_path / "report.json"
    status = cr.main(["--target", "sm_90", "--kernel", "da_reduce", "--dtype", "bf16", "--rank", "16",
                      "--json", str(out)])
    assert status == 1
    rows = json.loads(out.read_text())["rows"]
    # da_reduce's variants: no dropout, the keep-mask from the forward's bits
    assert len(rows) == len(calls[0]) == 2 * len(configs.reduce_configs((9, 0), torch.bfloat16))
    assert rows[-1]["failures"] and not rows[0]["failures"]
    assert "spills 8 B" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cr.main(["--target", "sm_75"])


def test_one_real_compilation_through_the_command_line(tmp_path):
    out = tmp_path / "report.json"
    status = cr.main(["--target", "sm_90", "--kernel", "da_reduce", "--dtype", "bf16", "--rank", "16",
                      "--first-config", "--heaviest-variant", "--jobs", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert status == 0 and len(rows) == 1
    assert rows[0]["registers"] > 0 and rows[0]["shared"] > 0 and rows[0]["mma_name"] == "HGMMA"


def test_markdown_page_and_progress_lines(tmp_path, monkeypatch):
    """--markdown PATH writes the page (the command, the subset it is, a summary, every row); on a non-terminal
    a progress line comes every --progress-every compilations and at the end."""
    def fake_run_jobs(jobs, workers=0, progress=None):
        for done in range(1, len(jobs) + 1):
            progress(done, len(jobs))
        return [cr.Row(j.kernel, j.variant, j.dtype, j.target, j.rank, 16, "-", j.num_warps, j.num_stages,
                       registers=40 + i, spill_stores=0, spill_loads=0, shared=1024, mma=4, mma_name="HGMMA")
                for i, j in enumerate(jobs)]

    monkeypatch.setattr(cr, "run_jobs", fake_run_jobs)
    err = io.StringIO()   # not a terminal
    monkeypatch.setattr(cr.sys, "stderr", err)
    page = tmp_path / "report.md"
    args = ["--target", "sm_90", "--kernel", "da_reduce", "--dtype", "bf16", "--rank", "16", "--markdown",
            str(page), "--progress-every", "2"]
    assert cr.main(args + ["--json", str(tmp_path / "r.json")]) == 0
    n = 2 * len(configs.reduce_configs((9, 0), torch.bfloat16))   # da_reduce's two variants
    lines = [line for line in err.getvalue().splitlines() if line.startswith("compiled ")]
    assert [line.split(" (")[0] for line in lines] == [f"compiled {d}/{n}" for d in range(2, n + 1, 2)] + \
        ([f"compiled {n}/{n}"] if n % 2 else [])
    text = page.read_text()
    assert f"`{shlex.join(['python', '-m', 'lora_fast.compile_report', *args])}`" in text
    assert f"**{n} compilations: {n} pass, 0 fail.** A subset of the full report's {len(cr.make_jobs())}" in text
    assert f"| da_reduce | sm_90 | {n} | {40 + n - 1} | 0 | 1024 | 4 HGMMA | 0 |" in text
    assert text.count("| da_reduce | ") == n + 1 and "## Every compilation, sm_90" in text


def test_fp32_adapter_ds_pass_with_db_on_sm80_fp16_does_not_spill():
    """dS = dY B^T finishing dB with fp32 adapters on an fp16 dY (PEFT's default adapters; the Q tile takes the
    fp16 range guard) at rank 16 on sm_80: 64 w4 s4 spilled 40 B (compile report, triton 3.9), and ops launches
    it with its own list without it. fp16 is outside the CI set, hence this one compilation per config."""
    jobs = [j for j in cr.make_jobs(targets=("sm_80",), kernels=("dyb_proj",), dtypes=("fp16",), ranks=(16,))
            if j.variant == "dB+split+fp32-Q"]
    expected = configs.proj_configs((8, 0), torch.float16, partials=True, q_fp32=True)
    assert [(j.num_warps, j.num_stages, j.config["BLOCK_K"]) for j in jobs] \
        == [(c.num_warps, c.num_stages, c.kwargs["BLOCK_K"]) for c in expected] and jobs
    assert (4, 4) not in [(j.num_warps, j.num_stages) for j in jobs]
    for row in cr.run_jobs(jobs, workers=1):
        assert row.failures == [] and row.spill_stores == 0 and row.spill_loads == 0, row


def test_tma_host_descriptor_rows():
    """The TMA GEMM's host-descriptor variants (LORA_FAST_TMA_DESC=host) are in the report, typed as Triton's JIT types
    a TensorDescriptor argument (the config's block shapes), and a row of them fails with any tensor-map instruction
    or global scratch left (what host-side descriptors remove)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    jobs = [j for j in cr.make_jobs(targets=("sm_90",), kernels=cr.TMA_KERNELS, dtypes=("fp16",), ranks=(16,),
                                    first_config=True) if j.config.get("HOST_DESC")]
    assert sorted(j.variant for j in jobs) == ["W^T+bias+host-desc", "W^T+bias+term-tma+host-desc",
                                               "dropout+host-desc", "dropout+term-tma+bits-tma+host-desc"]
    job = next(j for j in jobs if j.variant == "dropout+term-tma+bits-tma+host-desc")
    fn, args = cr.launch_args(job)
    signature, _, attrs = cr.specialise(fn, args, cr.constexpr_names(fn), make_backend(GPUTarget("cuda", 90, 32)))
    bm, bn, bk, sub = (job.config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SUBTILE"))
    expected = {"P_ptr": f"fp16[{bm},{bk}]", "Q_ptr": f"fp16[{bk},{bn}]", "OUT_ptr": f"fp16[{bm},{bn // sub}]",
                "L_ptr": f"fp16[{bm},16]", "RM_ptr": f"fp16[{bn},16]", "MASK_ptr": f"u8[{bm},{bn // 8}]",
                "F_ptr": f"fp32[{bm}]"}
    for name, desc in expected.items():
        assert signature[name] == f"tensordesc<{desc}>", (name, signature[name])
        assert (fn.arg_names.index(name),) not in attrs
    assert signature["BIAS_ptr"] == "*fp16"   # dX has no bias: the output's pointer in its place
    row = cr.Row(job.kernel, job.variant, "fp16", "sm_90", 16, 16, "-", job.num_warps, job.num_stages, registers=160,
                 spill_stores=0, spill_loads=0, shared=1024, mma=5, mma_name="HGMMA", tma_loads=11, tensormaps=0,
                 scratch=0)
    assert cr.check(row, job) == []
    for change in (dict(tensormaps=3), dict(scratch=128)):
        assert "host-side descriptors" in cr.check(cr.Row(**{**row.__dict__, **change}), job)[0], change


def test_tma_gemm_term_by_pointer_loads_of_fp32_adapters_fits_its_model():
    """The TMA GEMM's term by pointer loads of fp32 B (fp32 adapters without the S pass's copy: calls with
    lora_forward's zero_rows) at bf16 rank 64: its fp32 tiles pass through shared memory beside the 16-bit ones, and
    the 16-bit model let configs of 245-303 KB through (compile report, triton 3.9); its own list
    (configs.tma_shared_bytes(rm_fp32=True)) compiles within the limit, without spills, under the model."""
    jobs = [j for j in cr.make_jobs(targets=("sm_90",), kernels=("fwd_gemm_tma",), dtypes=("bf16",), ranks=(64,))
            if j.variant == "W^T+bias+fp32-RM"]
    expected = configs.gemm_tma_configs((9, 0), torch.bfloat16, block_r=64, rm_fp32=True)
    assert jobs and len(jobs) == len(expected) < len(configs.gemm_tma_configs((9, 0), torch.bfloat16, block_r=64))
    for job, row in zip(jobs, cr.run_jobs(jobs, workers=1)):
        c = job.config
        model = configs.tma_shared_bytes(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], job.num_stages, c["SUBTILE"], 64, 2,
                                         rm_fp32=True)
        assert row.failures == [] and row.shared <= model, (row, model)
