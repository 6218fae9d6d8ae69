"""Fused attention backward: a preprocess, then either the single-pass kernel (the default) or the
two-pass dK/dV + dQ kernels (the deterministic path), and (only when a float mask needs a gradient) a
dMask pass.

All of them recompute P = exp2((S - m) · log2(e) - log2 l) from the forward's per-row statistics (row
max m, log2 of the denominator) instead of storing L×S probabilities (in log2 units where common.py's
LOG2_SCORES holds: exp2(fma(q·k, scale · log2(e), -m · log2(e)) - log2 l), except the dMask pass, which
runs only for float masks); subtracting m first keeps P exact even
for huge scores, where an lse could not hold log2 l. Fully masked rows read m = +inf, log2 l = 0, so P
is 0 there rather than exp2(-inf + inf) = NaN. The preprocess forms delta = rowsum(dO ∘ O) − dlse,
where dlse is the gradient of the returned log-sum-exp and O = out + out_lo (the forward's rounding
residual of a half-precision output, when it saved one) to float32 accuracy.

    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − delta),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dMask = dS

With the score modifications (score_mods.py; each behind a constexpr switch): dropout's multiplier Z
(0 or 1/(1-p), regenerated from the rng) gives dV = (P ∘ Z)ᵀ dO and dP = (dO Vᵀ) ∘ Z, delta keeps its
form (O is the dropped output); soft-capping multiplies dS by 1 − tanh² on its way to dQ and dK (dMask
is dS itself); ALiBi changes only the recomputed scores.

Single pass: a program owns a key block of one kv head and sweeps the query tiles of that head's whole
query-head group once: S and dP are formed once per tile (5 products, 1 exp per score); dK, dV stay
in registers and each tile's dQ share is added into a float32 buffer with atomics, so dQ's rounding
depends on the order the programs' additions land in (not bitwise reproducible on a GPU).

Two passes (deterministic, no atomics): the dK/dV programs are laid out as above without the dQ
product; dQ programs own a query block and loop over the keys, recomputing S and dP (7 products, 2
exps per score). Grouped-query attention needs neither atomics nor a materialized repeat: on both paths
a dK/dV program loops over its kv head's query heads, or, when that grid would leave SMs idle (MQA,
small batch), over one part of them, the parts summed after in a fixed order (kv_group_parts).

The dK/dV, dQ and single-pass kernels narrow their loops to a bool mask's spans as the forward does
(block_map.py): a key block visits the rows from the first to the last the mask shows it, a query block
the keys.

Packed variable-length batches (varlen.py; varlen_backward) run the dK/dV, dQ and single-pass kernels
with VARLEN set, one launch each over every sequence, as the forward does (forward.py); the preprocess
takes the packed rows as one problem. A packed batch has no mask, hence no dMask pass.

The dMask pass owns one tile of the (Bm, Hm, Lm, Sm) mask gradient and sums over exactly the dims the
mask broadcasts over; over keys it sums each row as rowsum(P ∘ dP)(1 − rowsum P) + dlse · rowsum P,
the same value as rowsum dS but free of delta's rounding (which rowsum dS ≈ dlse would amplify by
cancellation).
"""
import torch
import triton
import triton.language as tl

from ..buffers import new_grad, new_mask_grad
from ..config import single_pass_backward
from ..masks import mask_kind
from ..score_mods import NONE
from . import common as tcommon, configs
from .common import (dropout_keep, index_range, key_tiles, load_mods, load_row_stats, load_tile, map_args,
                     mask_scores, modify_scores, mods_args, needs_int64, packed_mods, packed_sequence,
                     probabilities, query_tiles,
                     span_tiles, store_tile, at_token, first_row, whole_tiles, aligned, LOG2E, MASK_BOOL)
from .forward import mask_args, precision_for


@triton.jit
def _bwd_preprocess_kernel(
    O, O_LO, DO, DLSE, STATS, DELTA,
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_lob, stride_loh, stride_lol, stride_loe,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_dlb, stride_dlh, stride_dll,
    H, L,
    EV: tl.constexpr, BLOCK_EV: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_LO: tl.constexpr,
    BLOCK_M: tl.constexpr, I64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = index_range(pid_m * BLOCK_M, BLOCK_M, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)
    o = load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_ev[None, :] * stride_oe,
                  offs_m, offs_ev, L, EV, True, BLOCK_EV != EV).to(tl.float32)
    if HAS_LO:
        o += load_tile(O_LO + b * stride_lob + h * stride_loh + offs_m[:, None] * stride_lol
                       + offs_ev[None, :] * stride_loe, offs_m, offs_ev, L, EV, True, BLOCK_EV != EV).to(tl.float32)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                   + offs_ev[None, :] * stride_doe, offs_m, offs_ev, L, EV, True, BLOCK_EV != EV)
    delta = tl.sum(o * do.to(tl.float32), 1)
    in_range = offs_m < L
    if HAS_DLSE:
        # A fully masked row (row max -inf) has P = 0 and a constant lse: its dlse, maybe inf or NaN (a
        # log-sum-exp merge), must not enter delta, or dS = 0 * (dP - delta) would be NaN on every key.
        row_max = tl.load(STATS + ((b * H + h) * L + offs_m) * 2, mask=in_range, other=0.0)
        live = in_range & (row_max != float("-inf"))
        dlse = tl.load(DLSE + b * stride_dlb + h * stride_dlh + offs_m * stride_dll, mask=live, other=0.0)
        delta -= dlse.to(tl.float32)
    tl.store(DELTA + (b * H + h) * L + offs_m, delta, mask=in_range)


@triton.jit
def _dkdv_tile(
    dk, dv, kT, v, start_m, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, APPLY_BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate one query tile's contribution to a key block's dK, dV. Works on Sᵀ (keys × queries).

    S is formed exactly as the forward forms it, dot(q, kᵀ) · scale with kᵀ loaded as the forward loads
    it, and only then transposed: a dot with the operands swapped or laid out otherwise may sum in
    another order, and at |score| ~ 1e6 one rounding step of a
    score (0.06 at 1e6) already changes P by 6%. Bit-identical scores keep P exact relative to the
    forward's statistics, however large the logits.

    With dropout, dV takes the kept P (the keep scale multiplies dV once, at the end) and dP the kept,
    scaled dO Vᵀ; with soft-capping dS is multiplied by 1 - tanh² on its way to dK. The groups are
    _dkdv_range's."""
    q_base, do_base, mask_base, stats_base, delta_base = ptrs
    offs_n, offs_m0, offs_e, offs_ev = offs
    stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms = strides
    L, S, scale, lo_off, hi_off, qk_scale = problem
    offs_m = start_m + offs_m0
    q = load_tile(q_base + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                  offs_m, offs_e, L, E, CHECK_M, BLOCK_E != E)
    row_max, log2l = load_row_stats(stats_base, offs_m, L, CHECK_M, LOG2_SCORES)  # rows past L: P = 0
    if CHECK_M:
        delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    else:
        delta = tl.load(delta_base + offs_m)
    sT = tl.trans(tl.dot(q, kT, input_precision=PRECISION))
    tT = sT
    if not LOG2_SCORES:
        sT, tT = modify_scores(sT * scale, offs_m[None, :], offs_n[:, None], mods, SOFTCAP, HAS_ALIBI)
    sT = mask_scores(sT, offs_m[None, :], offs_n[:, None], mask_base, stride_ml, stride_ms, L, S, lo_off, hi_off,
                     MASK_KIND, APPLY_BAND, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N)
    pT = probabilities(sT, row_max[None, :], log2l[None, :], qk_scale, LOG2_SCORES)
    do = load_tile(do_base + offs_m[:, None] * stride_dol + offs_ev[None, :] * stride_doe,
                   offs_m, offs_ev, L, EV, CHECK_M, BLOCK_EV != EV)
    if HAS_DROPOUT:
        keepT = tl.trans(dropout_keep(offs_m, start_n, mods, BLOCK_M, BLOCK_N))
        dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
    else:
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if HAS_DROPOUT:
        dpT = tl.where(keepT, dpT * mods[8], 0.0)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_range(
    dk, dv, kT, v, tiles, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query head's query tiles against the key block at start_n, in order: `tiles` =
    query_tiles' (lo, full_lo, full_hi, hi); the band's edge tiles [lo, full_lo) and [full_hi, hi)
    compare per element, the inner ones do not. Groups: ptrs (q_base, do_base, mask_base, stats_base,
    delta_base) at this batch and head, offs (offs_n, offs_m0, offs_e, offs_ev), strides (Q's row and
    feature, dO's, the mask's row and column), problem (L, S, scale, lo_off, hi_off), mods (load_mods)."""
    lo, full_lo, full_hi, hi = tiles
    for start_m in range(lo, full_lo, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, v, start_m, start_n, ptrs, offs, strides, problem, mods,
                            E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                            PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_m in range(full_lo, full_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, v, start_m, start_n, ptrs, offs, strides, problem, mods,
                            E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, False, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                            PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_m in range(full_hi, hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, v, start_m, start_n, ptrs, offs, strides, problem, mods,
                            E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                            PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    return dk, dv


@triton.autotune(
    configs=configs.configs_for(configs.DKDV_CONFIGS),
    key=["L_BUCKET", "S_BUCKET", "E", "EV", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "PRECISION", "SOFTCAP",
         "HAS_ALIBI", "HAS_DROPOUT", "VARLEN", "LOG2_SCORES"],
    prune_configs_by={"early_config_prune": configs.prune_dkdv},
)
@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["S"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, M, SPANS, DO, STATS, DELTA, DK, DV, ALIBI, RNG,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_pb, stride_ph, stride_pi,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_dkb, stride_dkh, stride_dks, stride_dke,
    stride_dvb, stride_dvh, stride_dvs, stride_dve,
    H, GROUP, HEADS, L, S, scale, qk_scale, lo_off, hi_off, L_BUCKET, S_BUCKET,
    stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale, CU_Q, CU_K,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    I64: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    # Strides of a ragged head dim (40, 120, ...): multiples of 8 that Triton cannot prove (common.aligned)
    stride_qb, stride_qh, stride_ql = aligned(stride_qb, stride_qh, stride_ql, ROW_ALIGN)
    stride_kb, stride_kh, stride_ks = aligned(stride_kb, stride_kh, stride_ks, ROW_ALIGN)
    stride_vb, stride_vh, stride_vs = aligned(stride_vb, stride_vh, stride_vs, ROW_ALIGN)
    stride_dob, stride_doh, stride_dol = aligned(stride_dob, stride_doh, stride_dol, ROW_ALIGN)
    stride_dkb, stride_dkh, stride_dks = aligned(stride_dkb, stride_dkh, stride_dks, ROW_ALIGN)
    stride_dvb, stride_dvh, stride_dvs = aligned(stride_dvb, stride_dvh, stride_dvs, ROW_ALIGN)
    pid_n = tl.program_id(0)
    # Program axis 1: HEADS consecutive query heads of one kv head's group (HEADS = GROUP: the whole
    # group, written to the kv head's dK/dV; fewer: a part, written to slot j of a per-part buffer).
    j = tl.program_id(1).to(tl.int64)
    h0 = j * HEADS
    hk = h0 // GROUP
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = index_range(start_n, BLOCK_N, I64)
    offs_m0 = index_range(0, BLOCK_M, I64)
    offs_e = index_range(0, BLOCK_E, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)

    # K read transposed, (BLOCK_E, BLOCK_N), as the forward reads it: the score product then has the
    # forward's operands in the forward's layout (see _dkdv_tile).
    q0 = 0
    k0 = 0
    rows = L  # the lse/stats/delta rows per head (a packed batch's total)
    if VARLEN:  # sequence b0 + b of a packed batch: its own rows, keys, lengths and band (batch strides 0)
        q0, k0, L, S, lo_off, hi_off = packed_sequence(CU_Q, CU_K, b, lo_off, hi_off)
        if start_n >= S:
            return
    kT = load_tile(at_token(K + b * stride_kb + hk * stride_kh, k0, stride_ks, VARLEN)
                   + offs_e[:, None] * stride_ke + offs_n[None, :] * stride_ks,
                   offs_e, offs_n, E, S, BLOCK_E != E, not EVEN_N)
    v = load_tile(at_token(V + b * stride_vb + hk * stride_vh, k0, stride_vs, VARLEN)
                  + offs_n[:, None] * stride_vs + offs_ev[None, :] * stride_ve,
                  offs_n, offs_ev, S, EV, not EVEN_N, BLOCK_EV != EV)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)

    # The query tiles that see this key block: the band's edge tiles compare per element, the inner
    # ones do not. Every tile checks the rows' bounds when L is ragged: unchecked inner tiles (whole_tiles,
    # as the forward and dQ take) measured more spills here, sm_90 fp16 L = 1000: E = 128 causal 360 ->
    # 536 bytes, varlen 348 -> 488 (one more compiled copy of the tile body in the loop).
    tiles = query_tiles(start_n, L, lo_off, hi_off, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, HEADS):
        h = h0 + g
        q_base = at_token(Q + b * stride_qb + h * stride_qh, q0, stride_ql, VARLEN)
        do_base = at_token(DO + b * stride_dob + h * stride_doh, q0, stride_dol, VARLEN)
        mask_base = M + b * stride_mb + h * stride_mh
        row0 = first_row(b, h, H, rows, q0, VARLEN)
        stats_base = STATS + row0 * 2
        delta_base = DELTA + row0
        head_tiles = tiles
        if MASK_KIND == MASK_BOOL:  # and the rows the mask shows these keys (block_map.py)
            head_tiles = span_tiles(tiles, (SPANS + b * stride_pb + h * stride_ph, stride_pi), start_n, S, BLOCK_N,
                                    BLOCK_M)
        mods = load_mods(ALIBI, RNG, b, h, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold,
                         drop_scale, HAS_ALIBI, HAS_DROPOUT)
        if VARLEN:
            mods = packed_mods(mods, b0 + b, h)
        dk, dv = _dkdv_range(
            dk, dv, kT, v, head_tiles, start_n, (q_base, do_base, mask_base, stats_base, delta_base),
            (offs_n, offs_m0, offs_e, offs_ev), (stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms),
            (L, S, scale, lo_off, hi_off, qk_scale), mods,
            E=E, EV=EV, BLOCK_E=BLOCK_E, BLOCK_EV=BLOCK_EV, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, PRECISION=PRECISION, SOFTCAP=SOFTCAP,
            HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, LOG2_SCORES=LOG2_SCORES, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

    dk = dk * scale
    if HAS_DROPOUT:
        dv = dv * drop_scale
    store_tile(at_token(DK + b * stride_dkb + j * stride_dkh, k0, stride_dks, VARLEN)
               + offs_n[:, None] * stride_dks + offs_e[None, :] * stride_dke,
               dk.to(DK.dtype.element_ty), offs_n, offs_e, S, E, not EVEN_N, BLOCK_E != E)
    store_tile(at_token(DV + b * stride_dvb + j * stride_dvh, k0, stride_dvs, VARLEN)
               + offs_n[:, None] * stride_dvs + offs_ev[None, :] * stride_dve,
               dv.to(DV.dtype.element_ty), offs_n, offs_ev, S, EV, not EVEN_N, BLOCK_EV != EV)


@triton.jit
def _dq_tile(
    dq, rows, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, APPLY_BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile's share of a query block's dQ; the groups are _dq_range's."""
    q, do, row_max, log2l, delta = rows
    k_base, v_base, mask_base = ptrs
    offs_m, offs_n0, offs_e, offs_ev = offs
    stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms = strides
    L, S, scale, lo_off, hi_off, qk_scale = problem
    offs_n = start_n + offs_n0
    kT = load_tile(k_base + offs_e[:, None] * stride_ke + offs_n[None, :] * stride_ks,
                   offs_e, offs_n, E, S, BLOCK_E != E, CHECK_N)
    vT = load_tile(v_base + offs_ev[:, None] * stride_ve + offs_n[None, :] * stride_vs,
                   offs_ev, offs_n, EV, S, BLOCK_EV != EV, CHECK_N)
    s = tl.dot(q, kT, input_precision=PRECISION)
    t = s
    if not LOG2_SCORES:
        s, t = modify_scores(s * scale, offs_m[:, None], offs_n[None, :], mods, SOFTCAP, HAS_ALIBI)
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_base, stride_ml, stride_ms, L, S, lo_off, hi_off,
                    MASK_KIND, APPLY_BAND, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N)
    p = probabilities(s, row_max[:, None], log2l[:, None], qk_scale, LOG2_SCORES)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if HAS_DROPOUT:  # dP = (dO Vᵀ) ∘ Z
        dp = tl.where(dropout_keep(offs_m, start_n, mods, BLOCK_M, BLOCK_N), dp * mods[8], 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # the raw scores' gradient
        ds = ds * (1.0 - t * t)
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_range(
    dq, rows, tiles, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key tiles of one query block, in order: `tiles` = key_tiles' (lo, full_lo, full_hi, hi); the
    band's edge tiles [lo, full_lo) and [full_hi, hi) compare per element and check key bounds, the
    inner ones (whole_tiles) do neither. Groups: rows (q, dO, row max, log2 l, delta of the block's
    rows), ptrs (k_base, v_base, mask_base) at this batch and head, offs (offs_m, offs_n0, offs_e,
    offs_ev), strides (K's key and feature, V's, the mask's row and column), problem (L, S, scale, lo_off,
    hi_off), mods (load_mods)."""
    lo, full_lo, full_hi, hi = tiles
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_tile(dq, rows, start_n, ptrs, offs, strides, problem, mods,
                      E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                      PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(dq, rows, start_n, ptrs, offs, strides, problem, mods,
                      E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, False, HAS_LEFT, HAS_RIGHT, CHECK_M, False,
                      PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, rows, start_n, ptrs, offs, strides, problem, mods,
                      E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                      PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    return dq


@triton.autotune(
    configs=configs.configs_for(configs.DQ_CONFIGS),
    key=["L_BUCKET", "S_BUCKET", "E", "EV", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "PRECISION", "SOFTCAP",
         "HAS_ALIBI", "HAS_DROPOUT", "VARLEN", "LOG2_SCORES"],
    prune_configs_by={"early_config_prune": configs.prune_dq},
)
@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["S"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, M, SPANS, DO, STATS, DELTA, DQ, ALIBI, RNG,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_pb, stride_ph, stride_pi,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_dqb, stride_dqh, stride_dql, stride_dqe,
    H, GROUP, L, S, scale, qk_scale, lo_off, hi_off, L_BUCKET, S_BUCKET,
    stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale, CU_Q, CU_K,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    I64: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    # Strides of a ragged head dim (40, 120, ...): multiples of 8 that Triton cannot prove (common.aligned)
    stride_qb, stride_qh, stride_ql = aligned(stride_qb, stride_qh, stride_ql, ROW_ALIGN)
    stride_kb, stride_kh, stride_ks = aligned(stride_kb, stride_kh, stride_ks, ROW_ALIGN)
    stride_vb, stride_vh, stride_vs = aligned(stride_vb, stride_vh, stride_vs, ROW_ALIGN)
    stride_dob, stride_doh, stride_dol = aligned(stride_dob, stride_doh, stride_dol, ROW_ALIGN)
    stride_dqb, stride_dqh, stride_dql = aligned(stride_dqb, stride_dqh, stride_dql, ROW_ALIGN)
    pid_m = tl.program_id(0)
    if HAS_RIGHT and not HAS_LEFT:  # causal-like: the longest rows first
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = index_range(start_m, BLOCK_M, I64)
    offs_n0 = index_range(0, BLOCK_N, I64)
    offs_e = index_range(0, BLOCK_E, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)

    q0 = 0
    k0 = 0
    rows = L  # the lse/stats/delta rows per head (a packed batch's total)
    if VARLEN:  # sequence b0 + b of a packed batch: its own rows, keys, lengths and band (batch strides 0)
        q0, k0, L, S, lo_off, hi_off = packed_sequence(CU_Q, CU_K, b, lo_off, hi_off)
        if start_m >= L:
            return

    q = load_tile(at_token(Q + b * stride_qb + h * stride_qh, q0, stride_ql, VARLEN)
                  + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                  offs_m, offs_e, L, E, not EVEN_M, BLOCK_E != E)
    do = load_tile(at_token(DO + b * stride_dob + h * stride_doh, q0, stride_dol, VARLEN) + offs_m[:, None] * stride_dol
                   + offs_ev[None, :] * stride_doe, offs_m, offs_ev, L, EV, not EVEN_M, BLOCK_EV != EV)
    row0 = first_row(b, h, H, rows, q0, VARLEN)
    row_max, log2l = load_row_stats(STATS + row0 * 2, offs_m, L, not EVEN_M, LOG2_SCORES)
    if EVEN_M:
        delta = tl.load(DELTA + row0 + offs_m)
    else:
        delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < L, other=0.0)
    k_base = at_token(K + b * stride_kb + hk * stride_kh, k0, stride_ks, VARLEN)
    v_base = at_token(V + b * stride_vb + hk * stride_vh, k0, stride_vs, VARLEN)
    mask_base = M + b * stride_mb + h * stride_mh
    mods = load_mods(ALIBI, RNG, b, h, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale,
                     HAS_ALIBI, HAS_DROPOUT)
    if VARLEN:
        mods = packed_mods(mods, b0 + b, h)
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)

    tiles = whole_tiles(key_tiles(start_m, S, lo_off, hi_off, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT), S, BLOCK_N,
                        EVEN_N)
    if MASK_KIND == MASK_BOOL:  # and the keys the mask shows these rows (block_map.py)
        tiles = span_tiles(tiles, (SPANS + b * stride_pb + h * stride_ph, stride_pi), start_m, L, BLOCK_M, BLOCK_N)
    dq = _dq_range(
        dq, (q, do, row_max, log2l, delta), tiles, (k_base, v_base, mask_base), (offs_m, offs_n0, offs_e, offs_ev),
        (stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms), (L, S, scale, lo_off, hi_off, qk_scale),
        mods,
        E=E, EV=EV, BLOCK_E=BLOCK_E, BLOCK_EV=BLOCK_EV, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
        CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, PRECISION=PRECISION, SOFTCAP=SOFTCAP, HAS_ALIBI=HAS_ALIBI,
        HAS_DROPOUT=HAS_DROPOUT, LOG2_SCORES=LOG2_SCORES, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

    dq = dq * scale
    store_tile(at_token(DQ + b * stride_dqb + h * stride_dqh, q0, stride_dql, VARLEN)
               + offs_m[:, None] * stride_dql + offs_e[None, :] * stride_dqe,
               dq.to(DQ.dtype.element_ty), offs_m, offs_e, L, E, not EVEN_M, BLOCK_E != E)


@triton.jit
def _atomic_add_tile(ptrs, x, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """fp32 atomic add of a 2-D tile; bounds are only checked where they can fail (as store_tile)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tl.atomic_add(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, mask=rows[:, None] < n_rows, sem="relaxed")
    else:
        if CHECK_COLS:
            tl.atomic_add(ptrs, x, mask=cols[None, :] < n_cols, sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _onepass_tile(
    dk, dv, kT, vT, start_m, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, APPLY_BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile against a key block: S and dP formed once, then dV, dK accumulated in registers
    and this tile's dQ share added to the float32 dQ buffer (unscaled; the caller scales the sum).
    S is formed as the forward forms it, dot(q, kᵀ) · scale with kᵀ loaded as the forward loads it, so
    P is exact relative to the forward's statistics (see _dkdv_tile); dropout and soft-capping enter as
    there. The groups are _onepass_range's."""
    q_base, do_base, mask_base, stats_base, delta_base, dq_base = ptrs
    offs_n, offs_m0, offs_e, offs_ev = offs
    stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms = strides
    L, S, scale, lo_off, hi_off, qk_scale = problem
    offs_m = start_m + offs_m0
    q = load_tile(q_base + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                  offs_m, offs_e, L, E, CHECK_M, BLOCK_E != E)
    row_max, log2l = load_row_stats(stats_base, offs_m, L, CHECK_M, LOG2_SCORES)  # rows past L: P = 0
    if CHECK_M:
        delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    else:
        delta = tl.load(delta_base + offs_m)
    s = tl.dot(q, kT, input_precision=PRECISION)
    t = s
    if not LOG2_SCORES:
        s, t = modify_scores(s * scale, offs_m[:, None], offs_n[None, :], mods, SOFTCAP, HAS_ALIBI)
    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_base, stride_ml, stride_ms, L, S, lo_off, hi_off,
                    MASK_KIND, APPLY_BAND, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N)
    p = probabilities(s, row_max[:, None], log2l[:, None], qk_scale, LOG2_SCORES)
    do = load_tile(do_base + offs_m[:, None] * stride_dol + offs_ev[None, :] * stride_doe,
                   offs_m, offs_ev, L, EV, CHECK_M, BLOCK_EV != EV)
    if HAS_DROPOUT:
        keep = dropout_keep(offs_m, start_n, mods, BLOCK_M, BLOCK_N)
        dv = tl.dot(tl.trans(tl.where(keep, p, 0.0).to(do.dtype)), do, dv, input_precision=PRECISION)
    else:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if HAS_DROPOUT:
        dp = tl.where(keep, dp * mods[8], 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    ds = ds.to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
    dq = tl.dot(ds, tl.trans(kT), input_precision=PRECISION)
    _atomic_add_tile(dq_base + offs_m[:, None] * E + offs_e[None, :], dq, offs_m, offs_e, L, E,
                     CHECK_M, BLOCK_E != E)
    return dk, dv


@triton.jit
def _onepass_range(
    dk, dv, kT, vT, tiles, start_n, ptrs, offs, strides, problem, mods,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query head's query tiles against the key block at start_n, in order, as _dkdv_range (the
    band's edge tiles, a few each, are not pipelined); ptrs adds dq_base, the head's float32 dQ rows."""
    lo, full_lo, full_hi, hi = tiles
    for start_m in tl.range(lo, full_lo, BLOCK_M, num_stages=1):
        dk, dv = _onepass_tile(dk, dv, kT, vT, start_m, start_n, ptrs, offs, strides, problem, mods,
                               E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                               PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_m in range(full_lo, full_hi, BLOCK_M):
        dk, dv = _onepass_tile(dk, dv, kT, vT, start_m, start_n, ptrs, offs, strides, problem, mods,
                               E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, False, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                               PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    for start_m in tl.range(full_hi, hi, BLOCK_M, num_stages=1):
        dk, dv = _onepass_tile(dk, dv, kT, vT, start_m, start_n, ptrs, offs, strides, problem, mods,
                               E, EV, BLOCK_E, BLOCK_EV, MASK_KIND, True, HAS_LEFT, HAS_RIGHT, CHECK_M, CHECK_N,
                               PRECISION, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, LOG2_SCORES, BLOCK_M, BLOCK_N)
    return dk, dv


@triton.autotune(
    configs=configs.configs_for(configs.ONEPASS_CONFIGS),
    key=["L_BUCKET", "S_BUCKET", "E", "EV", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "PRECISION", "SOFTCAP",
         "HAS_ALIBI", "HAS_DROPOUT", "VARLEN", "LOG2_SCORES"],
    prune_configs_by={"early_config_prune": configs.prune_onepass},
    reset_to_zero=["DQ_ACC"],  # each benchmarked config adds into it
)
@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["S"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_onepass_kernel(
    Q, K, V, M, SPANS, DO, STATS, DELTA, DK, DV, DQ_ACC, ALIBI, RNG,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_pb, stride_ph, stride_pi,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_dkb, stride_dkh, stride_dks, stride_dke,
    stride_dvb, stride_dvh, stride_dvs, stride_dve,
    H, GROUP, HEADS, L, S, scale, qk_scale, lo_off, hi_off, L_BUCKET, S_BUCKET,
    stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale, CU_Q, CU_K,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    LOG2_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    I64: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Single-pass backward: one program per (key block, kv head, batch) sweeps the query tiles of every
    query head of its group once, owning dK, dV of its keys and adding dQ into DQ_ACC, a dense float32
    (B, H, L, E) buffer, with atomics (so the order of the additions, and the last bits, vary per run)."""
    # Strides of a ragged head dim (40, 120, ...): multiples of 8 that Triton cannot prove (common.aligned)
    stride_qb, stride_qh, stride_ql = aligned(stride_qb, stride_qh, stride_ql, ROW_ALIGN)
    stride_kb, stride_kh, stride_ks = aligned(stride_kb, stride_kh, stride_ks, ROW_ALIGN)
    stride_vb, stride_vh, stride_vs = aligned(stride_vb, stride_vh, stride_vs, ROW_ALIGN)
    stride_dob, stride_doh, stride_dol = aligned(stride_dob, stride_doh, stride_dol, ROW_ALIGN)
    stride_dkb, stride_dkh, stride_dks = aligned(stride_dkb, stride_dkh, stride_dks, ROW_ALIGN)
    stride_dvb, stride_dvh, stride_dvs = aligned(stride_dvb, stride_dvh, stride_dvs, ROW_ALIGN)
    pid_n = tl.program_id(0)
    # Program axis 1: HEADS consecutive query heads of one kv head's group (HEADS = GROUP: the whole
    # group, written to the kv head's dK/dV; fewer: a part, written to slot j of a per-part buffer).
    j = tl.program_id(1).to(tl.int64)
    h0 = j * HEADS
    hk = h0 // GROUP
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = index_range(start_n, BLOCK_N, I64)
    offs_m0 = index_range(0, BLOCK_M, I64)
    offs_e = index_range(0, BLOCK_E, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)

    q0 = 0
    k0 = 0
    rows = L  # the lse/stats/delta rows per head (a packed batch's total)
    if VARLEN:  # sequence b0 + b of a packed batch: its own rows, keys, lengths and band (batch strides 0)
        q0, k0, L, S, lo_off, hi_off = packed_sequence(CU_Q, CU_K, b, lo_off, hi_off)
        if start_n >= S:
            return
    kT = load_tile(at_token(K + b * stride_kb + hk * stride_kh, k0, stride_ks, VARLEN)
                   + offs_e[:, None] * stride_ke + offs_n[None, :] * stride_ks,
                   offs_e, offs_n, E, S, BLOCK_E != E, not EVEN_N)
    vT = load_tile(at_token(V + b * stride_vb + hk * stride_vh, k0, stride_vs, VARLEN)
                   + offs_ev[:, None] * stride_ve + offs_n[None, :] * stride_vs,
                   offs_ev, offs_n, EV, S, BLOCK_EV != EV, not EVEN_N)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)

    # The query tiles that see this key block: the band's edge tiles compare per element (a few tiles
    # each: not pipelined), the inner ones do not; all check row bounds when L is ragged (as _dkdv_range).
    tiles = query_tiles(start_n, L, lo_off, hi_off, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, HEADS):
        h = h0 + g
        q_base = at_token(Q + b * stride_qb + h * stride_qh, q0, stride_ql, VARLEN)
        do_base = at_token(DO + b * stride_dob + h * stride_doh, q0, stride_dol, VARLEN)
        mask_base = M + b * stride_mb + h * stride_mh
        row0 = first_row(b, h, H, rows, q0, VARLEN)
        stats_base = STATS + row0 * 2
        delta_base = DELTA + row0
        dq_base = DQ_ACC + row0 * E
        head_tiles = tiles
        if MASK_KIND == MASK_BOOL:  # and the rows the mask shows these keys (block_map.py)
            head_tiles = span_tiles(tiles, (SPANS + b * stride_pb + h * stride_ph, stride_pi), start_n, S, BLOCK_N,
                                    BLOCK_M)
        mods = load_mods(ALIBI, RNG, b, h, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold,
                         drop_scale, HAS_ALIBI, HAS_DROPOUT)
        if VARLEN:
            mods = packed_mods(mods, b0 + b, h)
        dk, dv = _onepass_range(
            dk, dv, kT, vT, head_tiles, start_n, (q_base, do_base, mask_base, stats_base, delta_base, dq_base),
            (offs_n, offs_m0, offs_e, offs_ev), (stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms),
            (L, S, scale, lo_off, hi_off, qk_scale), mods,
            E=E, EV=EV, BLOCK_E=BLOCK_E, BLOCK_EV=BLOCK_EV, MASK_KIND=MASK_KIND, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, CHECK_M=not EVEN_M, CHECK_N=not EVEN_N, PRECISION=PRECISION, SOFTCAP=SOFTCAP,
            HAS_ALIBI=HAS_ALIBI, HAS_DROPOUT=HAS_DROPOUT, LOG2_SCORES=LOG2_SCORES, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

    dk = dk * scale
    if HAS_DROPOUT:
        dv = dv * drop_scale
    store_tile(at_token(DK + b * stride_dkb + j * stride_dkh, k0, stride_dks, VARLEN)
               + offs_n[:, None] * stride_dks + offs_e[None, :] * stride_dke,
               dk.to(DK.dtype.element_ty), offs_n, offs_e, S, E, not EVEN_N, BLOCK_E != E)
    store_tile(at_token(DV + b * stride_dvb + j * stride_dvh, k0, stride_dvs, VARLEN)
               + offs_n[:, None] * stride_dvs + offs_ev[None, :] * stride_dve,
               dv.to(DV.dtype.element_ty), offs_n, offs_ev, S, EV, not EVEN_N, BLOCK_EV != EV)


@triton.jit
def _attn_bwd_dmask_kernel(
    Q, K, V, M, DO, STATS, DELTA, DLSE, DM, ALIBI, RNG,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_dlb, stride_dlh, stride_dll,
    stride_dmb, stride_dmh, stride_dml, stride_dms,
    B, H, GROUP, L, S, HM, scale, lo_off, hi_off,
    stride_ab, b0, softcap, softcap_inv, drop_threshold, drop_scale,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, HAS_DLSE: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SUM_B: tl.constexpr, SUM_H: tl.constexpr, SUM_L: tl.constexpr, SUM_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, I64: tl.constexpr,
):
    """One (BLOCK_M × BLOCK_N) tile of dMask (Bm, Hm, Lm, Sm) = dS summed over the broadcast dims.

    A dim that the mask broadcasts over (SUM_*) is looped over inside the program, so the sum is
    formed in registers in a fixed order: deterministic, and the buffer is written once.
    Summed over keys (SUM_S), a row's Σ_j P (dP − delta) is formed as A (1 − B) + dlse B with
    A = Σ_j P dP and B = Σ_j P: the same value, without the cancellation of delta (rounded from O)
    against A; a row that sees no key has B = 0 and gives 0. With dropout dP is the kept, scaled one
    (delta's form is unchanged); dMask is dS itself, without soft-capping's 1 - tanh² (the mask is added
    after the cap).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    bm = (pid_bh // HM).to(tl.int64)
    hm = (pid_bh % HM).to(tl.int64)
    offs_m0 = index_range(0, BLOCK_M, I64)
    offs_n0 = index_range(0, BLOCK_N, I64)
    offs_e = index_range(0, BLOCK_E, I64)
    offs_ev = index_range(0, BLOCK_EV, I64)

    # A summed dim loops over its whole extent; int64 bounds keep the loop variables int64.
    b_lo = bm
    b_hi = bm + 1
    if SUM_B:
        b_lo = bm * 0
        b_hi = b_lo + B
    h_lo = hm
    h_hi = hm + 1
    if SUM_H:
        h_lo = hm * 0
        h_hi = h_lo + H
    m_lo = pid_m * BLOCK_M
    m_hi = m_lo + BLOCK_M
    if SUM_L:
        m_lo = 0
        m_hi = L
    n_lo = pid_n * BLOCK_N
    n_hi = n_lo + BLOCK_N
    if SUM_S:
        n_lo = 0
        n_hi = S

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_M], dtype=tl.float32)  # SUM_S: each row's key-summed dS
    for b in range(b_lo, b_hi):
        for h in range(h_lo, h_hi):
            hk = h // GROUP
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            k_base = K + b * stride_kb + hk * stride_kh
            v_base = V + b * stride_vb + hk * stride_vh
            mask_base = M + b * stride_mb + h * stride_mh
            row0 = (b * H + h) * L
            mods = load_mods(ALIBI, RNG, b, h, H, L, S, stride_ab, b0, softcap, softcap_inv, drop_threshold,
                             drop_scale, HAS_ALIBI, HAS_DROPOUT)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                q = load_tile(q_base + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                              offs_m, offs_e, L, E, True, BLOCK_E != E)
                do = load_tile(do_base + offs_m[:, None] * stride_dol + offs_ev[None, :] * stride_doe,
                               offs_m, offs_ev, L, EV, True, BLOCK_EV != EV)
                row_max, log2l = load_row_stats(STATS + row0 * 2, offs_m, L, True, False)
                delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < L, other=0.0)
                row_pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
                row_p = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + offs_n0
                    kT = load_tile(k_base + offs_e[:, None] * stride_ke + offs_n[None, :] * stride_ks,
                                   offs_e, offs_n, E, S, BLOCK_E != E, True)
                    vT = load_tile(v_base + offs_ev[:, None] * stride_ve + offs_n[None, :] * stride_vs,
                                   offs_ev, offs_n, EV, S, BLOCK_EV != EV, True)
                    s = tl.dot(q, kT, input_precision=PRECISION) * scale
                    s, _ = modify_scores(s, offs_m[:, None], offs_n[None, :], mods, SOFTCAP, HAS_ALIBI)
                    s = mask_scores(s, offs_m[:, None], offs_n[None, :], mask_base, stride_ml, stride_ms,
                                    L, S, lo_off, hi_off, 2, True, HAS_LEFT, HAS_RIGHT, True, True)
                    p = tl.math.exp2((s - row_max[:, None]) * LOG2E - log2l[:, None])
                    dp = tl.dot(do, vT, input_precision=PRECISION)
                    if HAS_DROPOUT:
                        dp = tl.where(dropout_keep(offs_m, start_n, mods, BLOCK_M, BLOCK_N), dp * drop_scale, 0.0)
                    if SUM_S:
                        row_pdp += tl.sum(p * dp, 1)
                        row_p += tl.sum(p, 1)
                    else:
                        acc += p * (dp - delta[:, None])
                if SUM_S:
                    row = row_pdp * (1.0 - row_p)
                    if HAS_DLSE:
                        dl = tl.load(DLSE + b * stride_dlb + h * stride_dlh + offs_m * stride_dll,
                                     mask=offs_m < L, other=0.0).to(tl.float32)
                        row += tl.where(row_p != 0.0, dl, 0.0) * row_p
                    acc_rows += row
    offs_m = pid_m * BLOCK_M + offs_m0
    offs_n = pid_n * BLOCK_N + offs_n0
    dm_base = DM + bm * stride_dmb + hm * stride_dmh
    if SUM_L:
        if SUM_S:
            tl.store(dm_base, tl.sum(acc_rows, 0))
        else:
            tl.store(dm_base + offs_n * stride_dms, tl.sum(acc, 0), mask=offs_n < S)
    else:
        if SUM_S:
            tl.store(dm_base + offs_m * stride_dml, acc_rows, mask=offs_m < L)
        else:
            store_tile(dm_base + offs_m[:, None] * stride_dml + offs_n[None, :] * stride_dms, acc,
                       offs_m, offs_n, L, S, True, True)


def dmask_blocks(E: int, Ev: int, dtype):
    """(BLOCK_M, BLOCK_N, warps, stages) of the dMask kernel: its config for the head dim, dtype and GPU
    (configs.dmask_config; not autotuned: it runs only for learned masks, once per backward)."""
    if configs.INTERPRET:
        return configs.INTERPRET_BLOCK, configs.INTERPRET_BLOCK, 4, 1
    c = configs.dmask_config(max(configs.head_block(E), configs.head_block(Ev)), dtype)
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter: nothing to fill)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv_group_parts(B: int, Hkv: int, group: int, S: int, block_n: int, device) -> int:
    """Into how many parts the dK/dV programs split each kv head's group of query heads. One program
    per (key block, kv head, batch) leaves SMs idle when B·Hkv·ceil(S/BLOCK_N) is below the SM count
    (MQA/GQA at small batch): the group is then split into the fewest parts (a divisor of the group)
    that give every SM a program; each part's programs write their heads' dK/dV sum to a float32
    buffer slot, and the parts are summed after (_sum_kv_parts: a fixed order, deterministic)."""
    sms = _sm_count(device)
    programs = B * Hkv * triton.cdiv(S, block_n)
    if group == 1 or programs >= sms:
        return 1
    return next(p for p in range(2, group + 1) if group % p == 0 and (programs * p >= sms or p == group))


def _kv_part_buffers(dk, dv, parts: int):
    """Where the dK/dV programs write: dk and dv themselves, or float32 (B, Hkv·parts, S, ·) buffers
    with one slot per part of each group (one buffer under every batch index for a packed batch's views,
    whose batch stride is 0)."""
    if parts == 1:
        return dk, dv
    B, Hkv, S, E = dk.shape
    n = 1 if dk.stride(0) == 0 else B
    return tuple(torch.empty((n, Hkv * parts, S, t.shape[3]), dtype=torch.float32, device=t.device)
                 .expand(B, -1, -1, -1) for t in (dk, dv))


def _sum_kv_parts(dk, dv, dk_parts, dv_parts, parts: int) -> None:
    if parts == 1:
        return
    for t, t_parts in ((dk, dk_parts), (dv, dv_parts)):
        if t.stride(0) == 0:  # a packed batch's views: write the one tensor once
            t, t_parts = t[:1], t_parts[:1]
        B, Hkv, S = t.shape[:3]
        t.copy_(t_parts.view(B, Hkv, parts, S, t.shape[3]).sum(2))


def _first_block_n(candidates, chained_rows, E: int, Ev: int, dtype) -> int:
    if configs.INTERPRET:
        return configs.INTERPRET_BLOCK
    return configs.first_kept(candidates, chained_rows, max(configs.head_block(E), configs.head_block(Ev)),
                              dtype).kwargs["BLOCK_N"]


def onepass_runs(E: int, Ev: int, dtype) -> bool:
    """Whether the single pass has a config for this head dim and dtype on this GPU (one that duplicates
    no MMA work: configs.chained_rows_ok); where none does (float32, head dims over 128), the backward
    takes the two-pass kernels."""
    if configs.INTERPRET:
        return True
    try:
        configs.first_kept(configs.ONEPASS_CONFIGS, configs.onepass_rows,
                           max(configs.head_block(E), configs.head_block(Ev)), dtype)
    except StopIteration:
        return False
    return True


def _launch_onepass(q, k, v, mask_ptr, m_strides, spans, p_strides, dout, stats, delta, dk_t, dv_t, dq_acc,
                    parts: int, scale, band_bounds, mod_ptrs, cu_ptrs, mod_scalars, common, lengths):
    """The single-pass dK/dV/dQ kernel: writes dK and dV into dk_t and dv_t (_kv_part_buffers' for
    `parts`) and adds the unscaled dQ into the float32 buffer dq_acc."""
    B, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    common = dict(common, I64=common["I64"] or needs_int64(dq_acc, dk_t, dv_t))
    _attn_bwd_onepass_kernel[lambda meta: (triton.cdiv(lengths[1], meta["BLOCK_N"]), Hkv * parts, B)](
        q, k, v, mask_ptr, spans, dout, stats, delta, dk_t, dv_t, dq_acc, *mod_ptrs,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *p_strides, *dout.stride(), *dk_t.stride(),
        *dv_t.stride(),
        H, H // Hkv, H // Hkv // parts, L, S, scale, tcommon.qk_scale_of(scale), *band_bounds,
        configs.bucket(lengths[0]), configs.bucket(lengths[1]), *mod_scalars, *cu_ptrs, **common,
    )


def _launch_dkdv(q, k, v, mask_ptr, m_strides, spans, p_strides, dout, stats, delta, dk_t, dv_t, parts: int,
                 scale, band_bounds, mod_ptrs, cu_ptrs, mod_scalars, common, lengths):
    """The two-pass path's dK/dV kernel, writing dk_t and dv_t (_kv_part_buffers' for `parts`)."""
    B, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    common = dict(common, I64=common["I64"] or needs_int64(dk_t, dv_t))
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(lengths[1], meta["BLOCK_N"]), Hkv * parts, B)](
        q, k, v, mask_ptr, spans, dout, stats, delta, dk_t, dv_t, *mod_ptrs,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *p_strides, *dout.stride(), *dk_t.stride(),
        *dv_t.stride(),
        H, H // Hkv, H // Hkv // parts, L, S, scale, tcommon.qk_scale_of(scale), *band_bounds,
        configs.bucket(lengths[0]), configs.bucket(lengths[1]), *mod_scalars, *cu_ptrs, **common,
    )


def _launch_preprocess(out, out_lo, dout, dlse, stats, delta, i64: bool) -> None:
    """delta = rowsum(dO ∘ (out + out_lo)) - dlse over (B, H, L, ·) tensors (out_lo, dlse may be None)."""
    B, H, L, Ev = out.shape
    block_ev = configs.head_block(Ev)
    pre_block = 64 if block_ev <= 128 else 32
    lo_t = out_lo if out_lo is not None else out
    dlse_t = dlse if dlse is not None else delta
    _bwd_preprocess_kernel[(triton.cdiv(L, pre_block), H, B)](
        out, lo_t, dout, dlse_t, stats, delta,
        *out.stride(), *lo_t.stride(), *dout.stride(), *(dlse.stride() if dlse is not None else (0, 0, 0)), H, L,
        EV=Ev, BLOCK_EV=block_ev, HAS_DLSE=dlse is not None, HAS_LO=out_lo is not None, BLOCK_M=pre_block, I64=i64,
    )


def _kernel_switches(q, E: int, Ev: int, kind: int, band_bounds, i64: bool, mods, varlen: bool, scale) -> dict:
    """The constexpr arguments the dK/dV, dQ and single-pass kernels share (LOG2_SCORES as the forward's
    launch chose it for the same problem)."""
    switches = mods_args(mods, q)[2]
    return dict(E=E, EV=Ev, BLOCK_E=configs.head_block(E), BLOCK_EV=configs.head_block(Ev), MASK_KIND=kind,
                HAS_LEFT=band_bounds[2], HAS_RIGHT=band_bounds[3], PRECISION=precision_for(q.dtype), I64=i64,
                VARLEN=varlen, LOG2_SCORES=tcommon.log2_scores(scale, kind, switches["SOFTCAP"], switches["HAS_ALIBI"]),
                **switches)


def _gradients(q, k, v, mask_ptr, m_strides, spans, dout, stats, delta, dq, dk, dv, scale, band_bounds, mods,
               onepass: bool, common, lengths, cu=None) -> None:
    """dK, dV and dQ over (B, H, L, ·) tensors, after the preprocess: the two-pass kernels or the single
    pass, one launch each per batch slice. `lengths` (query, key) size the grids and the autotune
    buckets; `cu` (cu_seqlens_q, cu_seqlens_k) makes the launches packed ones (VARLEN, on
    common.packed_view's tensors, whose batch stride is 0: one buffer under every batch index)."""
    B, H, L, E = q.shape
    Hkv, Ev = k.shape[1], v.shape[3]
    candidates = (configs.ONEPASS_CONFIGS, configs.onepass_rows) if onepass else (configs.DKDV_CONFIGS,
                                                                                   configs.dkdv_rows)
    parts = kv_group_parts(B, Hkv, H // Hkv, lengths[1], _first_block_n(*candidates, E, Ev, q.dtype), q.device)
    dk_t, dv_t = _kv_part_buffers(dk, dv, parts)
    common = dict(common, ROW_ALIGN=tcommon.stride_align(q, k, v, dout, dq, dk_t, dv_t))
    dq_acc = None
    if onepass:  # the float32 dQ the single pass adds into, scaled once at the end
        dq_acc = torch.zeros((1 if cu is not None else B, H, L, E), dtype=torch.float32, device=q.device)
    lo_off, hi_off = band_bounds[:2]
    for b0, b1, part in tcommon.batch_slices(B):  # one launch each unless B passes grid axis 2's limit
        n = b1 - b0
        key_spans, query_spans, kp_strides, qp_strides = spans
        args = (part(q), part(k), part(v), part(mask_ptr), m_strides, part(query_spans), qp_strides, part(dout),
                part(stats), part(delta))
        mod_ptrs, mod_scalars, _ = mods_args(mods, q, b0)
        mod_ptrs = (part(mod_ptrs[0]), mod_ptrs[1])  # ALiBi slopes by batch; the rng whole
        cu_ptrs = (cu[0][b0:b1 + 1], cu[1][b0:b1 + 1]) if cu is not None else (q, q)  # q: never read
        if onepass:
            _launch_onepass(*args, part(dk_t), part(dv_t), part(dq_acc), parts, scale, (lo_off, hi_off), mod_ptrs,
                            cu_ptrs, mod_scalars, common, lengths)
            continue
        _launch_dkdv(*args, part(dk_t), part(dv_t), parts, scale, (lo_off, hi_off), mod_ptrs, cu_ptrs, mod_scalars,
                     common, lengths)
        _attn_bwd_dq_kernel[lambda meta, n=n: (triton.cdiv(lengths[0], meta["BLOCK_M"]), H, n)](
            part(q), part(k), part(v), part(mask_ptr), part(key_spans), part(dout), part(stats), part(delta),
            part(dq), *mod_ptrs, *q.stride(), *k.stride(), *v.stride(), *m_strides, *kp_strides, *dout.stride(),
            *dq.stride(),
            H, H // Hkv, L, k.shape[2], scale, tcommon.qk_scale_of(scale), lo_off, hi_off,
            configs.bucket(lengths[0]), configs.bucket(lengths[1]),
            *mod_scalars, *cu_ptrs, **common,
        )
    _sum_kv_parts(dk, dv, dk_t, dv_t, parts)
    if dq_acc is not None:
        (dq[:1] if cu is not None else dq).copy_(dq_acc.mul_(scale))


def _use_onepass(deterministic: bool, E: int, Ev: int, dtype) -> bool:
    return not deterministic and single_pass_backward() and onepass_runs(E, Ev, dtype)


def attention_backward(dout, dlse, q, k, v, mask, out, out_lo, stats, scale: float, band, mask_grad: bool,
                       deterministic: bool = False, mods=NONE):
    """Triton backward on canonical tensors (see backends/base.py; `band` a band.Band, `mods` the
    forward's score_mods.ScoreMods, dropout's rng included). Returns (dq, dk, dv, dmask or None).

    By default the two-pass dK/dV + dQ kernels run (no atomics, bitwise reproducible). With
    ATTNKERN_SINGLE_PASS=1 (config.single_pass_backward) and unless `deterministic`, the single-pass
    kernel does instead (dQ summed by float32 atomics: its last bits may differ from run to run on a GPU)."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    block_e, block_ev = configs.head_block(E), configs.head_block(Ev)
    band_bounds = tcommon.band_args(band, L, S)
    lo_off, hi_off, has_left, has_right = band_bounds
    precision = precision_for(q.dtype)
    kind = mask_kind(mask)
    mask_t, m_strides = mask_args(mask)
    mask_ptr = mask_t if mask_t is not None else q
    spans = map_args(mask, L, S, q)  # the forward's, from the cache, unless the mask changed since

    has_lo = out_lo is not None and out_lo.numel() > 0
    i64 = needs_int64(q, k, v, mask, out, out_lo if has_lo else None, dout, dq, dk, dv)
    dlse_strides = dlse.stride() if dlse is not None else (0, 0, 0)
    dlse_t = dlse if dlse is not None else delta
    switches = mods_args(mods, q)[2]
    for b0, b1, part in tcommon.batch_slices(B):
        _launch_preprocess(part(out), part(out_lo) if has_lo else None, part(dout), part(dlse), part(stats),
                           part(delta), i64)
    _gradients(q, k, v, mask_ptr, m_strides, spans, dout, stats, delta, dq, dk, dv, scale, band_bounds, mods,
               _use_onepass(deterministic, E, Ev, q.dtype),
               _kernel_switches(q, E, Ev, kind, band_bounds, i64, mods, False, scale), (L, S))

    dmask = None
    if mask_grad:
        Bm, Hm, Lm, Sm = mask.shape
        sum_b, sum_h, sum_l, sum_s = Bm == 1 and B > 1, Hm == 1 and H > 1, Lm == 1 and L > 1, Sm == 1 and S > 1
        bm_, bn_, warps, stages = dmask_blocks(E, Ev, q.dtype)
        dm = new_mask_grad(mask)
        # Bm * Hm mask slices on grid axis 2: a mask shared by the batch (Bm == 1) is summed over it in
        # one launch; a per-batch one (Bm == B) is sliced with the batch.
        for b0, b1, part in (tcommon.batch_slices(B, Hm) if Bm > 1 else [(0, B, lambda t: t)]):
            grid = (1 if sum_l else triton.cdiv(L, bm_), 1 if sum_s else triton.cdiv(S, bn_),
                    (b1 - b0 if Bm > 1 else 1) * Hm)
            mod_ptrs, mod_scalars, _ = mods_args(mods, q, b0)
            _attn_bwd_dmask_kernel[grid](
                part(q), part(k), part(v), part(mask_ptr), part(dout), part(stats), part(delta), part(dlse_t),
                part(dm), part(mod_ptrs[0]), mod_ptrs[1],
                *q.stride(), *k.stride(), *v.stride(), *m_strides, *dout.stride(), *dlse_strides, *dm.stride(),
                b1 - b0, H, group, L, S, Hm, scale, lo_off, hi_off, *mod_scalars, **switches,
                E=E, EV=Ev, BLOCK_E=block_e, BLOCK_EV=block_ev, HAS_LEFT=has_left, HAS_RIGHT=has_right,
                PRECISION=precision,
                HAS_DLSE=dlse is not None,
                SUM_B=sum_b, SUM_H=sum_h, SUM_L=sum_l, SUM_S=sum_s, BLOCK_M=bm_, BLOCK_N=bn_, I64=i64,
                num_warps=warps, num_stages=stages,
            )
        dmask = dm.to(mask.dtype)
    return dq, dk, dv, dmask


def varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, max_q: int, max_k: int, out, out_lo, stats, scale: float, band,
                    deterministic: bool = False, mods=NONE):
    """Triton backward of a packed batch (varlen.py; backends/base.py's varlen_backward): the padded
    path's kernels, one launch each over all sequences (VARLEN). Returns (dq, dk, dv) packed."""
    B, E, Ev = cu_q.shape[0] - 1, q.shape[2], v.shape[2]
    dq, dk, dv = new_grad(q), new_grad(k), new_grad(v)
    rows = lambda t: t.permute(1, 0, 2).unsqueeze(0)  # noqa: E731  packed (T, H, D) as one (1, H, T, D) problem
    view = lambda t: tcommon.packed_view(t, B)  # noqa: E731
    has_lo = out_lo.numel() > 0
    i64 = needs_int64(q, k, v, out, out_lo if has_lo else None, dout, dq, dk, dv)
    # delta is per row: the packed rows form one problem for the preprocess.
    delta = torch.empty((1, q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    stats_rows = stats.unsqueeze(0)
    _launch_preprocess(rows(out), rows(out_lo) if has_lo else None, rows(dout),
                       dlse.unsqueeze(0) if dlse is not None else None, stats_rows, delta, i64)
    band_bounds = tcommon.varlen_band_args(band, max_q, max_k)
    _gradients(view(q), view(k), view(v), q, (0, 0, 0, 0), map_args(None, 0, 0, q), view(dout), stats_rows, delta,
               view(dq), view(dk), view(dv), scale, band_bounds, mods, _use_onepass(deterministic, E, Ev, q.dtype),
               _kernel_switches(q, E, Ev, tcommon.MASK_NONE.value, band_bounds, i64, mods, True,
                                scale), (max_q, max_k),
               (cu_q, cu_k))
    return dq, dk, dv
