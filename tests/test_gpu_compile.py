"""The Triton kernels compile for Hopper (sm90) and Ampere (sm80) with Triton's own GPU compiler, within
the shared memory of the target, and the kernels the benchmarks time spill at most a few registers. Runs
without a GPU: the interpreter the other CPU tests use accepts code the GPU compiler rejects."""
import os
import subprocess
import sys


def test_kernels_compile_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "attnkern.triton.compile_check", "--ci", "--jobs", "2"],
                         capture_output=True, text=True, env=env, timeout=1800)
    report = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0, report
    assert "variants compiled within limits" in res.stdout, report
