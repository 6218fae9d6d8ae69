"""`python -m attnkern`: check this install on this machine.

Prints the versions, the device, which backends can run here (and why not), then runs a handful of
representative calls through the default ("auto") path, forward and backward, and compares output and
gradients with torch's SDPA in float64 by the tolerance rule, timing each against torch's SDPA in the
same process. Exit status 1 if any check fails.
"""
from __future__ import annotations

import sys
import time
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import __version__, backends, explain, reference, scaled_dot_product_attention
from .cases import Case, make_inputs
from ..tolerance import check

# Representative calls, in the case vocabulary of attnkern/tools/cases.py: key padding is a bool (B, 1, 1, S)
# prefix mask, the learned bias an (Hq, L, S) float mask that requires grad.
CPU_CALLS = [
    Case("plain", B=2, Hq=4, L=128, S=128, E=64),
    Case("causal gqa", B=1, Hq=8, Hkv=2, L=256, S=256, E=64, causal="top_left"),
    Case("key padding Lq!=Lk", B=2, Hq=4, L=96, S=160, E=80, mask="keypad"),
    Case("learned bias", B=1, Hq=4, L=128, S=128, E=32, mask="float_grad", mask_dims="hls"),
]
GPU_CALLS = [
    Case("plain", B=4, Hq=16, L=2048, S=2048, E=128),
    Case("causal gqa", B=2, Hq=32, Hkv=8, L=4096, S=4096, E=64, causal="top_left"),
    Case("key padding Lq!=Lk", B=4, Hq=8, L=1000, S=3000, E=80, mask="keypad"),
    Case("learned bias", B=2, Hq=8, L=1024, S=1024, E=64, mask="float_grad", mask_dims="hls"),
]


def _timed(fn, device, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _torch_sdpa(q, k, v, attn_mask, is_causal, enable_gqa):
    """torch's SDPA for the same call (its float64/math path refuses a mask together with is_causal,
    so causality is folded into the mask then)."""
    if is_causal and attn_mask is not None:
        L, S = q.shape[-2], k.shape[-2]
        tril = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = attn_mask & tril if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tril, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


def _naive(q, k, v, attn_mask, is_causal, enable_gqa):
    return reference.reference_attention(q, k, v, attn_mask, causal=is_causal, enable_gqa=enable_gqa)[0]


def _run(fn, inputs, causal, gqa, do):
    """Forward and backward of `fn`; returns (out, gradients of the inputs that require grad)."""
    q, k, v, mask = inputs
    for t in inputs:
        if t is not None and t.requires_grad:
            t.grad = None
    out = fn(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    out.backward(do)
    return out, [t.grad for t in inputs if t is not None and t.requires_grad]


def _detached(inputs, dtype):
    return [None if t is None else
            t.detach().to(dtype if t.is_floating_point() else t.dtype).requires_grad_(t.requires_grad)
            for t in inputs]


def check_call(case: Case, dtype, device, seed: int) -> Tuple[bool, str]:
    """Run one call through attnkern's default path; check it against torch's float64 SDPA and time it
    against torch's SDPA in `dtype`."""
    inputs = make_inputs(case, dtype, device, seed)
    q, k, v, mask = inputs
    causal, gqa = case.is_causal, case.enable_gqa
    do = torch.randn(case.B, case.Hq, case.L, case.ev, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype)
    path = explain(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa).backend

    out, grads = _run(scaled_dot_product_attention, inputs, causal, gqa, do)
    out64, grads64 = _run(_torch_sdpa, _detached(inputs, torch.float64), causal, gqa, do.double())
    out_lp, grads_lp = _run(_naive, _detached(inputs, dtype), causal, gqa, do)
    names = ["dq", "dk", "dv", "dmask"]
    failures = [m for m in [check("out", out, out64, out_lp, dtype)] + [
        check(n, g, g64, glp, dtype, factor=3.0) for n, g, g64, glp in zip(names, grads, grads64, grads_lp)] if m]

    ratio = (_timed(lambda: _run(_torch_sdpa, inputs, causal, gqa, do), device)
             / _timed(lambda: _run(scaled_dot_product_attention, inputs, causal, gqa, do), device))
    status = "PASS" if not failures else "FAIL"
    line = (f"{status}  {case.name:<20} {str(dtype).replace('torch.', ''):<9} {case.summary()}  path={path:<9}  "
            f"fwd+bwd speed vs torch SDPA: {ratio:.2f}x")
    return not failures, "\n".join([line] + [f"      {m}" for m in failures])


def main(argv: List[str] = ()) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"attnkern {__version__}  torch {torch.__version__}  device {device.type}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name in backends.names()[1:]:
        why = backends.get(name).availability(device)
        print(f"  backend {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    calls = GPU_CALLS if device.type == "cuda" else CPU_CALLS
    ok = True
    for dtype in dtypes:
        for i, case in enumerate(calls):
            passed, text = check_call(case, dtype, device, seed=2 * i)
            ok &= passed
            print(text, flush=True)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
