"""The Python side of the "cuda" backend, exercised without a GPU.

CudaBackend.forward/backward call torch.ops.attnkern_ext.forward/backward, which dispatch on the
device: on CPU tensors they reach the C++ CPU kernels. That runs the backend's own logic (zero-padding
head dims that are not multiples of 8, cutting the results back, copying layouts the 16-byte copies
cannot read, output and gradient layouts) against the float64 reference here; the CUDA kernels behind
it are tested by the shared matrix on a GPU, and on the CPU under the SIMT emulator (backend
"cuda-emu", the same glue over the emulated kernels; tests/test_cuda_emu.py).
"""
import pytest
import torch

from attnkern.backends import extension
from attnkern.band import FULL, make_band
from attnkern.backends.cuda import CudaBackend, _layout_problem, _padded
from attnkern.reference import reference_attention
from attnkern.score_mods import NONE

pytestmark = pytest.mark.skipif(extension.EXTENSION_ERROR is not None,
                                reason=f"C++ extension not built: {extension.EXTENSION_ERROR}")


def test_padding_rounds_head_dims_up_to_a_multiple_of_8():
    t = torch.randn(1, 2, 3, 13)
    p = _padded(t)
    assert p.shape == (1, 2, 3, 16) and torch.equal(p[..., :13], t) and torch.all(p[..., 13:] == 0)
    same = torch.randn(1, 2, 3, 16)
    assert _padded(same) is same


def test_layout_problems_are_named():
    t = torch.randn(2, 3, 5, 16)
    assert _layout_problem(t, "query") is None
    assert "unit-stride head dim" in _layout_problem(t.transpose(2, 3), "query")
    misaligned = torch.randn(2 * 3 * 5 * 8 + 1)[1:].view(2, 3, 5, 8)  # starts 4 bytes in
    assert "16-byte aligned" in _layout_problem(misaligned, "query")
    odd_rows = torch.randn(2, 3, 5, 9)[..., :8]  # rows 36 bytes apart
    assert "multiple of 16 bytes" in _layout_problem(odd_rows, "query")


@pytest.mark.parametrize("E,Ev,causal,mask_kind", [
    (13, 13, 0, None),      # both head dims padded
    (40, 20, 1, "bool"),    # only Ev padded
    (5, 64, 2, "float"),    # only E padded, bottom-right causal
    (64, 64, 0, "float"),   # nothing padded
])
def test_forward_and_backward_through_the_backend_glue(E, Ev, causal, mask_kind):
    torch.manual_seed(0)
    B, H, L, S = 2, 3, 17, 29
    # q as a (B, L, H, E) buffer viewed as (B, H, L, E): the layout models hand over.
    q = torch.randn(B, L, H, E, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, H, S, E, dtype=torch.float64)
    v = torch.randn(B, H, S, Ev, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, L, S) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(B, 1, L, S, dtype=torch.float64)
    scale = 0.3
    backend = CudaBackend()
    band = make_band(causal, None)
    out, lse, stats, out_lo = backend.forward(q, k, v, mask, scale, band, NONE, True)
    assert out_lo.numel() == 0, "float64 outputs need no rounding residual"
    assert out.shape == (B, H, L, Ev) and lse.shape == (B, H, L)
    assert out.stride(1) < out.stride(2), "the output keeps the query's (B, L, H, E) layout"

    mode = {0: False, 1: "top_left", 2: "bottom_right"}[causal]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mref = None if mask is None else (mask.clone().requires_grad_() if mask.is_floating_point() else mask)
    ref_out, ref_lse = reference_attention(*leaves, mref, scale=scale, causal=mode)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-10, atol=1e-10)

    dout = torch.randn(B, H, L, Ev, dtype=torch.float64)
    ref_out.backward(dout)
    dq, dk, dv, dmask = backend.backward(dout, None, q, k, v, mask, out, out_lo, stats, scale, band, NONE,
                                         mask is not None and mask.is_floating_point())
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-9)
    if mref is not None and mref.requires_grad:
        torch.testing.assert_close(dmask, mref.grad, rtol=1e-9, atol=1e-9)


def test_half_output_residual_is_cut_and_laid_out_like_the_output():
    """fp16 with head dims padded to 8: the rounding residual out_lo comes back cut to Ev, laid out like
    the output, and out + out_lo holds the float32 result to far more bits than out alone."""
    torch.manual_seed(1)
    B, H, L, S, E, Ev = 1, 2, 9, 11, 13, 5
    q = torch.randn(B, L, H, E).transpose(1, 2).half()
    k, v = torch.randn(B, H, S, E).half(), torch.randn(B, H, S, Ev).half()
    out, lse, stats, out_lo = CudaBackend().forward(q, k, v, None, 0.4, FULL, NONE, True)
    assert out_lo.shape == out.shape and out_lo.stride() == out.stride()
    exact, _ = reference_attention(q.double(), k.double(), v.double(), scale=0.4)
    err_hi = (out.double() - exact).abs().max().item()
    err_both = (out.double() + out_lo.double() - exact).abs().max().item()
    assert err_both < err_hi / 50, (err_hi, err_both)
    assert CudaBackend().forward(q, k, v, None, 0.4, FULL, NONE, False)[3].numel() == 0, "no residual unless asked"
