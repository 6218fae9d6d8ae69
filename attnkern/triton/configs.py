"""Block sizes, warps and stages per head dim and dtype, and when to autotune.

On a GPU each kernel autotunes over a short list of configs that fit the head dim (pruned before any
benchmarking), keyed by power-of-two length buckets so a training run with varying lengths does not
re-tune at every new length. ATTNKERN_AUTOTUNE=0 takes the first (heuristic) config instead, which is
what the test suite does. Under TRITON_INTERPRET=1 (no GPU) there is exactly one config: the
interpreter cannot benchmark, and larger tiles mean fewer, faster interpreted programs.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return not INTERPRET and os.environ.get("ATTNKERN_AUTOTUNE", "1") != "0"


def bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two bucket (16 minimum)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def head_block(e: int) -> int:
    """Padded head dim: a power of two and at least 16 (tl.dot's minimum K)."""
    return max(16, triton.next_power_of_2(int(e)))


def _tier(tier: int, dtype_class: str, *specs):
    """Configs (BLOCK_M, BLOCK_N, warps, stages) for padded head dims in (previous tier, tier] and one
    dtype class ("half": fp16/bf16; "fp32": operands twice the size, three tf32 products per dot)."""
    out = []
    for bm, bn, warps, stages in specs:
        c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        c.attnkern_tier = (tier, dtype_class)
        out.append(c)
    return out


# Interpreter block sizes: small enough that 100-200 long test sequences still span several tiles (so
# the boundary, causal-diagonal and multi-tile paths are exercised), large enough to keep the
# interpreted program count low.
INTERPRET_BLOCK = int(os.environ.get("ATTNKERN_INTERPRET_BLOCK", "32"))

TIERS = (64, 128, 256)
# Listed best-first per (tier, dtype class): the first is the no-autotune choice and must compile for
# every mask kind and alignment within the shared memory of an sm80 GPU (checked by
# `python -m attnkern.triton.compile_check`, which also reports register spills).
# Forward: one program owns BLOCK_M query rows and streams K/V tiles of BLOCK_N keys.
FWD_CONFIGS = (
    _tier(64, "half", (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4))
    + _tier(128, "half", (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3))
    + _tier(256, "half", (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 1))
    + _tier(64, "fp32", (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2))
    + _tier(128, "fp32", (64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2))
    + _tier(256, "fp32", (16, 32, 4, 1), (32, 32, 4, 1), (64, 32, 8, 1))
)
# Backward dK/dV: one program owns BLOCK_N keys and streams query tiles of BLOCK_M rows;
# dQ: one program owns BLOCK_M query rows and streams key tiles of BLOCK_N. Both use these.
BWD_CONFIGS = (
    _tier(64, "half", (64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 2))
    + _tier(128, "half", (64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 4, 1))
    + _tier(256, "half", (32, 32, 4, 1), (64, 32, 8, 1), (16, 32, 4, 1))
    + _tier(64, "fp32", (32, 32, 4, 2), (64, 32, 4, 1), (32, 64, 4, 1))
    + _tier(128, "fp32", (16, 32, 4, 1), (32, 32, 4, 1), (32, 64, 8, 1))
    + _tier(256, "fp32", (16, 16, 4, 1), (16, 32, 4, 1), (32, 32, 8, 1))
)

# Single-pass backward: one program owns BLOCK_N keys (dK, dV accumulated in registers) and streams
# query tiles of BLOCK_M rows, adding each tile's dQ into a float32 buffer with atomics. It holds more
# live state than either two-pass kernel (dK, dV and a dQ tile at once), so its tiles are smaller.
# Chosen from `compile_check` figures (registers, spills, shared memory; sm90 and sm80, with and without
# the divisibility hints of a real launch): the first of each tier spills at most a few dozen bytes in
# its plain form and fits an sm80's shared memory. fp32 above E = 64 spills in every config tried, as
# the two-pass dK/dV kernel does there.
ONEPASS_CONFIGS = (
    _tier(64, "half", (64, 64, 4, 2), (64, 64, 4, 1), (128, 128, 8, 2))
    + _tier(128, "half", (64, 32, 4, 2), (64, 64, 4, 1), (128, 64, 8, 2))
    + _tier(256, "half", (16, 32, 4, 1), (32, 32, 4, 1))
    + _tier(64, "fp32", (16, 32, 4, 1), (32, 32, 4, 1))
    + _tier(128, "fp32", (16, 32, 4, 1), (32, 32, 4, 1))
    + _tier(256, "fp32", (16, 16, 4, 1))
)


def dtype_class(dtype) -> str:
    """'fp32' or 'half' for a torch or triton dtype (or its name)."""
    return "fp32" if "float32" in str(dtype) or str(dtype) == "fp32" else "half"


def tier_of(e: int) -> int:
    return next(t for t in TIERS if e <= t)


def configs_for(candidates):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}, num_warps=4, num_stages=1)]
    return list(candidates)


def first_config(candidates, e: int, dtype):
    """The no-autotune config of a head dim and dtype."""
    key = (tier_of(e), dtype_class(dtype))
    return next(c for c in candidates if c.attnkern_tier == key)


def prune(configs, named_args, **kwargs):
    """Early prune: keep the configs of this call's (head-dim tier, dtype class); the head dim is the
    larger of E and Ev, padded."""
    if INTERPRET:
        return configs
    args = {**named_args, **kwargs}
    key = (tier_of(max(args["BLOCK_E"], args["BLOCK_EV"])), dtype_class(args["Q"].dtype))
    fitting = [c for c in configs if getattr(c, "attnkern_tier", key) == key]
    return fitting if autotune_enabled() else fitting[:1]
