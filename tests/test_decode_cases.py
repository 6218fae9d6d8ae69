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


@pytest.mark.parametrize("pair", DECODE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("case", decode_cases(torch.device(DEVICE).type), ids=str)
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
