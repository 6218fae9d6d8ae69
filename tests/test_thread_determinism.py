"""Deterministic means bitwise equal across runs and thread counts: the C++ CPU kernels split work by
the problem's shape alone wherever a split changes a reduction's order (the backward's partial dK/dV
per query chunk), so 1, 2 or 3 threads give the same bits for out, lse and every gradient. (The
backward's dK/dV once differed between 1 and 2 threads: the query-chunk split followed the thread
count.)"""
import pytest
import torch

import attnkern
from matrix import BACKEND_DTYPES, DEVICE

CPU_DTYPES = BACKEND_DTYPES.get("cpu", ())
pytestmark = pytest.mark.skipif(DEVICE != "cpu" or not CPU_DTYPES, reason="the C++ CPU kernels run on CPU tensors")

CASES = {
    # B * Hkv = 1: the backward splits the kv head's 300 query rows into chunks.
    "gqa_float_mask_grad": dict(B=1, Hq=2, Hkv=1, L=300, S=200, causal=False, mask="float_ls"),
    "causal_top_left_bool_mask": dict(B=1, Hq=2, Hkv=2, L=250, S=190, causal="top_left", mask="bool"),
    "causal_bottom_right_key_bias": dict(B=2, Hq=2, Hkv=1, L=130, S=260, causal="bottom_right", mask="float_s"),
    "no_mask_ev_differs": dict(B=1, Hq=3, Hkv=1, L=200, S=140, causal=False, mask=None, Ev=24),
    # Score mods: the dropout mask is regenerated per (row, key) in the forward and the backward, so it
    # and the results must not depend on which thread computes which rows.
    "dropout_gqa_float_mask_grad": dict(B=1, Hq=2, Hkv=1, L=300, S=200, causal=False, mask="float_ls",
                                        mods=dict(dropout_p=0.2)),
    "all_mods_causal_bool_mask": dict(B=2, Hq=2, Hkv=2, L=250, S=190, causal="bottom_right", mask="bool",
                                      mods=dict(dropout_p=0.1, softcap=3.0, alibi=True)),
}


def _run(case, dtype, threads):
    gen = torch.Generator().manual_seed(17)
    B, Hq, Hkv, L, S = case["B"], case["Hq"], case["Hkv"], case["L"], case["S"]
    E, Ev = 40, case.get("Ev", 40)
    q = torch.randn(B, Hq, L, E, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, E, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(dtype).requires_grad_()
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand(L, S, generator=gen) > 0.2
    elif case["mask"] == "float_ls":
        mask = torch.randn(L, S, generator=gen).to(dtype).requires_grad_()
    elif case["mask"] == "float_s":
        mask = torch.randn(B, 1, 1, S, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(B, Hq, L, Ev, generator=gen).to(dtype)
    dlse = torch.randn(B, Hq, L, generator=gen)
    mods = dict(case.get("mods", {}))
    if mods.pop("alibi", False):
        mods["alibi_slopes"] = torch.rand(B, Hq, generator=gen)
    if mods.get("dropout_p"):
        mods["dropout_rng"] = torch.tensor([2024, 9], dtype=torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = attnkern.attention(q, k, v, attn_mask=mask, causal=case["causal"], enable_gqa=Hq != Hkv,
                                      backend="cpu", **mods)
        torch.autograd.backward([out, lse], [do, dlse])
    finally:
        torch.set_num_threads(before)
    grads = [t.grad for t in (q, k, v, mask) if t is not None and t.requires_grad]
    return [out.detach(), lse.detach(), *grads]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cpu_results_are_bitwise_equal_across_thread_counts(dtype, case):
    names = ["out", "lse", "dq", "dk", "dv", "dmask"]
    one = _run(CASES[case], dtype, 1)
    for threads in (2, 3):
        other = _run(CASES[case], dtype, threads)
        for name, a, b in zip(names, one, other):
            assert torch.equal(a, b), f"{name} differs between 1 and {threads} threads: max |diff| " \
                                      f"{(a.double() - b.double()).abs().max().item():.3e}"
