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
