"""Block sizes, warps and stages per head dim and dtype, and when to autotune.

On a GPU each kernel autotunes over a short list of configs that fit the head dim and the GPU (pruned
before any benchmarking: see pruner), keyed by power-of-two length buckets so a training run with
varying lengths does not re-tune at every new length. ATTNKERN_AUTOTUNE=0 takes the first config the
prune keeps instead, which is what the test suite does. Under TRITON_INTERPRET=1 (no GPU) there is exactly one config: the
interpreter cannot benchmark, and larger tiles mean fewer, faster interpreted programs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

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


# Config flags (a spec's fifth element).
SM90_ONLY = "sm90-only"  # kept off older GPUs, where it spills or does not fit
MMA_SYNC_OK = "mma.sync-ok"  # allowed below 64 rows on sm_90: no 64-row tile fits its shared memory


def _tier(tier: int, dtype_class: str, *specs):
    """Configs (BLOCK_M, BLOCK_N, warps, stages[, flag]) for padded head dims in (previous tier, tier]
    and one dtype class ("half": fp16/bf16; "fp32": operands twice the size, three tf32 products per
    dot)."""
    out = []
    for bm, bn, warps, stages, *flag in specs:
        c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        c.attnkern_tier = (tier, dtype_class)
        c.attnkern_min_arch = 90 if SM90_ONLY in flag else 0
        c.attnkern_small_ok = MMA_SYNC_OK in flag
        out.append(c)
    return out


# Interpreter block sizes: small enough that 100-200 long test sequences still span several tiles (so
# the boundary, causal-diagonal and multi-tile paths are exercised), large enough to keep the
# interpreted program count low.
INTERPRET_BLOCK = int(os.environ.get("ATTNKERN_INTERPRET_BLOCK", "32"))

TIERS = (64, 128, 256)
# Listed best-first per (tier, dtype class). On each target the prune (below) keeps the configs whose
# chained dots duplicate no work there (chained_rows_ok) and that are not reserved for newer GPUs
# (min_arch); the first kept is the no-autotune choice and must compile for every mask kind and
# alignment within the shared memory of that target (sm_86: 99 KB). `attnkern compile-report` checks
# all of it (and spills, and tensor-core use) without a GPU; bench/README.md has its table.
# Forward: one program owns BLOCK_M query rows and streams K/V tiles of BLOCK_N keys.
FWD_CONFIGS = (
    _tier(64, "half", (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4))
    + _tier(128, "half", (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2, SM90_ONLY), (64, 64, 4, 3))
    + _tier(256, "half", (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 2, 2))
    + _tier(64, "fp32", (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 2, 2))
    + _tier(128, "fp32", (32, 32, 2, 2), (64, 32, 4, 2), (64, 64, 4, 2))
    + _tier(256, "fp32", (32, 32, 2, 1), (64, 32, 4, 1), (16, 32, 1, 1))
)
# Backward dK/dV: one program owns BLOCK_N keys and streams query tiles of BLOCK_M rows.
DKDV_CONFIGS = (
    _tier(64, "half", (64, 64, 4, 3), (64, 64, 4, 2))
    + _tier(128, "half", (64, 64, 4, 2), (64, 64, 4, 3))
    + _tier(256, "half", (32, 32, 2, 1), (64, 64, 4, 1), (16, 16, 1, 1))
    + _tier(64, "fp32", (32, 32, 2, 2), (64, 64, 4, 1), (32, 32, 2, 1))
    + _tier(128, "fp32", (32, 32, 2, 1), (64, 64, 4, 1), (16, 32, 1, 1))
    + _tier(256, "fp32", (16, 16, 1, 1, MMA_SYNC_OK), (32, 32, 2, 1, MMA_SYNC_OK))
)
# Backward dQ: one program owns BLOCK_M query rows and streams key tiles of BLOCK_N.
DQ_CONFIGS = (
    _tier(64, "half", (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3, SM90_ONLY), (128, 64, 8, 2, SM90_ONLY))
    + _tier(128, "half", (64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2, SM90_ONLY), (128, 64, 8, 2, SM90_ONLY))
    + _tier(256, "half", (32, 32, 2, 1), (64, 32, 4, 1), (16, 32, 1, 1))
    + _tier(64, "fp32", (64, 32, 4, 2), (32, 32, 2, 2), (64, 64, 4, 1))
    + _tier(128, "fp32", (32, 32, 2, 1), (64, 32, 4, 1), (16, 32, 1, 1))
    + _tier(256, "fp32", (16, 16, 1, 1, MMA_SYNC_OK), (32, 32, 2, 1, MMA_SYNC_OK))
)
# The mask-gradient pass: not autotuned (it runs only for learned masks, once per backward); it takes
# the first config of its tier that the target keeps (dmask_config).
DMASK_CONFIGS = (
    _tier(64, "half", (64, 64, 4, 2), (32, 32, 2, 2))
    + _tier(128, "half", (64, 32, 4, 2), (32, 32, 2, 2))
    + _tier(256, "half", (32, 32, 2, 1), (64, 32, 4, 1))
    + _tier(64, "fp32", (64, 32, 4, 2), (32, 32, 2, 2))
    + _tier(128, "fp32", (32, 32, 2, 1), (64, 32, 4, 1))
    + _tier(256, "fp32", (16, 16, 1, 1, MMA_SYNC_OK), (32, 16, 2, 1, MMA_SYNC_OK))
)

# Single-pass backward: one program owns BLOCK_N keys (dK, dV accumulated in registers) and streams
# query tiles of BLOCK_M rows, adding each tile's dQ into a float32 buffer with atomics. It holds more
# live state than either two-pass kernel (dK, dV and a dQ tile at once), so its tiles are smaller.
# Chosen from `attnkern compile-report` figures (registers, spills, shared memory; sm90 and sm80, with and without
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


_forced_arch: Optional[int] = None
_duplication_rule = True


@contextlib.contextmanager
def for_target(arch: int, duplication_rule: bool = True):
    """Prune for compute capability `arch` (e.g. 90) instead of the current GPU's: what the compile
    check uses to see which configs a GPU it does not have would choose from (and, with
    duplication_rule=False, which ones chained_rows_ok drops)."""
    global _forced_arch, _duplication_rule
    saved = _forced_arch, _duplication_rule
    _forced_arch, _duplication_rule = arch, duplication_rule
    try:
        yield
    finally:
        _forced_arch, _duplication_rule = saved


def target_arch() -> Optional[int]:
    """The compute capability the kernels are compiled for (90 for sm_90), None when not CUDA."""
    if _forced_arch is not None:
        return _forced_arch
    arch = triton.runtime.driver.active.get_current_target().arch
    return arch if isinstance(arch, int) else None


def chained_rows_ok(rows: int, num_warps: int, arch: Optional[int], small_ok: bool = False) -> bool:
    """Whether a chain of dots with `rows` rows (M) runs on `num_warps` warps without duplicated work.
    Triton lays chained dots out with every warp along M: each warp needs 16 rows of its own (an
    mma.sync tile), and on sm_90 each warpgroup 64 (a wgmma tile; below that Triton falls back to
    mma.sync, or two warpgroups compute the same rows). small_ok (MMA_SYNC_OK configs) accepts the
    mma.sync fallback on sm_90 where no 64-row tile fits."""
    return rows >= 16 * num_warps and (arch is None or arch < 90 or rows >= 64 or small_ok)


def pruner(chained_rows):
    """The early-prune hook of a kernel whose chained dots have `chained_rows(config)` rows: keeps the
    configs of this call's (head-dim tier, dtype class) (the head dim is the larger of E and Ev,
    padded) that duplicate no work on the target (chained_rows_ok). With autotuning off, the first."""
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        key = (tier_of(max(args["BLOCK_E"], args["BLOCK_EV"])), dtype_class(args["Q"].dtype))
        arch = target_arch()
        fitting = [c for c in configs if getattr(c, "attnkern_tier", key) == key and kept_on(c, arch)
                   and (not _duplication_rule or chained_rows_ok(chained_rows(c), c.num_warps, arch,
                                                                 getattr(c, "attnkern_small_ok", False)))]
        if args.get("HAS_DROPOUT"):
            fitting = [c for c in fitting if dropout_fits(c)] or fitting
        return fitting if autotune_enabled() else fitting[:1]
    return prune


# Dropout's Philox draws hold one 32-bit word per score of the tile beside the scores and accumulators:
# tiles of more than this many scores per thread spill with it (compile report), so a dropout call
# takes only configs within it where its tier has any.
DROPOUT_SCORES_PER_THREAD = 32


def dropout_fits(config) -> bool:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= DROPOUT_SCORES_PER_THREAD * 32 * config.num_warps


def kept_on(config, arch: Optional[int]) -> bool:
    """Whether a config is meant for the target (its min_arch)."""
    return arch is None or getattr(config, "attnkern_min_arch", 0) <= arch


# Rows (M) of each kernel's chained dots: the forward's S = QKᵀ and PV, and dQ's S, dP and dQ, have
# BLOCK_M; dK/dV's S (formed as the forward forms it, then transposed) has BLOCK_M, its dPᵀ, dV and
# dK have BLOCK_N.
prune_fwd = pruner(lambda c: c.kwargs["BLOCK_M"])
prune_dkdv = pruner(lambda c: min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))
prune_dq = pruner(lambda c: c.kwargs["BLOCK_M"])
# The single-pass backward chains S (BLOCK_M rows) and dPᵀ, dV, dK (BLOCK_N rows), as dK/dV does.
onepass_rows = dkdv_rows = lambda c: min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])  # noqa: E731
prune_onepass = pruner(onepass_rows)


def first_kept(candidates, chained_rows, e: int, dtype):
    """The config a call takes without autotuning: the first of the tier of padded head dim `e` and the
    dtype class that the target keeps (as the kernel's prune would)."""
    key = (tier_of(e), dtype_class(dtype))
    arch = target_arch()
    return next(c for c in candidates if c.attnkern_tier == key and kept_on(c, arch)
                and chained_rows_ok(chained_rows(c), c.num_warps, arch, getattr(c, "attnkern_small_ok", False)))


def dmask_config(e: int, dtype):
    """The mask-gradient pass's config for padded head dim `e`: the first of its tier that the target
    keeps (its chained dots, S and dP, have BLOCK_M rows)."""
    key = (tier_of(e), dtype_class(dtype))
    arch = target_arch()
    return next(c for c in DMASK_CONFIGS if c.attnkern_tier == key and kept_on(c, arch)
                and chained_rows_ok(c.kwargs["BLOCK_M"], c.num_warps, arch, c.attnkern_small_ok))


# KV-cache decoding (decode.py): not autotuned (one launch per generated token; the split count, not
# the tile, decides how well a GPU is used). The M dim is the GQA group's query rows (group * Lq), at
# least 16 for tl.dot and at most 64 per program; the key tile streams the cache.
DECODE_MAX_ROWS = 64
# Interpreter key tile: small, so that test caches of a few dozen keys span several tiles and splits.
INTERPRET_DECODE_KEYS = 16


def decode_config(rows: int, e: int, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode kernel for `rows` query rows per kv head
    and head dim e (the larger of E and Ev)."""
    block_m = min(max(16, triton.next_power_of_2(max(rows, 1))), DECODE_MAX_ROWS)
    if INTERPRET:
        return block_m, INTERPRET_DECODE_KEYS, 4, 1
    wide = head_block(e) > 128 or dtype_class(dtype) == "fp32"
    if head_block(e) > 128 and dtype_class(dtype) == "fp32":
        # float32 at 256 features (compile report, sm_90/sm_86): two stages take 100 KB of shared memory
        # (sm_86 has 99 KB), one stage on 4 warps spills 184-256 B; 8 warps spill nothing, at the price of
        # duplicated MMA work in a kernel that waits on memory anyway.
        return block_m, 32, 8, 1
    return block_m, 32 if wide else 64, 4, 2
