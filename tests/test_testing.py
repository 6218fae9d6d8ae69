"""attnkern.testing.check_gradients: a right attention function passes, planted mistakes are caught and
named, NaN/Inf are located, gradcheck runs where float64 does, bad inputs are refused clearly."""
import json

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern.testing import check_gradients
from attention_fns import (detached_key_sdpa, nan_grad_sdpa, right_sdpa, wrong_scale_sdpa,
                           zero_dmask_sdpa)
from matrix import DEVICE


def inputs(B=2, Hq=4, Hkv=2, L=24, S=40, E=16, Ev=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    return r(B, Hq, L, E), r(B, Hkv, S, E), r(B, Hkv, S, Ev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_right_function_passes(dtype):
    q, k, v = inputs(dtype=dtype)
    report = check_gradients(right_sdpa, q, k, v, is_causal=True, enable_gqa=True)
    assert report.passed, str(report)
    assert [t.name for t in report.tensors] == ["out", "dq", "dk", "dv"]
    for t in report.tensors:
        assert t.passed and t.error is not None and t.error <= t.bound
        assert t.max_abs_err is not None and t.rel_err is not None and t.max_abs_err_same_dtype is not None


def test_a_wrong_scale_in_the_backward_is_caught():
    q, k, v = inputs()
    report = check_gradients(wrong_scale_sdpa, q, k, v, is_causal=True, enable_gqa=True)
    assert not report.passed
    verdicts = {t.name: t.passed for t in report.tensors}
    # the forward is right; every gradient is wrong
    assert verdicts == {"out": True, "dq": False, "dk": False, "dv": False}
    failures = report.failures()
    assert len(failures) == 3 and all("> bound" in f for f in failures)
    text = str(report)
    assert text.startswith("FAIL") and "dq" in text


def test_nan_in_a_gradient_fails_and_says_where():
    q, k, v = inputs()
    report = check_gradients(nan_grad_sdpa, q, k, v, enable_gqa=True)
    dq = next(t for t in report.tensors if t.name == "dq")
    assert not report.passed and not dq.passed
    assert "NaN" in dq.message and "index (0, 0, 0, 7)" in dq.message
    assert all(t.passed for t in report.tensors if t.name != "dq")


def test_a_gradient_that_never_arrives_fails():
    q, k, v = inputs(Hkv=4)
    report = check_gradients(detached_key_sdpa, q, k, v)
    dk = next(t for t in report.tensors if t.name == "dk")
    assert not dk.passed and "no gradient for key" in dk.message


def test_mask_gradient_is_checked_when_the_mask_requires_grad():
    q, k, v = inputs(Hkv=4)
    bias = torch.randn(4, 24, 40, device=DEVICE, requires_grad=True)
    good = check_gradients(right_sdpa, q, k, v, attn_mask=bias)
    assert good.passed and [t.name for t in good.tensors][-1] == "d_mask"
    bad = check_gradients(zero_dmask_sdpa, q, k, v, attn_mask=bias)
    assert [t.name for t in bad.tensors if not t.passed] == ["d_mask"]
    # a constant float mask (no grad) and a bool mask: no d_mask
    for mask in (bias.detach(), torch.rand(24, 40, device=DEVICE) > 0.2):
        r = check_gradients(right_sdpa, q, k, v, attn_mask=mask)
        assert r.passed and "d_mask" not in [t.name for t in r.tensors]


def test_attnkern_and_torch_pass():
    q, k, v = inputs()
    mask = torch.rand(2, 1, 24, 40, device=DEVICE) > 0.3
    mask[..., 0] = True
    for fn in (attnkern.scaled_dot_product_attention, F.scaled_dot_product_attention):
        r = check_gradients(fn, q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
        assert r.passed, str(r)


def test_gradcheck_catches_a_wrong_backward_and_passes_a_right_one():
    q, k, v = inputs(B=1, Hq=2, Hkv=2, L=5, S=6, E=4, Ev=3)
    right = check_gradients(right_sdpa, q, k, v, gradcheck=True)
    assert right.gradcheck.ran and right.gradcheck.passed and not right.gradcheck.fast_mode
    wrong = check_gradients(wrong_scale_sdpa, q, k, v, gradcheck=True)
    assert wrong.gradcheck.ran and wrong.gradcheck.passed is False
    assert any(f.startswith("gradcheck:") for f in wrong.failures())


def test_gradcheck_is_skipped_where_the_function_refuses_float64():
    q, k, v = inputs(B=1, Hq=2, Hkv=2, L=5, S=6, E=4, Ev=3)

    def triton_only(query, key, value, **kw):
        return attnkern.attention(query, key, value, backend="triton", return_lse=False, **kw)

    r = check_gradients(triton_only, q, k, v, gradcheck=True)
    assert r.passed and not r.gradcheck.ran and "does not run in float64" in r.gradcheck.message


def test_report_serializes_and_prints():
    q, k, v = inputs()
    r = check_gradients(wrong_scale_sdpa, q, k, v, enable_gqa=True, name="mine")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["name"] == "mine" and d["passed"] is False and len(d["failures"]) == 3
    assert {t["name"] for t in d["tensors"]} == {"out", "dq", "dk", "dv"}
    assert "mine" in str(r) and "rel(ref64)" in str(r)


def test_bad_inputs_are_refused_with_the_argument_named():
    q, k, v = inputs(Hkv=4)
    with pytest.raises(TypeError, match="fn must be callable"):
        check_gradients("sdpa", q, k, v)
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        check_gradients(right_sdpa, q, [1.0], v)
    bad = q.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"query has non-finite values \(first at \(0, 1, 2, 3\)\)"):
        check_gradients(right_sdpa, bad, k, v)
    with pytest.raises(ValueError, match="grad_out must have the output's shape"):
        check_gradients(right_sdpa, q, k, v, grad_out=torch.ones(3))
    with pytest.raises(TypeError, match="must return the attention output as one tensor"):
        check_gradients(lambda q, k, v: (q, k), q, k, v)
