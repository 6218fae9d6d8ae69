"""The C++ extension: float64 gradcheck through the CPU kernels, and its own argument checks, called
directly on the ops (bypassing the Python validation) to prove the C++ side refuses bad input too."""
import pytest
import torch

import attnkern
from attnkern.backends import extension

pytestmark = pytest.mark.skipif(extension.EXTENSION_ERROR is not None,
                                reason=f"C++ extension not built: {extension.EXTENSION_ERROR}")
OPS = torch.ops.attnkern_ext if extension.EXTENSION_ERROR is None else None


@pytest.mark.parametrize("causal,mask_kind,gqa", [
    (False, None, False), ("top_left", "float", True), ("bottom_right", "bool", False), (False, "float_bs", True)])
def test_gradcheck_float64(causal, mask_kind, gqa):
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()

    Hkv = 1 if gqa else 2
    q, k, v = r(2, 2, 5, 6), r(2, Hkv, 7, 6), r(2, Hkv, 7, 3)
    inputs = [q, k, v]
    mask = None
    if mask_kind == "float":
        mask = r(2, 5, 7)
        inputs.append(mask)
    elif mask_kind == "float_bs":
        mask = r(2, 1, 1, 7)
        inputs.append(mask)
    elif mask_kind == "bool":
        mask = torch.rand(5, 7, generator=gen) > 0.3
        mask[:, 0] = True

    def fn(q, k, v, *m):
        out, lse = attnkern.attention(q, k, v, attn_mask=m[0] if m else mask, causal=causal, enable_gqa=gqa,
                                      backend="cpu")
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _buffers(B=2, Hq=4, Hkv=2, L=5, S=7, E=8, Ev=8, dtype=torch.float32):
    q, k, v = torch.randn(B, Hq, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype), torch.randn(
        B, Hkv, S, Ev, dtype=dtype)
    out = torch.empty(B, Hq, L, Ev, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse, stats = torch.empty(B, Hq, L, dtype=acc), torch.empty(B, Hq, L, 2, dtype=acc)
    return q, k, v, out, lse, stats


NO_MODS = (0.0, None, 0.0, None)  # softcap, alibi, dropout_p, rng (score_mods.py)


def test_forward_op_direct_call_works():
    q, k, v, out, lse, stats = _buffers()
    OPS.forward(q, k, v, None, 0.5, [0, -1, 0], *NO_MODS, out, lse, stats)  # causal, top-left
    ref, ref_lse = attnkern.reference_attention(q, k, v, causal=1, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(q=a["q"][0]), r"query must be 4-D \(batch, heads, length, head_dim\), got 3-D"),
    (lambda a: a.update(k=a["k"].double()), r"query, key and value must have the same dtype"),
    (lambda a: a.update(q=a["q"].int()), r"query must be float16, bfloat16, float32 or float64, got Int"),
    (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), r"key and value must have the query's batch size 2"),
    (lambda a: a.update(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)),
     r"the query's heads \(4\) must be a multiple of the key/value heads \(3\)"),
    (lambda a: a.update(v=a["v"][:, :1]), r"key and value must have the same number of heads"),
    (lambda a: a.update(v=a["v"][:, :, :6]), r"key and value must have the same length"),
    (lambda a: a.update(k=a["k"][..., :6]), r"key must have the query's head dim 8"),
    (lambda a: a.update(mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)),
     r"attn_mask dim 3 \(key length\) must be 1 or 7, got shape \(2, 4, 5, 6\)"),
    (lambda a: a.update(mask=torch.ones(5, 7, dtype=torch.bool)), r"attn_mask must be 4-D"),
    (lambda a: a.update(mask=torch.ones(1, 1, 5, 7, dtype=torch.int32)),
     r"attn_mask must be bool, float32 or the query's dtype Float, got Int"),
    (lambda a: a.update(scale=float("inf")), r"scale must be finite"),
    (lambda a: a.update(scale=-1e39), r"scale=-1e\+39 does not fit float32, in which Float problems compute"),
    (lambda a: a.update(k=torch.randn(2, 0, 7, 8), v=torch.randn(2, 0, 7, 8)),
     r"the query's heads \(4\) must be a multiple of the key/value heads \(0\)"),
    (lambda a: a.update(band=[2, -1, 0]), r"band must be \[bottom_right \(0 or 1\), left \(>= -1\), right \(>= -1\)\], got \[2, -1, 0\]"),
    (lambda a: a.update(band=[1, -2, 0]), r"band must be \[bottom_right"),
    (lambda a: a.update(band=[1, 0]), r"band must be \[bottom_right"),
    (lambda a: a.update(softcap=-1.0), r"softcap must be a finite float >= 0, got -1"),
    (lambda a: a.update(alibi=torch.ones(4)), r"alibi must be a contiguous float32 \(1 or B, Hq\) = \(1 or 2, 4\)"),
    (lambda a: a.update(alibi=torch.ones(3, 4)), r"alibi must be a contiguous float32"),
    (lambda a: a.update(alibi=torch.ones(1, 4, dtype=torch.float64)), r"alibi must be a contiguous float32"),
    (lambda a: a.update(dropout_p=1.5, rng=torch.zeros(2, dtype=torch.int64)), r"dropout_p must be in \[0, 1\]"),
    (lambda a: a.update(dropout_p=0.5), r"dropout_p > 0 needs rng"),
    (lambda a: a.update(dropout_p=0.5, rng=torch.zeros(3, dtype=torch.int64)), r"rng must be a contiguous int64"),
    (lambda a: a.update(dropout_p=0.5, rng=torch.zeros(2)), r"rng must be a contiguous int64"),
    (lambda a: a.update(out=torch.empty(2, 4, 5, 9)),
     r"out must have shape \(2, 4, 5, 8\) \(batch, query heads, query length, value head dim\)"),
    (lambda a: a.update(out=torch.empty(2, 4, 5, 8, dtype=torch.float64)), r"out must have the query's dtype"),
    (lambda a: a.update(lse=torch.empty(2, 4, 5, dtype=torch.float16)), r"lse must be Float"),
    (lambda a: a.update(lse=torch.empty(2, 4, 6)), r"lse must have shape \(2, 4, 5\)"),
    (lambda a: a.update(stats=torch.empty(2, 4, 5)), r"stats must have shape \(2, 4, 5, 2\)"),
    (lambda a: a.update(stats=torch.empty(2, 4, 5, 2, dtype=torch.float64)), r"stats must be Float"),
    (lambda a: a.update(stats=torch.empty(2, 4, 2, 5).transpose(-1, -2)), r"stats must be contiguous"),
    # The mask's block map (attnkern.block_map: int8 flags per 16 x 16 sub-tile; read by the CUDA forward).
    (lambda a: a.update(mask_map=torch.zeros(1, 1, 1, 1, dtype=torch.int8)), r"mask_map given without an attn_mask"),
    (lambda a: a.update(mask=torch.ones(2, 1, 5, 7, dtype=torch.bool), mask_map=torch.zeros(2, 1, 1, 1)),
     r"mask_map must be int8 \(attnkern.block_map\), got Float"),
    (lambda a: a.update(mask=torch.ones(2, 1, 5, 7, dtype=torch.bool), mask_map=torch.zeros(2, 1, 1, 2, dtype=torch.int8)),
     r"mask_map must have shape \(2, 1, 1, 1\) or 1 on a dim \(the mask's 16 x 16 sub-tiles\), got \(2, 1, 1, 2\)"),
    (lambda a: a.update(mask=torch.ones(2, 1, 5, 7, dtype=torch.bool), mask_map=torch.zeros(2, 1, 1, dtype=torch.int8)),
     r"mask_map must be 4-D, got shape \(2, 1, 1\)"),
])
def test_forward_op_refuses_bad_arguments(mutate, message):
    q, k, v, out, lse, stats = _buffers()
    args = dict(q=q, k=k, v=v, mask=None, scale=0.5, band=[1, -1, -1], softcap=0.0, alibi=None, dropout_p=0.0,
                rng=None, out=out, lse=lse, stats=stats, mask_map=None)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        OPS.forward(args["q"], args["k"], args["v"], args["mask"], args["scale"], args["band"], args["softcap"],
                    args["alibi"], args["dropout_p"], args["rng"], args["out"], args["lse"], args["stats"], None,
                    args["mask_map"])


def test_forward_op_takes_a_block_map():
    """The CPU kernels do not read the map; a valid one (broadcast dims of 1 included) changes nothing."""
    from attnkern import block_map

    q, k, v, out, lse, stats = _buffers()
    mask = torch.rand(2, 1, 5, 7) < 0.7
    mask[..., 0] = True
    OPS.forward(q, k, v, mask, 0.5, [0, -1, -1], *NO_MODS, out, lse, stats, None, block_map.block_map(mask, 5, 7).flags)
    ref, _ = attnkern.reference_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(dout=a["dout"][..., :4]), r"grad_out must have shape \(2, 4, 5, 8\)"),
    (lambda a: a.update(dq=a["dq"].double()), r"grad_query must have the query's dtype"),
    (lambda a: a.update(dk=torch.empty(2, 4, 7, 8)), r"grad_key must have shape \(2, 2, 7, 8\)"),
    (lambda a: a.update(dlse=torch.zeros(2, 4, 6)), r"grad_lse must have shape \(2, 4, 5\)"),
    (lambda a: a.update(dmask=torch.zeros(1, 1, 5, 7)), r"grad_mask needs a float attn_mask"),
    (lambda a: a.update(mask=torch.zeros(1, 1, 5, 7), dmask=torch.zeros(1, 1, 5, 6)),
     r"grad_mask must have shape \(1, 1, 5, 7\)"),
    (lambda a: a.update(out_lo=torch.zeros(2, 4, 5, 9)), r"out_lo must have shape \(2, 4, 5, 8\) \(like out\)"),
    (lambda a: a.update(out_lo=torch.zeros(2, 4, 5, 8, dtype=torch.float16)), r"out_lo must have the query's dtype"),
    (lambda a: a.update(mask=torch.zeros(1, 1, 5, 7), mask_map=torch.zeros(1, 1, 1, 1, dtype=torch.uint8)),
     r"mask_map must be int8"),
])
def test_backward_op_refuses_bad_arguments(mutate, message):
    q, k, v, out, lse, stats = _buffers()
    OPS.forward(q, k, v, None, 0.5, [1, -1, -1], *NO_MODS, out, lse, stats)
    args = dict(dout=torch.randn_like(out), dlse=None, mask=None, dq=torch.empty_like(q), dk=torch.empty_like(k),
                dv=torch.empty_like(v), dmask=None, out_lo=None, mask_map=None)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        OPS.backward(args["dout"], args["dlse"], q, k, v, args["mask"], out, args["out_lo"], stats, 0.5, [1, -1, -1],
                     *NO_MODS, args["dq"], args["dk"], args["dv"], args["dmask"], args["mask_map"])


def test_extension_is_optional(monkeypatch):
    """Without the extension attnkern still imports and says why the backend is unavailable."""
    monkeypatch.setattr(extension, "EXTENSION_ERROR", "the C++ extension attnkern._C is not built (test)")
    q = torch.randn(1, 2, 5, 16)
    e = attnkern.explain(q, q, q)
    assert e.backend != "cpu" and "not built" in e.rejected["cpu"]
    with pytest.raises(attnkern.BackendUnavailableError, match=r"backend='cpu' cannot run this call: .*not built"):
        attnkern.attention(q, q, q, backend="cpu")
