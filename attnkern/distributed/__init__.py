"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

    ring_attention(q, k, v, group=..., causal=..., window=..., layout="zigzag")   key/value blocks pass around the ring
    ulysses_attention(q, k, v, group=..., causal=...)                             all-to-all: sequence shards <-> head shards
    shard_sequence(x, dim) / unshard_sequence(x, dim)                             this rank's shard / the full sequence
    context_parallel(group, layout=..., method="ring")                            models' SDPA calls run on the shards
    run_local(fn, P)                                                              fn on P gloo processes (tests, examples)

Any attnkern backend runs the per-rank attention; communication is torch.distributed (gloo on CPUs, NCCL
on GPUs).
"""
from .context import context_parallel
from .launch import run_local
from .ring import ring_attention
from .sharding import LAYOUTS, SequenceLayout, shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "SequenceLayout", "context_parallel", "ring_attention", "run_local", "shard_sequence",
           "ulysses_attention", "unshard_sequence"]
