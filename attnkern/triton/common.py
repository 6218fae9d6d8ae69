"""Tile helpers shared by the forward and backward kernels.

Scores, masks and row maxima stay in natural units: s = (q·k) · scale + mask, so any finite float mask
(finfo.min included) adds without overflowing; only differences from the row max enter base 2,
exp(s - m) = exp2((s - m) · log2(e)). The log-sum-exp handed to Python is in natural log.
"""
import triton
import triton.language as tl

# constexpr so compiled kernels may read them (plain globals only work under the interpreter); Python
# code reads `.value`.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def index_range(start, BLOCK: tl.constexpr, I64: tl.constexpr):
    """start + [0, BLOCK): int64 when a tensor spans 2**31 elements or more (I64), so that
    index × stride products cannot wrap around; int32 otherwise (fewer registers)."""
    r = tl.arange(0, BLOCK)
    if I64:
        r = r.to(tl.int64)
    return start + r


@triton.jit
def load_row_stats(stats_base, offs_m, L, CHECK: tl.constexpr):
    """The forward's per-row softmax statistics (row max m, log2 denominator), ready for
    P = exp2((s - m) · log2(e) - log2l): fully masked rows and rows past L get m = +inf, log2l = 0, so
    P = 0."""
    if CHECK:
        m = tl.load(stats_base + offs_m * 2, mask=offs_m < L, other=float("inf"))
        log2l = tl.load(stats_base + offs_m * 2 + 1, mask=offs_m < L, other=0.0)
    else:
        m = tl.load(stats_base + offs_m * 2)
        log2l = tl.load(stats_base + offs_m * 2 + 1)
    empty = m == float("-inf")
    return tl.where(empty, float("inf"), m), tl.where(empty, 0.0, log2l)


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
    s, qi, kj, mask_base, stride_ml, stride_ms, L, S, causal_offset,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr,
):
    """Apply the user mask, the causal diagonal and the sequence bounds to a score tile.

    `qi` and `kj` are the query-row and key-column indices shaped to broadcast against `s`
    ([:, None] and [None, :], or the transpose for the kernels that hold Sᵀ). Masked scores become -inf.
    """
    if MASK_KIND != 0:
        m_ptrs = mask_base + qi * stride_ml + kj * stride_ms
        if CHECK_Q or CHECK_K:
            m = tl.load(m_ptrs, mask=(qi < L) & (kj < S), other=0)
        else:
            m = tl.load(m_ptrs)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32)
    if APPLY_CAUSAL:
        s = tl.where(kj <= qi + causal_offset, s, float("-inf"))
    if CHECK_K:
        s = tl.where(kj < S, s, float("-inf"))
    return s


def needs_int64(*tensors) -> bool:
    """Whether some tensor's largest element offset reaches 2**31 (the kernels' I64 switch)."""
    return any(
        t is not None and sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride())) >= 2**31
        for t in tensors
    )
