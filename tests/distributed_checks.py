"""Checks that run inside the spawned ranks of tests/test_distributed_*.py (a module of its own so the
spawned processes can import it). Each check builds the full-sequence inputs from a seed shared by all
ranks, runs the distributed attention on this rank's shard, and judges this rank's shard of the output and
of dQ, dK, dV against the float64 reference on the full sequence with the tolerance rule."""
import os

import torch

os.environ.setdefault("ATTNKERN_POISON", "1")

from attnkern import attention, reference_attention, tolerance  # noqa: E402
from attnkern.distributed import ring_attention, shard_sequence, ulysses_attention  # noqa: E402


def _reference(q, k, v, dout, causal, window, gqa, dtype, keep=None, dlse=None):
    """(out, dq, dk, dv, lse) of the full-sequence reference computed in `dtype`; the gradients are those
    of sum(out * dout) (+ sum(lse * dlse) if given). `window` means what it means to attnkern.attention
    on the full sequence (the reference takes it as attention does)."""
    mask = None if keep is None else keep[:, None, None, :]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, mask, causal="top_left" if causal else False, window=window,
                                   enable_gqa=gqa, compute_dtype=dtype)
    loss = (out * dout.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * dlse.to(lse.dtype)).sum()
    loss.backward()
    return [out.detach()] + [t.grad for t in leaves] + [lse.detach()]


def check_case(rank, world, case, group=None):
    """Failure messages ('' entries dropped) for one case on this rank."""
    method, B, Hq, Hkv, L, E, dtype = (case[n] for n in ("method", "B", "Hq", "Hkv", "L", "E", "dtype"))
    causal, layout, window = case.get("causal", False), case.get("layout", "zigzag"), case.get("window")
    backend = case.get("backend", "cpu")
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q, k, v, dout = (torch.randn(B, h, L, E, generator=g).to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    gqa = Hq != Hkv
    keep = None
    if case.get("padding"):
        # Random padded keys, and the first three keys of batch 0: its first causal rows see nothing.
        keep = torch.rand(B, L, generator=g) > 0.3
        keep[0, :3] = False
    dlse = torch.randn(B, Hq, L, generator=g) if case.get("lse") else None
    ref64 = _reference(q, k, v, dout, causal, window, gqa, torch.float64, keep, dlse)
    ref_lp = _reference(q, k, v, dout, causal, window, gqa, dtype, keep, dlse)

    def mine(t, dim=-2):
        return shard_sequence(t, dim, layout=layout, group=group)

    leaves = [mine(t).detach().requires_grad_() for t in (q, k, v)]
    kwargs = dict(causal=causal, scale=None, enable_gqa=gqa, layout=layout, backend=backend,
                  group=group,
                  key_padding_mask=None if keep is None else shard_sequence(keep, 1, layout=layout, group=group))
    if method == "ring":
        out, lse = ring_attention(*leaves, window=window, return_lse=True, **kwargs)
    else:
        out, lse = ulysses_attention(*leaves, return_lse=True, **kwargs)
    loss = (out * mine(dout)).sum()
    if dlse is not None:  # the lse is an output too: its gradient must reach q, k, v
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * mine(dlse, -1)).sum()
    loss.backward()
    got = [out] + [t.grad for t in leaves] + [lse]
    tag = f"rank {rank}/{world} {case}: "
    msgs = []
    if window is not None and keep is None:
        # Windowed ring == single-process attnkern.attention(window=...) on the full sequence: the same
        # band, held to the rule with attention's output as the truth.
        single = attention(q, k, v, causal=causal, window=window, enable_gqa=gqa, backend=backend,
                           return_lse=False)
        msgs.append(tag + tolerance.check("out vs attention(window=)", out, mine(single), mine(ref_lp[0]), dtype))
    for name, x, r64, rlp, factor in zip(("out", "dq", "dk", "dv", "lse"), got, ref64, ref_lp, (2, 3, 3, 3, 2)):
        dim = -1 if name == "lse" else -2
        msg = tolerance.check(name, x, mine(r64, dim), mine(rlp, dim), dtype, factor)
        if msg:
            msgs.append(tag + msg)
    return [m for m in msgs if m != tag]


def run_cases(rank, world, cases, refusals=False, subgroups=False):
    torch.set_num_threads(1)
    failures = check_refusals(rank, world) if refusals else []
    if subgroups:
        failures += check_subgroups(rank, world)
    for case in cases:
        failures += check_case(rank, world, case)
    return failures


def _raises(fn, exc, words):
    try:
        fn()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        return f"error message {str(e)!r} lacks {missing}" if missing else ""
    return f"{fn} did not raise {exc.__name__}"


def check_refusals(rank, world):
    """What ring/Ulysses/context_parallel refuse, each with an error naming the argument."""
    import torch.nn.functional as F

    from attnkern.distributed import context_parallel

    q = torch.randn(1, 4, 6, 8)
    k3 = torch.randn(1, 3, 6, 8)
    checks = [
        _raises(lambda: ring_attention(q, q, q, causal="bottom_right"), ValueError, ["causal"]),
        _raises(lambda: ring_attention(q, q, q, window=(-2, 2)), ValueError, ["window"]),
        _raises(lambda: ring_attention(q, q, q, window=3), ValueError, ["window", "pair"]),
        _raises(lambda: ring_attention(q, q, q, layout="striped"), ValueError, ["layout"]),
        _raises(lambda: ring_attention(q, q[:, :, :5], q[:, :, :5]), ValueError, ["sequence shard"]),
        _raises(lambda: ring_attention(q, k3, k3, enable_gqa=True), ValueError, ["heads"]),
        _raises(lambda: ring_attention(q[0], q[0], q[0]), ValueError, ["4-D"]),
        _raises(lambda: ring_attention(q, q, q, key_padding_mask=torch.ones(1, 6)), ValueError,
                ["key_padding_mask", "bool"]),
        _raises(lambda: ulysses_attention(q, q, q, key_padding_mask=torch.ones(6, dtype=torch.bool)), ValueError,
                ["key_padding_mask", "(1, 6)"]),
        _raises(lambda: ulysses_attention(q[:, :3], q[:, :3], q[:, :3]), ValueError, ["divisible"]),
    ]
    # Shards that are not the layout's (rank 0 one token short): every rank gets the same clear error.
    short = torch.randn(1, 4, 6 - 2 * (rank == 0), 8)
    checks.append(_raises(lambda: ring_attention(short, short, short), ValueError, ["shard_sequence"]))

    def sdpa_with(**kw):
        with context_parallel():
            F.scaled_dot_product_attention(q, q, q, **kw)

    checks.append(_raises(lambda: sdpa_with(attn_mask=torch.ones(6, 6, dtype=torch.bool)), ValueError,
                          ["attn_mask"]))
    checks.append(_raises(lambda: sdpa_with(dropout_p=0.1), ValueError, ["dropout_p"]))
    checks.append(_raises(lambda: context_parallel(method="ulysses", window=4).__enter__(), ValueError,
                          ["window"]))
    return [f"rank {rank}: {c}" for c in checks if c]


def fail_on_rank_one(rank, world):
    """Rank 1 raises while rank 0 waits in a collective: the run must fail fast, not hang."""
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    import torch.distributed as dist

    dist.barrier()
    return []


def stall_rank_one(rank, world):
    """On a group per method, rank 1 agrees on the layout (the shard-length all_gather every call starts
    with), then never joins the attention's transfers (ring: batch_isend_irecv, Ulysses: async
    all-to-alls). Rank 0's call must raise once the group's timeout passes, not hang. Failure messages."""
    import datetime
    import time

    import torch.distributed as dist

    from attnkern.distributed.sharding import layout_from_shards

    q = torch.randn(1, 2, 5, 8)
    # A subgroup has its own timeout (new_group's default is not the world's). Rank 1 enters Ulysses's
    # all_gather while rank 0 is still stuck in the ring: that group waits longer than the ring's.
    groups = {m: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=s)) for m, s in (("ring", 3),
                                                                                               ("ulysses", 6))}
    if rank == 1:
        for group in groups.values():
            layout_from_shards(5, group, "zigzag", q.device)
        time.sleep(10)  # until rank 0 has seen both timeouts
        return []
    failures = []
    for method, group in groups.items():
        fn = ring_attention if method == "ring" else ulysses_attention
        start = time.monotonic()
        try:
            fn(q, q, q, causal=True, group=group)
            failures.append(f"{method}: rank 0 finished without its peer")
        except RuntimeError as e:
            # gloo says "Timed out ..." or, when its pair closes first, "Application timeout caused pair closure"
            if not any(w in str(e).lower() for w in ("timed out", "timeout")) or time.monotonic() - start > 10:
                failures.append(f"{method}: expected a timeout within 10 s, got after "
                                f"{time.monotonic() - start:.1f} s: {e}")
    return failures


def check_subgroups(rank, world):
    """Two independent rings at once, on process groups {0, 1} and {2, 3} (peers are group ranks)."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    failures = []
    for method in ("ring", "ulysses"):
        case = dict(method=method, B=1, Hq=2, Hkv=2, L=11, E=8, dtype=torch.float32, causal=True, seed=rank // 2)
        failures += check_case(rank, world, case, group=mine)
    return failures


def check_llama(rank, world, method, layout):
    """A tiny Llama (random weights, fp32) with attn_implementation="attnkern": loss and every parameter's
    gradient of a step with the sequence sharded over the group inside context_parallel (losses and
    gradients summed over the ranks) equal the single-process step on the full sequence. Failure messages."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    import attnkern
    from attnkern.distributed import context_parallel

    torch.set_num_threads(1)
    attnkern.register_transformers()
    torch.manual_seed(0)  # the same weights and tokens on every rank
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="attnkern")
    model = LlamaForCausalLM(config).float()
    B, L = 2, 4 * world + 3
    ids = torch.randint(0, config.vocab_size, (B, L))
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # next token; the last has none
    count = B * (L - 1)

    def loss_of(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum") / count

    single = loss_of(model(ids).logits, labels)
    single.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def mine(t):
        return shard_sequence(t, 1, layout=layout)

    positions = torch.arange(L).expand(B, L)
    with context_parallel(layout=layout, method=method, backend="cpu"):
        logits = model(mine(ids), position_ids=mine(positions)).logits
    local = loss_of(logits, mine(labels))
    local.backward()
    loss = local.detach().clone()
    dist.all_reduce(loss)
    failures = []
    if abs(loss.item() - single.item()) > 1e-5 * abs(single.item()):
        failures.append(f"rank {rank} {method} {layout}: loss {loss.item()} != single-process {single.item()}")
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        err, ref = (g - expected[name]).norm().item(), expected[name].norm().item()
        if not err <= 1e-5 * ref + 1e-7:
            failures.append(f"rank {rank} {method} {layout}: grad {name}: error norm {err:.3g} of {ref:.3g}")
    return failures
