"""torch.compile(fullgraph=True) traces through attnkern: the kernels are custom ops with fake
implementations and registered autograd, so there is no graph break, forward or backward."""
import pytest
import torch

import attnkern
from matrix import DEVICE


def _attend(q, k, v, mask):
    out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    return (out * out).sum()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_match_eager(compiler):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=gen).to(DEVICE).requires_grad_() for s in
              [(2, 4, 17, 16), (2, 2, 23, 16), (2, 2, 23, 16), (4, 17, 23)]]
    compiled = torch.compile(_attend, fullgraph=True, backend=compiler)
    loss = compiled(*leaves)
    loss.backward()
    got = [loss.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss = _attend(*leaves)
    loss.backward()
    want = [loss.detach()] + [t.grad for t in leaves]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_graph_holds_the_custom_ops():
    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm

    q = torch.randn(1, 2, 9, 16, device=DEVICE)
    torch.compile(lambda q: attnkern.scaled_dot_product_attention(q, q, q), fullgraph=True, backend=record)(q)
    assert any("attnkern.attention_forward" in g for g in seen)


# ---------------------------------------------------------------------------------------------------
# attention_with_kvcache: the append and the attention as one op that mutates the caches (ops_kvcache.py).

def _decode_step(q, k_cache, v_cache, k_new, v_new, lens, table):
    out, lse = attnkern.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, lens, block_table=table,
                                               causal=True, return_lse=True)
    return out * 2, lse


def _decode_inputs(paged: bool):
    from cases import DecodeCase, make_decode_inputs

    case = DecodeCase("compile", Lq=2, cache=(40, 3, 0), Lnew=2, Hq=8, Hkv=2, E=16, page_size=16 if paged else None)
    inputs = make_decode_inputs(case, torch.float32, DEVICE, seed=3)
    names = ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "block_table")
    return [inputs[n] for n in names], inputs


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compiled_decode_matches_eager_and_appends(compiler, paged):
    """fullgraph=True traces the decode step (no host read of the lengths while tracing); the compiled
    call writes the new keys into the caches in place, as the eager call does, and returns its results."""
    torch._dynamo.reset()
    args, inputs = _decode_inputs(paged)
    eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    compiled = torch.compile(_decode_step, fullgraph=True, backend=compiler)
    with torch.inference_mode():
        got = compiled(*args)
        want = _decode_step(*eager_args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[1], inputs["k_after"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(args[2], inputs["v_after"], rtol=0, atol=0, equal_nan=True)


def test_compiled_decode_graph_holds_the_op_and_checks_lengths_when_run():
    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm

    args, _ = _decode_inputs(paged=True)
    compiled = torch.compile(_decode_step, fullgraph=True, backend=record)
    with torch.inference_mode():
        compiled(*args)
        assert len(seen) == 1 and "kvcache_decode" in seen[0]
        args[5] = torch.tensor([40, 3, 31], dtype=torch.int32)  # 31 + 2 keys: a third page that is not there
        with pytest.raises(ValueError, match="block_table holds page"):
            compiled(*args)
