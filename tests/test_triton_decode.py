"""attention_with_kvcache on the Triton split-KV kernel (attnkern/triton/decode.py), checked against the
float64 reference with the tolerance rule, under the interpreter here (fp32, fp16) and compiled on a GPU.

test_kvcache.py's cases: caches NaN beyond each length and in unused pages, block tables in random page
order whose unused entries name no page, so a stray read fails. Lengths are small (the interpreter is
slow) but span several key tiles (16 keys each under the interpreter) and pages, ragged per batch
element down to 0 and 1 keys; page sizes 16 (a tile within one page: one lookup per tile), 5 and 3
(a lookup per key); forced 1 and 3 splits (the direct store, and the merge with splits that saw
nothing).
"""
import pytest
import torch

import attnkern
from attnkern.backends import BackendUnavailableError
from matrix import BACKEND_DTYPES
from test_kvcache import make_case, run_and_check

pytestmark = pytest.mark.skipif("triton" not in BACKEND_DTYPES, reason="the Triton backend does not run here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _on_device(case):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def _run(case, **kwargs):
    case = _on_device(case)
    out, lse = run_and_check(case, "triton", **kwargs)
    return out, lse


# (name, case arguments, causal): GQA 4:1 and 8:1 and MHA, Lq 1 and 4, paged and contiguous.
SHAPES = {
    "gqa4_lq1_paged16": (dict(B=3, Lq=1, Hq=8, Hkv=2, E=64, before=[50, 0, 1], Lnew=0, page_size=16), False),
    "gqa8_lq4_paged5_append": (dict(B=2, Lq=4, Hq=8, Hkv=1, E=32, before=[37, 1], Lnew=4, page_size=5), True),
    "gqa4_lq4_contig_empty_rows": (dict(B=3, Lq=4, Hq=8, Hkv=2, E=16, before=[0, 1, 45], Lnew=0), True),
    "mha_e80_ev40_paged3": (dict(B=2, Lq=1, Hq=2, Hkv=2, E=80, Ev=40, before=[20, 9], Lnew=1, page_size=3), False),
}


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_triton_matches_reference(shape, dtype, num_splits):
    args, causal = SHAPES[shape]
    _run(make_case(dtype=dtype, seed=len(shape), **args), num_splits=num_splits, causal=causal)


@pytest.mark.parametrize("variant", ["window", "window_causal", "softcap_alibi", "alibi_batch_softcap_window"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_score_mods_and_window(variant, dtype):
    case = make_case(B=2, Lq=4, Hq=8, Hkv=2, E=40, before=[60, 7], Lnew=1, page_size=5, dtype=dtype, seed=11)
    gen = torch.Generator().manual_seed(5)
    mods = {
        "window": dict(window=(20, 3)),
        "window_causal": dict(window=(9, -1), causal=True),
        "softcap_alibi": dict(softcap=2.0, alibi_slopes=torch.rand(8, generator=gen) * 0.3, causal=True),
        "alibi_batch_softcap_window": dict(alibi_slopes=torch.rand(2, 8, generator=gen) * 0.3, softcap=3.0,
                                           window=(25, 0)),
    }[variant]
    mods = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in mods.items()}
    _run(case, num_splits=3, **mods)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_several_row_blocks(num_splits):
    """GQA 8:1 with Lq = 9: 72 query rows per kv head, two row blocks of at most 64."""
    case = make_case(B=2, Lq=9, Hq=8, Hkv=1, E=16, before=[30, 0], Lnew=9, page_size=16, dtype=torch.float16,
                     seed=7)
    _run(case, num_splits=num_splits, causal=True)


def test_triton_strided_inputs():
    """q in (B, Hq, Lq, E) storage, caches and new rows whose head dim is strided: read in place."""
    from test_kvcache import references
    from attnkern.tolerance import check

    case = _on_device(make_case(B=2, Lq=2, Hq=8, Hkv=2, E=32, before=[40, 3], Lnew=2, page_size=5,
                                dtype=torch.float16, seed=21))

    def strided(t):
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]

    q = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    k_cache, v_cache = strided(case["k_cache"]), strided(case["v_cache"])
    out, lse = attnkern.attention_with_kvcache(q, k_cache, v_cache, strided(case["k_new"]), strided(case["v_new"]),
                                               case["cache_seqlens"], block_table=case["block_table"], causal=True,
                                               return_lse=True, backend="triton", num_splits=2)
    (o64, l64), (olp, llp) = references(case, causal=True)
    msgs = [check("out", out, o64, olp, torch.float16), check("lse", lse, l64, llp.float(), torch.float16)]
    assert not any(msgs), "\n".join(m for m in msgs if m)


def test_triton_auto_splits_and_rows_that_see_nothing():
    """num_splits=0 (chosen from the problem) on a cache long enough for two splits under the interpreter;
    rows that see no key under causal give out 0 and lse -inf."""
    case = make_case(B=2, Lq=6, Hq=4, Hkv=2, E=16, before=[600, 2], Lnew=0, page_size=16, seed=4)
    out, lse = _run(case, causal=True)
    assert torch.equal(out[1, :4], torch.zeros_like(out[1, :4])) and (lse[1, :, :4] == float("-inf")).all()


def test_choose_splits_rule():
    from attnkern.triton.decode import choose_splits

    cpu = torch.device("cpu")
    assert choose_splits(3, 4, 100, 16, cpu) == 3  # the caller's count
    assert choose_splits(50, 4, 100, 16, cpu) == 7  # at most one per key tile of the cache
    assert choose_splits(0, 4, 100, 16, cpu) == 1
    assert choose_splits(0, 4, 2000, 16, cpu) == 4  # a split per 512 keys without a GPU
    assert choose_splits(0, 64, 2000, 16, cpu) == 1  # enough programs already


def test_nan_in_a_visible_key_propagates():
    case = _on_device(make_case(B=1, Lq=1, Hq=2, Hkv=1, E=16, before=[60], page_size=16, seed=9))
    k = case["k_cache"].clone()
    k[int(case["block_table"][0, 3]), 5, 0, 0] = float("nan")  # key 53
    out, lse = attnkern.attention_with_kvcache(case["q"], k, case["v_cache"], cache_seqlens=case["cache_seqlens"],
                                               block_table=case["block_table"], return_lse=True, backend="triton",
                                               num_splits=3)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's bfloat16 limit")
def test_bfloat16_declines_on_the_interpreter():
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, E=16, before=[10], dtype=torch.bfloat16, seed=1)
    with pytest.raises(BackendUnavailableError, match="bfloat16 runs on a GPU"):
        attnkern.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"],
                                        cache_seqlens=case["cache_seqlens"], backend="triton")


def test_auto_picks_triton_for_cuda_tensors_only():
    from attnkern import kvcache

    case = _on_device(make_case(B=1, Lq=1, Hq=2, Hkv=1, E=16, before=[10], seed=1))
    problem = kvcache.check_call(case["q"], case["k_cache"], case["v_cache"], None, None, case["cache_seqlens"],
                                 None, False, None, None, None, None, 0)[0]
    expected = "triton" if DEVICE == "cuda" else "cpu"
    if kvcache.unsupported_reason(expected, problem) is None:
        assert kvcache.choose_backend(problem, "auto") == expected
