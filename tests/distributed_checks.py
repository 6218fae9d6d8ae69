"""Checks that run inside the spawned ranks of tests/test_distributed_*.py (a module of its own so the
spawned processes can import it). Each check builds the full-sequence inputs from a seed shared by all
ranks, runs the distributed attention on this rank's shard, and judges this rank's shard of the output and
of dQ, dK, dV against the float64 reference on the full sequence with the tolerance rule."""
import os

import torch

os.environ.setdefault("ATTNKERN_POISON", "1")

from attnkern import reference_attention, tolerance  # noqa: E402
from attnkern.distributed import ring_attention, shard_sequence, ulysses_attention  # noqa: E402
from attnkern.distributed.ring import parse_window  # noqa: E402


def _band_mask(L, lo, hi):
    d = torch.arange(L).unsqueeze(0) - torch.arange(L).unsqueeze(1)
    return (d >= lo) & (d <= hi)


def _reference(q, k, v, dout, causal, window, gqa, dtype):
    """(out, dq, dk, dv) of the full-sequence reference computed in `dtype`."""
    lo, hi = parse_window(window, False)
    mask = None if window is None else _band_mask(q.shape[-2], lo, hi)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention(*leaves, mask, causal="top_left" if causal else False, enable_gqa=gqa,
                                 compute_dtype=dtype)
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_case(rank, world, case):
    """Failure messages ('' entries dropped) for one case on this rank."""
    method, B, Hq, Hkv, L, E, dtype = (case[n] for n in ("method", "B", "Hq", "Hkv", "L", "E", "dtype"))
    causal, layout, window = case.get("causal", False), case.get("layout", "zigzag"), case.get("window")
    backend = case.get("backend", "cpu")
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q, k, v, dout = (torch.randn(B, h, L, E, generator=g).to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    gqa = Hq != Hkv
    ref64 = _reference(q, k, v, dout, causal, window, gqa, torch.float64)
    ref_lp = _reference(q, k, v, dout, causal, window, gqa, dtype)

    def mine(t):
        return shard_sequence(t, -2, layout=layout)

    leaves = [mine(t).detach().requires_grad_() for t in (q, k, v)]
    kwargs = dict(causal=causal, scale=None, enable_gqa=gqa, layout=layout, backend=backend)
    if method == "ring":
        out = ring_attention(*leaves, window=window, **kwargs)
    else:
        out = ulysses_attention(*leaves, **kwargs)
    out.backward(mine(dout))
    got = [out] + [t.grad for t in leaves]
    tag = f"rank {rank}/{world} {case}: "
    msgs = []
    for name, x, r64, rlp, factor in zip(("out", "dq", "dk", "dv"), got, ref64, ref_lp, (2, 3, 3, 3)):
        msg = tolerance.check(name, x, mine(r64), mine(rlp), dtype, factor)
        if msg:
            msgs.append(tag + msg)
    return msgs


def run_cases(rank, world, cases):
    torch.set_num_threads(1)
    failures = []
    for case in cases:
        failures += check_case(rank, world, case)
    return failures
