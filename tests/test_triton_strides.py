"""The Triton kernels' stride hints (common.stride_align, common.aligned): a head dim such as 40 or 120
gives row strides that are multiples of 8 but not of 16, which Triton cannot prove by itself; the launches
pass what the strides are all multiples of, and the kernels rebuild each stride from it. A wrong claim
would change a stride, so the forward and every gradient are checked on layouts that claim 4, 8 and 1."""
import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from attnkern.triton.common import stride_align
from matrix import BACKEND_DTYPES, DEVICE

TRITON_DTYPES = BACKEND_DTYPES.get("triton", ())


def test_stride_align_is_the_power_of_two_dividing_every_stride():
    assert stride_align(torch.empty(2, 3, 5, 64)) == 16
    assert stride_align(torch.empty(2, 3, 5, 40)) == 8  # row stride 40, head stride 200
    assert stride_align(torch.empty(2, 3, 5, 36)) == 4
    assert stride_align(torch.empty(2, 3, 5, 17)) == 1
    assert stride_align(torch.empty(2, 5, 3, 64).transpose(1, 2)) == 16  # (B, L, H, E) storage
    assert stride_align(torch.empty(2, 5, 3 * 120)[..., :40].unflatten(-1, (1, 40)).transpose(1, 2)) == 8
    assert stride_align(torch.empty(2, 3, 5, 128)[..., :120]) == 16  # the sliced columns do not matter
    assert stride_align(torch.empty(2, 3, 5, 64), torch.empty(2, 3, 5, 40), None) == 8  # every tensor
    assert stride_align(torch.empty(4, 6)[:, ::2]) == 2  # a non-unit feature stride counts


def _fused_qkv(E: int, H: int, L: int, dtype, seed: int):
    """q, k, v as views of one (B, L, 3 * H * E) projection: strides (L·3HE, E, 3HE, 1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, L, 3 * H * E, generator=gen).to(dtype).to(DEVICE)
    return [t.unflatten(-1, (H, E)).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


@pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")
@pytest.mark.parametrize("E,H,align", [(40, 1, 8), (20, 1, 4), (17, 1, 1)])
@pytest.mark.parametrize("dtype", [d for d in (torch.float16, torch.float32) if d in TRITON_DTYPES])
def test_kernels_on_fused_projection_layouts(E, H, align, dtype):
    q, k, v = _fused_qkv(E, H, 37, dtype, seed=E)
    assert stride_align(q, k, v) == align
    do = torch.randn(q.shape[:-1] + (E,), generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)

    def run(dt, backend):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if backend is None:
            out = reference_attention(*leaves, causal="top_left")[0]
        else:
            out = attnkern.attention(*leaves, causal="top_left", backend=backend, return_lse=False)
        out.backward(do.to(dt))
        return out, [t.grad for t in leaves]

    out, grads = run(dtype, "triton")
    out64, grads64 = run(torch.float64, None)
    out_lp, grads_lp = run(dtype, None)
    assert_all([check("out", out, out64, out_lp, dtype)]
               + [check(n, g, a, b, dtype, factor=3.0) for n, g, a, b in zip("qkv", grads, grads64, grads_lp)])
