"""Main-loop figures of the CUDA kernels, counted on their CPU emulation (backend "cuda-emu").

The CUDA kernels are hand-written with mma.sync, ldmatrix and ex2 as inline PTX (csrc/cuda/ptx.h),
their main loops nest loops that nvcc does not unroll, so the PTX read of attnkern.tools.asm_stats
cannot weigh their instructions. The emulator runs the same sources and counts what each kernel
executes: warp-level `mma.sync.m16n8k16` and `ldmatrix.x4` instructions, `ex2` lanes, and the bytes
read from each tensor through cp.async or through plain (synchronous) loads. Over a problem whose
scores are all visible (no causal band, lengths a multiple of every tile), per kernel:

- mma_efficiency = executed MMA multiply-adds (instructions x 16·8·16) / the products the kernel needs
  for the problem (`USEFUL_PRODUCTS`: e.g. the forward S = QKᵀ and PV, L·S·(E + Ev)). 1.0 when no
  work is duplicated; head dims run at their kernel bucket (no padding in these problems).
- exp_per_score = ex2 lanes / scores (the forward adds its per-row rescale to 1).
- smem_loads_per_mma = ldmatrix / mma instructions.
- async_kv: the tensors the kernel streams tile by tile (K and V; dK/dV streams Q and dO) arrive only
  through cp.async.
- sync_bytes_per_score: bytes read from global memory by plain loads, per score (row statistics, and a
  user mask's per-element reads).

The counts are the instructions the source issues on every path the problem takes, the same on sm_80
and sm_90a (the kernels use no sm_90-only instruction); registers and spills come from ptxas
(csrc/cuda/compile_check.py).
"""
from __future__ import annotations

import json
import re
from typing import Dict, Optional

MMA_MACS = 16 * 8 * 16  # one m16n8k16
# Products per score element, by kernel, for head dims E (Q, K) and Ev (V): the forward S = QKᵀ and
# O = PV; dK/dV S, dP = dO Vᵀ, dV = Pᵀ dO and dK = dSᵀ Q; dQ S, dP and dQ = dS K; dMask S and dP.
USEFUL_PRODUCTS = {
    "attention_fwd_kernel": lambda e, ev: e + ev,
    "attention_bwd_dkdv_kernel": lambda e, ev: 2 * (e + ev),
    "attention_bwd_dq_kernel": lambda e, ev: 2 * e + ev,
    "attention_bwd_dmask_kernel": lambda e, ev: e + ev,
}
# The tensors each kernel streams tile by tile through its main loop.
STREAMED = {
    "attention_fwd_kernel": ("key", "value"),
    "attention_bwd_dkdv_kernel": ("query", "grad_out"),
    "attention_bwd_dq_kernel": ("key", "value"),
    "attention_bwd_dmask_kernel": ("key", "value"),
}
# (head dim, mask, in the benchmark grid): fp16, B = 1, H = 2, L = S = 256.
PROBLEMS = ((64, None, True), (128, None, True), (128, "bool", False), (128, "float", False), (256, None, False))
SHAPE = dict(B=1, H=2, L=256, S=256)
TARGET = "emulated"


def _traits(name: str) -> str:
    m = re.search(r"(\w+)Traits<([^>]*)>", name)
    if not m:
        return "-"
    args = [a.strip() for a in m.group(2).split(",") if not a.strip().startswith("__")]
    return f"{m.group(1)}<{','.join(args)}>"


def records_from_counts(counts: Dict[str, dict], E: int, Ev: int, scores: int, problem: str, in_grid: bool,
                        short_name) -> list:
    """compile_report.Record rows from the emulator's counts (kernel name -> counts) of one problem
    whose `scores` score elements were all visible. Kernels without matrix products are left out."""
    from .compile_report import Record

    out = []
    for name, c in sorted(counts.items()):
        base = next((k for k in USEFUL_PRODUCTS if k in name), None)
        if base is None or c["mma"] == 0:
            continue
        streamed = STREAMED[base]
        sync = c["sync_load_bytes"]
        out.append(Record(
            "cuda", short_name(name), _traits(name), TARGET, problem, in_grid, True,
            mma_efficiency=round(c["mma"] * MMA_MACS / (scores * USEFUL_PRODUCTS[base](E, Ev)), 3),
            exp_per_score=round(c["ex2_lanes"] / scores, 3),
            smem_loads_per_mma=round(c["ldmatrix"] / c["mma"], 3),
            async_kv=all(sync.get(t, 0) == 0 and c["async_load_bytes"].get(t, 0) > 0 for t in streamed),
            sync_bytes_per_score=round(sum(sync.values()) / scores, 3), mma_kind="mma.sync"))
    return out


def _run(E: int, mask: Optional[str]) -> Dict[str, dict]:
    """Forward and backward of one problem on cuda-emu; the emulator's counts of it."""
    import torch

    import attnkern

    ops = torch.ops.attnkern_emu
    g = torch.Generator().manual_seed(0)
    B, H, L, S = SHAPE["B"], SHAPE["H"], SHAPE["L"], SHAPE["S"]
    q, k, v = (torch.randn(B, H, n, E, generator=g, dtype=torch.float16).requires_grad_() for n in (L, S, S))
    m = None
    if mask == "bool":
        m = torch.rand(L, S, generator=g) < 0.9
        m[:, 0] = True  # every row sees a key: all scores count as computed
    elif mask == "float":
        m = torch.randn(L, S, generator=g, dtype=torch.float16).requires_grad_()
    ops.reset_kernel_counts()
    out, _ = attnkern.attention(q, k, v, attn_mask=m, backend="cuda-emu")
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    return json.loads(ops.kernel_counts())


def cuda_loop_records(short_name):
    """The figures of the module docstring for PROBLEMS, or ([], reason) where the emulator cannot be
    built here."""
    try:
        from ..backends import cuda_emu

        cuda_emu.load()
    except Exception as exc:  # no compiler or CUDA headers: say so, as for nvcc
        return [], f"the CPU emulation could not be built: {str(exc).splitlines()[0][:200]}"
    out = []
    scores = SHAPE["B"] * SHAPE["H"] * SHAPE["L"] * SHAPE["S"]
    for E, mask, in_grid in PROBLEMS:
        problem = f"float16 E={E} L=S={SHAPE['L']}" + (f" {mask}-mask" if mask else "")
        out += records_from_counts(_run(E, mask), E, E, scores, problem, in_grid, short_name)
    return out, ""
