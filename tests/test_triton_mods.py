"""The Triton kernels' dropout mask is philox.py's, bit for bit.

The shared cases (test_correctness.py) check softcap, ALiBi and dropout against the float64 reference,
which regenerates the mask from the same rng; here the mask itself is read back: from the tile helper
(common.dropout_keep, through load_mods as every kernel calls it) at arbitrary rows, key tiles, heads and
batch slices, and from the launched kernels, whose outputs expose it when V (forward) or dO (dK/dV
kernels) is the identity: out = (P ∘ Z) V = P ∘ Z and dV = (P ∘ Z)ᵀ dO = (P ∘ Z)ᵀ, where P > 0 everywhere
(no mask), so a score is kept exactly where its entry is nonzero.
"""
import pytest
import torch

import attnkern
from attnkern import philox
from matrix import BACKEND_DTYPES

pytestmark = pytest.mark.skipif("triton" not in BACKEND_DTYPES, reason="the Triton backend does not run here")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from attnkern.triton.common import dropout_keep, load_mods  # noqa: E402


@triton.jit
def _keep_tile(RNG, OUT, b, h, H, b0, row0, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which scores of rows row0 + [0, BLOCK_M), keys start_n + [0, BLOCK_N) of batch b0 + b, head h
    the kernels keep, as int8."""
    mods = load_mods(RNG, RNG, b, h, H, 1, 1, 0, b0, 0.0, 0.0, threshold, 1.0, False, True)
    rows = row0 + tl.arange(0, BLOCK_M)
    keep = dropout_keep(rows, start_n, mods, BLOCK_M, BLOCK_N)
    tl.store(OUT + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("seed, offset", [(12345, 0), (0x7EDC_BA98_7654_3210, (5 << 32) + 77)],
                         ids=["small", "high_words"])
def test_dropout_keep_is_philox_bit_for_bit(p, seed, offset):
    """Rows and key tiles away from 0, a batch slice (b0) and head, a seed using both key words and an
    offset past 2^32 (the counter takes it mod 2^32); thresholds below and above 2^31."""
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    B, H, L, S = 5, 3, 200, 160
    b0, b, h, row0, start_n, bm, bn = 2, 1, 2, 96, 64, 32, 64
    out = torch.empty(bm, bn, dtype=torch.int8)
    threshold = philox.dropout_threshold(p)
    _keep_tile[(1,)](rng, out, b, h, H, b0, row0, start_n, threshold, BLOCK_M=bm, BLOCK_N=bn)
    draws = philox.dropout_draws(rng, B, H, L, S)[b0 + b, h, row0:row0 + bm, start_n:start_n + bn]
    expected = draws >= threshold
    assert 0 < int(expected.sum()) < expected.numel()  # both outcomes occur
    assert torch.equal(out.bool(), expected)


def _rng(seed):
    return torch.tensor([seed * 7919 + 13, seed], dtype=torch.int64)


@pytest.mark.parametrize("single_pass", [False, True], ids=["two_pass", "single_pass"])
@pytest.mark.parametrize("sliced", [False, True], ids=["one_launch", "batch_slices"])
def test_kernels_drop_the_philox_mask(monkeypatch, single_pass, sliced):
    """The forward's and the dK/dV kernel's dropped scores are philox.py's (the single pass's dK/dV/dQ
    kernel too); with batch slices (grid axis 2 limit lowered) the counter still counts the batch of
    the whole problem."""
    from attnkern.triton import common as tcommon

    if single_pass:
        monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")
    else:
        monkeypatch.delenv("ATTNKERN_SINGLE_PASS", raising=False)
    if sliced:
        monkeypatch.setattr(tcommon, "MAX_GRID_YZ", 2)  # 5 batches: launches of 2, 2, 1
    B, H, N, p = 5, 2, 40, 0.3  # L = S = E = N: V and dO can be the identity
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, N, N, generator=gen).requires_grad_() for _ in range(2))
    eye = torch.eye(N).expand(B, H, N, N)
    v = eye.clone().requires_grad_()
    rng = _rng(11)
    out = attnkern.attention(q, k, v, dropout_p=p, dropout_rng=rng, backend="triton", return_lse=False)
    out.backward(eye)
    kept = philox.dropout_draws(rng, B, H, N, N) >= philox.dropout_threshold(p)
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(out.detach() != 0, kept)
    assert torch.equal(v.grad.transpose(-2, -1) != 0, kept)
    # Kept entries carry P / (1 - p).
    ref = torch.softmax((q.detach().double() @ k.detach().double().transpose(-2, -1)) / N ** 0.5, -1) / (1 - p)
    torch.testing.assert_close(out.detach().double()[kept], ref[kept], rtol=1e-4, atol=1e-6)


def test_dropout_p_one_drops_everything():
    """p = 1: the threshold is 2^32 - 1 (one draw in 2^32 still passes it) and the keep scale 0."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen).requires_grad_() for _ in range(3))
    out, lse = attnkern.attention(q, k, v, dropout_p=1.0, dropout_rng=_rng(2), backend="triton")
    assert torch.equal(out.detach(), torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v.grad))
    assert torch.isfinite(lse).all() and torch.isfinite(q.grad).all()
