"""Train a tiny causal language model with its sequence split over P processes (context parallelism), and
check that the loss equals the single-process run.

    python examples/train_context_parallel.py                  # 2 gloo processes on this machine
    python examples/train_context_parallel.py --procs 4 --method ulysses --layout contiguous

The model is plain torch and calls F.scaled_dot_product_attention(..., is_causal=True). Each rank holds
its shard of every sequence (attnkern.distributed.shard_sequence: tokens, targets and positions), runs the
model on it inside `attnkern.distributed.context_parallel(...)`, where the SDPA calls become ring (or
Ulysses) attention over the whole sequence, and sums loss and gradients over the ranks (all_reduce). The
single-process run trains the same weights on the same batches with torch's own SDPA.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attnkern.distributed import context_parallel, run_local, shard_sequence


class Block(torch.nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # Looked up at call time: context_parallel (or replace_sdpa) takes effect here.
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, length: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.position = torch.nn.Embedding(length, hidden)
        self.blocks = torch.nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids, positions):
        x = self.embed(ids) + self.position(positions)  # global positions: a shard knows where it sits
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(args):
    """The same batches (tokens, next-token targets) on every rank and in the single-process run."""
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        ids = torch.randint(args.vocab, (args.batch, args.length + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def make_model(args):
    torch.manual_seed(0)
    return TinyCausalLM(args.vocab, args.hidden, args.heads, args.layers, args.length)


def train_single(args):
    model = make_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    positions = torch.arange(args.length)
    losses = []
    for ids, targets in batches(args):
        loss = F.cross_entropy(model(ids, positions).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_sharded(rank, world, args):
    """One rank of the context-parallel run; returns the losses (summed over ranks) and its time."""
    torch.set_num_threads(1)
    model = make_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    shard = dict(dim=1, layout=args.layout)
    positions = shard_sequence(torch.arange(args.length).unsqueeze(0), **shard).squeeze(0)
    losses, start = [], time.perf_counter()
    for ids, targets in batches(args):
        with context_parallel(layout=args.layout, method=args.method, backend=args.backend):
            logits = model(shard_sequence(ids, **shard), positions)
        # This rank's tokens' share of the mean loss over all B*L tokens; summed over ranks it is the loss.
        loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(targets, **shard).flatten(),
                               reduction="sum") / targets.numel()
        opt.zero_grad()
        loss.backward()  # the ring's backward runs here, in the same order on every rank
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--method", choices=("ring", "ulysses"), default="ring")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--backend", default="cpu", help="attnkern backend of each rank's attention")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args(argv)
    single = train_single(args)
    results = run_local(train_sharded, args.procs, args, timeout=600)
    sharded, seconds = results[0][0], max(r[1] for r in results)
    print(f"{'step':>4}  {'single process':>15}  {f'{args.procs} processes ({args.method}, {args.layout})':>34}")
    for i, (a, b) in enumerate(zip(single, sharded)):
        print(f"{i:>4}  {a:>15.7f}  {b:>34.7f}")
    diff = max(abs(a - b) for a, b in zip(single, sharded))
    print(f"largest loss difference: {diff:.2e}; context-parallel training took {seconds:.2f} s")
    return {"single": single, "sharded": sharded, "max_diff": diff}


if __name__ == "__main__":
    main()
