"""Tile helpers shared by the forward and backward kernels.

Two forms of the scores, chosen per launch by the constexpr LOG2_SCORES (log2_scores says when):
- log2 units, for kernels without a float mask, soft-capping or ALiBi (and with a positive scale): masks,
  bands and bounds set the raw products x = q·k to -inf, the row max is taken over x and scaled once per
  row, c = max(x) · qk_scale with qk_scale = scale · log2(e), and each score costs one FFMA,
  exp2(fma(x, qk_scale, -c)) (row_bias). The FMA forms x · qk_scale - c exactly before rounding it
  once, so scores of 3e6 keep the bits their differences need. The statistics handed on keep natural
  units (backends/base.py's contract): m = max(x) · scale, and log2 l takes what the backward's
  to_log2(m) misses of the forward's bias (probabilities).
- natural units otherwise: s = (q·k) · scale + mask, so any finite float mask (finfo.min included) adds
  without overflowing (in log2 units finfo.min · log2(e) would overflow to -inf and turn a row that
  torch averages into an empty one); only differences from the row max enter base 2,
  exp(s - m) = exp2((s - m) · log2(e)).
The log-sum-exp handed to Python is in natural log.
"""
import os

import torch
import triton
import triton.language as tl

from .. import block_map, masks

# constexpr so compiled kernels may read them (plain globals only work under the interpreter); Python
# code reads `.value`.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The kernels' MASK_KIND, by name (masks.py's codes).
MASK_NONE = tl.constexpr(masks.MASK_NONE)
MASK_BOOL = tl.constexpr(masks.MASK_BOOL)
# The block map's sub-tile edge (block_map.py).
MAP_TILE = tl.constexpr(block_map.TILE)
# Under TRITON_INTERPRET=1 there is no PTX to inline (mul_rn).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def log2_scores(scale: float, mask_kind: int, softcap: bool, alibi: bool) -> bool:
    """Whether a launch takes the scores in log2 units (module docstring): no float mask, no soft-capping
    or ALiBi (they need natural-unit scores), and a scale > 0 whose product with log2(e) stays well inside
    float32 (the row max is scaled after the max is taken, which needs a positive scale). Scores past
    float32's max / log2(e) (about 2.4e38; natural units hold them to 3.4e38) overflow there."""
    return (mask_kind in (masks.MASK_NONE, masks.MASK_BOOL) and not softcap and not alibi
            and 0.0 < scale < 2.0e38)


def qk_scale_of(scale: float) -> float:
    """scale · log2(e) as the float32 product the kernels take for qk_scale under LOG2_SCORES (the forward
    and the backward must scale by the same bits). An argument rather than a product formed in the
    kernel: it then stays in the constant bank instead of holding a register (the backward's E = 128
    configs spill 4-16 bytes more otherwise)."""
    import numpy as np

    return float(np.float32(scale) * np.float32(LOG2E.value))


@triton.jit
def mul_rn(a, b):
    """a · b rounded once to float32, kept out of the compiler's FMA contraction (a PTX mul.rn): a row
    bias must have the same bits wherever it is used (subtracted from another product it would else be
    fused into an FMA on the GPU and lose its rounding there only)."""
    if INTERPRETED:  # no PTX to inline; numpy rounds every product
        c = a * b
    else:
        c = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return c


@triton.jit
def row_bias(m_raw, qk_scale):
    """A row's bias in log2 units for a raw-product max m_raw: (c, r) with c = m_raw · qk_scale rounded
    (-inf for a row that sees nothing yet) and r its rounding residual where |c| >= 2^24, else 0.
    fma(x, qk_scale, -c) is exact before its one rounding, so the row's largest score gets
    exp2(residual): harmless (the same in the denominator) while |c| < 2^24 (residual <= 1), but past it
    (scores of 1e36: residuals of 1e29) it would overflow; those rows subtract r as well."""
    c = mul_rn(m_raw, tl.zeros_like(m_raw) + qk_scale)
    big = (tl.abs(c) >= 16777216.0) & (tl.abs(c) < float("inf"))
    r = tl.where(big, tl.fma(m_raw, qk_scale, -c), 0.0)
    return c, r


@triton.jit
def log2_softmax_step(s, m_i, qk_scale):
    """One key tile of an online softmax in log2 units: s the tile's raw products q·k (masked ones -inf),
    m_i the rows' raw max so far. Returns (p, alpha, m_new): p = exp2(fma(s, qk_scale, -c) - r) with (c, r)
    the new max's row bias and residual (row_bias), alpha the factor that moves what was
    summed against the old bias onto the new one."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    c_new, r_new = row_bias(m_new, qk_scale)
    c_old, r_old = row_bias(m_i, qk_scale)
    c_new = tl.where(c_new == float("-inf"), 0.0, c_new)  # nothing visible yet: exp2(-inf), not NaN
    # Minus the residual (0 below 2^24) on every row: one add per score, where a branch on "some row is past
    # 2^24" would take a maximum across the warps' rows on every tile.
    e = tl.fma(s, qk_scale, -c_new[:, None]) - r_new[:, None]
    return tl.math.exp2(e), tl.math.exp2((c_old - c_new) + (r_old - r_new)), m_new


@triton.jit
def softmax_step(s, m_i, qk_scale, LOG2_SCORES: tl.constexpr):
    """One key tile of an online softmax: (p, alpha, m_new). With LOG2_SCORES s holds the raw products
    (log2_softmax_step); else the natural-unit scores, p = exp(s - m_new) and alpha = exp(m_i - m_new)
    in base 2. A row with nothing visible yet keeps m = -inf and subtracts 0, so exp2 sees -inf, not NaN."""
    if LOG2_SCORES:
        p, alpha, m_new = log2_softmax_step(s, m_i, qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    return p, alpha, m_new


@triton.jit
def to_log2(m):
    """m · log2(e), rounded once to float32: the row bias the backward derives from a natural-unit row
    max, and the forward from its own to fold the difference into log2 l (so both get the same bits)."""
    return mul_rn(m, tl.zeros_like(m) + LOG2E)


@triton.jit
def index_range(start, BLOCK: tl.constexpr, I64: tl.constexpr):
    """start + [0, BLOCK): int64 when a tensor spans 2**31 elements or more (I64), so that
    index × stride products cannot wrap around; int32 otherwise (fewer registers)."""
    r = tl.arange(0, BLOCK)
    if I64:
        r = r.to(tl.int64)
    return start + r


@triton.jit
def load_row_stats(stats_base, offs_m, L, CHECK: tl.constexpr, LOG2_SCORES: tl.constexpr):
    """The forward's per-row softmax statistics (row max m, log2 denominator), ready for
    P = exp2((s - m) · log2(e) - log2l), or with LOG2_SCORES m in log2 units (to_log2) for probabilities:
    fully masked rows and rows past L get m = +inf, log2l = 0, so P = 0."""
    if CHECK:
        m = tl.load(stats_base + offs_m * 2, mask=offs_m < L, other=float("inf"))
        log2l = tl.load(stats_base + offs_m * 2 + 1, mask=offs_m < L, other=0.0)
    else:
        m = tl.load(stats_base + offs_m * 2)
        log2l = tl.load(stats_base + offs_m * 2 + 1)
    empty = m == float("-inf")
    m = tl.where(empty, float("inf"), m)
    if LOG2_SCORES:
        m = to_log2(m)
    return m, tl.where(empty, 0.0, log2l)


@triton.jit
def probabilities(s, row_max, log2l, qk_scale, LOG2_SCORES: tl.constexpr):
    """The backward's P from the forward's statistics (load_row_stats'; row_max, log2l broadcast against
    s). Under LOG2_SCORES s holds the raw products q·k and row_max is already in log2 units:
    P = exp2(s · qk_scale - row_max - log2 l), one FFMA and a subtraction per score (log2 l stays apart:
    folded into the row bias, its rounding at large logits would move P). Else natural units:
    P = exp2((s - m) · log2(e) - log2 l)."""
    if LOG2_SCORES:
        p = tl.math.exp2(tl.fma(s, qk_scale, -row_max) - log2l)
    else:
        p = tl.math.exp2((s - row_max) * LOG2E - log2l)
    return p


@triton.jit
def load_tile(ptrs, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile; out-of-range elements read as 0. Bounds are only checked where they can fail."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
        else:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=cols[None, :] < n_cols)
        else:
            tl.store(ptrs, x)


@triton.jit
def mask_scores(
    s, qi, kj, mask_base, stride_ml, stride_ms, L, S, lo_off, hi_off,
    MASK_KIND: tl.constexpr, APPLY_BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr,
):
    """Apply the user mask, the band (row i sees keys i + lo_off <= j <= i + hi_off, each bound only
    where the band has it; see band.py) and the sequence bounds to a score tile.

    `qi` and `kj` are the query-row and key-column indices shaped to broadcast against `s`
    ([:, None] and [None, :], or the transpose for the kernels that hold Sᵀ). Masked scores become -inf.
    APPLY_BAND is off for tiles that key_tiles/query_tiles found inside the band for every row.
    """
    if MASK_KIND != MASK_NONE:
        m_ptrs = mask_base + qi * stride_ml + kj * stride_ms
        if CHECK_Q or CHECK_K:
            m = tl.load(m_ptrs, mask=(qi < L) & (kj < S), other=0)
        else:
            m = tl.load(m_ptrs)
        if MASK_KIND == MASK_BOOL:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32)
    if APPLY_BAND:
        if HAS_RIGHT:
            s = tl.where(kj <= qi + hi_off, s, float("-inf"))
        if HAS_LEFT:
            s = tl.where(kj >= qi + lo_off, s, float("-inf"))
    if CHECK_K:
        s = tl.where(kj < S, s, float("-inf"))
    return s


@triton.jit
def span_tiles(tiles, spans, start, n, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """key_tiles' (or query_tiles') (lo, full_lo, full_hi, hi) narrowed to the user mask's span for the
    block of BLOCK rows (keys) at `start`, of n: from the first to the last element its rows' visible
    block-map sub-tiles cover (block_map.BlockMap), lo kept a multiple of BLOCK_OTHER. `spans` is (base
    at this batch and head, stride between sub-tiles; lo at +0, hi at +1). Nothing visible: lo > hi,
    no tile."""
    tl.static_assert(BLOCK // MAP_TILE * MAP_TILE == BLOCK, "blocks are whole block-map sub-tiles")
    base, stride = spans
    lo, full_lo, full_hi, hi = tiles
    cells = start // MAP_TILE + tl.arange(0, BLOCK // MAP_TILE)
    inside = cells < tl.cdiv(n, MAP_TILE)
    span_lo = tl.min(tl.load(base + cells * stride, mask=inside, other=2147483647), 0)
    span_hi = tl.max(tl.load(base + cells * stride + 1, mask=inside, other=0), 0)
    lo = tl.maximum(lo, span_lo // BLOCK_OTHER * BLOCK_OTHER)
    hi = tl.minimum(hi, span_hi)
    return _ordered(lo, full_lo, full_hi, hi)


def map_args(mask, L: int, S: int, dummy):
    """The span arguments of a canonical bool mask for L × S scores (block_map.block_map, cached): (key
    spans, query spans, their kernel strides (3 each)); `dummy` pointers and zero strides without one (a
    float mask hides no tile: the kernels take no spans for it)."""
    if mask is None or mask.dtype != torch.bool:
        return dummy, dummy, (0, 0, 0), (0, 0, 0)
    bm = block_map.block_map(mask, L, S)
    return (bm.key_spans, bm.query_spans, block_map.kernel_strides(bm.key_spans)[:3],
            block_map.kernel_strides(bm.query_spans)[:3])


# ----------------------------------------------------------------------------------------------------
# Score modifications (score_mods.py): soft-capping, ALiBi, dropout. Each kernel takes them behind the
# constexpr switches SOFTCAP, HAS_ALIBI, HAS_DROPOUT, so a kernel without them compiles to the code it
# had before they existed. A program gathers its head's values once (load_mods) into one tuple that the
# tile helpers take; `mods_args` (host side) builds the launch arguments.


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter has no libdevice): an odd Taylor polynomial where |x| < 0.3, where
    (1 - e) / (1 + e) with e = exp(-2|x|) would lose bits to cancellation; that form elsewhere (within
    a few ulp; ±1 exactly for large |x|, NaN stays NaN)."""
    a = tl.abs(x)
    x2 = x * x
    poly = x + x * x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0
                                                                                   + x2 * (-1382.0 / 155925.0)))))
    e = tl.math.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(a < 0.3, poly, big)


@triton.jit
def load_mods(ALIBI, RNG, b, h, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale,
              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """The score modifications of batch b (of a launch whose batch slice starts at b0), query head h,
    as the tuple the tile helpers take: (softcap, 1/softcap, ALiBi slope, ALiBi offset S - L, dropout
    seed, counter offset, counter head word (b0 + b)·H + h, keep threshold, keep scale)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h)
    seed = 0
    offset = 0
    bh = 0
    if HAS_DROPOUT:  # the rng tensor read on the device: no host synchronization
        seed = tl.load(RNG)
        offset = tl.load(RNG + 1).to(tl.uint32)  # offset mod 2^32
        bh = ((b0 + b) * H + h).to(tl.uint32)
    return softcap, softcap_inv, slope, S - L, seed, offset, bh, drop_threshold, drop_scale


@triton.jit
def modify_scores(s, qi, kj, mods, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Soft-cap, then ALiBi, the scaled scores s (before masks; score_mods.py). `qi`, `kj` broadcast
    against s as in mask_scores. Returns (s, t) with t = tanh(s_raw / softcap), which the backward's
    gradient factor 1 - t² needs (t is s itself without soft-capping: unused)."""
    t = s
    if SOFTCAP:
        t = tanh(s * mods[1])
        s = mods[0] * t
    if HAS_ALIBI:  # -slope * |i + S - L - j|
        s = s - mods[2] * tl.abs(qi + mods[3] - kj).to(tl.float32)
    return s, t


@triton.jit
def dropout_keep(rows, start_n, mods, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which scores of query rows `rows` (BLOCK_M of them) and keys start_n + [0, BLOCK_N) dropout keeps:
    philox.py's mask bit for bit. One Philox4x32-10 call per 4 keys (counter (j/4, i, b·H + h, offset),
    key the seed's two words: tl.philox), its four lanes interleaved to keys 4q + lane. start_n is a
    multiple of 4 (of BLOCK_N)."""
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.uint32)
    c0 = zero + (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    r0, r1, r2, r3 = tl.philox(mods[4], c0, c1, zero + mods[6], zero + mods[5])
    # join(join(r0, r2), join(r1, r3))[q, x, y] is lane 2x + y: row-major flattening puts it at 4q + lane.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_N])
    return r >= mods[7]


def mods_args(mods, dummy, b0: int = 0):
    """The kernels' score-modification arguments for a ScoreMods: (ALIBI, RNG) pointers (`dummy`, never
    read, for what is off), then (stride_ab, b0, softcap, 1/softcap, keep threshold, keep scale), and the
    switches {SOFTCAP, HAS_ALIBI, HAS_DROPOUT}. b0 is the first batch of a batch slice's launch (the
    dropout counter counts batches of the whole problem); 0 without dropout, so the plain kernels see
    the same arguments whatever the slice."""
    from ..philox import dropout_scale, dropout_threshold

    drop = mods.dropout_p > 0.0
    alibi = mods.alibi
    ptrs = (alibi if alibi is not None else dummy, mods.rng if drop else dummy)
    scalars = (alibi.stride(0) if alibi is not None and alibi.shape[0] > 1 else 0, b0 if drop else 0,
               float(mods.softcap), 1.0 / mods.softcap if mods.softcap > 0.0 else 0.0,
               dropout_threshold(mods.dropout_p) if drop else 0, dropout_scale(mods.dropout_p) if drop else 1.0)
    switches = dict(SOFTCAP=mods.softcap > 0.0, HAS_ALIBI=alibi is not None, HAS_DROPOUT=drop)
    return ptrs, scalars, switches


# ----------------------------------------------------------------------------------------------------
# Packed variable-length batches (varlen.py). The kernels take them behind the constexpr VARLEN: the
# launch passes the packed tensors as (B, H, T, D) views with batch stride 0, L and S the packed totals
# (Tq, Tk: the lse/stats row count) and the band as (-left, right) (varlen_band_args); each program then
# reads its sequence's offsets and works on the sequence's own rows, keys, lengths and band.


@triton.jit
def packed_sequence(CU_Q, CU_K, b, neg_left, right):
    """Sequence b of a packed batch: (q0, k0, L_b, S_b, lo_off, hi_off): its first query and key token
    (int64), its lengths, and its bottom-right band's bounds as band_args computes them for (L_b, S_b)
    (offset S_b - L_b, lo = offset - left, hi = offset + right, clamped to [-L_b, S_b])."""
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    L = tl.load(CU_Q + b + 1) - q0
    S = tl.load(CU_K + b + 1) - k0
    lo_off = tl.maximum(S - L + neg_left, -L)
    hi_off = tl.minimum(tl.maximum(S - L + right, -L), S)
    return q0.to(tl.int64), k0.to(tl.int64), L, S, lo_off, hi_off


@triton.jit
def at_token(base, first, stride, VARLEN: tl.constexpr):
    """A pointer (or offset) at a batch and head, moved to a packed sequence's first token (VARLEN) or left as
    is."""
    if VARLEN:
        base += first * stride
    return base


@triton.jit
def first_row(b, h, H, rows, q0, VARLEN: tl.constexpr):
    """The first lse/stats/delta row of batch b, head h: (b·H + h)·rows, or for a packed batch (rows the
    total Tq) h·Tq + q0."""
    if VARLEN:
        row = h * rows + q0
    else:
        row = (b * H + h) * rows
    return row


@triton.jit
def packed_mods(mods, b, h):
    """load_mods' tuple for sequence b (of the whole batch) and query head h of a packed batch: dropout
    draws as for the sequence's own (1, Hq, L_b, S_b) problem with offset + b (varlen.sequence_rng), i.e.
    counter head word h and counter offset word offset + b (mod 2^32)."""
    return (mods[0], mods[1], mods[2], mods[3], mods[4], mods[5] + b.to(tl.uint32), h.to(tl.uint32), mods[7],
            mods[8])


def varlen_band_args(band, max_q: int, max_k: int):
    """A packed launch's band arguments (lo_off, hi_off, HAS_LEFT, HAS_RIGHT): -left and right, which
    packed_sequence turns into each sequence's bounds. Clamped to max_q + max_k, beyond which no
    sequence's visibility changes, so they stay 32-bit; bottom-right bands only (varlen's alignment)."""
    assert band.bottom_right, "packed batches align their bands bottom-right"
    reach = max_q + max_k
    return (-min(band.left, reach) if band.left >= 0 else 0, min(band.right, reach) if band.right >= 0 else 0,
            band.left >= 0, band.right >= 0)


def packed_view(t, batches: int):
    """A packed (T, H, D) tensor as the kernels' (B, H, T, D) view: batch stride 0, no copy."""
    return t.permute(1, 0, 2).unsqueeze(0).expand(batches, -1, -1, -1)


@triton.jit
def _ordered(lo, full_lo, full_hi, hi):
    """lo <= full_lo <= full_hi <= hi, shrinking [full_lo, full_hi) (the tiles spared the band compare)
    where the bounds crossed: a narrower unchecked range is always safe."""
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def whole_tiles(tiles, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """key_tiles' (or query_tiles') (lo, full_lo, full_hi, hi) with the inner tiles [full_lo, full_hi)
    also inside [0, n) whole, so that they skip the bounds checks: when n is not a multiple of BLOCK
    (EVEN false), the partial last tile joins the edge range [full_hi, hi), whose tiles check bounds.
    Inner tiles start at multiples of BLOCK (or the range is empty), hence end by n // BLOCK * BLOCK."""
    lo, full_lo, full_hi, hi = tiles
    if not EVEN:
        lo, full_lo, full_hi, hi = _ordered(lo, full_lo, tl.minimum(full_hi, n // BLOCK * BLOCK), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_tiles(start_m, S, lo_off, hi_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The key tiles of query rows [start_m, start_m + BLOCK_M): (lo, full_lo, full_hi, hi). Keys in
    [lo, hi) are seen by some row (lo a multiple of BLOCK_N); the tiles in [full_lo, full_hi) are inside
    the band for every row (no band compare); [lo, full_lo) and [full_hi, hi) need one."""
    lo = start_m * 0
    hi = lo + S
    full_lo = lo
    full_hi = hi
    if HAS_RIGHT:  # the last row sees j <= start_m + BLOCK_M - 1 + hi_off, the first j <= start_m + hi_off
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + hi_off, 0), S)
        full_hi = tl.maximum(start_m + hi_off + 1, 0) // BLOCK_N * BLOCK_N
    if HAS_LEFT:  # the first row sees j >= start_m + lo_off, the last j >= start_m + BLOCK_M - 1 + lo_off
        lo = tl.minimum(tl.maximum(start_m + lo_off, 0) // BLOCK_N * BLOCK_N, hi)
        full_lo = (tl.maximum(start_m + BLOCK_M - 1 + lo_off, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return _ordered(lo, full_lo, full_hi, hi)


@triton.jit
def query_tiles(start_n, L, lo_off, hi_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The query tiles that see keys [start_n, start_n + BLOCK_N): (lo, full_lo, full_hi, hi), as
    key_tiles (lo a multiple of BLOCK_M). Row i sees key j iff j - hi_off <= i <= j - lo_off."""
    lo = start_n * 0
    hi = lo + L
    full_lo = lo
    full_hi = hi
    if HAS_RIGHT:  # rows i >= start_n - hi_off see the first key, i >= start_n + BLOCK_N - 1 - hi_off all
        lo = tl.minimum(tl.maximum(start_n - hi_off, 0) // BLOCK_M * BLOCK_M, L)
        full_lo = tl.maximum(start_n + BLOCK_N - 1 - hi_off + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:  # rows i <= start_n + BLOCK_N - 1 - lo_off see the last key, i <= start_n - lo_off all
        hi = tl.maximum(tl.minimum(tl.maximum(start_n + BLOCK_N - lo_off, 0), L), lo)
        full_hi = tl.maximum(start_n - lo_off + 1, 0) // BLOCK_M * BLOCK_M
    return _ordered(lo, full_lo, full_hi, hi)


def band_args(band, L: int, S: int):
    """(lo_off, hi_off, HAS_LEFT, HAS_RIGHT) of a band.Band for the kernels: row i sees keys
    i + lo_off <= j <= i + hi_off."""
    off = band.offset(L, S)
    # Clamped to [-L, S], which changes no visibility, so the offsets stay 32-bit whatever the window.
    lo = max(off - band.left, -L) if band.left >= 0 else 0
    hi = min(max(off + band.right, -L), S) if band.right >= 0 else 0
    return lo, hi, band.left >= 0, band.right >= 0


def needs_int64(*tensors) -> bool:
    """Whether some tensor's largest element offset reaches 2**31 (the kernels' I64 switch)."""
    return any(
        t is not None and sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride())) >= 2**31
        for t in tensors
    )


# Triton proves a stride argument a multiple of 16 (elements) when it is one, and then loads whole
# 16-byte vectors, asynchronously; a head dim such as 40, 72 or 120 makes the row strides multiples of 8
# only, and without a hint every load is element by element and synchronous. ROW_ALIGN (stride_align)
# is what the strides are all multiples of, up to 16; below 16 the kernels rebuild each stride as
# stride // ROW_ALIGN * ROW_ALIGN (the same value), from which Triton proves it (a tl.multiple_of on a
# scalar argument is ignored by Triton 3.9's analysis).
def stride_align(*tensors) -> int:
    """The largest power of two up to 16 that divides every stride of `tensors` but a unit feature
    stride (None skipped)."""
    align = 16
    for t in tensors:
        if t is not None:
            strides = t.stride()[:-1] if t.stride(-1) == 1 else t.stride()
            for st in strides:
                while st % align:
                    align //= 2
    return align


@triton.jit
def aligned(stride_b, stride_h, stride_l, ROW_ALIGN: tl.constexpr):
    """A tensor's batch, head and row strides with the divisibility stride_align found (unchanged at
    16, which Triton proves itself)."""
    if ROW_ALIGN < 16 and ROW_ALIGN > 1:
        stride_b = stride_b // ROW_ALIGN * ROW_ALIGN
        stride_h = stride_h // ROW_ALIGN * ROW_ALIGN
        stride_l = stride_l // ROW_ALIGN * ROW_ALIGN
    return stride_b, stride_h, stride_l


# Grid axes 1 and 2 hold at most 65535 programs (axis 0: 2**31 - 1). The launches keep heads on axis 1
# and batches (or mask slices) on axis 2; a launch over more batches than axis 2 holds runs as several,
# each on a batch slice of the tensors: an ordinary smaller problem, so the kernels carry no index
# arithmetic for it (decoding batch and head from axis 0 instead cost the forward and dK/dV kernels
# registers they have not got: they spilled on sm_90). Read at call time: tests lower it.
MAX_GRID_YZ = 65535


def batch_slices(batches: int, per_batch: int = 1):
    """(b0, b1, slice) for consecutive batch ranges whose launches put at most MAX_GRID_YZ programs on
    grid axis 2 (`per_batch` of them per batch); slice(t) is t's rows b0:b1, or t itself when t is
    shared by the batch (size 1) or None. One range, with slice the identity, when all fit."""
    per_launch = MAX_GRID_YZ // per_batch
    if per_launch < 1:
        raise ValueError(f"attnkern triton: {per_batch} programs per batch on grid axis 2 (at most {MAX_GRID_YZ})")
    if batches <= per_launch:
        return [(0, batches, lambda t: t)]
    if per_launch >= 16:  # slices start 16 batches apart: 16-byte aligned pointers, as the whole tensors'
        per_launch -= per_launch % 16
    return [(b0, min(b0 + per_launch, batches),
             lambda t, b0=b0, b1=min(b0 + per_launch, batches): t if t is None or t.shape[0] == 1 else t[b0:b1])
            for b0 in range(0, batches, per_launch)]
