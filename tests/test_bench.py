"""`attnkern bench` on tiny CPU cells: every cell lands in the JSON (measured or marked with a reason),
the PNG is an image, the markdown summary and --compare work, exit codes and flag errors are right;
plus the FLOP convention and the CPU peak-memory measurement."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from attnkern.tools import cli
from attnkern.tools.bench import measure, providers
from attnkern.tools.bench.grid import BenchConfig, Shape, parse_kv_seqlen, parse_length
from attnkern.tools.bench.runner import OK, Sweep, cell_key
from attnkern.tools.flops import attention_flops, causal_pairs
from attnkern.band import make_band

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seqlens", "16,32", "--tokens", "64", "--head-dims", "16", "--heads", "2", "--repeats", "2",
        "--warmup", "0", "--no-progress", "--device", "cpu"]


def test_flops_follow_the_design_convention():
    assert attention_flops(2, 3, 128, 128, 64) == 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 128, 64, causal=True) == 4 * 2 * 3 * 128 * 128 * 64 / 2
    assert attention_flops(1, 1, 10, 20, 64, 32) == 2 * 10 * 20 * (64 + 32)
    assert attention_flops(1, 1, 8, 8, 16, mode="bwd") == 2.5 * attention_flops(1, 1, 8, 8, 16)
    assert attention_flops(1, 1, 8, 8, 16, mode="fwd+bwd") == 3.5 * attention_flops(1, 1, 8, 8, 16)
    for L, S in [(3, 7), (7, 3), (1, 5), (16, 9)]:  # non-square causal: the unmasked pairs exactly
        for causal in ("top_left", "bottom_right"):
            code = 1 if causal == "top_left" else 2
            assert causal_pairs(L, S, causal) == int(make_band(code, None).allowed(L, S).sum()), (L, S, causal)
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(1, 1, 8, 8, 16, mode="forward")


def test_length_parsing():
    assert parse_length("512") == 512 and parse_length("2k") == 2048 and parse_length("1.5K") == 1536
    assert parse_kv_seqlen("x2") == "x2" and parse_kv_seqlen("4k") == "4096"
    for bad in ("0", "-4", "abc", "1.3", "2m"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_cpu_peak_memory_sees_a_large_temporary():
    if measure.cpu_memory_method() is not None:
        pytest.skip(measure.cpu_memory_method())
    n = 16 << 20  # 64 MiB of float32, written so that its pages are resident

    def run(_):
        t = torch.ones(n)
        t.add_(1.0)

    peak = measure.peak_extra_bytes(lambda i: None, run, torch.device("cpu"))
    assert 60 << 20 <= peak <= 200 << 20


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_sweep_writes_every_cell_a_png_and_a_summary(tmp_path, capsys):
    out = tmp_path / "run.json"
    names = "attnkern:reference,sdpa,sdpa:efficient,naive"
    rc, stdout, _ = _run(["bench", *TINY, "--causal", "both", "--modes", "fwd,bwd,fwd+bwd", "--providers", names,
                          "--json", str(out), "--markdown", str(tmp_path / "run.md")], capsys)
    assert rc == 0
    doc = json.loads(out.read_text())
    # every (shape, mode, provider) cell, exactly once
    expected = {(L, causal, mode, p) for L in (16, 32) for causal in (False, True)
                for mode in ("fwd", "bwd", "fwd+bwd") for p in names.split(",")}
    got = [(c["Lq"], c["causal"], c["mode"], c["provider"]) for c in doc["cells"]]
    assert sorted(got) == sorted(expected)
    assert len({cell_key(c) for c in doc["cells"]}) == len(doc["cells"])
    for c in doc["cells"]:
        assert c["B"] == 64 // c["Lq"] and c["H"] == 2 and c["E"] == 16 and c["dtype"] == "fp32"
        if c["status"] == OK:
            assert len(c["times_ms"]) == 2 and c["min_ms"] <= c["median_ms"] <= c["max_ms"]
            assert c["tflops"] == pytest.approx(c["flops"] / (c["median_ms"] * 1e-3) / 1e12)
            assert c["peak_mem_bytes"] is None or c["peak_mem_bytes"] >= 0
        else:
            assert c["reason"] and c["tflops"] is None
    by = {(c["Lq"], c["causal"], c["mode"], c["provider"]): c for c in doc["cells"]}
    # torch has no CPU efficient kernel: marked, with the reason; the others ran
    for k, c in by.items():
        if k[-1] == "sdpa:efficient":
            assert c["status"] == "unsupported" and "no CPU efficient kernel" in c["reason"]
        else:
            assert c["status"] == OK
            # the baseline's speedup over itself is 1; the others' are time ratios
            base = by[k[:-1] + ("sdpa",)]
            assert c["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / c["median_ms"])
    assert doc["schema"] == "attnkern-bench/1" and doc["device"]["type"] == "cpu" and doc["device"]["name"]
    assert doc["versions"]["torch"] == torch.__version__ and doc["date"] and "git_commit" in doc
    assert doc["config"]["seqlens"] == [16, 32] and doc["config"]["repeats"] == 2

    png = tmp_path / "run.png"  # default: the results file's name with .png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    summary = (tmp_path / "run.md").read_text()
    assert "## fp32  E=16  H=2  causal  fwd+bwd" in summary and "| naive |" in summary
    assert "unsupported: torch has no CPU efficient kernel" in stdout and "vs sdpa" in stdout


def test_score_mods_are_grid_axes_side_by_side(tmp_path, capsys):
    """--softcap, --alibi and --dropout give every (shape, mode, provider) one cell per variant; torch's
    SDPA cannot soft-cap (marked, with the reason) and runs the rest."""
    out = tmp_path / "run.json"
    names = "attnkern:reference,sdpa,naive"
    rc, stdout, _ = _run(["bench", *TINY, "--causal", "yes", "--modes", "fwd,fwd+bwd", "--providers", names,
                          "--softcap", "0,5", "--alibi", "both", "--dropout", "0,0.1", "--json", str(out)], capsys)
    assert rc == 0
    cells = json.loads(out.read_text())["cells"]
    variants = {(c, a, d) for c in (0.0, 5.0) for a in (False, True) for d in (0.0, 0.1)}
    expected = {(L, mode, p, v) for L in (16, 32) for mode in ("fwd", "fwd+bwd") for p in names.split(",")
                for v in variants}
    got = [(c["Lq"], c["mode"], c["provider"], (c["softcap"], c["alibi"], c["dropout"])) for c in cells]
    assert sorted(got) == sorted(expected)
    assert len({cell_key(c) for c in cells}) == len(cells)  # the variant is part of a cell's identity
    for c in cells:
        if c["provider"] == "sdpa" and c["softcap"]:
            assert c["status"] == "unsupported" and "soft-cap" in c["reason"]
        else:
            assert c["status"] == OK, (c["provider"], c["reason"])
    assert "softcap=5 alibi dropout=0.1" in stdout


@pytest.mark.parametrize("variant", [dict(alibi=True), dict(softcap=5.0), dict(softcap=5.0, alibi=True)],
                         ids=lambda v: "+".join(v))
def test_providers_compute_the_same_score_mods(variant):
    """What each provider computes for a variant is the same attention: attnkern's kernels, torch's SDPA
    (ALiBi as a float mask) and the naive reference agree; with dropout each call draws a new mask."""
    shape = Shape("fp32", 2, 4, 2, 40, 48, 16, 16, True, None, **variant)
    q, k, v = (torch.randn(2, h, n, 16) for h, n in ((4, 40), (2, 48), (2, 48)))
    names = ["attnkern:reference", "naive"] + ([] if shape.softcap else ["sdpa"])
    if providers.by_name()["attnkern:cpu"].availability(torch.device("cpu")) is None:
        names.append("attnkern:cpu")
    outs = [providers.by_name()[n].build(shape, torch.device("cpu"))(q, k, v) for n in names]
    for name, o in zip(names[1:], outs[1:]):
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5, msg=name)
    dropped = Shape("fp32", 2, 4, 2, 40, 48, 16, 16, True, None, dropout=0.3, **variant)
    for name in names:
        fn = providers.by_name()[name].build(dropped, torch.device("cpu"))
        a, b = fn(q, k, v), fn(q, k, v)
        assert not torch.equal(a, b) and not torch.equal(a, outs[0]), name


def test_a_dtype_a_provider_cannot_do_is_marked(tmp_path, capsys):
    """Under the test suite's Triton interpreter, bfloat16 is refused (the interpreter computes its dots
    wrongly) while float32 runs: the bf16 cells say so and the rest of the sweep is measured."""
    out = tmp_path / "run.json"
    rc, _, _ = _run(["bench", *TINY, "--seqlens", "16", "--causal", "yes", "--dtypes", "fp32,bf16",
                     "--modes", "fwd,fwd+bwd", "--repeats", "1", "--providers", "attnkern:triton,sdpa",
                     "--no-plot", "--json", str(out)], capsys)
    assert rc == 0
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 2 * 2 * 2
    for c in cells:
        if c["provider"] == "attnkern:triton" and c["dtype"] == "bf16":
            assert c["status"] == "unsupported" and "bfloat16" in c["reason"]
        else:
            assert c["status"] == OK and c["median_ms"] > 0


def test_out_of_memory_and_errors_are_marked_and_the_sweep_goes_on(monkeypatch):
    def oom(shape, device):
        def fn(q, k, v):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return fn

    def broken(shape, device):
        def fn(q, k, v):
            raise ValueError("a bug in the provider")
        return fn

    monkeypatch.setattr(providers.NaiveProvider, "build", lambda self, shape, device: oom(shape, device))
    monkeypatch.setattr(providers.FlexProvider, "build", lambda self, shape, device: broken(shape, device))
    cfg = BenchConfig(device="cpu", seqlens=[16, 32], head_dims=[16], dtypes=["fp32"], modes=["fwd", "fwd+bwd"],
                      causal=[True], providers=["naive", "flex", "sdpa"], tokens=32, heads=2, repeats=2, warmup=0)
    cells = Sweep(cfg).run()
    assert len(cells) == 2 * 2 * 3
    status = {(c["Lq"], c["mode"], c["provider"]): c for c in cells}
    for (L, mode, p), c in status.items():
        if p == "naive":
            assert c["status"] == "OOM" and "out of memory" in c["reason"]
        elif p == "flex":
            assert c["status"] == "error" and "ValueError: a bug in the provider" in c["reason"]
        else:
            assert c["status"] == OK and c["median_ms"] > 0


def test_strict_exits_nonzero_on_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(providers.NaiveProvider, "build",
                        lambda self, shape, device: (lambda q, k, v: 1 / 0))
    argv = ["bench", *TINY, "--modes", "fwd", "--causal", "no", "--providers", "sdpa,naive", "--no-plot",
            "--json", str(tmp_path / "r.json")]
    rc, _, err = _run(argv, capsys)
    assert rc == 0 and "ZeroDivisionError" in err
    rc, _, _ = _run(argv + ["--strict"], capsys)
    assert rc == 1


def test_nothing_measurable_exits_nonzero(tmp_path, capsys):
    rc, _, err = _run(["bench", *TINY, "--modes", "fwd", "--providers", "sdpa:cudnn", "--no-plot",
                       "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 1 and "no cell could be measured" in err
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    assert cells and all(c["status"] == "unsupported" for c in cells)


def test_compare_prints_per_cell_speedups(tmp_path, capsys):
    a = tmp_path / "a.json"
    rc, _, _ = _run(["bench", *TINY, "--modes", "fwd", "--causal", "no", "--providers", "sdpa,naive",
                     "--no-plot", "--json", str(a)], capsys)
    assert rc == 0
    doc = json.loads(a.read_text())
    faster = copy.deepcopy(doc)
    for c in faster["cells"]:
        c["median_ms"] = c["median_ms"] / (2.0 if c["provider"] == "sdpa" else 0.5)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(faster))
    rc, out, _ = _run(["bench", "--compare", str(a), str(b)], capsys)
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("fp32 ")]
    assert len(rows) == 4  # 2 lengths x 2 providers
    assert all(line.endswith("2.00x") for line in rows if " sdpa " in line)
    assert all(line.endswith("0.50x") for line in rows if " naive " in line)
    assert "sdpa" in out.split("geometric mean")[1] and "2.00x over 2 cell(s)" in out


@pytest.mark.parametrize("argv, flag", [
    (["bench", "--seqlens", "0"], "--seqlens"),
    (["bench", "--seqlens", "1k,abc"], "--seqlens"),
    (["bench", "--modes", "fwdd"], "--modes"),
    (["bench", "--dtypes", "fp8"], "--dtypes"),
    (["bench", "--providers", "cudnn"], "--providers"),
    (["bench", "--heads", "4", "--gqa", "3"], "--gqa"),
    (["bench", "--varlen", "--heads", "4", "--gqa", "3"], "--gqa"),
    (["bench", "--varlen", "--varlen-lengths", "9..2x3"], "--varlen-lengths"),
    (["bench", "--tokens", "1k", "--batch", "2"], "--batch"),
    (["bench", "--kv-seqlen", "x-1"], "--kv-seqlen"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--softcap", "-1"], "--softcap"),
    (["bench", "--dropout", "0,1.5"], "--dropout"),
    (["bench", "--alibi", "maybe"], "--alibi"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--baseline", "fast"], "--baseline"),
    (["bench", "--compare", "missing.json", "missing.json"], "--compare"),
    (["check-grads", "--backends", "cuda-magic"], "--backends"),
    (["check-grads", "--fn", "no_colon"], "--fn"),
    (["check-grads", "--fn", "math:no_such_function"], "--fn"),
    (["check-grads", "--heads", "6", "--kv-heads", "4"], "--kv-heads"),
    (["check-grads", "--seqlen", "0"], "--seqlen"),
    (["check-grads", "--mask", "diagonal"], "--mask"),
    (["check-grads", "--scale", "nan"], "--scale"),
    (["frobnicate"], "COMMAND"),
])
def test_bad_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err, err


def test_varlen_grid_writes_every_cell_a_png_and_a_summary(tmp_path, capsys):
    """`--varlen`: one packed batch per --seqlens value against the padded batch through SDPA, each
    (batch, dtype, causal, provider, mode) cell once, FLOPs of the real tokens, the sweep's outputs."""
    from attnkern.tools.bench.varlen import scaled_lengths

    out = tmp_path / "varlen.json"
    rc, stdout, _ = _run(["bench", "--varlen", "--seqlens", "40,64", "--heads", "4", "--gqa", "2", "--head-dims",
                          "16", "--causal", "both", "--modes", "fwd,bwd,fwd+bwd", "--repeats", "2", "--json", str(out),
                          "--markdown", str(tmp_path / "varlen.md"), "--no-progress"], capsys)
    assert rc == 0, stdout
    doc = json.loads(out.read_text())
    got = sorted((c["Lq"], c["causal"], c["mode"], c["provider"]) for c in doc["cells"])
    assert got == sorted((L, causal, mode, p) for L in (40, 64) for causal in (False, True)
                         for mode in ("fwd", "bwd", "fwd+bwd") for p in ("attnkern varlen", "sdpa padded"))
    for c in doc["cells"]:
        lengths = scaled_lengths(c["Lq"])
        assert c["lengths"] == lengths and c["B"] == len(lengths) and max(lengths) == c["Lq"] == c["Lk"]
        assert (c["H"], c["Hkv"], c["E"], c["dtype"], c["status"]) == (4, 2, 16, "fp32", OK)
        assert c["flops"] == pytest.approx(sum(attention_flops(1, 4, n, n, 16, 16, c["causal"], c["mode"])
                                               for n in lengths))
        assert len(c["times_ms"]) == 2 and c["speedup_vs_baseline"] > 0
    assert doc["config"]["baseline"] == "sdpa padded" and doc["notes"]["varlen"]
    assert (tmp_path / "varlen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| attnkern varlen |" in (tmp_path / "varlen.md").read_text()
    assert "vs sdpa padded" in stdout and "batch: 8 sequences, lengths 16..40" in stdout


def test_varlen_grid_marks_a_reference_fallback(monkeypatch, capsys, tmp_path):
    from attnkern import backends

    for name in backends.AUTO_ORDER:  # no fused backend takes packed batches: auto would take the reference
        monkeypatch.setattr(backends.get(name), "varlen", False)
    rc, stdout, _ = _run(["bench", "--varlen", "--varlen-lengths", "3,9", "--modes", "fwd", "--repeats", "1",
                          "--out-dir", str(tmp_path), "--no-plot", "--no-progress"], capsys)
    assert rc == 0 and "attnkern varlen  unsupported: no varlen kernel runs it here" in stdout


def test_decode_grid_times_every_provider_or_says_why_not(tmp_path, capsys, monkeypatch):
    """`--decode` with a tiny grid (a cache that is not a whole number of pages); a call attnkern would only
    run on the reference path is marked with the reason, not timed."""
    from attnkern import kvcache

    out = tmp_path / "decode.json"
    rc, stdout, _ = _run(["bench", "--decode", "--decode-caches", "300", "--batch", "2", "--dtypes", "fp32",
                          "--repeats", "2", "--warmup", "1", "--json", str(out)], capsys)
    assert rc == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert doc["shape"]["B"] == 2 and (row["cache"], row["dtype"]) == (300, "float32")
    assert {"attnkern", "attnkern paged", "sdpa gqa", "sdpa repeat-kv"} <= set(row["ms"])
    assert row["speedup_vs_best_sdpa"] == pytest.approx(min(row["ms"]["sdpa gqa"], row["ms"]["sdpa repeat-kv"])
                                                        / row["ms"]["attnkern"])
    assert ("flash_attn kvcache" in row["ms"]) != ("flash_attn kvcache" in doc["not_run"])
    monkeypatch.setattr(kvcache, "unsupported_reason", lambda name, problem: None if name == "reference" else "no")
    rc, stdout, _ = _run(["bench", "--decode", "--decode-caches", "300", "--dtypes", "fp32", "--repeats", "1"], capsys)
    assert rc == 0 and "not run: attnkern: no decode kernel runs it here" in stdout


@pytest.mark.parametrize("causal", [False, True], ids=["keypad", "causal"])
def test_varlen_providers_compute_the_same_attention(causal):
    """The packed call and the padded SDPA call of the varlen grid agree on every real row."""
    import itertools

    from attnkern.tools.bench import varlen

    lengths, device = [5, 17, 1, 9], torch.device("cpu")
    cu = [0, *itertools.accumulate(lengths)]
    packed = varlen._input_sets(lengths, 4, 2, 8, torch.float64, device, 1, 3, padded=False)[0]
    padded = varlen._input_sets(lengths, 4, 2, 8, torch.float64, device, 1, 3, padded=True)[0]
    fn_packed = varlen._provider_fn("attnkern varlen", lengths, causal, (4, 2, 8), torch.float64, "reference",
                                    device)[0]
    fn_padded = varlen._provider_fn("sdpa padded", lengths, causal, (4, 2, 8), torch.float64, "auto", device)[0]
    got = fn_packed(*packed.frozen)
    want = varlen._pad(got, cu, max(lengths))
    ref = fn_padded(*padded.frozen)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(want[b, :, :n], ref[b, :, :n])


def test_no_command_runs_the_selfcheck(monkeypatch):
    from attnkern.tools import selfcheck

    monkeypatch.setattr(selfcheck, "main", lambda argv: 42)
    assert cli.main([]) == 42


def test_module_entry_point_and_the_bench_suite_run(tmp_path):
    """`python -m attnkern bench` in a fresh process (no interpreter: Triton is left out on a CPU), and
    `pytest bench/ --benchmark-only` on one cell per provider kind."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNKERN_POISON")}
    res = subprocess.run([sys.executable, "-m", "attnkern", "bench", *TINY, "--modes", "fwd", "--causal", "no",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "not included: attnkern:triton" in res.stdout
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "png"] and files[0].startswith("bench-cpu-")
    res = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                          "--bench-seqlens", "32", "--bench-tokens", "64", "--bench-modes", "fwd,bwd",
                          "--bench-causal", "yes", "--bench-providers", "attnkern:reference,sdpa,sdpa:efficient"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 passed, 2 skipped" in res.stdout, res.stdout


def test_context_parallel_bench_reports_time_comm_and_memory(tmp_path, capsys):
    """`attnkern bench --context-parallel 2` on a tiny problem (one spawn of 2 gloo processes): a row with
    the time, the exposed communication (within the step), the bytes sent per rank and the peak extra
    memory; no P = 1 measured, so no efficiency. comm_bytes follows the plan's formulas."""
    from attnkern.tools.bench.context_parallel import CPConfig, comm_bytes

    path = tmp_path / "cp.json"
    code = cli.main(["bench", "--context-parallel", "2", "--cp-length", "96", "--heads", "4", "--gqa", "2",
                     "--head-dims", "16", "--repeats", "1", "--json", str(path)])
    printed = capsys.readouterr().out
    assert code == 0 and "exposed comm" in printed and "Hq=4 Hkv=2 L=96 E=16" in printed
    (row,) = json.loads(path.read_text())["rows"]
    assert row["P"] == 2 and row["time"] > 0 and 0 <= row["comm"] <= row["time"] and row["shard_mb"] > 0
    assert row["efficiency"] is None and row["extra_mb"] >= 0
    # ring, K and V of one shard = 2 * (B=1) * (Hkv=2) * (n=48) * (E=16) fp32 values: one hop forward, one
    # backward, and P = 2 hops of the fp32 dK/dV accumulators
    assert row["sent_mb"] * 2**20 == pytest.approx((1 + 1 + 2) * (2 * 2 * 48 * 16) * 4)
    uly = CPConfig(procs=[4], method="ulysses", heads=8, kv_heads=2, length=64, dim=16, batch=1)
    # kv heads replicated to 4; per direction (2*8 + 2*4)*16*16*4 bytes + the lse, 3/4 of it leaves
    assert comm_bytes(uly, 4) == pytest.approx(2 * ((2 * 8 + 2 * 4) * 16 * 16 * 4 + 8 * 16 * 4) * 3 / 4)


def test_context_parallel_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--context-parallel", "0"])
    assert "--context-parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--context-parallel", "2", "--causal", "both"])
    assert "--causal" in capsys.readouterr().err
