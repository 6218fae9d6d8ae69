"""Train a tiny Mistral-style decoder (sliding-window attention) with attnkern's windows and with a dense mask.

    python examples/train_sliding_window.py                    # on the GPU if there is one, else the CPU
    python examples/train_sliding_window.py --length 2048 --window 128 --steps 5

The model is plain torch in the Mistral mould: RMSNorm, rotary positions, grouped-query attention, a
SwiGLU MLP, and every layer attending a sliding window: a token sees itself and the `window - 1` tokens
before it. With attnkern that is `attnkern.attention(q, k, v, causal=True, window=(window - 1, 0))`: the
kernels skip the key tiles outside the band, so attention costs grow with length * window, not length^2.
The comparison run computes the same attention with torch's SDPA and a dense (length x length) bool
mask. Both runs start from the same weights and see the same batches, so their losses agree to rounding.
(With Hugging Face transformers, `attn_implementation="attnkern"` passes a model's `sliding_window` to
the kernels the same way.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import attnkern
import lm_training


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (B, H, L, D), the half-split form Llama and Mistral use."""
    L, D = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = torch.cat([angle, angle], -1).cos().to(x.dtype), torch.cat([angle, angle], -1).sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dense_window_mask(length: int, window: int, device) -> torch.Tensor:
    """The (length, length) bool mask of a causal sliding window: key j visible from query i iff
    i - window < j <= i."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)
    return (j <= i) & (j > i - window)


class Block(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, window: int, use_attnkern: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.window, self.use_attnkern = window, use_attnkern
        self.attn_norm = torch.nn.RMSNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = torch.nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.mlp_norm = torch.nn.RMSNorm(hidden)
        self.gate_up = torch.nn.Linear(hidden, 2 * 4 * hidden, bias=False)
        self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = rotary(q), rotary(k)
        if self.use_attnkern:
            # A causal window of `window` tokens: right bound 0 (causal), left bound window - 1.
            out = attnkern.attention(q, k, v, causal=True, window=(self.window - 1, 0), enable_gqa=True,
                                     return_lse=False)
        else:
            mask = dense_window_mask(L, self.window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.attn_norm(x))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyMistral(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, kv_heads: int, layers: int, window: int,
                 use_attnkern: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(Block(hidden, heads, kv_heads, window, use_attnkern)
                                          for _ in range(layers))
        self.norm = torch.nn.RMSNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def attention_path(args, device, dtype) -> str:
    """Which attnkern backend runs the model's attention calls, and the band, in words."""
    head_dim = args.hidden // args.heads
    q = torch.empty(args.batch, args.heads, args.length, head_dim, device=device, dtype=dtype)
    k = torch.empty(args.batch, args.kv_heads, args.length, head_dim, device=device, dtype=dtype)
    e = attnkern.explain(q, k, k, causal=True, window=(args.window - 1, 0), enable_gqa=True)
    return f"attnkern, backend {e.backend!r}" + (" (fallback: the naive reference)" if e.fallback else "")


def train(args, use_attnkern: bool):
    torch.manual_seed(0)
    model = TinyMistral(args.vocab, args.hidden, args.heads, args.kv_heads, args.layers, args.window,
                        use_attnkern).to(args.device_, args.dtype_)
    return lm_training.train(model, args)


def main(argv=None):
    p = lm_training.parser(__doc__, steps=5, batch=2, length=1024, hidden=64, vocab=256)
    p.add_argument("--window", type=int, default=64, help="tokens each token sees, itself included")
    p.add_argument("--kv-heads", type=int, default=2)
    args = lm_training.parse(p, argv, positive=("window", "kv_heads"))
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        p.error(f"--hidden ({args.hidden}) must be --heads ({args.heads}) times an even head dim")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    path = attention_path(args, args.device_, args.dtype_)
    print(f"device {args.device_}, dtype {str(args.dtype_).replace('torch.', '')}, {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads ({args.kv_heads} kv), batch {args.batch} x {args.length} tokens, "
          f"window {args.window}, {args.steps} steps")
    print(f"sliding-window attention runs on: {path}")
    return lm_training.compare(args, {"dense mask": lambda: train(args, False), "attnkern": lambda: train(args, True)},
                               path)


if __name__ == "__main__":
    main()
