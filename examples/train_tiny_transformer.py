"""Train a tiny causal transformer for a few steps with torch's SDPA and again with attnkern, and compare.

    python examples/train_tiny_transformer.py                 # on the GPU if there is one, else the CPU
    python examples/train_tiny_transformer.py --steps 50 --length 1024 --dtype bfloat16

The model is plain torch (nn.TransformerEncoder with a causal mask); attnkern comes in through
`attnkern.replace_sdpa()`, with no change to the model code. Both runs start from the same weights and
see the same batches, so their loss curves should agree to rounding. Where attnkern's kernels do not serve
the calls (a CPU without TRITON_INTERPRET=1, float64, ...) torch's SDPA runs them in both runs: the script
says which path ran, using attnkern.explain.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnkern


class TinyCausalLM(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, length: int):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.position = torch.nn.Embedding(length, hidden)
        # dropout=0: the runs compare loss curves, and dropout would draw different masks in each (attnkern's
        # fused dropout has its own random stream, the same distribution as torch's).
        layer = torch.nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        L = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(L, device=ids.device))
        causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=ids.device, dtype=x.dtype)
        return self.head(self.blocks(x, mask=causal, is_causal=True))


def attention_path(args, device, dtype) -> str:
    """Which path the model's attention calls take under replace_sdpa, in words."""
    head_dim = args.hidden // args.heads
    q = torch.empty(args.batch, args.heads, args.length, head_dim, device=device, dtype=dtype)
    e = attnkern.explain(q, q, q, is_causal=True)
    if e.fallback or e.backend in ("reference", "none"):
        reasons = "; ".join(e.rejected.values()) or e.reason
        return f"torch's SDPA (attnkern's kernels do not serve these calls: {reasons})"
    return f"attnkern, backend {e.backend!r}"


def train(args, device, dtype, with_attnkern: bool):
    torch.manual_seed(0)
    model = TinyCausalLM(args.vocab, args.hidden, args.heads, args.layers, args.length).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1)
    losses, times = [], []
    patch = attnkern.replace_sdpa() if with_attnkern else None
    try:
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
    finally:
        if patch is not None:
            patch.restore()
    return losses, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "length", "hidden", "heads", "layers", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    path = attention_path(args, device, dtype)

    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, batch {args.batch} x {args.length} tokens, {args.steps} steps")
    print(f"with attnkern, attention runs on: {path}")

    results = {}
    for name, on in (("torch SDPA", False), ("attnkern", True)):
        losses, times = train(args, device, dtype, on)
        steady = times[1:] or times  # the first step pays for compilation and warm-up
        tokens_per_s = args.batch * args.length / statistics.median(steady)
        results[name] = {"losses": losses, "step_s": statistics.median(steady), "tokens_per_s": tokens_per_s}
        print(f"{name:>10}: losses {' '.join(f'{x:.4f}' for x in losses)}")
        print(f"{'':>10}  median step {1e3 * statistics.median(steady):.1f} ms, {tokens_per_s:,.0f} tokens/s")
    a, b = results["attnkern"], results["torch SDPA"]
    drift = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    print(f"largest loss difference {drift:.2e}; attnkern step time {a['step_s'] / b['step_s']:.2f}x torch's")
    results["path"] = path
    return results


if __name__ == "__main__":
    main()
