"""Context-parallel attention on P local gloo processes: the same measurement as
`attnkern bench --context-parallel P,...` (attnkern/tools/bench/context_parallel.py), with this script's
older flags.

    python bench/context_parallel.py                          # ring, causal, zigzag; B=1 H=8 L=4096 E=64 fp32
    python bench/context_parallel.py --method ulysses --procs 1 2 4 --length 8192
"""
from __future__ import annotations

import argparse


def main(argv=None):
    from attnkern.tools.bench.context_parallel import CPConfig, run_context_parallel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--method", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    return run_context_parallel(CPConfig(procs=a.procs, method=a.method, layout=a.layout, causal=a.causal,
                                         backend=a.backend, batch=a.batch, heads=a.heads, kv_heads=a.heads,
                                         length=a.length, dim=a.dim, repeats=a.reps))


if __name__ == "__main__":
    main()
