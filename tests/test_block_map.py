"""Block maps (attnkern/block_map.py): the per-sub-tile classification of a mask, its spans, its
cache, and the Triton kernels that narrow their loops to a bool mask's spans.

The kernels' results are checked against the float64 reference by the tolerance rule (forward and every
gradient, the float mask's included) on the masks spans are for: key and query padding, block-diagonal
document masks, random masks with fully masked rows, bool and float, with Lq != Lk, GQA, odd lengths and
both backward paths. The interpreter runs the kernels with 32 × 32 tiles, two block-map sub-tiles a side.
"""
import pytest
import torch

import attnkern
from attnkern import block_map
from attnkern.block_map import MASKS, SEES
from attnkern.testing import check_gradients
from matrix import BACKEND_DTYPES, DEVICE

TRITON_DTYPES = BACKEND_DTYPES.get("triton", ())
T = block_map.TILE
EMPTY, FULL, PARTIAL = MASKS, SEES, SEES | MASKS


def test_classes_of_a_hand_built_bool_mask():
    L, S = 2 * T + 3, 3 * T  # a ragged last row of sub-tiles
    m = torch.ones(1, 1, L, S, dtype=torch.bool)
    m[0, 0, :T, T:2 * T] = False  # sub-tile (0, 1): hidden
    m[0, 0, T + 5, 2 * T + 7] = False  # sub-tile (1, 2): one score hidden
    m[0, 0, 2 * T:, :T] = False  # sub-tile (2, 0): its 3 rows hidden
    m[0, 0, 2 * T + 2, 2 * T] = False  # sub-tile (2, 2): one of its 3 rows partly hidden
    want = torch.tensor([[FULL, EMPTY, FULL], [FULL, FULL, PARTIAL], [EMPTY, FULL, PARTIAL]], dtype=torch.int8)
    got = block_map.classify(m)
    assert got.dtype == torch.int8 and got.shape == (1, 1, 3, 3)
    assert torch.equal(got[0, 0], want)


def test_classes_of_a_float_mask_and_of_broadcast_dims():
    """Float: full only where every entry is ±0.0; a -inf sub-tile is never empty (a NaN or +inf score
    under it gives NaN, as in torch's math path, so the kernels must compute it). Broadcast dims, size 1
    or stride-0 expanded, stay 1 in the map."""
    S = 2 * T
    m = torch.zeros(2, 1, 1, S)
    m[0, 0, 0, :T] = float("-inf")
    m[1, 0, 0, T + 1] = -0.0
    m[1, 0, 0, T + 2] = 0.5
    got = block_map.classify(m)
    assert got.shape == (2, 1, 1, 2)
    assert got[:, 0, 0].tolist() == [[PARTIAL, FULL], [FULL, PARTIAL]]
    keys = torch.arange(S) < T + 3  # key padding, expanded (stride 0) over 3 query rows and 4 heads
    expanded = keys.view(1, 1, 1, S).expand(1, 4, 3 * T, S)
    got = block_map.classify(expanded)
    assert got.shape == (1, 1, 1, 2) and got[0, 0, 0].tolist() == [FULL, PARTIAL]
    assert block_map.kernel_strides(got) == (0, 0, 0, got.stride(3))


def test_cache_reuses_and_sees_in_place_changes():
    block_map.clear_cache()
    L, S = 5, 3 * T
    m = torch.ones(2, 1, 1, S, dtype=torch.bool)
    first = block_map.block_map(m, L, S)
    assert block_map.block_map(m, L, S) is first  # same tensor, same version
    assert block_map.block_map(m.view(2, 1, 1, S), L, S) is first  # a new view of the same memory
    m[1, 0, 0, :T] = False  # in place: the version counter moves
    second = block_map.block_map(m, L, S)
    assert second is not first and second.flags[1, 0, 0, 0].item() == EMPTY and first.flags[1, 0, 0, 0].item() == FULL
    other = torch.ones(2, 1, 1, S, dtype=torch.bool)
    assert block_map.block_map(other, L, S) is not second  # other memory
    for _ in range(block_map.CACHE_SIZE + 2):
        block_map.block_map(torch.ones(1, 1, 1, T, dtype=torch.bool), L, T)
    assert block_map.cache_size() <= block_map.CACHE_SIZE
    with torch.inference_mode():  # no version counter: classified every call, never cached
        inf_mask = torch.ones(1, 1, 1, T, dtype=torch.bool)
        assert block_map.block_map(inf_mask, L, T) is not block_map.block_map(inf_mask, L, T)


def test_spans_of_padding_and_document_masks():
    """Per query sub-tile row, the keys its visible sub-tiles span (and per key column, the rows);
    (n, 0) where nothing is visible; a broadcast dim spans everything."""
    L, S = 3 * T, 2 * T + 5
    keys = torch.arange(S) < T + 2  # key padding: sub-tiles 0 (full) and 1 (partial) visible, 2 hidden
    bm = block_map.build(keys.view(1, 1, 1, S), L, S)
    assert bm.key_spans[0, 0].tolist() == [[0, 2 * T]]  # one broadcast row: keys [0, 2T)
    assert bm.query_spans[0, 0].tolist() == [[0, L], [0, L], [L, 0]]  # the last key column: no row
    docs = torch.zeros(L, S, dtype=torch.bool)
    docs[:T, :T] = True
    docs[T:, T:] = True
    docs[2 * T:, :] = False  # the last row of sub-tiles sees nothing
    bm = block_map.build(docs.view(1, 1, L, S), L, S)
    assert bm.key_spans[0, 0].tolist() == [[0, T], [T, S], [S, 0]]
    assert bm.query_spans[0, 0].tolist() == [[0, T], [T, 2 * T], [T, 2 * T]]


def _document_mask(L, S, docs):
    """Block-diagonal: query i and key j in the same one of `docs` equal-ish documents."""
    qd = torch.arange(L) * docs // L
    kd = torch.arange(S) * docs // S
    return qd[:, None] == kd[None, :]


def _masks(B, H, L, S, gen):
    """name -> bool mask (broadcast shapes as users pass them)."""
    key_pad = torch.ones(B, 1, 1, S, dtype=torch.bool)
    key_pad[0, ..., S // 3:] = False  # batch 0: a third of the keys, so whole key tiles are hidden
    query_pad = torch.ones(B, 1, L, 1, dtype=torch.bool)
    query_pad[-1, :, L // 2:] = False  # the last batch's second half of rows sees nothing
    rand = torch.rand(1, H, L, S, generator=gen) < 0.7
    rand[0, 0, : min(L, 40)] = False  # head 0: rows (whole query tiles) that see nothing
    rand[0, -1, :, : S // 2] = True  # the last head: full tiles
    return {"key_pad": key_pad, "query_pad": query_pad, "docs": _document_mask(L, S, 3), "random": rand}


def _attention(deterministic):
    def fn(query, key, value, attn_mask=None, is_causal=False, enable_gqa=False, **_):
        return attnkern.attention(query, key, value, attn_mask=attn_mask, causal=is_causal, enable_gqa=enable_gqa,
                                  backend="triton", deterministic=deterministic, return_lse=False)
    return fn


SMALL = (2, 2, 2, 17, 33, 16)
ODD = (2, 2, 1, 113, 70, 40)  # GQA 2:1, odd lengths, E = 40
CASES = ([(name, SMALL, kind) for name in ("key_pad", "query_pad", "docs", "random") for kind in ("bool", "float")]
         + [("key_pad", ODD, "bool"), ("docs", ODD, "bool"), ("random", ODD, "float"), ("query_pad", ODD, "float")])


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
@pytest.mark.parametrize("name,shape,kind", CASES,
                         ids=[f"{n}-{'x'.join(map(str, s[3:]))}-{k}" for n, s, k in CASES])
def test_masked_kernels_match_the_reference(name, shape, kind, monkeypatch):
    """Forward and dQ, dK, dV (and dMask for float masks: learned, so its pass runs) against the
    reference; the single pass for bool masks, the two-pass kernels for float ones."""
    B, Hq, Hkv, L, S, E = shape
    monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")
    gen = torch.Generator().manual_seed(7)
    mask = _masks(B, Hq, L, S, gen)[name]
    if kind == "float":
        gen_f = torch.randn(mask.shape, generator=gen)
        mask = torch.where(mask, torch.where(gen_f > 1.0, gen_f, 0.0), float("-inf")).requires_grad_()
    q = torch.randn(B, Hq, L, E, generator=gen)
    k, v = (torch.randn(B, Hkv, S, E, generator=gen) for _ in range(2))
    report = check_gradients(_attention(kind == "float"), *(t.to(DEVICE) for t in (q, k, v)),
                             attn_mask=mask.detach().to(DEVICE).requires_grad_(kind == "float"),
                             enable_gqa=Hq != Hkv, is_causal=name == "docs" and kind == "bool")
    assert report.passed, str(report)


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
def test_a_learned_mask_of_zeros_gets_its_gradient():
    """A float mask of zeros is full everywhere (nothing to skip) and still gets its gradient (the dMask
    pass), the score gradient."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 2, 33, 33)
    assert (block_map.classify(mask) == FULL).all()
    report = check_gradients(_attention(False), q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                             attn_mask=mask.to(DEVICE).requires_grad_())
    assert report.passed, str(report)
    assert report.tensors[-1].name == "d_mask"


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
def test_hidden_tiles_are_skipped():
    """Key tiles past the last one a bool mask shows a query block are never read: a NaN value there
    does not reach the output (as for keys outside a causal band), while a NaN under a partly hidden
    tile does (0 · NaN in the product of P and V), which shows that the tile is what is skipped. The
    mask's halves are 128 wide: whole tiles for every config."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 256, 16, generator=gen) for _ in range(3))
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool)
    mask[..., :128, 128:] = False  # the first half of the rows sees only the first half of the keys
    mask[..., 128:, 0] = False  # the second half sees all but key 0
    v[..., 200, :] = float("nan")  # hidden from the first half
    v[..., 0, :] = float("nan")  # hidden from the second half's rows, in tiles they partly see
    run = lambda: attnkern.attention(*(t.to(DEVICE) for t in (q, k, v)), attn_mask=mask.to(DEVICE),  # noqa: E731
                                     backend="triton", return_lse=False)
    out = run()
    assert torch.isnan(out).all()  # key 0 seen by the first half; 0 · NaN from the partial tiles for the second
    v[..., 0, :] = 1.0
    out = run()
    assert torch.isfinite(out[..., :128, :]).all()  # key 200's tiles skipped for the first half
    assert torch.isnan(out[..., 128:, :]).all()


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "single-pass"])
def test_hidden_tiles_are_skipped_in_the_backward(deterministic, monkeypatch):
    """As above for the gradients: a NaN key that the mask hides from the first half of the rows leaves
    their dQ finite (its tiles are not visited: 0 · NaN would be NaN), on both backward paths."""
    monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 256, 16, generator=gen).to(DEVICE) for _ in range(3))
    k[..., 200, :] = float("nan")
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool, device=DEVICE)
    mask[..., :128, 128:] = False
    q.requires_grad_()
    out = attnkern.attention(q, k, v, attn_mask=mask, backend="triton", return_lse=False, deterministic=deterministic)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(q.grad[..., :128, :]).all() and torch.isnan(q.grad[..., 128:, :]).all()


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
def test_kernels_follow_an_in_place_mask_change():
    """Same mask tensor, changed in place between calls: the second call must not reuse the first spans
    (they would skip the key tile the mask now shows)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=gen).to(DEVICE) for _ in range(3))
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    mask[..., :3] = True
    attnkern.attention(q, k, v, attn_mask=mask, backend="triton", return_lse=False)
    mask[..., 32:] = True  # a key tile that was empty
    out = attnkern.attention(q, k, v, attn_mask=mask, backend="triton", return_lse=False)
    ref = attnkern.attention(q.double(), k.double(), v.double(), attn_mask=mask, backend="reference",
                             return_lse=False)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
