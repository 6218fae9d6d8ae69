"""The shared decode cases (tests/cases.py DECODE_CASES) on every backend of the test matrix that takes a
decode call: attention_with_kvcache's output and log-sum-exp against the float64 reference (tolerance
rule), and the in-place append (exactly the new keys at the right slots, nothing else touched).

Each (backend, dtype) pair of matrix.py is asked through kvcache.unsupported_reason; a backend that
declines the call is skipped with its reason, so a decode kernel joins these tests by accepting calls.
The reference backend is left out: it runs the oracle's own code (kvcache_reference)."""
import pytest
import torch

import attnkern
from attnkern import kvcache
from attnkern.tolerance import check

from cases import decode_cases, decode_kwargs, make_decode_inputs, run_decode_reference
from conftest import DEVICE
from matrix import pair_id, pairs


def _declines(backend: str, inputs, case) -> str:
    problem, _, _ = kvcache.check_call(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k_new"],
                                       inputs["v_new"], inputs["cache_seqlens"], inputs["block_table"],
                                       **{"softcap": None, "alibi_slopes": None, "scale": None, "num_splits": 0,
                                          **decode_kwargs(case, DEVICE)})
    return kvcache.unsupported_reason(backend, problem)


DECODE_PAIRS = [p for p in pairs() if p[0] != "reference"]
# Kernels interpreted on the CPU (Triton's interpreter, the CUDA emulator) take the cases up to 4k keys:
# an 8k case costs them 20-40 s each, and the 8k cases' shapes add no kernel path the others miss.
INTERPRETED = {"triton", "cuda-emu"} if torch.device(DEVICE).type == "cpu" else set()
CASE_PAIRS = [(case, pair) for case in decode_cases(torch.device(DEVICE).type) for pair in DECODE_PAIRS
              if pair[0] not in INTERPRETED or max(case.cache) + case.Lnew <= 4096]


@pytest.mark.parametrize("case, pair", CASE_PAIRS, ids=lambda x: pair_id(x) if isinstance(x, tuple) else str(x))
def test_decode_case(case, pair):
    backend, dtype = pair
    inputs = make_decode_inputs(case, dtype, DEVICE, seed=len(case.name))
    why = _declines(backend, inputs, case)
    if why:
        pytest.skip(f"{backend} declines: {why}")
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with torch.inference_mode():
        out, lse = attnkern.attention_with_kvcache(
            inputs["q"], k_cache, v_cache, inputs["k_new"], inputs["v_new"], inputs["cache_seqlens"],
            block_table=inputs["block_table"], return_lse=True, backend=backend, **decode_kwargs(case, DEVICE))
    torch.testing.assert_close(k_cache, inputs["k_after"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, inputs["v_after"], rtol=0, atol=0, equal_nan=True)
    o64, l64 = run_decode_reference(inputs, case, torch.float64)
    olp, llp = run_decode_reference(inputs, case, dtype)
    assert out.shape == (case.B, case.Lq, case.Hq, case.ev) and out.dtype == dtype
    assert lse.shape == (case.B, case.Hq, case.Lq)
    msgs = [check("out", out, o64, olp, dtype), check("lse", lse, l64, llp.float(), dtype)]
    assert not any(msgs), "\n".join(m for m in msgs if m)


def test_decode_cases_cover_the_issue():
    """Lq 1..16, caches up to 8k with ragged lengths (and an empty one), paged and contiguous, GQA 8:1."""
    cpu = decode_cases("cpu")
    assert {c.Lq for c in cpu} >= {1, 16} and max(max(c.cache) + c.Lnew for c in cpu) >= 8192
    assert any(0 in c.cache for c in cpu) and all(len(set(c.cache)) > 1 for c in cpu)
    assert any(c.page_size for c in cpu) and any(c.page_size is None for c in cpu)
    assert any(c.Hq // c.Hkv == 8 for c in cpu)


def _call_args(inputs):
    return (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k_new"], inputs["v_new"],
            inputs["cache_seqlens"])


def test_explain_kvcache_names_the_runner_and_every_decline():
    """explain_kvcache agrees with the backends' own answers, appends nothing, and reports (not raises) an
    explicit backend that declines."""
    from attnkern.backends import names

    case = decode_cases("cpu")[1]
    inputs = make_decode_inputs(case, torch.float32, DEVICE)
    kw = dict(block_table=inputs["block_table"], **decode_kwargs(case, DEVICE))
    k_before = inputs["k_cache"].clone()
    e = attnkern.explain_kvcache(*_call_args(inputs), **kw)
    torch.testing.assert_close(inputs["k_cache"], k_before, rtol=0, atol=0, equal_nan=True)
    declining = {n: _declines(n, inputs, case) for n in names() if n not in ("auto", "reference")}
    declining = {n: why for n, why in declining.items() if why}
    assert e.rejected == {n: why for n, why in declining.items() if n != e.backend}
    assert e.backend not in declining and e.backward.startswith("none")
    assert f"B={case.B} Lq={case.Lq} Hq={case.Hq} Hkv={case.Hkv}" in e.problem and "paged" in e.problem
    text = str(e)
    assert text.startswith(f"backend: {e.backend}") and all(f"not {n}: {why}" in text for n, why in e.rejected.items())
    if declining:  # a backend that declines, asked by name: reported with its reason
        name, why = next(iter(declining.items()))
        e = attnkern.explain_kvcache(*_call_args(inputs), backend=name, **kw)
        assert e.backend == "none" and why in e.reason
    e = attnkern.explain_kvcache(*_call_args(inputs), backend="reference", **kw)
    assert (e.backend, e.reason, e.fallback) == ("reference", "requested explicitly", False)


def test_explain_kvcache_checks_arguments_as_the_call_does():
    case = decode_cases("cpu")[1]
    inputs = make_decode_inputs(case, torch.float32, DEVICE)
    bad = inputs["block_table"].clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="block_table holds page -1"):
        attnkern.explain_kvcache(*_call_args(inputs), block_table=bad)
    with pytest.raises(ValueError, match="k_new and v_new come together"):
        attnkern.explain_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k_new"], None,
                                 inputs["cache_seqlens"], block_table=inputs["block_table"])
