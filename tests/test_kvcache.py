"""attention_with_kvcache: decode steps against contiguous and paged KV caches (attnkern/kvcache.py, the
CPU split-KV kernel csrc/cpu/decode.cpp) checked against the float64 reference with the tolerance rule.

The caches are filled with random values up to each batch element's length and NaN beyond it (and in
every page no batch element uses), so a kernel that reads a key it must not see fails; the block table's
unused entries name pages that do not exist. The expected cache after the append is built here with
plain loops, independently of the module's own append."""
import math

import pytest
import torch

import attnkern
from attnkern import kvcache
from attnkern.backends import BackendUnavailableError
from attnkern.tolerance import check

def _cpu_available():
    from attnkern.backends import extension

    return not extension.EXTENSION_ERROR and hasattr(torch.ops.attnkern_ext, "decode")


needs_cpu = pytest.mark.skipif(not _cpu_available(), reason="the C++ decode op is not built")


def make_case(*, B, Lq, Hq, Hkv, E=64, Ev=None, before, Lnew=0, page_size=None, dtype=torch.float32, seed=0,
              spare_pages=3):
    """Random q, caches (NaN beyond each length), k_new/v_new, block table (random page order) and the
    expected cache after the append. `before`: cache_seqlens per batch element."""
    Ev = Ev or E
    gen = torch.Generator().manual_seed(seed)
    after = [n + Lnew for n in before]
    q = torch.randn(B, Lq, Hq, E, generator=gen).to(dtype)
    k_new = torch.randn(B, Lnew, Hkv, E, generator=gen).to(dtype)
    v_new = torch.randn(B, Lnew, Hkv, Ev, generator=gen).to(dtype)
    cap = max(after) + 5
    if page_size is None:
        shape_k, shape_v = (B, cap, Hkv, E), (B, cap, Hkv, Ev)
        table = None
        where = lambda b, j: (b, j)  # noqa: E731
    else:
        max_pages = (cap + page_size - 1) // page_size
        used = [(n + page_size - 1) // page_size for n in after]
        P = sum(used) + spare_pages
        perm = torch.randperm(P, generator=gen)
        table = torch.full((B, max_pages), P + 7, dtype=torch.int32)  # unused entries: no such page
        at = 0
        for b in range(B):
            table[b, : used[b]] = perm[at: at + used[b]].to(torch.int32)
            at += used[b]
        shape_k, shape_v = (P, page_size, Hkv, E), (P, page_size, Hkv, Ev)
        where = lambda b, j: (int(table[b, j // page_size]), j % page_size)  # noqa: E731
    k_cache = torch.full(shape_k, float("nan"), dtype=dtype)
    v_cache = torch.full(shape_v, float("nan"), dtype=dtype)
    for b in range(B):
        for j in range(before[b]):
            k_cache[where(b, j)] = torch.randn(Hkv, E, generator=gen).to(dtype)
            v_cache[where(b, j)] = torch.randn(Hkv, Ev, generator=gen).to(dtype)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for b in range(B):
        for t in range(Lnew):
            k_expect[where(b, before[b] + t)] = k_new[b, t]
            v_expect[where(b, before[b] + t)] = v_new[b, t]
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new if Lnew else None, v_new=v_new if Lnew else None,
                cache_seqlens=torch.tensor(before, dtype=torch.int32), block_table=table,
                k_expect=k_expect, v_expect=v_expect, after=torch.tensor(after, dtype=torch.int32))


def references(case, *, causal=False, window=None, softcap=None, alibi_slopes=None, scale=None):
    """(ref64, ref_lp) of (out, lse): the reference on the expected cache in float64 and in the input dtype."""
    from attnkern.masks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
    from attnkern.band import make_band
    from attnkern.problem import kernel_scale

    q = case["q"]
    band = make_band(CAUSAL_BOTTOM_RIGHT if causal else CAUSAL_NONE, window)
    scale = kernel_scale(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, q.dtype)
    canon = None if alibi_slopes is None else alibi_slopes.reshape(-1, q.shape[2])
    kw = dict(band=band, scale=scale, softcap=softcap or 0.0, alibi=canon)
    ref64 = kvcache.kvcache_reference(q.double(), case["k_expect"].double(), case["v_expect"].double(), case["after"],
                                      case["block_table"], **kw)
    ref_lp = kvcache.kvcache_reference(q, case["k_expect"], case["v_expect"], case["after"], case["block_table"], **kw)
    return ref64, ref_lp


def run_and_check(case, backend, *, num_splits=0, **mods):
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    out, lse = attnkern.attention_with_kvcache(
        case["q"], k_cache, v_cache, case["k_new"], case["v_new"], case["cache_seqlens"],
        block_table=case["block_table"], return_lse=True, backend=backend, num_splits=num_splits, **mods)
    # The append: exactly the new rows at the right places, nothing else touched (NaN stays NaN).
    torch.testing.assert_close(k_cache, case["k_expect"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, case["v_expect"], rtol=0, atol=0, equal_nan=True)
    (o64, l64), (olp, llp) = references(case, **mods)
    dtype = case["q"].dtype
    msgs = [check("out", out, o64, olp, dtype), check("lse", lse, l64, llp.float(), dtype)]
    assert not any(msgs), "\n".join(m for m in msgs if m)
    return out, lse


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (name, shape/length arguments): Lq 1..16, ragged lengths up to a few thousand, GQA 8:1 and MHA, paged
# (page sizes 16 and 256) and contiguous.
SHAPES = {
    "gqa8_lq1_contig": dict(B=3, Lq=1, Hq=8, Hkv=1, before=[700, 1, 2100], Lnew=1),
    "gqa8_lq1_paged16": dict(B=3, Lq=1, Hq=16, Hkv=2, before=[33, 1500, 0], Lnew=1, page_size=16),
    "gqa8_lq4_paged256": dict(B=2, Lq=4, Hq=8, Hkv=1, before=[3000, 257], Lnew=4, page_size=256),
    "mha_lq16_paged16": dict(B=2, Lq=16, Hq=4, Hkv=4, before=[100, 1030], Lnew=16, page_size=16),
    "mha_lq7_contig_noappend": dict(B=2, Lq=7, Hq=3, Hkv=3, before=[9, 1200], Lnew=0, Ev=40),
    "gqa4_lq2_paged256_lnew3": dict(B=2, Lq=2, Hq=8, Hkv=2, before=[5, 600], Lnew=3, page_size=256, E=128),
    "gqa2_e36_ev20_paged16": dict(B=2, Lq=3, Hq=4, Hkv=2, before=[77, 301], Lnew=1, page_size=16, E=36, Ev=20),
}


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_matches_reference(shape, dtype, causal):
    case = make_case(dtype=dtype, seed=hash(shape) % 1000, **SHAPES[shape])
    run_and_check(case, "cpu", causal=causal)


@needs_cpu
@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_split_counts(num_splits, dtype):
    """Forced split counts (more splits than some batch elements have keys included) agree with the reference."""
    case = make_case(B=3, Lq=3, Hq=8, Hkv=2, before=[1800, 2, 40], Lnew=2, page_size=16, dtype=dtype, seed=3)
    run_and_check(case, "cpu", num_splits=num_splits, causal=True)


@needs_cpu
@pytest.mark.parametrize("variant", ["window", "window_causal", "softcap", "alibi", "alibi_batch_softcap_window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_score_mods_and_window(variant, dtype):
    case = make_case(B=2, Lq=5, Hq=8, Hkv=2, before=[1300, 70], Lnew=2, page_size=16, dtype=dtype, seed=11)
    gen = torch.Generator().manual_seed(5)
    mods = {
        "window": dict(window=(100, 3)),
        "window_causal": dict(window=(257, -1), causal=True),
        "softcap": dict(softcap=2.0, causal=True),
        "alibi": dict(alibi_slopes=torch.rand(8, generator=gen) * 0.1),
        "alibi_batch_softcap_window": dict(alibi_slopes=torch.rand(2, 8, generator=gen) * 0.1, softcap=3.0,
                                           window=(40, 0)),
    }[variant]
    run_and_check(case, "cpu", num_splits=3, **mods)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_strided_inputs(dtype):
    """q in (B, Hq, Lq, E) storage, caches and new rows whose head dim is strided: read (and appended) in place."""
    case = make_case(B=2, Lq=2, Hq=8, Hkv=2, before=[90, 33], Lnew=2, page_size=16, dtype=dtype, seed=21)

    def strided(t):
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    q = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    k_cache, v_cache = strided(case["k_cache"]), strided(case["v_cache"])
    out, lse = attnkern.attention_with_kvcache(q, k_cache, v_cache, strided(case["k_new"]), strided(case["v_new"]),
                                               case["cache_seqlens"], block_table=case["block_table"], causal=True,
                                               return_lse=True, backend="cpu", num_splits=2)
    torch.testing.assert_close(k_cache, case["k_expect"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, case["v_expect"], rtol=0, atol=0, equal_nan=True)
    (o64, l64), (olp, llp) = references(case, causal=True)
    msgs = [check("out", out, o64, olp, dtype), check("lse", lse, l64, llp.float(), dtype)]
    assert not any(msgs), "\n".join(m for m in msgs if m)


# The CPU kernel's two tile paths (csrc/cpu/decode.cpp): K/V read in place by AVX-512 dot products
# (decode_avx512.h; head dims multiples of 16, float accumulation, where the processor has AVX-512F) and
# the packed GEMM panels (ATTNKERN_CPU_DECODE=gemm, and every other case). Query rows per kv head 1, 3, 5,
# 12 (the in-place path's 4/2/1-row blocks), key counts off every block size, Ev != E, a NaN key.
TILE_PATH_SHAPES = {
    "rows1_e16_ev48": dict(B=2, Lq=1, Hq=2, Hkv=2, E=16, Ev=48, before=[1, 203], Lnew=1, page_size=16),
    "rows3_e64": dict(B=2, Lq=1, Hq=3, Hkv=1, before=[17, 130], Lnew=0),
    "rows5_e32_paged": dict(B=1, Lq=5, Hq=2, Hkv=2, E=32, before=[113], Lnew=5, page_size=16),
    "rows12_e128_ev64": dict(B=2, Lq=3, Hq=8, Hkv=2, E=128, Ev=64, before=[600, 9], Lnew=2, page_size=256),
}


@needs_cpu
@pytest.mark.parametrize("path", ["in_place", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(TILE_PATH_SHAPES), ids=str)
def test_cpu_tile_paths(shape, dtype, path, monkeypatch):
    if path == "gemm":
        monkeypatch.setenv("ATTNKERN_CPU_DECODE", "gemm")
    else:
        monkeypatch.delenv("ATTNKERN_CPU_DECODE", raising=False)
    case = make_case(dtype=dtype, seed=len(shape), **TILE_PATH_SHAPES[shape])
    run_and_check(case, "cpu", causal=True, num_splits=2)
    run_and_check(case, "cpu", softcap=4.0, window=(50, 2))
    k = case["k_cache"].clone()
    k[0, 0, 0, 1] = float("nan")  # key 0 of batch element 0 (page 0 or row 0): visible to every row
    if case["block_table"] is not None:
        k = case["k_cache"].clone()
        k[int(case["block_table"][0, 0]), 0, 0, 1] = float("nan")
    out = attnkern.attention_with_kvcache(case["q"], k, case["v_cache"].clone(), case["k_new"], case["v_new"],
                                          case["cache_seqlens"], block_table=case["block_table"], backend="cpu")
    assert torch.isnan(out[0, :, : out.shape[2] // case["k_cache"].shape[2]]).all()  # kv head 0's query heads
    assert not torch.isnan(out[1:]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_reference_backend(dtype):
    case = make_case(B=2, Lq=3, Hq=8, Hkv=1, before=[40, 300], Lnew=3, page_size=16, dtype=dtype, seed=2)
    run_and_check(case, "reference", causal=True, softcap=5.0)


@needs_cpu
def test_rows_that_see_nothing():
    """Lq beyond the cache under causal: the first rows see no key (out 0, lse -inf), as an empty cache does."""
    case = make_case(B=3, Lq=6, Hq=4, Hkv=2, before=[2, 0, 0], Lnew=0, page_size=16, seed=4)
    out, lse = run_and_check(case, "cpu", causal=True, num_splits=2)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4])) and torch.isinf(lse[0, :, :4]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and (lse[1] == float("-inf")).all()


@needs_cpu
def test_cache_seqlens_as_int_and_none():
    case = make_case(B=2, Lq=1, Hq=4, Hkv=1, before=[50, 50], Lnew=1, seed=6)
    out_int = attnkern.attention_with_kvcache(case["q"], case["k_cache"].clone(), case["v_cache"].clone(),
                                              case["k_new"], case["v_new"], 50, backend="cpu")
    out_t = attnkern.attention_with_kvcache(case["q"], case["k_cache"].clone(), case["v_cache"].clone(),
                                            case["k_new"], case["v_new"], case["cache_seqlens"], backend="cpu")
    assert torch.equal(out_int, out_t)
    full = case["k_expect"][:, :51].clone(), case["v_expect"][:, :51].clone()
    out_none = attnkern.attention_with_kvcache(case["q"], *full, backend="cpu")
    torch.testing.assert_close(out_none, out_t, rtol=0, atol=0)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_deterministic_across_threads(dtype):
    """The split count comes from the problem, not the thread count: 1, 2 and 3 threads give the same bits."""
    case = make_case(B=1, Lq=2, Hq=8, Hkv=2, before=[4000], Lnew=0, page_size=256, dtype=dtype, seed=8)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(attnkern.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"], None, None,
                                                           case["cache_seqlens"], block_table=case["block_table"],
                                                           causal=True, return_lse=True, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@needs_cpu
def test_nan_in_a_visible_key_propagates():
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, before=[300], page_size=16, seed=9)
    k = case["k_cache"].clone()
    k[int(case["block_table"][0, 3]), 5, 0, 0] = float("nan")  # key 53
    out, lse = attnkern.attention_with_kvcache(case["q"], k, case["v_cache"], cache_seqlens=case["cache_seqlens"],
                                               block_table=case["block_table"], return_lse=True, backend="cpu",
                                               num_splits=3)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


def test_cuda_backend_declines_with_reason():
    """(The triton backend's decode kernel: test_triton_decode.py.)"""
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, before=[10], seed=1)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run this decode call: (?!KV-cache decoding has no)"):
        attnkern.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"],
                                        cache_seqlens=case["cache_seqlens"], backend="cuda")


def test_forward_only():
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, before=[10], seed=1)
    q = case["q"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="forward only.*q requires grad"):
        attnkern.attention_with_kvcache(q, case["k_cache"], case["v_cache"], cache_seqlens=case["cache_seqlens"])
    with torch.no_grad():
        attnkern.attention_with_kvcache(q, case["k_cache"], case["v_cache"], cache_seqlens=case["cache_seqlens"])


def _bad_calls():
    case = make_case(B=2, Lq=1, Hq=4, Hkv=2, before=[20, 40], Lnew=1, page_size=16, seed=12)
    q, kc, vc, kn, vn, sl, bt = (case[n] for n in ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens",
                                                   "block_table"))
    return {
        "q_3d": ((q[0], kc, vc, kn, vn, sl), dict(block_table=bt), "q must be 4-D"),
        "cache_dtype": ((q, kc.double(), vc, kn, vn, sl), dict(block_table=bt), "k_cache must have the query's dtype"),
        "head_dim": ((q, kc[..., :8], vc, kn, vn, sl), dict(block_table=bt), "k_cache must have shape"),
        "v_shape": ((q, kc, vc[:, :8], kn, vn, sl), dict(block_table=bt), "v_cache must have shape"),
        "heads": ((q[:, :, :3], kc, vc, kn, vn, sl), dict(block_table=bt), "multiple of the cache's heads"),
        "k_new_shape": ((q, kc, vc, kn[:, :, :1], vn, sl), dict(block_table=bt), "k_new must have shape"),
        "k_new_alone": ((q, kc, vc, kn, None, sl), dict(block_table=bt), "pass both or neither"),
        "seqlens_int64": ((q, kc, vc, kn, vn, sl.long()), dict(block_table=bt), "cache_seqlens must be an int or"),
        "seqlens_negative": ((q, kc, vc, kn, vn, torch.tensor([-1, 3], dtype=torch.int32)), dict(block_table=bt),
                             r"cache_seqlens \+ Lnew must lie in"),
        "seqlens_overflow": ((q, kc, vc, kn, vn, torch.tensor([20, 10**6], dtype=torch.int32)),
                             dict(block_table=bt), r"cache_seqlens \+ Lnew must lie in"),
        "table_dtype": ((q, kc, vc, kn, vn, sl), dict(block_table=bt.long()), "block_table must be an int32"),
        "table_page_out_of_range": ((q, kc, vc, kn, vn, sl), dict(block_table=torch.where(
            torch.arange(bt.shape[1]) == 1, torch.tensor(kc.shape[0], dtype=torch.int32), bt)),
            "outside the cache's pages"),
        "table_negative_page": ((q, kc, vc, kn, vn, sl), dict(block_table=torch.full_like(bt, -1)),
                                "outside the cache's pages"),
        "contig_batch": ((q, kc, vc, kn, vn, sl), {}, "a contiguous k_cache must have shape"),
        "top_left": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, causal="top_left"), "bottom-right"),
        "window": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, window=(3,)), "window must be"),
        "softcap": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, softcap=-1.0), "softcap must be"),
        "alibi_shape": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, alibi_slopes=torch.ones(3)),
                        "alibi_slopes must have shape"),
        "num_splits": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, num_splits=-2), "num_splits must be"),
        "backend": ((q, kc, vc, kn, vn, sl), dict(block_table=bt, backend="gpu"), "backend must be one of"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_inputs(name):
    args, kwargs, match = _bad_calls()[name]
    with pytest.raises((ValueError, TypeError), match=match):
        attnkern.attention_with_kvcache(*args, **kwargs)


@needs_cpu
def test_op_checks_its_own_arguments():
    """Called directly, the op refuses a block table entry or a length outside the cache (no stray read)."""
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, before=[40], page_size=16, seed=13)
    q = case["q"]
    out, lse = torch.empty(1, 1, 2, 64), torch.empty(1, 2, 1)
    bad_table = case["block_table"].clone()
    bad_table[0, 2] = 10**6
    with pytest.raises(RuntimeError, match="is not a page of the cache"):
        torch.ops.attnkern_ext.decode(q, case["k_cache"], case["v_cache"], case["cache_seqlens"], bad_table, 0.1,
                                      [1, -1, -1], 0.0, None, 0, out, lse)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.attnkern_ext.decode(q, case["k_cache"], case["v_cache"], torch.tensor([10**5], dtype=torch.int32),
                                      case["block_table"], 0.1, [1, -1, -1], 0.0, None, 0, out, lse)


@needs_cpu
def test_bench_decode_cli(tmp_path, capsys):
    """`attnkern bench --decode` runs its grid (one small cache here) and writes its rows."""
    import json

    from attnkern.tools.bench.command import main

    path = tmp_path / "decode.json"
    assert main(["--decode", "--decode-caches", "512", "--dtypes", "bf16", "--repeats", "1", "--warmup", "0",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["cache"], r["dtype"]) for r in rows] == [(512, "bfloat16")]
    assert all(ms > 0 for ms in rows[0]["ms"].values())
    assert "sdpa gqa" in capsys.readouterr().out
