"""The compile report's parts that need no compiler: the PTX main-loop figures (attnkern.tools.asm_stats), the
rules (attnkern.tools.compile_report) and the per-target config pruning (attnkern.triton.configs). The
compiled report itself runs in test_gpu_compile.py."""
import pytest

from attnkern.tools import asm_stats, compile_report
from attnkern.triton import configs
from attnkern.tools.compile_report import Record


def _ptx(body: str) -> str:
    return "\n".join([".entry k()", "{", "mov.u32 %r1, 0;", "$L__BB0_1:", body, "@%p1 bra $L__BB0_1;",
                      "$L__BB0_2:", "ret;", "}"])


WGMMA = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 1;"
MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%r1,%r2,%r3,%r4}, {%r5}, {%r6}, {%r7};"


def test_wgmma_work_counts_per_warpgroup():
    # A 64x64 tile over K = 64 (4 k-steps): one warpgroup does it exactly, two do it twice.
    body = "\n".join([WGMMA] * 4 + ["ex2.approx.ftz.f32 %r9, %r8;"] * 32 + ["cp.async.cg.shared.global [%r1], [%rd1], 16;"])
    useful, scores = 64 * 64 * 64, 64 * 64
    one = asm_stats.efficiency(_ptx(body), 4, useful, scores)
    assert (one.mma_efficiency, one.exp_per_score, one.async_kv, one.mma_kind) == (1.0, 1.0, True, "wgmma")
    two = asm_stats.efficiency(_ptx(body), 8, useful, scores)
    assert (two.mma_efficiency, two.exp_per_score) == (2.0, 2.0)


def test_float_ops_per_score():
    # 4 warps over a 64x64 tile: 32 lanes x 4 warps = 128 scores per instruction, so 32 FFMAs, 32 muls and
    # 32 subs are 1 + 1 + 1 per score; max, selp and ex2 are not counted.
    body = "\n".join([WGMMA] + ["fma.rn.f32 %r1, %r2, %r3, %r4;", "mul.f32 %r1, %r2, %r3;", "sub.f32 %r1, %r2, %r3;",
                                 "max.f32 %r1, %r2, %r3;", "selp.f32 %r1, %r2, %r3, %p1;",
                                 "ex2.approx.ftz.f32 %r9, %r8;"] * 32)
    eff = asm_stats.efficiency(_ptx(body), 4, 64 * 64 * 16, 64 * 64)
    assert eff.fops_per_score == 3.0 and eff.exp_per_score == 1.0


def test_mma_sync_work_and_shared_loads():
    # 4 warps, each 16 rows x 64 cols over K = 16: 8 m16n8k16 per warp; 4 ldmatrix.
    body = "\n".join([MMA] * 8 + ["ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1,%r2,%r3,%r4}, [%r5];"] * 4
                     + ["ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];"])
    eff = asm_stats.efficiency(_ptx(body), 4, 64 * 64 * 16, 64 * 64)
    assert eff.mma_efficiency == 1.0 and eff.smem_loads_per_mma == 0.5
    assert eff.async_kv is False and eff.exp_per_score == 0.0


def test_no_mma_loop_gives_no_figures():
    eff = asm_stats.efficiency(_ptx("add.f32 %r1, %r2, %r3;"), 4, 1, 1)
    assert eff.mma_efficiency is None and eff.main_loops == 0


def _record(**kw):
    base = dict(backend="triton", kernel="dq", config="64x64 w8 s2", target="sm_90",
                problem="float16 E=128 mask=0 causal=1", in_grid=True, chosen=True, registers=100, spill_bytes=0,
                smem_bytes=1000, smem_limit=2000, mma_efficiency=1.0, exp_per_score=1.0, smem_loads_per_mma=0.0,
                async_kv=True)
    base.update(kw)
    return Record(**base)


@pytest.mark.parametrize("change, rule", [
    (dict(mma_efficiency=1.67), "duplicated MMA work"),
    (dict(exp_per_score=2.0), "duplicated exps"),
    (dict(smem_bytes=3000), "shared memory"),
    (dict(spill_bytes=8), "spills"),
    (dict(async_kv=False), "synchronous"),
    (dict(error="CompilationError: x"), "CompilationError"),
])
def test_each_rule_fails_the_report(change, rule):
    bad = compile_report.violations([_record(**change)])
    assert len(compile_report.failures(bad)) == 1 and rule in bad[0][1]


def test_rules_spare_what_cannot_run_or_is_not_benchmarked():
    assert compile_report.violations([_record()]) == []
    # Pruned on this target: never chosen. Over the shared memory but not the default: autotune skips it.
    assert compile_report.violations([_record(chosen=False, mma_efficiency=2.0)]) == []
    assert compile_report.violations([_record(default=False, smem_bytes=3000)]) == []
    # Spills and synchronous loads only matter where the benchmark grid runs.
    assert compile_report.violations([_record(in_grid=False, spill_bytes=8, async_kv=False)]) == []


def test_ragged_head_dims_must_load_asynchronously():
    """Outside the grid, a ragged head dim's forward and two-pass backward still must not load
    synchronously (their strides' alignment reaches the kernel); fp32, the single pass and one-stage
    configs (nothing to pipeline) may."""
    ragged = dict(in_grid=False, async_kv=False, problem="float16 E=120 mask=0 causal=1 ragged")
    for kernel in ("fwd", "fwd+lo", "dkdv", "dq"):
        bad = compile_report.failures(compile_report.violations([_record(kernel=kernel, **ragged)]))
        assert len(bad) == 1 and "ragged head dim" in bad[0][1]
    assert compile_report.violations([_record(**ragged, kernel="onepass")]) == []
    assert compile_report.violations([_record(**dict(ragged, problem="float32 E=120 mask=0 causal=1 ragged"))]) == []
    assert compile_report.violations([_record(**dict(ragged, async_kv=True))]) == []
    assert compile_report.violations([_record(**dict(ragged, config="64x32 w4 s1"))]) == []  # one stage


def test_soft_capped_kernels_need_two_exps_per_score():
    """A soft-capped kernel takes tanh's exp and the softmax's: 2 per score is no duplication, 3 is."""
    assert compile_report.violations([_record(exps_needed=2, exp_per_score=2.06)]) == []
    bad = compile_report.violations([_record(exps_needed=2, exp_per_score=3.0)])
    assert len(bad) == 1 and "duplicated exps" in bad[0][1]


def test_known_violations_are_shown_but_do_not_fail():
    r = _record(kernel="dkdv", target="sm_86", spill_bytes=300, problem="float16 E=64 mask=0 causal=1")
    bad = compile_report.violations([r])
    assert len(bad) == 1 and bad[0][1].startswith("KNOWN") and compile_report.failures(bad) == []
    # Not the same kernel: it fails.
    assert compile_report.failures(compile_report.violations([_record(target="sm_86", spill_bytes=300)]))


@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("name, rows", [
    ("FWD_CONFIGS", lambda c: c.kwargs["BLOCK_M"]),
    ("DKDV_CONFIGS", lambda c: min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])),
    ("DQ_CONFIGS", lambda c: c.kwargs["BLOCK_M"]),
    ("DMASK_CONFIGS", lambda c: c.kwargs["BLOCK_M"]),
])
def test_every_tier_keeps_a_config_on_every_target(name, rows, arch):
    for tier in configs.TIERS:
        for cls in ("half", "fp32"):
            kept = [c for c in getattr(configs, name) if c.attnkern_tier == (tier, cls)
                    and configs.kept_on(c, arch)
                    and configs.chained_rows_ok(rows(c), c.num_warps, arch, c.attnkern_small_ok)]
            assert kept, (name, tier, cls, arch)


def test_chained_rows_rule():
    assert configs.chained_rows_ok(64, 4, 90) and configs.chained_rows_ok(128, 8, 90)
    assert not configs.chained_rows_ok(64, 8, 90)  # two warpgroups on one 64-row tile
    assert not configs.chained_rows_ok(32, 2, 90)  # below a wgmma tile
    assert configs.chained_rows_ok(32, 2, 80) and not configs.chained_rows_ok(32, 4, 80)
    assert configs.chained_rows_ok(32, 2, 90, small_ok=True) and not configs.chained_rows_ok(32, 4, 90, True)


def test_dmask_config_follows_the_target():
    with configs.for_target(90):
        c90 = configs.dmask_config(256, "float32")
    with configs.for_target(86):
        c86 = configs.dmask_config(256, "float32")
    with configs.for_target(90):
        h90 = configs.dmask_config(128, "float16")
    with configs.for_target(86):
        h86 = configs.dmask_config(128, "float16")
    assert (c90.kwargs, c90.num_warps) == (c86.kwargs, c86.num_warps)  # no 64-row tile fits at 256 fp32
    assert h90.kwargs["BLOCK_M"] >= 64 and h86.kwargs["BLOCK_M"] >= 16 * h86.num_warps


def test_cli_checks_saved_records(tmp_path, capsys):
    import json
    from dataclasses import asdict

    from attnkern.tools import cli

    path = tmp_path / "report.json"
    path.write_text(json.dumps([asdict(_record())]))
    assert cli.main(["compile-report", "--from-json", str(path)]) == 0
    assert "1 records, 0 violations" in capsys.readouterr().out
    path.write_text(json.dumps([asdict(_record()), asdict(_record(kernel="fwd", mma_efficiency=1.5))]))
    assert cli.main(["compile-report", "--from-json", str(path), "--markdown"]) == 1
    out = capsys.readouterr().out
    assert "| triton | fwd |" in out and "VIOLATION triton fwd sm_90" in out


def test_cli_refuses_the_interpreter_and_bad_flags(capsys):
    from attnkern.tools import cli

    assert cli.main(["compile-report"]) == 2  # the test suite runs with TRITON_INTERPRET=1
    assert "TRITON_INTERPRET" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile-report", "--backend", "rocm"])
    assert exc.value.code == 2 and "--backend" in capsys.readouterr().err


def _counts(mma, ldmatrix=0, ex2=0, sync=None, asynchronous=None):
    return {"launches": 1, "ctas": 1, "mma": mma, "ldmatrix": ldmatrix, "ex2_lanes": ex2,
            "async_load_bytes": {"key": 64, "value": 64} if asynchronous is None else asynchronous,
            "sync_load_bytes": sync or {}}


def test_cuda_counted_figures():
    """attnkern.tools.cuda_counts turns the emulator's counts into records: 64 x 64 scores at E = Ev = 64
    need 64·64·128 products = 256 m16n8k16 instructions."""
    from attnkern.tools import cuda_counts

    fwd = "void attnkern::cuda::attention_fwd_kernel<attnkern::cuda::FwdTraits<64, 64, 4, __half>, false>(P)"
    recs = cuda_counts.records_from_counts({fwd: _counts(256, 128, 64 * 64)}, 64, 64, 64 * 64, "float16 E=64",
                                           True, lambda n: "fwd")
    (r,) = recs
    assert (r.mma_efficiency, r.exp_per_score, r.smem_loads_per_mma, r.async_kv, r.config) == \
        (1.0, 1.0, 0.5, True, "Fwd<64,64,4>")
    assert compile_report.violations(recs) == []
    twice = cuda_counts.records_from_counts({fwd: _counts(512, 0, 2 * 64 * 64, sync={"value": 64})}, 64, 64,
                                            64 * 64, "float16 E=64", True, lambda n: "fwd")
    (r,) = twice
    assert (r.mma_efficiency, r.exp_per_score, r.async_kv, r.sync_bytes_per_score) == (2.0, 2.0, False, round(64 / 4096, 3))
    rules = [why for _, why in compile_report.violations(twice)]
    assert any("MMA" in w for w in rules) and any("exps" in w for w in rules) and any("synchronous" in w for w in rules)
    # Kernels without products (the backward's preprocess, the group split's sum) are left out.
    assert cuda_counts.records_from_counts({"attention_bwd_preprocess_kernel<__half>": _counts(0)}, 64, 64, 1,
                                           "float16 E=64", True, str) == []
