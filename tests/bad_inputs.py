"""Random invalid calls, and a worker that runs them in a process of its own.

`bad_call(entry, seed)` draws one invalid call: a small valid problem with one thing broken (a wrong
dtype, device, shape, head count, mask, scale, dropout_p, causal, softcap, ALiBi slopes, dropout rng or
backend), made through the public
API (entry "api": scaled_dot_product_attention or attention) or the custom ops (entry "ops":
torch.ops.attnkern.attention_forward_v5 / attention_backward_v5, which anyone can call). Each must raise
TypeError, ValueError or RuntimeError with a message naming the broken argument.

A wrong call may also crash the process (an out-of-bounds read in a kernel), so tests run the calls
here, in a subprocess (test_random_oracle.py):

    python tests/bad_inputs.py api 0 300     # entry, first seed, count: one line per call
    python tests/bad_inputs.py ops 17 1      # one call again

Lines: "RUN <seed> <what>" before a call, then "OK <seed>" or "FAIL <seed> <what>: <why>".
"""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Callable, Tuple

if __name__ == "__main__" and not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # the interpreter must be chosen before triton is imported (as conftest.py does)

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch

ERRORS = (TypeError, ValueError, RuntimeError)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class BadCall:
    what: str  # what is broken, and how the call is made
    call: Callable[[], object]
    names: Tuple[str, ...]  # the error message must name one of these (as a word)


def _names_pattern(names):
    return re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9_])",
                      re.IGNORECASE)


def run_one(bad: BadCall) -> str:
    """'' if the call raised a clear error naming the argument, else why not."""
    try:
        bad.call()
    except ERRORS as exc:
        msg = str(exc)
        if not _names_pattern(bad.names).search(msg):
            return f"{type(exc).__name__} does not name {' or '.join(bad.names)}: {msg[:300]!r}"
        return ""
    except Exception as exc:  # noqa: BLE001 - any other type is itself the failure
        return f"raised {type(exc).__name__} (want TypeError/ValueError/RuntimeError): {str(exc)[:300]!r}"
    return "no error"


# --- the public API -------------------------------------------------------------------------------

_PUBLIC = ("query", "key", "value")


def _api_problem(rng: random.Random):
    dtype = rng.choice(FLOATS)
    rank = rng.choice((3, 4, 4, 5))
    batch = {3: (), 4: (rng.randint(1, 3),), 5: (rng.randint(1, 2), rng.randint(1, 3))}[rank]
    Hkv = rng.randint(1, 3)
    Hq = Hkv * rng.randint(1, 3)
    L, S, E, Ev = (rng.randint(1, 9) for _ in range(4))
    return dict(dtype=dtype, batch=batch, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev)


def bad_api_call(seed: int) -> BadCall:
    import attnkern

    rng = random.Random(seed)
    p = _api_problem(rng)
    dtype, batch, Hq, Hkv, L, S, E, Ev = (p[n] for n in ("dtype", "batch", "Hq", "Hkv", "L", "S", "E", "Ev"))
    gen = torch.Generator().manual_seed(seed)
    t = {"query": torch.randn(*batch, Hq, L, E, generator=gen).to(dtype),
         "key": torch.randn(*batch, Hkv, S, E, generator=gen).to(dtype),
         "value": torch.randn(*batch, Hkv, S, Ev, generator=gen).to(dtype)}
    kw = dict(attn_mask=None, dropout_p=0.0, scale=None, enable_gqa=Hq != Hkv)
    entry = rng.choice(("sdpa", "attention"))
    extra = {}  # attention()'s own arguments
    scores = (*batch, Hq, L, S)
    name = rng.choice(_PUBLIC)
    kinds = ["dtype", "mixed_dtype", "device", "mask_device", "head_dim", "kv_length", "rank", "mask_shape",
             "mask_rank", "heads_without_gqa", "gqa_not_a_multiple", "mask_dtype", "mask_type", "scale",
             "dropout", "not_a_tensor"]
    if len(batch) and max(batch) > 1:
        kinds.append("batch")
    if entry == "attention":
        kinds += ["causal", "backend", "softcap", "alibi_slopes", "dropout_rng"]
    kind = rng.choice(kinds)
    names: Tuple[str, ...]
    if kind == "dtype":
        t[name] = t[name].to(rng.choice((torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)))
        names = (name,)
    elif kind == "mixed_dtype":
        t[name] = t[name].to(rng.choice([d for d in FLOATS + (torch.float64,) if d != dtype]))
        names = (name, "dtype")
    elif kind == "device":
        t[name] = t[name].to("meta")
        names = (name,)
    elif kind == "mask_device":
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool, device="meta")
        names = ("attn_mask",)
    elif kind == "head_dim":  # key's head dim differs from query's (value's may differ)
        t["key"] = torch.randn(*batch, Hkv, S, E + rng.randint(1, 4)).to(dtype)
        names = ("key", "query")
    elif kind == "kv_length":
        t["value"] = torch.randn(*batch, Hkv, S + rng.randint(1, 4), Ev).to(dtype)
        names = ("key", "value")
    elif kind == "rank":
        t[name] = t[name].reshape(-1)[: rng.randint(0, 3)] if rng.random() < 0.7 else t[name].sum()
        names = (name,)
    elif kind == "batch":  # key/value batch dims that do not broadcast against the query's
        kb = tuple(b + 1 if b > 1 else b for b in batch)
        t["key"], t["value"] = torch.randn(*kb, Hkv, S, E).to(dtype), torch.randn(*kb, Hkv, S, Ev).to(dtype)
        names = ("key", "value", "batch")
    elif kind == "mask_shape":  # one dim neither 1 nor the scores' size
        shape = [rng.choice((1, n)) for n in scores]
        d = rng.randrange(len(shape))
        shape[d] = scores[d] + rng.randint(1, 3)
        shape = shape[rng.randint(0, d):]  # leading dims may be dropped
        kw["attn_mask"] = torch.zeros(shape, dtype=torch.bool)
        names = ("attn_mask",)
    elif kind == "mask_rank":  # more dims than the scores have
        kw["attn_mask"] = torch.zeros((1,) * rng.randint(1, 2) + scores, dtype=dtype)
        names = ("attn_mask",)
    elif kind == "heads_without_gqa":  # Hq a multiple of Hkv > 1 but enable_gqa False
        Hkv = rng.randint(2, 3)
        Hq = Hkv * rng.randint(2, 3)
        t["query"] = torch.randn(*batch, Hq, L, E).to(dtype)
        t["key"], t["value"] = torch.randn(*batch, Hkv, S, E).to(dtype), torch.randn(*batch, Hkv, S, Ev).to(dtype)
        kw["enable_gqa"] = False
        names = ("head", "heads", "enable_gqa")
    elif kind == "gqa_not_a_multiple":
        Hkv = rng.randint(2, 4)
        Hq = Hkv * rng.randint(1, 3) + rng.randint(1, Hkv - 1)
        t["query"] = torch.randn(*batch, Hq, L, E).to(dtype)
        t["key"], t["value"] = torch.randn(*batch, Hkv, S, E).to(dtype), torch.randn(*batch, Hkv, S, Ev).to(dtype)
        kw["enable_gqa"] = True
        names = ("head", "heads", "enable_gqa")
    elif kind == "mask_dtype":
        bad = [torch.int32, torch.int64, torch.uint8, torch.float64] + [d for d in (torch.float16, torch.bfloat16)
                                                                         if d != dtype]
        kw["attn_mask"] = torch.zeros(L, S, dtype=rng.choice(bad))
        names = ("attn_mask",)
    elif kind == "mask_type":
        kw["attn_mask"] = rng.choice(([[True] * S] * L, 1.0, "causal", (L, S)))
        names = ("attn_mask",)
    elif kind == "scale":
        kw["scale"] = rng.choice((float("nan"), float("inf"), float("-inf"), "0.5", [0.5], complex(1, 1)))
        names = ("scale",)
    elif kind == "dropout":
        kw["dropout_p"] = rng.choice((-0.1, 1.5, float("nan"), "0.1", None, [0.1]))
        names = ("dropout_p",)
    elif kind == "not_a_tensor":
        t[name] = rng.choice((t[name].tolist(), None, 3.0, t[name].numpy() if dtype != torch.bfloat16 else "q"))
        names = (name,)
    elif kind == "causal":
        extra["causal"] = rng.choice(("lower", "causal", 3, -1, 1.5, "bottom"))
        names = ("causal",)
    elif kind == "softcap":
        extra["softcap"] = rng.choice((-1.0, float("inf"), float("nan"), "30", True))
        names = ("softcap",)
    elif kind == "alibi_slopes":
        extra["alibi_slopes"] = rng.choice((torch.ones(Hq + 1), torch.ones(Hq, dtype=torch.float64),
                                            torch.ones(2, Hq + 1), [0.5] * Hq, torch.ones(Hq, device="meta")))
        names = ("alibi_slopes",)
    elif kind == "dropout_rng":
        kw["dropout_p"] = 0.25
        extra["dropout_rng"] = rng.choice((torch.zeros(3, dtype=torch.int64), torch.zeros(2), [1, 2],
                                           torch.zeros(2, dtype=torch.int64, device="meta")))
        names = ("dropout_rng",)
    else:  # backend
        extra["backend"] = rng.choice(("cudnn", "flash", "CPU ", 3))
        names = ("backend",)

    q, k, v = t["query"], t["key"], t["value"]
    if entry == "sdpa":
        def call():
            return attnkern.scaled_dot_product_attention(q, k, v, **kw)
    else:
        def call():
            return attnkern.attention(q, k, v, attn_mask=kw["attn_mask"], scale=kw["scale"],
                                      enable_gqa=kw["enable_gqa"], dropout_p=kw["dropout_p"], **extra)
    return BadCall(f"{kind} via {entry}: {_shapes(q, k, v)} kw={_short(kw)} {_short(extra)}", call, names)


# --- the custom ops -------------------------------------------------------------------------------

def _op_backends(dtype):
    """The backends that run `dtype` here (as tests/matrix.py lists them) and the reference."""
    on_gpu = torch.cuda.is_available()
    names = ["triton", "reference"] if on_gpu else ["cpu", "reference"] + (["triton"] if dtype != torch.bfloat16 else [])
    return names


def bad_op_call(seed: int) -> BadCall:
    from attnkern import ops

    rng = random.Random(seed)
    dtype = rng.choice(FLOATS)
    backend = rng.choice(_op_backends(dtype))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Hkv = rng.randint(1, 2), rng.randint(1, 3)
    Hq, L, S, E, Ev = Hkv * rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 16), rng.randint(1, 16)
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    good = {"q": r(B, Hq, L, E), "k": r(B, Hkv, S, E), "v": r(B, Hkv, S, Ev), "mask": None}
    if rng.random() < 0.5:
        good["mask"] = r(1, Hq, L, S)
    t = dict(good)  # the call's inputs: `good` with one thing broken
    which = rng.choice(("forward", "backward"))
    kinds = ["heads", "head_dim", "kv_length", "batch", "rank", "dtype", "int_dtype", "device", "mask_shape",
             "mask_dtype", "backend"]
    if which == "backward":
        kinds += ["dout", "out", "stats", "dlse"]
    kinds += ["softcap", "alibi", "dropout", "rng"]
    softcap, alibi, dropout_p, drop_rng = 0.0, None, 0.0, None
    kind = rng.choice(kinds)
    name = rng.choice(("q", "k", "v"))
    names = (name, {"q": "query", "k": "key", "v": "value"}[name])
    if kind == "heads":  # Hq not a multiple of Hkv (the Triton kernel read past k's end: issue 10 item 5)
        Hkv = rng.randint(2, 4)
        Hq = Hkv * rng.randint(1, 2) + rng.randint(1, Hkv - 1)
        t.update(q=r(B, Hq, L, E), k=r(B, Hkv, S, E), v=r(B, Hkv, S, Ev), mask=None)
        names = ("q", "k", "v", "query", "key", "value", "heads")
    elif kind == "head_dim":
        t["k"] = r(B, Hkv, S, E + rng.randint(1, 4))
        names = ("k", "q", "key", "query")
    elif kind == "kv_length":
        t["v"] = r(B, Hkv, S + rng.randint(1, 4), Ev)
        names = ("k", "v", "key", "value")
    elif kind == "batch":
        t[name] = r(B + 1, *t[name].shape[1:])
        names = ("q", "k", "v", "query", "key", "value")
    elif kind == "rank":
        t[name] = t[name][0]
    elif kind == "dtype":
        t[name] = t[name].to(rng.choice([d for d in FLOATS + (torch.float64,) if d != dtype]))
    elif kind == "int_dtype":
        t[name] = t[name].to(rng.choice((torch.int32, torch.int64)))
    elif kind == "device":
        t[name] = t[name].to("meta")
    elif kind == "mask_shape":  # one dim neither 1 nor full, or not 4-D
        shape = [1, Hq, L, S]
        d = rng.randrange(4)
        shape[d] = (B if d == 0 else shape[d]) + rng.randint(1, 2)
        t["mask"] = r(*shape) if rng.random() < 0.5 else r(1, Hq, L, S).reshape(-1)
        names = ("mask", "attn_mask")
    elif kind == "mask_dtype":
        dt = rng.choice((torch.int32, torch.uint8, torch.float64))
        t["mask"] = torch.zeros(1, Hq, L, S, dtype=dt, device=device)
        names = ("mask", "attn_mask")
    elif kind == "backend":
        names = ("backend",)
    elif kind == "softcap":
        softcap, names = rng.choice((-1.0, float("inf"), float("nan"))), ("softcap",)
    elif kind == "alibi":  # not (1 or B, Hq) float32 on the device
        alibi = rng.choice((torch.ones(Hq, device=device), torch.ones(B + 1, Hq, device=device),
                            torch.ones(1, Hq, dtype=torch.float64, device=device), torch.ones(1, Hq, device="meta")))
        names = ("alibi",)
    elif kind == "dropout":
        dropout_p = rng.choice((-0.5, 1.5, float("nan")))
        drop_rng, names = torch.zeros(2, dtype=torch.int64, device=device), ("dropout_p",)
    elif kind == "rng":  # missing, or not int64 (2,) on the device
        dropout_p = 0.5
        drop_rng = rng.choice((None, torch.zeros(3, dtype=torch.int64, device=device), torch.zeros(2, device=device)))
        names = ("rng",)
    mods = (softcap, alibi, dropout_p, drop_rng)
    scale, causal = 0.5, rng.choice(([1, -1, -1], [0, -1, 0], [1, -1, 0], [1, 3, 2]))
    op_backend = rng.choice(("cudnn", "", "Auto")) if kind == "backend" else backend
    q, k, v, mask = t["q"], t["k"], t["v"], t["mask"]
    what = f"{kind} via {which} op on {backend}: {_shapes(q, k, v)} mask={_meta(mask)} causal={causal}"
    if which == "forward":
        def call():
            return ops.attention_forward(q, k, v, mask, scale, causal, *mods, op_backend, True)
        return BadCall(what, call, names)

    # The backward of a valid forward, called with one input broken.
    out, lse, stats, out_lo = ops.attention_forward(good["q"], good["k"], good["v"], good["mask"], scale, causal,
                                                    0.0, None, 0.0, None, backend, True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    if kind == "dout":
        dout = r(*out.shape[:-1], out.shape[-1] + 1) if rng.random() < 0.5 else r(*out.shape[1:])
        names = ("dout", "grad_out", "grad_output", "do")
    elif kind == "out":
        out = r(B, Hq, L + 1, Ev)
        names = ("out", "output")
    elif kind == "stats":
        stats = torch.zeros(B, Hq, L, rng.choice((1, 3)), device=device)
        names = ("stats",)
    elif kind == "dlse":
        dlse = torch.zeros(B, Hq, L + 1, device=device)
        names = ("dlse", "grad_lse", "lse")
    mask_grad = mask is not None and mask.is_floating_point() and rng.random() < 0.5
    what += f" mask_grad={mask_grad}"

    def call():
        return ops.attention_backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale, causal, *mods,
                                      mask_grad, op_backend)

    return BadCall(what, call, names)


def _meta(t):
    if t is None:
        return "None"
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" + (f"@{t.device.type}" if t.device.type != "cpu" else "")


def _shapes(q, k, v):
    return f"q={_meta(q)} k={_meta(k)} v={_meta(v)}"


def _short(kw):
    return {n: (_meta(x) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()
            if not (n in ("attn_mask", "scale") and x is None) and not (n == "dropout_p" and x == 0.0)}


ENTRIES = {"api": bad_api_call, "ops": bad_op_call}


def main(argv):
    entry, start, count = argv[0], int(argv[1]), int(argv[2])
    import warnings

    warnings.simplefilter("ignore")
    for seed in range(start, start + count):
        try:
            bad = ENTRIES[entry](seed)
        except Exception as exc:  # noqa: BLE001 - the generator itself broke: say so, keep going
            print(f"FAIL {seed} (drawing the call): {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"RUN {seed} {bad.what}", flush=True)
        why = run_one(bad)
        print(f"FAIL {seed} {bad.what}: {why}" if why else f"OK {seed}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
