"""Packed variable-length batches: attnkern.varlen_attention (no padding) against the same batch padded
to its longest sequence through torch's SDPA, forward and forward + backward, side by side in one run.

    python bench/varlen.py                                   # lengths 64..4k (mean ~1k), H=4, E=64, fp32, causal
    python bench/varlen.py --lengths 1..200x128 --heads 8    # 128 random lengths in 1..200 (seeded)
    python bench/varlen.py --no-causal                       # the padded batch then needs a key-padding mask

The padded batch is what a caller without varlen support runs: (B, H, max_len, E), causal top-left (padding
at the end changes no real row) or, without causal, a bool key-padding mask. Times are the best of
--repeats runs after one warm-up; on a shared machine compare the two columns of one run only.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

import attnkern

DEFAULT_LENGTHS = [64, 128, 256, 512, 768, 1024, 1536, 4096]  # 64..4k, mean 1048


def parse_lengths(text: str):
    """'64,128,4096' or 'LO..HIxN' (N lengths drawn uniformly in LO..HI, seed 0)."""
    if ".." in text:
        span, n = text.split("x")
        lo, hi = (int(x) for x in span.split(".."))
        return torch.randint(lo, hi + 1, (int(n),), generator=torch.Generator().manual_seed(0)).tolist()
    return [int(x) for x in text.split(",")]


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=parse_lengths, default=DEFAULT_LENGTHS)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()
    lens, H, E, dtype = args.lengths, args.heads, args.head_dim, getattr(torch, args.dtype)
    causal = not args.no_causal
    B, L = len(lens), max(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lens), H, E, generator=gen).to(dtype) for _ in range(3))

    def padded(t):
        out = t.new_zeros(B, H, L, E)
        for b in range(B):
            out[b, :, :lens[b]] = t[cu[b]:cu[b + 1]].transpose(0, 1)
        return out

    qp, kp, vp = padded(q), padded(k), padded(v)
    mask = None if causal else (torch.arange(L) < torch.tensor(lens)[:, None]).view(B, 1, 1, L)

    def run_varlen(grad):
        ts = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        o = attnkern.varlen_attention(*ts, cu, cu, L, L, causal=causal, backend=args.backend)
        if grad:
            o.backward(torch.ones_like(o))

    def run_padded(grad):
        ts = [t.clone().requires_grad_(grad) for t in (qp, kp, vp)]
        o = F.scaled_dot_product_attention(*ts, attn_mask=mask, is_causal=causal)
        if grad:
            o.backward(torch.ones_like(o))

    print(f"B={B} lengths {min(lens)}..{L} (mean {sum(lens) / B:.0f}, {sum(lens)} tokens; padded {B * L}) H={H} "
          f"E={E} {args.dtype} causal={causal} threads={torch.get_num_threads()}")
    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        with torch.set_grad_enabled(grad):
            tv = best_time(lambda: run_varlen(grad), args.repeats)
            tp = best_time(lambda: run_padded(grad), args.repeats)
        print(f"  {mode:8s} attnkern varlen ({args.backend}) {tv * 1e3:8.1f} ms   padded torch SDPA {tp * 1e3:8.1f} ms"
              f"   speedup {tp / tv:.2f}x")


if __name__ == "__main__":
    main()
