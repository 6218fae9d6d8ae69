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

import torch

import attnkern
import lm_training


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


def train(args, with_attnkern: bool):
    torch.manual_seed(0)
    model = TinyCausalLM(args.vocab, args.hidden, args.heads, args.layers, args.length).to(args.device_, args.dtype_)
    patch = attnkern.replace_sdpa() if with_attnkern else None
    try:
        return lm_training.train(model, args)
    finally:
        if patch is not None:
            patch.restore()


def main(argv=None):
    p = lm_training.parser(__doc__)
    args = lm_training.parse(p, argv)
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    path = attention_path(args, args.device_, args.dtype_)
    print(f"device {args.device_}, dtype {str(args.dtype_).replace('torch.', '')}, {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads, batch {args.batch} x {args.length} tokens, {args.steps} steps")
    print(f"with attnkern, attention runs on: {path}")
    return lm_training.compare(args, {"torch SDPA": lambda: train(args, False), "attnkern": lambda: train(args, True)},
                               path)


if __name__ == "__main__":
    main()
