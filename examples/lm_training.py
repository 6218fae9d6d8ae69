"""What the training examples share: their command-line arguments, the next-token training loop, and the
side-by-side report of two runs (the same weights and batches, one with attnkern and one without).

Not an example itself; the scripts beside it import it (their folder is on sys.path when run as scripts).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Sequence

import torch


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The arguments every training example takes; `defaults` overrides theirs (steps, batch, length,
    hidden, heads, layers, vocab)."""
    d = {**dict(steps=8, batch=8, length=256, hidden=256, heads=4, layers=2, vocab=512), **defaults}
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--length", type=int, default=d["length"], help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--heads", type=int, default=d["heads"])
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--vocab", type=int, default=d["vocab"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    return p


def parse(p: argparse.ArgumentParser, argv, positive: Sequence[str] = ()):
    """Parse, check that the sizes are at least 1, and add args.device_ (torch.device) and args.dtype_."""
    args = p.parse_args(argv)
    for name in ("steps", "batch", "length", "hidden", "heads", "layers", "vocab", *positive):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.device_ = torch.device(args.device)
    args.dtype_ = getattr(torch, args.dtype or ("bfloat16" if args.device_.type == "cuda" else "float32"))
    return args


def train(model: torch.nn.Module, args) -> tuple:
    """args.steps steps of next-token prediction on random tokens (the same batches for every call,
    from a seeded generator); returns (losses, step times in seconds)."""
    device = args.device_
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.length + 1), generator=data).to(device)
        start = time.perf_counter()
        logits = model(ids[:, :-1])  # predict each next token
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def compare(args, runs: Dict[str, Callable[[], tuple]], path: str) -> dict:
    """Run each of `runs` (name -> a function returning (losses, times)), print their losses and speed,
    then the largest loss difference and the time ratio of the last run over the first."""
    results = {}
    for name, run in runs.items():
        losses, times = run()
        steady = times[1:] or times  # the first step pays for compilation and warm-up
        step = statistics.median(steady)
        results[name] = {"losses": losses, "step_s": step, "tokens_per_s": args.batch * args.length / step}
        print(f"{name:>10}: losses {' '.join(f'{x:.4f}' for x in losses)}")
        print(f"{'':>10}  median step {1e3 * step:.1f} ms, {results[name]['tokens_per_s']:,.0f} tokens/s")
    base, ours = (results[n] for n in (list(runs)[0], list(runs)[-1]))
    drift = max(abs(x - y) for x, y in zip(ours["losses"], base["losses"]))
    print(f"largest loss difference {drift:.2e}; {list(runs)[-1]} step time {ours['step_s'] / base['step_s']:.2f}x "
          f"{list(runs)[0]}'s")
    results["path"] = path
    return results
