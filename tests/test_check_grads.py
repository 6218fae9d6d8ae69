"""`attnkern check-grads`: attnkern's backends pass, a planted mistake fails with exit status 1, skips
are reported as skips, --json is machine-readable."""
import json
import os
import subprocess
import sys

from attnkern import cli
from matrix import AUTO

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = ["--heads", "4", "--kv-heads", "2", "--seqlen", "24", "--kv-seqlen", "40", "--head-dim", "16",
         "--v-head-dim", "8", "--device", "cpu"]


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_backends_pass_on_a_command_line_shape(tmp_path, capsys):
    path = tmp_path / "grads.json"
    rc, out, _ = _run(["check-grads", "--backends", "triton,reference,torch", *SHAPE, "--causal",
                       "--json", str(path)], capsys)
    assert rc == 0, out
    doc = json.loads(path.read_text())
    assert doc["passed"] is True and doc["counts"] == {"PASS": 6, "FAIL": 0, "SKIP": 0}
    checks = doc["checks"]
    assert {(c["target"], c["dtype"]) for c in checks} == {
        (b, d) for b in ("triton", "reference", "torch") for d in ("fp32", "fp16")}
    for c in checks:
        assert c["shape"] == "B=1 H=4/2 L=24 S=40 E=16 Ev=8 causal"
        names = [t["name"] for t in c["report"]["tensors"]]
        assert names == ["out", "dq", "dk", "dv"]
        assert all(t["passed"] and t["max_abs_err"] is not None and t["rel_err"] is not None
                   and t["max_abs_err_same_dtype"] is not None for t in c["report"]["tensors"])
    assert "max|x-ref64|" in out and "6 passed, 0 failed, 0 skipped" in out


def test_the_mask_gradient_is_reported(capsys):
    rc, out, _ = _run(["check-grads", "--backends", "auto", *SHAPE, "--mask", "float-grad", "--dtypes", "fp32"],
                      capsys)
    assert rc == 0, out
    assert f"auto->{AUTO}" in out and "d_mask" in out


def test_a_wrong_function_fails_with_exit_status_1(capsys, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    rc, out, _ = _run(["check-grads", "--fn", "attention_fns:wrong_scale_sdpa", "--fn", "attention_fns:right_sdpa",
                       *SHAPE, "--dtypes", "fp32", "--quiet"], capsys)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith("FAIL  attention_fns:wrong_scale_sdpa")
    assert any(line.strip().startswith("dq: error norm") for line in lines)
    assert any(line.startswith("PASS  attention_fns:right_sdpa") for line in lines)
    assert "1 passed, 1 failed, 0 skipped" in out


def test_skips_are_reported_and_nothing_checked_is_a_failure(capsys):
    # under the test suite's interpreter the Triton backend refuses bfloat16
    rc, out, err = _run(["check-grads", "--backends", "triton", *SHAPE, "--dtypes", "bf16"], capsys)
    assert rc == 1 and "SKIP  triton" in out and "bfloat16" in out and "nothing was checked" in err
    rc, out, _ = _run(["check-grads", "--backends", "triton,reference", *SHAPE, "--dtypes", "bf16", "--quiet"], capsys)
    assert rc == 0 and "1 passed, 0 failed, 1 skipped" in out


def test_default_battery_and_json_on_stdout_in_a_fresh_process():
    """`python -m attnkern check-grads --json -` with the default battery: JSON alone on stdout. Without
    the interpreter the CPU has only the reference backend (--fn alone would check just the function)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "attnkern", "check-grads", "--dtypes", "fp32", "--json", "-",
                          "--backends", "reference", "--fn", "attention_fns:nan_grad_sdpa"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    by_target = {}
    for c in doc["checks"]:
        by_target.setdefault(c["target"], []).append(c)
    # the battery has six cases; the last, a sliding window, is skipped for a function with SDPA's signature
    assert set(by_target) == {"reference", "attention_fns:nan_grad_sdpa"}
    assert [c["status"] for c in by_target["reference"]] == ["PASS"] * 6
    for c in by_target["attention_fns:nan_grad_sdpa"][:5]:
        assert c["status"] == "FAIL" and "dq:" in c["reason"] and "NaN" in c["reason"]
    last = by_target["attention_fns:nan_grad_sdpa"][5]
    assert last["status"] == "SKIP" and "takes no window=" in last["reason"]
    assert "6 passed, 5 failed, 1 skipped" in res.stderr
