"""The CUDA split-KV decode kernel (csrc/cuda/decode_kernel.h) of attention_with_kvcache, run on the CPU
by the SIMT emulator (backend "cuda-emu"), against the float64 reference with the tolerance rule.

Tiny shapes (the emulator runs every thread as a fiber), chosen so that each reaches a path of the
kernel: ragged lengths with 0 and 1 keys (rows that see nothing: out 0, lse -inf), paged caches with
page size 16 and an odd one (tiles that straddle pages) and contiguous ones, GQA 4:1 (the group's heads
as the MMA's rows) and a group of more rows than one CTA holds, Lq 1 and 3, causal, a window, softcap,
ALiBi, head dims 32 to 128 (key tiles of 64 and 32) and ones that are not multiples of 8 (padded), and
forced split counts 1 and 3 (with more splits than key tiles: empty splits) besides the device-chosen one.
"""
import pytest
import torch

import attnkern
from attnkern import kvcache
from attnkern.backends import BackendUnavailableError, cuda_emu
from test_kvcache import make_case, run_and_check

pytestmark = pytest.mark.skipif(cuda_emu.build_error() is not None, reason=f"cuda-emu: {cuda_emu.build_error()}")

_slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)) * 0.3

# name: (shape arguments of make_case, modifications, num_splits, dtype)
CASES = {
    "paged16_lq1_gqa4_ragged": (dict(B=3, Lq=1, Hq=4, Hkv=1, before=[0, 40, 80], Lnew=1, page_size=16),
                                dict(), 3, torch.float16),
    "paged5_lq3_causal_len0_len1": (dict(B=3, Lq=3, Hq=4, Hkv=1, before=[0, 1, 37], page_size=5),
                                    dict(causal=True), 3, torch.bfloat16),
    "paged5_lq3_causal_one_split": (dict(B=2, Lq=3, Hq=8, Hkv=2, before=[1, 90], Lnew=2, page_size=5),
                                    dict(causal=True), 1, torch.float16),
    "contig_lq3_window": (dict(B=2, Lq=3, Hq=8, Hkv=2, before=[20, 100], Lnew=3, E=32),
                          dict(window=(9, 0)), 3, torch.bfloat16),
    "paged16_softcap_alibi": (dict(B=2, Lq=1, Hq=4, Hkv=1, before=[70, 3], Lnew=1, page_size=16),
                              dict(softcap=2.0, alibi_slopes=_slopes, causal=True), 3, torch.bfloat16),
    "contig_alibi_one_split": (dict(B=2, Lq=3, Hq=4, Hkv=1, before=[30, 0], Lnew=1),
                               dict(alibi_slopes=_slopes[0]), 1, torch.float16),
    "contig_e36_ev20_auto_splits": (dict(B=1, Lq=1, Hq=4, Hkv=1, before=[150], E=36, Ev=20),
                                    dict(), 0, torch.float16),
    "paged7_e80_window_causal": (dict(B=2, Lq=3, Hq=4, Hkv=1, E=80, before=[45, 2], Lnew=1, page_size=7),
                                 dict(window=(20, 0), causal=True), 3, torch.float16),
    "contig_e128_softcap": (dict(B=1, Lq=1, Hq=8, Hkv=2, E=128, before=[70], Lnew=1),
                            dict(softcap=1.5), 3, torch.bfloat16),
    "paged16_two_row_blocks": (dict(B=1, Lq=3, Hq=24, Hkv=1, before=[33], Lnew=1, page_size=16),
                               dict(causal=True), 3, torch.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_emu_decode_matches_reference(name):
    shape, mods, num_splits, dtype = CASES[name]
    case = make_case(dtype=dtype, seed=len(name), **shape)
    out, lse = run_and_check(case, "cuda-emu", num_splits=num_splits, **mods)
    if shape["before"][0] == 0 and not shape.get("Lnew"):  # an empty cache: nothing to see
        assert torch.equal(out[0], torch.zeros_like(out[0])) and (lse[0] == float("-inf")).all()


def test_cuda_emu_decode_splits_agree():
    """One split (written directly) and several (merged by the combine kernel) give the same answer up to
    the merge's rounding; a NaN among the visible keys makes the rows NaN through the merge."""
    case = make_case(B=2, Lq=1, Hq=4, Hkv=1, before=[200, 130], page_size=16, dtype=torch.float16, seed=2)
    runs = [attnkern.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"],
                                            cache_seqlens=case["cache_seqlens"], block_table=case["block_table"],
                                            return_lse=True, backend="cuda-emu", num_splits=s) for s in (1, 4)]
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)
    k = case["k_cache"].clone()
    k[int(case["block_table"][0, 3]), 5, 0, 0] = float("nan")  # key 53 of batch element 0
    out, lse = attnkern.attention_with_kvcache(case["q"], k, case["v_cache"], cache_seqlens=case["cache_seqlens"],
                                               block_table=case["block_table"], return_lse=True,
                                               backend="cuda-emu", num_splits=4)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    assert not torch.isnan(out[1]).any() and not torch.isnan(lse[1]).any()


def test_cuda_backends_decline_with_reason():
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, before=[10], seed=1)  # float32
    problem = kvcache.check_call(case["q"], case["k_cache"], case["v_cache"], None, None, case["cache_seqlens"],
                                 None, False, None, None, None, None, 0)[0]
    assert "float16 and bfloat16" in kvcache.unsupported_reason("cuda-emu", problem)
    assert "CUDA" in kvcache.unsupported_reason("cuda", problem)  # CPU tensors (or no CUDA kernels built)
    with pytest.raises(BackendUnavailableError, match="float16 and bfloat16"):
        attnkern.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"],
                                        cache_seqlens=case["cache_seqlens"], backend="cuda-emu")


def test_cuda_emu_decode_op_checks_the_kernels_needs():
    """The op itself refuses what the kernels cannot read (here a head dim that is not a multiple of 8)."""
    cuda_emu.load()
    case = make_case(B=1, Lq=1, Hq=2, Hkv=1, E=12, before=[10], dtype=torch.float16, seed=1)
    out = torch.empty(1, 1, 2, 12, dtype=torch.float16)
    lse = torch.empty(1, 2, 1)
    with pytest.raises(RuntimeError, match="head dims must be multiples of 8"):
        torch.ops.attnkern_emu.decode(case["q"], case["k_cache"], case["v_cache"], torch.tensor([10], dtype=torch.int32),
                                      None, 0.3, [1, -1, -1], 0.0, None, 0, out, lse)
