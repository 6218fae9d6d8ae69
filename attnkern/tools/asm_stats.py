"""Efficiency figures read from a kernel's PTX: what the main loop executes per iteration.

A main loop is an innermost PTX loop (a branch back to an earlier `$L__BB` label) that holds matrix
products. Per iteration of it, with W warps per block (CTA):

- executed MMA work: Σ over its MMA instructions of m·n·k (from the shape in the opcode, e.g.
  `mma.sync.aligned.m16n8k16` or `wgmma.mma_async.sync.aligned.m64n128k16`) times the warps that issue
  it: W for a warp-level `mma.sync`, W/4 for a warpgroup-level `wgmma`. Every warp runs the same code,
  so work that two warps (or two warpgroups) both compute is counted twice, as the GPU spends it.
- useful MMA work: the products the tile needs, given by the caller from BLOCK_M, BLOCK_N and the
  padded head dims (e.g. the forward: BLOCK_M·BLOCK_N·BLOCK_E for S = QKᵀ plus BLOCK_M·BLOCK_N·BLOCK_EV
  for PV), times the tensor-core passes per product (3 for float32's tf32x3). Padding of a head dim to
  its power-of-two block counts as useful here: the figure isolates duplication, not padding.
- mma_efficiency = executed / useful: 1.0 when nothing is duplicated, 2.0 when two warpgroups both
  compute the same tile.
- exp_per_score = ex2 lanes executed (`ex2.approx` instructions × 32 lanes × W) / (BLOCK_M·BLOCK_N):
  about 1 (plus the forward's per-row rescale) when each score's exponential is taken once; 2 when
  every exp is taken twice.
- fops_per_score = float32 add/sub/mul/fma lanes executed (`add|sub|mul|fma[.rn].f32` × 32 × W) /
  (BLOCK_M·BLOCK_N): the arithmetic around the products, per score element (scaling, the row-max
  subtraction, the row sums, the rescale of the accumulator and the backward's dS all count; compares
  versions of one kernel, not kernels with each other).
- smem_loads_per_mma = explicit shared-memory loads (`ldmatrix`, `ld.shared`) / MMA instructions. A
  wgmma that reads an operand straight from shared memory through a descriptor needs none.
- async_kv: the loop copies its streamed tiles global→shared with `cp.async` or TMA
  (`cp.async.bulk`), so loads overlap the products of earlier tiles.

A kernel with several main loops (causal kernels: the full tiles and the diagonal tiles) reports the
worst loop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\S*?\.m(\d+)n(\d+)k(\d+)")
_EX2 = re.compile(r"\bex2\.approx\S*")
_FOP = re.compile(r"^(?:add|sub|mul|fma)(?:\.rn)?(?:\.ftz)?\.f32\b")
_SMEM_LOAD = re.compile(r"\b(ldmatrix|ld\.shared)\S*")
_ASYNC_COPY = re.compile(r"\bcp\.async\.(?:cg|ca|bulk)\S*")


@dataclass
class LoopStats:
    first_line: int
    last_line: int
    mma_instructions: int
    executed_macs: int  # per iteration, whole block
    mma_kind: str  # "wgmma", "mma.sync" or "mixed"
    exp_lanes: int  # per iteration, whole block
    fop_lanes: int  # float32 add/sub/mul/fma, per iteration, whole block
    smem_loads: int
    async_copies: int


def _loops(lines: List[str]):
    """(first, last) line index of every loop: a branch back to a label above it."""
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        s = line.strip()
        m = _LABEL.match(s)
        if m:
            labels[m.group(1)] = i
            continue
        m = _BRANCH.search(s)
        if m and m.group(1) in labels:
            loops.append((labels[m.group(1)], i))
    return loops


def _body_stats(lines: List[str], first: int, last: int, num_warps: int) -> LoopStats:
    mma = macs = exps = fops = smem = copies = 0
    kinds = set()
    for line in lines[first:last + 1]:
        s = line.strip()
        if s.startswith("//"):
            continue
        m = _MMA.search(s)
        if m:
            warpgroup = m.group(1).startswith("wgmma")
            kinds.add("wgmma" if warpgroup else "mma.sync")
            issuers = max(num_warps // 4, 1) if warpgroup else num_warps
            macs += int(m.group(2)) * int(m.group(3)) * int(m.group(4)) * issuers
            mma += 1
            continue
        m = _EX2.search(s)
        if m:
            exps += (2 if m.group(0).endswith("16x2") else 1) * 32 * num_warps
            continue
        if _FOP.match(s):
            fops += 32 * num_warps
            continue
        if _SMEM_LOAD.search(s):
            smem += 1
        elif _ASYNC_COPY.search(s):
            copies += 1
    kind = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "")
    return LoopStats(first, last, mma, macs, kind, exps, fops, smem, copies)


def main_loops(ptx: str, num_warps: int) -> List[LoopStats]:
    """Stats of the innermost loops that hold MMA instructions (the kernel's main loops)."""
    lines = ptx.splitlines()
    loops = sorted(_loops(lines))
    with_mma = [(a, b) for a, b in loops if any(_MMA.search(x) for x in lines[a:b + 1])]
    inner = [(a, b) for a, b in with_mma
             if not any((c, d) != (a, b) and a <= c and d <= b for c, d in with_mma)]
    return [_body_stats(lines, a, b, num_warps) for a, b in inner]


@dataclass
class Efficiency:
    mma_efficiency: Optional[float]
    exp_per_score: Optional[float]
    smem_loads_per_mma: Optional[float]
    async_kv: Optional[bool]
    mma_kind: str
    main_loops: int
    fops_per_score: Optional[float] = None


def efficiency(ptx: str, num_warps: int, useful_macs: int, scores: int) -> Efficiency:
    """The figures of the module docstring for a kernel whose main-loop iteration should do
    `useful_macs` multiply-adds over a tile of `scores` score elements. None where the PTX has no main
    loop with MMA instructions (e.g. scalar float32 products)."""
    loops = main_loops(ptx, num_warps)
    if not loops:
        return Efficiency(None, None, None, None, "", 0, None)
    eff = max(l.executed_macs / useful_macs for l in loops)
    exps = max(l.exp_lanes / scores for l in loops)
    fops = max(l.fop_lanes / scores for l in loops)
    smem = max(l.smem_loads / l.mma_instructions for l in loops)
    kinds = {l.mma_kind for l in loops}
    return Efficiency(round(eff, 3), round(exps, 3), round(smem, 3), all(l.async_copies > 0 for l in loops),
                      kinds.pop() if len(kinds) == 1 else "mixed", len(loops), round(fops, 3))
