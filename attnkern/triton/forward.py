"""Fused attention forward: one program per (query block, head, batch), online softmax over K/V tiles.

Never materializes the L×S scores. Saves per-row softmax statistics (row max, log2 of the
denominator) beside the log-sum-exp for the backward, and, when asked (HAS_LO), the half-precision
output's rounding residual out_lo = O32 - out, so that the backward's delta is float32-accurate.
A banded problem (causal, sliding window; band.py) visits only the key tiles its rows see and applies
the band compare only on the tiles that straddle an edge; fully masked rows end with l = 0, which gives
output 0 and log-sum-exp -inf. A bool mask comes with its block map (block_map.py, computed once per
mask and cached): the block visits only the keys from the first to the last sub-tile the mask shows its
rows (span_tiles: it narrows the loop as the band does). Soft-capping and ALiBi change the scores before
the masks; dropout zeroes the dropped probabilities on their way into P·V only (the statistics and the
lse are those of the undropped softmax) and scales the output by 1/(1-p) once (score_mods.py; common.py's
helpers).

Packed variable-length batches (varlen.py) run the same kernel with VARLEN set (varlen_forward): one
launch, grid (query tiles of the longest sequence, heads, sequences); a program reads its sequence's
offsets and bottom-right band (common.packed_sequence), returns at once when its tile starts past the
sequence's end, and otherwise is the padded program for that sequence alone. With VARLEN off the
compiled kernel is the padded one (the offsets' pointers are unused arguments).
"""
import os

import torch
import triton
import triton.language as tl

from ..buffers import (forward_buffers, new_varlen_lse, new_varlen_output, new_varlen_residual,
                       new_varlen_stats)
from ..score_mods import NONE
from . import common, configs
from .common import (dropout_keep, index_range, key_tiles, load_mods, load_tile, map_args, mask_scores,
                     modify_scores, mods_args, needs_int64, packed_mods, packed_sequence, span_tiles, store_tile,
                     at_token, first_row, row_bias, softmax_step, to_log2, whole_tiles, aligned, LN2, MASK_BOOL)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, APPLY_BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of the online softmax. Groups: ptrs (k_base, v_base, mask_base) at this batch and
    head, offs (offs_m, offs_n0, offs_e, offs_ev), strides (K's key and feature, V's, the mask's row and
    column), problem (L, S, scale, lo_off, hi_off, qk_scale = scale · log2(e)), mods (load_mods). m_i is
    the row max of the raw products q·k under LOG2_SCORES (common.py), else of the natural-unit scores."""
    k_base, v_base, mask_base = ptrs
    offs_m, offs_n0, offs_e, offs_ev = offs
    stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms = strides
    L, S, scale, lo_off, hi_off, qk_scale = problem
    offs_n = start_n + offs_n0
    # K is read transposed, (BLOCK_E, BLOCK_N), straight from memory.
    kT = load_tile(k_base + offs_e[:, None] * stride_ke + offs_n[None, :] * stride_ks,
                   offs_e, offs_n, E, S, BLOCK_E != E, CHECK_N)
    s = tl.dot(q, kT, input_precision=PRECISION)
    if not LOG2_SCORES:
        s = s * scale
        s, _ = modify_scores(s, offs_m[:, None], offs_n[None, :], mods, SOFTCAP, HAS_ALIBI)
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_base, stride_ml, stride_ms, L, S, lo_off, hi_off,
                    MASK_KIND, APPLY_BAND, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N)
    p, alpha, m_new = softmax_step(s, m_i, qk_scale, LOG2_SCORES)  # LOG2_SCORES: m_i the raw max of q·k
    l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's denominator counts every score, dropped or not
    if HAS_DROPOUT:  # P ∘ kept; the keep scale 1/(1-p) multiplies the output once, at the end
        p = tl.where(dropout_keep(offs_m, start_n, mods, BLOCK_M, BLOCK_N), p, 0.0)
    v = load_tile(v_base + offs_n[:, None] * stride_vs + offs_ev[None, :] * stride_ve,
                  offs_n, offs_ev, S, EV, CHECK_N, BLOCK_EV != EV)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.autotune(
    configs=configs.configs_for(configs.FWD_CONFIGS),
    # HAS_LO (training: the residual store needs registers) tunes apart from the inference forward.
    key=["L_BUCKET", "S_BUCKET", "E", "EV", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "PRECISION", "HAS_LO",
         "SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT", "LOG2_SCORES"],
    prune_configs_by={"early_config_prune": configs.prune_fwd},
)
@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["S"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, M, SPANS, O, O_LO, LSE, STATS, ALIBI, RNG,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_pb, stride_ph, stride_pi,
    stride_ob, stride_oh, stride_ol, stride_oe,
    H, GROUP, L, S, scale, qk_scale, lo_off, hi_off, L_BUCKET, S_BUCKET,
    stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale, CU_Q, CU_K,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LO: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    I64: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    # Strides of a ragged head dim (40, 120, ...): multiples of 8 that Triton cannot prove (common.aligned)
    stride_qb, stride_qh, stride_ql = aligned(stride_qb, stride_qh, stride_ql, ROW_ALIGN)
    stride_kb, stride_kh, stride_ks = aligned(stride_kb, stride_kh, stride_ks, ROW_ALIGN)
    stride_vb, stride_vh, stride_vs = aligned(stride_vb, stride_vh, stride_vs, ROW_ALIGN)
    stride_ob, stride_oh, stride_ol = aligned(stride_ob, stride_oh, stride_ol, ROW_ALIGN)
    pid_m = tl.program_id(0)
    if HAS_RIGHT and not HAS_LEFT:  # causal-like: the longest rows (most key tiles) first, for the tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    h64 = h.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = index_range(start_m, BLOCK_M, I64)
    offs_n0 = index_range(0, BLOCK_N, I64)
    offs_e = index_range(0, BLOCK_E, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)

    q0 = 0
    k0 = 0
    rows = L  # the lse/stats rows per head (a packed batch's total)
    if VARLEN:  # sequence b0 + b of a packed batch: its own rows, keys, lengths and band (batch strides 0)
        q0, k0, L, S, lo_off, hi_off = packed_sequence(CU_Q, CU_K, b, lo_off, hi_off)
        if start_m >= L:
            return

    q_base = at_token(Q + b * stride_qb + h64 * stride_qh, q0, stride_ql, VARLEN)
    k_base = at_token(K + b * stride_kb + hk * stride_kh, k0, stride_ks, VARLEN)
    v_base = at_token(V + b * stride_vb + hk * stride_vh, k0, stride_vs, VARLEN)
    mask_base = M + b * stride_mb + h64 * stride_mh
    q = load_tile(q_base + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                  offs_m, offs_e, L, E, not EVEN_M, BLOCK_E != E)

    mods = load_mods(ALIBI, RNG, b, h64, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale,
                     HAS_ALIBI, HAS_DROPOUT)
    if VARLEN:
        mods = packed_mods(mods, b0 + b, h64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)

    # The key tiles this block sees: the band's edge tiles compare per element (and check bounds: a partial
    # last tile is one of them, whole_tiles), the inner ones do neither.
    # The three loops stay here rather than in a range helper like backward.py's _dkdv_range: moved into
    # one (Triton 3.9), the PTX has the same instructions but in another order, and ptxas then spills
    # 20 bytes instead of 12 for the float32 float-mask causal E = 64 default config on sm_90 (fp16 grid,
    # mods and sm_80 configs unchanged in registers, spills and shared memory). Keep the compiled kernel.
    tiles = whole_tiles(key_tiles(start_m, S, lo_off, hi_off, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT), S, BLOCK_N,
                        EVEN_N)
    if MASK_KIND == MASK_BOOL:  # and the keys the mask shows these rows (block_map.py)
        tiles = span_tiles(tiles, (SPANS + b * stride_pb + h64 * stride_ph, stride_pi), start_m, L, BLOCK_M, BLOCK_N)
    lo, full_lo, full_hi, hi = tiles
    ptrs = (k_base, v_base, mask_base)
    offs = (offs_m, offs_n0, offs_e, offs_ev)
    strides = (stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms)
    problem = (L, S, scale, lo_off, hi_off, qk_scale)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, ptrs, offs, strides, problem, mods,
                                  E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, not EVEN_M,
                                  not EVEN_N, PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M,
                                  BLOCK_N)
    for start_n in range(full_lo, full_hi, BLOCK_N):  # whole tiles inside the band: no compares
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, ptrs, offs, strides, problem, mods,
                                  E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, False, HAS_LEFT, HAS_RIGHT, not EVEN_M,
                                  False, PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M,
                                  BLOCK_N)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, ptrs, offs, strides, problem, mods,
                                  E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, not EVEN_M,
                                  not EVEN_N, PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M,
                                  BLOCK_N)

    empty = l_i == 0.0  # every key masked: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    log2l = tl.where(empty, float("-inf"), tl.math.log2(l_safe))
    if LOG2_SCORES:  # hand on m in natural units; log2 l takes what the backward's to_log2(m) misses
        c, r = row_bias(m_i, qk_scale)
        lse = tl.where(empty, float("-inf"), (c + (r + log2l)) * LN2)
        m_i = m_i * scale  # the max of the scaled scores, as in natural units
        log2l = tl.where(empty, float("-inf"), log2l + ((c - to_log2(m_i)) + r))
    else:
        lse = tl.where(empty, float("-inf"), m_i + log2l * LN2)

    o_offs = (at_token(b * stride_ob + h64 * stride_oh, q0, stride_ol, VARLEN) + offs_m[:, None] * stride_ol
              + offs_ev[None, :] * stride_oe)
    out_hi = out.to(O.dtype.element_ty)
    store_tile(O + o_offs, out_hi, offs_m, offs_ev, L, EV, not EVEN_M, BLOCK_EV != EV)
    if HAS_LO:  # out_lo has out's layout (and strides)
        store_tile(O_LO + o_offs, (out - out_hi.to(tl.float32)).to(O.dtype.element_ty),
                   offs_m, offs_ev, L, EV, not EVEN_M, BLOCK_EV != EV)
    row = first_row(b, h64, H, rows, q0, VARLEN) + offs_m
    # A row with NaN (or +inf) scores has l = NaN, hence NaN output, lse and log2l. Its max may still have
    # come out finite or -inf (compiled max drops NaN): store NaN, so the backward cannot take the row
    # for a fully masked one (m = -inf) and recomputes NaN probabilities for it, as torch's math path has.
    m_out = tl.where(empty, float("-inf"), tl.where(l_i == l_i, m_i, float("nan")))
    if EVEN_M:
        tl.store(LSE + row, lse)
        tl.store(STATS + row * 2, m_out)
        tl.store(STATS + row * 2 + 1, log2l)
    else:
        tl.store(LSE + row, lse, mask=offs_m < L)
        tl.store(STATS + row * 2, m_out, mask=offs_m < L)
        tl.store(STATS + row * 2 + 1, log2l, mask=offs_m < L)


def precision_for(dtype) -> str:
    """How float32 dots run (half dots ignore it). By default "tf32x3": three TF32 tensor-core products
    per dot, float32-class accuracy at tensor-core speed ("ieee" compiles to scalar FMAs that spill
    registers). "tf32" when the user allowed TF32 in torch; ATTNKERN_FP32_PRECISION overrides both."""
    if str(dtype) not in ("torch.float32", "float32"):
        return "ieee"
    forced = os.environ.get("ATTNKERN_FP32_PRECISION")
    if forced:
        if forced not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"ATTNKERN_FP32_PRECISION must be ieee, tf32x3 or tf32, got {forced!r}")
        return forced
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def mask_args(mask):
    """(pointer tensor, strides) for the kernels; size-1 (broadcast) dims read with stride 0."""
    if mask is None:
        return None, (0, 0, 0, 0)
    strides = tuple(0 if size == 1 else st for size, st in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # the kernels test `!= 0`
    return mask, strides


def attention_forward(q, k, v, mask, scale: float, band, residual: bool = False, mods=NONE):
    """Triton forward on canonical tensors (see backends/base.py; `band` a band.Band, `mods` a
    score_mods.ScoreMods). Returns (out, lse, stats, out_lo)."""
    L, S, Ev = q.shape[2], k.shape[2], v.shape[3]
    out, lse, stats, out_lo = forward_buffers(q, Ev, residual)
    _launch(q, k, v, mask, out, out_lo, lse, stats, scale, common.band_args(band, L, S), mods, (L, S))
    return out, lse, stats, out_lo


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, band, residual: bool = False,
                   mods=NONE):
    """Triton forward of a packed batch (varlen.py; backends/base.py's varlen_forward): one launch over
    (query tiles of the longest sequence, heads, sequences); programs past their sequence's end return.
    Returns (out (Tq, Hq, Ev), lse (Hq, Tq), stats (Hq, Tq, 2), out_lo)."""
    B, Ev = cu_q.shape[0] - 1, v.shape[2]
    out, lse = new_varlen_output(q, Ev), new_varlen_lse(q)
    stats, out_lo = new_varlen_stats(q), new_varlen_residual(q, Ev, residual)
    view = lambda t: common.packed_view(t, B)  # noqa: E731
    # lse and stats as (1, Hq, Tq[, 2]): one tensor for every batch slice (the kernel indexes their rows)
    _launch(view(q), view(k), view(v), None, view(out), view(out_lo) if out_lo.numel() else out_lo, lse.unsqueeze(0),
            stats.unsqueeze(0), scale, common.varlen_band_args(band, max_q, max_k), mods, (max_q, max_k),
            (cu_q, cu_k))
    return out, lse, stats, out_lo


def _launch(q, k, v, mask, out, out_lo, lse, stats, scale, band_bounds, mods, lengths, cu=None):
    """The forward kernel over (B, H, L, ·) tensors, writing out, out_lo (when not empty), lse, stats;
    `band_bounds` band_args' (or varlen_band_args') tuple, `lengths` the (query, key) lengths that size
    the grid and the autotune buckets (L, S; the longest sequence's for a packed batch).
    `cu` (cu_seqlens_q, cu_seqlens_k) makes it a packed launch (VARLEN; common.packed_view's tensors)."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    has_lo = out_lo.numel() > 0
    assert not has_lo or out_lo.stride() == out.stride()
    mask_t, m_strides = mask_args(mask)
    key_spans, _, p_strides, _ = map_args(mask, L, S, q)
    from ..masks import mask_kind

    mask_t = mask_t if mask_t is not None else q
    lo_off, hi_off, has_left, has_right = band_bounds
    for b0, b1, part in common.batch_slices(B):  # one launch unless B passes grid axis 2's limit
        mod_ptrs, mod_scalars, switches = mods_args(mods, q, b0)
        cu_q, cu_k = (cu[0][b0:b1 + 1], cu[1][b0:b1 + 1]) if cu is not None else (q, q)  # q: never read
        _attn_fwd_kernel[lambda meta, n=b1 - b0: (triton.cdiv(lengths[0], meta["BLOCK_M"]), H, n)](
            part(q), part(k), part(v), part(mask_t), part(key_spans), part(out), part(out_lo if has_lo else out),
            part(lse), part(stats), part(mod_ptrs[0]), mod_ptrs[1],  # ALiBi slopes by batch; the rng whole
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *p_strides, *out.stride(),
            H, H // Hkv, L, S, scale, common.qk_scale_of(scale), lo_off, hi_off,
            configs.bucket(lengths[0]), configs.bucket(lengths[1]), *mod_scalars, cu_q, cu_k, **switches,
            E=E, EV=Ev, BLOCK_E=configs.head_block(E), BLOCK_EV=configs.head_block(Ev),
            MASK_KIND=mask_kind(mask), HAS_LEFT=has_left, HAS_RIGHT=has_right, PRECISION=precision_for(q.dtype),
            HAS_LO=has_lo, VARLEN=cu is not None, I64=needs_int64(q, k, v, mask, out),
            ROW_ALIGN=common.stride_align(q, k, v, out, out_lo if has_lo else None),
            LOG2_SCORES=common.log2_scores(scale, mask_kind(mask), switches["SOFTCAP"], switches["HAS_ALIBI"]),
        )
