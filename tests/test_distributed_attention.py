"""Ring and Ulysses attention on 2 and 4 gloo processes: this rank's shard of the output and of dQ, dK,
dV equals the shard of the full-sequence attention under the tolerance rule (see distributed_checks.py).
Cases are batched per spawned group (spawning is the slow part)."""
import time

import pytest
import torch

from attnkern.distributed import SequenceLayout, run_local, shard_sequence
from attnkern.distributed.ring import plan_block, visible_offsets
import distributed_checks as checks

FP = (torch.float32, torch.bfloat16)


def _ring_cases(P):
    cases = []
    for dtype in FP:
        for causal in (False, True):
            for layout in ("zigzag", "contiguous"):
                # Odd per-rank lengths (L = 4P+3) and GQA (4 query heads on 2 kv heads) in every case.
                cases.append(dict(method="ring", B=2, Hq=4, Hkv=2, L=4 * P + 3, E=16, dtype=dtype,
                                  causal=causal, layout=layout, seed=len(cases)))
    cases.append(dict(method="ring", B=1, Hq=2, Hkv=2, L=8 * P, E=8, dtype=torch.float32, causal=True, lse=True))
    # Windows as attnkern.attention(window=) takes them (-1: unbounded side), both layouts, both causal modes.
    for i, window in enumerate(((3, 3), (5, 0), (2, 6), (-1, 2))):
        for causal in (False, True):
            cases.append(dict(method="ring", B=1, Hq=2, Hkv=1, L=6 * P + 1, E=8, dtype=torch.float32,
                              causal=causal, window=window, layout=("zigzag", "contiguous")[(i + causal) % 2],
                              seed=len(cases)))
    for causal in (False, True):  # key padding, with queries that see no key at all
        cases.append(dict(method="ring", B=2, Hq=2, Hkv=2, L=4 * P + 1, E=8, dtype=torch.float32, causal=causal,
                          padding=True, window=(4, 2) if causal else None, lse=True, seed=len(cases)))
    return cases


def _ulysses_cases(P):
    cases = []
    for dtype in FP:
        for causal in (False, True):
            for layout in ("zigzag", "contiguous"):
                # kv heads: P (split like the query heads) or 1 (replicated to every rank).
                hkv = P if (causal == (layout == "zigzag")) else 1
                cases.append(dict(method="ulysses", B=2, Hq=2 * P, Hkv=hkv, L=4 * P + 3, E=16, dtype=dtype,
                                  causal=causal, layout=layout, seed=len(cases)))
    cases.append(dict(method="ulysses", B=2, Hq=P, Hkv=P, L=4 * P + 1, E=8, dtype=torch.bfloat16, causal=True,
                      padding=True, seed=len(cases)))
    cases.append(dict(method="ulysses", B=1, Hq=P, Hkv=1, L=4 * P + 1, E=8, dtype=torch.float32, causal=True,
                      lse=True, seed=len(cases)))
    return cases


def _other_backend_cases():
    """The per-rank attention runs on any backend: the reference and (interpreted) Triton kernels too."""
    return [dict(method=m, B=1, Hq=2, Hkv=2, L=11, E=16, dtype=torch.float32, causal=True, backend=b)
            for m in ("ring", "ulysses") for b in ("reference", "triton")] + [
        dict(method="ring", B=1, Hq=2, Hkv=2, L=11, E=16, dtype=torch.float16, causal=True)]  # fp16, cpu


def _run(P, cases, timeout, refusals=False, subgroups=False):
    failures = run_local(checks.run_cases, P, cases, refusals, subgroups, timeout=timeout)
    assert not any(failures), "\n".join(m for f in failures for m in f)


def test_two_ranks():
    """Every case on 2 ranks, plus what ring/Ulysses/context_parallel refuse (checks.check_refusals)."""
    _run(2, _ring_cases(2) + _ulysses_cases(2) + _other_backend_cases(), 200, refusals=True)


def test_four_ranks():
    """Every case on 4 ranks, plus two 2-rank rings at once on subgroups (checks.check_subgroups), plus a
    sequence shorter than the ranks (L=3: some ranks hold no token)."""
    tiny = [dict(method=m, B=1, Hq=4, Hkv=4, L=3, E=8, dtype=torch.float32, causal=True, layout=lay)
            for m in ("ring", "ulysses") for lay in ("zigzag", "contiguous")]
    _run(4, _ring_cases(4) + _ulysses_cases(4) + tiny, 200, subgroups=True)


def test_failing_rank_fails_fast():
    """Rank 1 raises while rank 0 waits in a barrier: the run raises (rank 1's error, or rank 0's lost
    connection, whichever the launcher sees first) well before any timeout."""
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails on purpose|Connection|closed"):
        run_local(checks.fail_on_rank_one, 2, timeout=60, collective_timeout=45)
    assert time.monotonic() - start < 40


def test_stalled_peer_times_out():
    """Rank 1 never joins the transfers (ring: batch_isend_irecv; Ulysses: async all-to-alls): rank 0's
    waits raise after the group's timeout (3 s here) instead of hanging (checks.stall_rank_one)."""
    failures = run_local(checks.stall_rank_one, 2, timeout=100, collective_timeout=3)
    assert not any(failures), failures


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("L,P", [(16, 2), (13, 4), (7, 3)])
def test_layout_covers_the_sequence_once(layout, L, P):
    seq = SequenceLayout(L, P, layout)
    assert sorted(seq.sharded_order().tolist()) == list(range(L))
    assert torch.equal(seq.sharded_order()[seq.natural_order()], torch.arange(L))
    x = torch.arange(L)
    assert torch.equal(torch.cat([shard_sequence(x, 0, layout=layout, rank=r, world_size=P) for r in range(P)]),
                       seq.sharded_order())
    lengths = [seq.shard_length(r) for r in range(P)]
    assert max(lengths) - min(lengths) <= (2 if layout == "zigzag" else 1)


def test_zigzag_balances_causal_work():
    """Causal: zigzag gives every rank the same number of visible (query, key) pairs; contiguous does not."""
    P, L = 4, 64

    def work(layout):
        seq = SequenceLayout(L, P, layout)
        lo, hi = visible_offsets(None, True)
        per_rank = []
        for r in range(P):
            total = 0
            for owner in range(P):
                for c in plan_block(seq.segments(r), seq.segments(owner), lo, hi):
                    total += c.ql * c.kl / (2 if c.causal else 1)
            per_rank.append(total)
        return per_rank

    assert len(set(work("zigzag"))) == 1
    assert max(work("contiguous")) > 3 * min(work("contiguous"))


def test_plan_skips_and_masks_only_what_it_must():
    lo, hi = visible_offsets(None, True)
    assert plan_block([(8, 4)], [(0, 4)], lo, hi)[0].causal is False  # earlier keys: full block
    assert plan_block([(0, 4)], [(8, 4)], lo, hi) == []  # later keys: skipped
    diag = plan_block([(4, 4)], [(4, 4)], lo, hi)[0]
    assert diag.causal == "top_left" and diag.band is None
    lo, hi = visible_offsets((2, 2), True)
    assert plan_block([(8, 4)], [(0, 4)], lo, hi) == []  # out of the window: skipped
    partial = plan_block([(4, 4)], [(2, 4)], lo, hi)[0]
    assert partial.band is not None and tuple(partial.mask("cpu").shape) == (4, 4)


def test_one_rank():
    """A ring of one (P = 1) is plain attention with nothing to pass."""
    _run(1, [dict(method=m, B=1, Hq=4, Hkv=2, L=13, E=16, dtype=dt, causal=True)
             for m in ("ring", "ulysses") for dt in FP], 100)
