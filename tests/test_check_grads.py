"""`attnkern check-grads`: attnkern's backends pass, a planted mistake fails with exit status 1, skips
are reported as skips, --json is machine-readable."""
import json
import os
import subprocess
import sys

import pytest

from attnkern.tools import cli
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
    # the battery has seven cases; the last two (a sliding window; softcap, ALiBi and dropout) are skipped
    # for a function with SDPA's signature
    assert set(by_target) == {"reference", "attention_fns:nan_grad_sdpa"}
    assert [c["status"] for c in by_target["reference"]] == ["PASS"] * 7
    for c in by_target["attention_fns:nan_grad_sdpa"][:5]:
        assert c["status"] == "FAIL" and "dq:" in c["reason"] and "NaN" in c["reason"]
    window, variants = by_target["attention_fns:nan_grad_sdpa"][5:]
    assert window["status"] == "SKIP" and "takes no window=" in window["reason"]
    assert variants["status"] == "SKIP" and "takes no softcap=, alibi_slopes=, dropout_rng=" in variants["reason"]
    assert "7 passed, 5 failed, 2 skipped" in res.stderr


def test_softcap_alibi_and_dropout_flags(tmp_path, capsys, monkeypatch):
    """--softcap, --alibi (random slopes) and --dropout (a fixed rng): attnkern's backends that take them
    pass, and say why where they do not; torch's SDPA has none of them: skipped, saying which."""
    monkeypatch.syspath_prepend(HERE)
    path = tmp_path / "grads.json"
    rc, out, _ = _run(["check-grads", "--backends", "reference,torch", "--fn", "attention_fns:right_variants",
                       *SHAPE, "--causal", "--softcap", "2.5", "--alibi", "--dropout", "0.2", "--dtypes", "fp32",
                       "--gradcheck", "--json", str(path)], capsys)
    assert rc == 0, out
    doc = json.loads(path.read_text())
    by_target = {c["target"]: c for c in doc["checks"]}
    for name in ("reference", "attention_fns:right_variants"):
        c = by_target[name]
        assert c["status"] == "PASS" and c["shape"].endswith("causal softcap=2.5 alibi=h dropout=0.2")
        options = c["report"]["options"]
        assert options["softcap"] == 2.5 and options["dropout_p"] == 0.2 and len(options["dropout_rng"]) == 2
        slopes = options["alibi_slopes"]  # random, one per query head
        assert len(slopes) == 4 and len(set(slopes)) == 4 and all(0.05 <= s < 1 for s in slopes)
        assert c["report"]["gradcheck"]["passed"] is True
    assert by_target["torch"]["status"] == "SKIP"
    assert "takes no softcap=, alibi_slopes=, dropout_rng=" in by_target["torch"]["reason"]


@pytest.mark.parametrize("flags, fn, failing", [
    (["--softcap", "1.5"], "no_softcap_variants", {"out", "dq", "dk", "dv"}),
    (["--dropout", "0.3"], "backward_redraws_dropout_variants", {"dq", "dk", "dv"}),
])
def test_a_variant_mistake_fails(capsys, monkeypatch, tmp_path, flags, fn, failing):
    """A function that ignores the cap fails everywhere; one whose backward draws another dropout mask
    than its forward fails the gradients only (the check uses the same rng in both)."""
    monkeypatch.syspath_prepend(HERE)
    path = tmp_path / "grads.json"
    rc, out, _ = _run(["check-grads", "--fn", f"attention_fns:{fn}", *SHAPE, *flags, "--dtypes", "fp32",
                       "--json", str(path)], capsys)
    assert rc == 1, out
    (check,) = json.loads(path.read_text())["checks"]
    assert check["status"] == "FAIL"
    assert {t["name"] for t in check["report"]["tensors"] if not t["passed"]} == failing


def test_variant_flags_check_their_values(capsys):
    for flags, message in ((["--softcap", "0"], "--softcap: expected a number > 0"),
                           (["--softcap", "nan"], "--softcap: expected a finite number"),
                           (["--dropout", "1"], "--dropout: expected a probability in (0, 1)"),
                           (["--dropout", "-0.1"], "--dropout: expected a probability in (0, 1)")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["check-grads", "--backends", "reference", *SHAPE, *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err
