"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_86) with Triton's own GPU compiler, as a
call launches them, and meet the compile report's rules (attnkern/tools/compile_report.py): no duplicated
tensor-core work or exps, the default configs within the target's shared memory, and for what the
benchmark grid runs no spills and asynchronous tile loads (bar the KNOWN violations). Runs without a
GPU: the interpreter the other CPU tests use accepts code the GPU compiler rejects."""
import json
import os
import subprocess
import sys

FIELDS = {"backend", "kernel", "config", "target", "registers", "spill_bytes", "smem_bytes", "mma_efficiency",
          "exp_per_score", "smem_loads_per_mma", "async_kv", "in_grid"}


def test_kernels_compile_for_gpu_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "attnkern", "compile-report", "--ci", "--backend", "triton",
                          "--jobs", "2", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1800)
    report = res.stdout[-20000:] + res.stderr[-3000:]
    assert res.returncode == 0, report
    assert " 0 violations" in res.stdout, report
    records = json.loads(out.read_text())
    assert records and all(FIELDS <= set(r) for r in records), report
    # Every record compiled and was measured: the grid's configs on both targets, with figures.
    assert all(not r["error"] and r["smem_bytes"] > 0 and r["registers"] > 0 for r in records), report
    grid = [r for r in records if r["in_grid"]]
    assert {r["target"] for r in grid} == {"sm_90", "sm_86"}, report
    assert {r["kernel"] for r in grid} == {"fwd", "fwd+lo", "dkdv", "dq"}, report
    assert all(r["mma_efficiency"] is not None and r["async_kv"] for r in grid), report
