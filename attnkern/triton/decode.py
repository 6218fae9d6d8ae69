"""KV-cache decoding (attnkern/kvcache.py's contract): split-KV ("flash-decoding") over a contiguous or
paged cache, then a merge of the splits by their log-sum-exp.

Launch 1, one program per (split x row block, kv head, batch element): its rows are the GROUP = Hq/Hkv
query heads of that kv head times the Lq queries (row r: head hk * GROUP + r // Lq, query r % Lq), so
each K/V tile is read once for the whole GQA group and the M dim of the tile's dots is GROUP * Lq
(padded to 16 or more for tl.dot). The program walks its share of the key tiles that some row of the
batch element sees (band and length, bottom-right on n_b = seqlens[b]), online softmax as the forward's,
and writes its partial state: the unnormalized output (float32) and the row max m and denominator l.
Split boundaries are multiples of BLOCK_N in key positions, so a tile never straddles a page when the
page size is a multiple of BLOCK_N: one page lookup per tile then (TILE_IN_PAGE); any other page size
looks up the page of each key. Keys at or past n_b are never loaded (the cache holds anything there).
Launch 2, one program per (row block, kv head, batch element): merges the splits in split order
(bitwise reproducible) as csrc/cpu/decode.cpp does:
    M = max_s m_s,  l = sum_s l_s e^(m_s - M),  out = sum_s acc_s e^(m_s - M) / l,  lse = M + ln l;
a row no split saw gives out 0 and lse -inf; a NaN state in any split gives a NaN row. Without
soft-capping and ALiBi the scores are in log2 units (common.py's LOG2_SCORES: one FFMA per score), and
so is m, with 2^ for e^.
With one split the first launch writes the output itself and there is no merge.
"""
import torch
import triton
import triton.language as tl

from ..buffers import _poisoned
from . import configs
from .common import LN2, LOG2E, MASK_NONE, log2_scores, modify_scores, qk_scale_of, row_bias, softmax_step
from .forward import precision_for


@triton.jit
def _row_ids(rb, Lq, GROUP, hk, BLOCK_M: tl.constexpr):
    """Rows of row block rb of kv head hk: (row index r, query i, query head h, r < GROUP * Lq)."""
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    return r, r % Lq, hk * GROUP + r // Lq, r < GROUP * Lq


@triton.jit
def _store_result(O, LSE, acc, m, r, l, b, i, h, row_ok, offs_ev, Hq, Lq,
                  stride_ob, stride_ol, stride_oh, stride_oe, EV: tl.constexpr, LOG2_SCORES: tl.constexpr):
    """out = acc / l and lse = m + ln l of the rows (m the row max in natural units, or with LOG2_SCORES
    the bias c + r in log2 units: common.row_bias); a row with l = 0 (no visible key) gets 0 and -inf."""
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    if LOG2_SCORES:
        lse = tl.where(empty, float("-inf"), (m + (r + tl.math.log2(l_safe))) * LN2)
    else:
        lse = tl.where(empty, float("-inf"), m + tl.math.log2(l_safe) * LN2)
    o_ptrs = O + b * stride_ob + i[:, None] * stride_ol + h[:, None] * stride_oh + offs_ev[None, :] * stride_oe
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_ev[None, :] < EV))
    tl.store(LSE + (b * Hq + h) * Lq + i, lse, mask=row_ok)


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, BLOCK_TABLE, ALIBI, O, LSE, PART_ACC, PART_ML,
    stride_qb, stride_ql, stride_qh, stride_qe,
    stride_kp, stride_ks, stride_kh, stride_ke,
    stride_vp, stride_vs, stride_vh, stride_ve,
    stride_ob, stride_ol, stride_oh, stride_oe,
    stride_bt, stride_ab,
    Lq, GROUP, Hq, page_size, num_splits, row_blocks, scale, qk_scale, softcap, softcap_inv, left, right,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, TILE_IN_PAGE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
    LOG2_SCORES: tl.constexpr,
):
    split = tl.program_id(0) // row_blocks
    rb = tl.program_id(0) % row_blocks
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    r, i, h, row_ok = _row_ids(rb, Lq, GROUP, hk, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)

    q = tl.load(Q + b * stride_qb + i[:, None] * stride_ql + h[:, None] * stride_qh + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    n = tl.load(SEQLENS + b)
    off = n - Lq  # bottom-right: query i's diagonal key is i + off
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h, mask=row_ok, other=0.0)
    mods = (softcap, softcap_inv, slope[:, None], off)

    # The keys [begin, end) some query of this batch element sees, as key tiles; this split's share.
    begin = 0
    end = n
    if HAS_LEFT:
        begin = tl.minimum(tl.maximum(off - left, 0), n)
    if HAS_RIGHT:
        end = tl.maximum(tl.minimum(Lq - 1 + off + right + 1, n), begin)
    tile_lo = begin // BLOCK_N
    tile_hi = tl.cdiv(end, BLOCK_N)
    per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
    t0 = tile_lo + split * per_split
    t1 = tl.minimum(t0 + per_split, tile_hi)

    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh
    if not PAGED:
        k_head += b * stride_kp
        v_head += b * stride_vp
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    for t in range(t0, t1):
        offs_n = t * BLOCK_N + offs_n0
        key_ok = offs_n < n
        # Where each key lives: its row in the contiguous cache, or (page, slot) through the block table.
        if PAGED:
            if TILE_IN_PAGE:  # the tile lies in one page
                page = tl.load(BLOCK_TABLE + b * stride_bt + (t * BLOCK_N) // page_size).to(tl.int64)
                k_rows = k_head + page * stride_kp + (offs_n % page_size) * stride_ks
                v_rows = v_head + page * stride_vp + (offs_n % page_size) * stride_vs
            else:
                pages = tl.load(BLOCK_TABLE + b * stride_bt + offs_n // page_size, mask=key_ok, other=0).to(tl.int64)
                k_rows = k_head + pages * stride_kp + (offs_n % page_size) * stride_ks
                v_rows = v_head + pages * stride_vp + (offs_n % page_size) * stride_vs
        else:
            k_rows = k_head + offs_n.to(tl.int64) * stride_ks
            v_rows = v_head + offs_n.to(tl.int64) * stride_vs
        kT = tl.load(k_rows[None, :] + offs_e[:, None] * stride_ke, mask=key_ok[None, :] & (offs_e[:, None] < E),
                     other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION)
        if not LOG2_SCORES:
            s, _ = modify_scores(s * scale, i[:, None], offs_n[None, :], mods, SOFTCAP, HAS_ALIBI)
        visible = key_ok[None, :]
        if HAS_RIGHT:
            visible = visible & (offs_n[None, :] <= i[:, None] + off + right)
        if HAS_LEFT:
            visible = visible & (offs_n[None, :] >= i[:, None] + off - left)
        s = tl.where(visible, s, float("-inf"))
        p, alpha, m_new = softmax_step(s, m_i, qk_scale, LOG2_SCORES)  # as the forward's
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + offs_ev[None, :] * stride_ve, mask=key_ok[:, None] & (offs_ev[None, :] < EV),
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    residual = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LOG2_SCORES:  # the bias in log2 units (the merge's m then too: _decode_merge_kernel)
        m_i, residual = row_bias(m_i, qk_scale)
        m_i = tl.where(l_i == 0.0, float("-inf"), m_i)
    if DIRECT:
        _store_result(O, LSE, acc, m_i, residual, l_i, b, i, h, row_ok, offs_ev, Hq, Lq,
                      stride_ob, stride_ol, stride_oh, stride_oe, EV, LOG2_SCORES)
    else:  # partial state of (b, hk, split): rows padded to row_blocks * BLOCK_M, EV to BLOCK_EV
        # (LOG2_SCORES: m is c without r, whose 2^r then stays in l: past 2^24 in log2 units splits are
        # weighed to the rounding of their maxima there, as natural units round the scores themselves)
        rows = ((b * tl.num_programs(1) + hk) * num_splits + split) * (row_blocks * BLOCK_M) + r
        tl.store(PART_ACC + rows[:, None] * BLOCK_EV + offs_ev[None, :], acc)
        tl.store(PART_ML + rows * 2, m_i)
        tl.store(PART_ML + rows * 2 + 1, l_i)


@triton.jit
def _decode_merge_kernel(
    PART_ACC, PART_ML, O, LSE,
    stride_ob, stride_ol, stride_oh, stride_oe,
    Lq, GROUP, Hq, num_splits, row_blocks,
    EV: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr, LOG2_SCORES: tl.constexpr,
):
    rb = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    r, i, h, row_ok = _row_ids(rb, Lq, GROUP, hk, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    first = (b * tl.num_programs(1) + hk) * num_splits * (row_blocks * BLOCK_M) + r  # split 0's rows
    split_rows = row_blocks * BLOCK_M
    # M over the splits that saw a key of the row (l > 0); NaN anywhere poisons the row.
    big_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    nan = tl.zeros([BLOCK_M], dtype=tl.int1)
    for s in range(0, num_splits):
        m = tl.load(PART_ML + (first + s * split_rows) * 2)
        l = tl.load(PART_ML + (first + s * split_rows) * 2 + 1)
        nan = nan | (m != m) | (l != l)
        big_m = tl.where(l > 0.0, tl.maximum(big_m, m), big_m)
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    l_total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    for s in range(0, num_splits):
        rows = first + s * split_rows
        m = tl.load(PART_ML + rows * 2)
        l = tl.load(PART_ML + rows * 2 + 1)
        if LOG2_SCORES:  # the split kernel's m in log2 units
            w = tl.where(l > 0.0, tl.math.exp2(m - m_safe), 0.0)
        else:
            w = tl.where(l > 0.0, tl.math.exp2((m - m_safe) * LOG2E), 0.0)
        l_total += tl.where(l > 0.0, l, 0.0) * w
        part = tl.load(PART_ACC + rows[:, None] * BLOCK_EV + offs_ev[None, :])
        acc += tl.where(w[:, None] > 0.0, part, 0.0) * w[:, None]
    l_total = tl.where(nan, float("nan"), l_total)
    _store_result(O, LSE, acc, big_m, tl.zeros([BLOCK_M], dtype=tl.float32), l_total, b, i, h, row_ok, offs_ev,
                  Hq, Lq, stride_ob, stride_ol, stride_oh, stride_oe, EV, LOG2_SCORES)


# Keys per split, at the least, when the problem chooses the split count: fewer would spend more on the
# merge (and on re-reading the queries) than splitting gains.
MIN_SPLIT_KEYS = 256
# Without a GPU (the interpreter) the CPU kernel's rule: a split per 512 keys of the cache, none for
# batches of 64 or more.
INTERPRET_SPLIT_KEYS = 512
MAX_SPLITS = 128


def choose_splits(requested: int, programs: int, capacity: int, block_n: int, device: torch.device) -> int:
    """The split count: the caller's (at most one per key tile of the cache), else from the problem and
    the device only: on a GPU enough splits for the (b, kv head, row block) programs to cover its SMs
    once, each split at least MIN_SPLIT_KEYS of the cache's capacity; never from the lengths' values
    (no host read) or anything that varies between runs."""
    tiles = max(1, triton.cdiv(capacity, block_n))
    if requested > 0:
        return min(requested, tiles)
    if device.type != "cuda":
        return 1 if programs >= 64 else max(1, min(triton.cdiv(capacity, INTERPRET_SPLIT_KEYS), tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(capacity, MIN_SPLIT_KEYS), tiles, MAX_SPLITS))


def decode_forward(q, k_cache, v_cache, seqlens, block_table, band, scale: float, softcap: float, alibi,
                   num_splits: int):
    """Triton decode on kvcache.py's checked arguments (DecodeProblem's fields): q (B, Lq, Hq, E), the
    caches (B, S_max, Hkv, E) or paged (P, page_size, Hkv, E) with block_table int32 (B, max_pages),
    seqlens int32 (B,) the keys per batch element, band bottom-right, alibi float32 (1 or B, Hq) or None,
    num_splits 0 (chosen here) or the caller's. Returns out (B, Lq, Hq, Ev) in q's dtype, lse (B, Hq, Lq)
    float32."""
    B, Lq, Hq, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hkv
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else page_size
    out = _poisoned(q.new_empty((B, Lq, Hq, Ev)))
    lse = _poisoned(q.new_empty((B, Hq, Lq), dtype=torch.float32))
    if out.numel() == 0:
        return out, lse
    # A page size that is not a multiple of the key tile (16, say, under a 64-key tile) keeps the tile
    # and looks up each key's page: smaller tiles would cost more than the lookups (compile report:
    # 16-key tiles duplicate MMA work across the warps).
    block_m, block_n, warps, stages = configs.decode_config(group * Lq, max(E, Ev), q.dtype)
    row_blocks = triton.cdiv(group * Lq, block_m)
    splits = choose_splits(num_splits, B * Hkv * row_blocks, capacity, block_n, q.device)
    # Windows past the cache's capacity see the same keys as unbounded ones: clamped, they stay 32-bit.
    left = min(band.left, capacity + Lq) if band.left >= 0 else 0
    right = min(band.right, capacity + Lq) if band.right >= 0 else 0
    block_e, block_ev = configs.head_block(E), configs.head_block(Ev)
    part_acc = part_ml = lse  # not read with one split
    if splits > 1:
        rows = B * Hkv * splits * row_blocks * block_m
        part_acc = q.new_empty((rows, block_ev), dtype=torch.float32)
        part_ml = q.new_empty((rows, 2), dtype=torch.float32)
    table = block_table if paged else seqlens  # a pointer never read without a block table
    slopes = alibi if alibi is not None else lse
    log2 = log2_scores(scale, MASK_NONE.value, softcap > 0, alibi is not None)
    _decode_split_kernel[(splits * row_blocks, Hkv, B)](
        q, k_cache, v_cache, seqlens, table, slopes, out, lse, part_acc, part_ml,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_table.stride(0) if paged else 0, alibi.stride(0) if alibi is not None and alibi.shape[0] > 1 else 0,
        Lq, group, Hq, page_size, splits, row_blocks, scale, qk_scale_of(scale), softcap,
        1.0 / softcap if softcap > 0 else 0.0, left, right,
        E=E, EV=Ev, BLOCK_E=block_e, BLOCK_EV=block_ev, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, TILE_IN_PAGE=paged and page_size % block_n == 0, HAS_LEFT=band.left >= 0,
        HAS_RIGHT=band.right >= 0, SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
        PRECISION=precision_for(q.dtype), DIRECT=splits == 1, LOG2_SCORES=log2, num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        _decode_merge_kernel[(row_blocks, Hkv, B)](
            part_acc, part_ml, out, lse, *out.stride(), Lq, group, Hq, splits, row_blocks,
            EV=Ev, BLOCK_EV=block_ev, BLOCK_M=block_m, LOG2_SCORES=log2, num_warps=4,
        )
    return out, lse
