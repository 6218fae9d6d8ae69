"""Triton grid limits: axes 1 and 2 allow 65535 programs, so every launch folds its programs onto axis
0 (triton/common.py grid_for). The interpreter does not enforce the limits and is far too slow for
65536 programs, so the launches' grids are recorded on a small problem instead, and grid_for itself
is checked on the sizes that used to pass 65535."""
import pytest
import torch

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from attnkern.triton import backward as tbwd
from attnkern.triton import forward as tfwd
from attnkern.triton.common import MAX_GRID_X, grid_for

KERNELS = [(tfwd, "_attn_fwd_kernel"), (tbwd, "_bwd_preprocess_kernel"), (tbwd, "_attn_bwd_dkdv_kernel"),
           (tbwd, "_attn_bwd_dq_kernel"), (tbwd, "_attn_bwd_dmask_kernel")]


def test_grid_for_keeps_y_and_z_at_one():
    assert grid_for(3, 90000) == (270000, 1, 1)  # e.g. Bm * Hm = 300 * 300 mask slices
    assert grid_for(1, MAX_GRID_X) == (MAX_GRID_X, 1, 1)
    with pytest.raises(ValueError, match="exceed the grid"):
        grid_for(2, 2**30)


class _Recording:
    """Stands in for a Triton kernel: kernel[grid](...) launches the real one and records its grid."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            def resolved(meta):
                g = grid(meta) if callable(grid) else grid
                self.grids.append(tuple(g))
                return g
            return self.kernel[resolved](*args, **kwargs)
        return launch


@pytest.mark.parametrize("causal,mask_shape", [(False, (2, 3, 9, 20)), ("bottom_right", (1, 3, 1, 20))])
def test_every_launch_folds_batch_and_heads_onto_axis_0(monkeypatch, causal, mask_shape):
    grids = {name: [] for _, name in KERNELS}
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, _Recording(getattr(module, name), grids[name]))
    gen, dtype = torch.Generator().manual_seed(2), torch.float32
    B, Hq, Hkv, L, S, E = 2, 3, 1, 9, 20, 16
    q = torch.randn(B, Hq, L, E, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, E, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, E, generator=gen, dtype=dtype).requires_grad_()
    m = torch.randn(mask_shape, generator=gen, dtype=dtype).requires_grad_()
    leaves = [q, k, v, m]
    out, lse = attnkern.attention(q, k, v, attn_mask=m, causal=causal, enable_gqa=True, backend="triton")
    do = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, do)

    for name, gs in grids.items():
        assert gs, f"{name} was not launched"
        for g in gs:
            assert len(g) == 3 and g[1] == g[2] == 1 and 1 <= g[0] <= MAX_GRID_X, (name, g)
    # The slices: (head, batch) pairs, kv heads for dK/dV, mask slices for dMask.
    assert grids["_bwd_preprocess_kernel"][-1][0] % (B * Hq) == 0
    assert grids["_attn_bwd_dkdv_kernel"][-1][0] % (B * Hkv) == 0
    assert grids["_attn_bwd_dmask_kernel"][-1][0] % (mask_shape[0] * mask_shape[1]) == 0

    # and the programs decode their (tile, head, batch) right
    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        r, rl = reference_attention(*ls, causal=causal, enable_gqa=True)
        return r, rl, torch.autograd.grad(r, ls, do.to(dt))

    out64, lse64, g64 = ref(torch.float64)
    out_lp, lse_lp, glp = ref(dtype)
    names = ["dq", "dk", "dv", "dmask"]
    assert_all([check("out", out, out64, out_lp, dtype), check("lse", lse, lse64, lse_lp, dtype),
                *[check(n, a, b, c, dtype, factor=3.0) for n, a, b, c in zip(names, grads, g64, glp)]])


def test_only_launches_past_grid_axis_0_are_declined():
    """B * H and Bm * Hm over 65535 run; a launch of more than 2**31 - 1 programs is declined with the
    reason (expanded tensors: explain() allocates nothing)."""
    q = torch.randn(300, 300, 1, 16)
    mask = torch.zeros(300, 300, 1, 1, requires_grad=True)
    assert attnkern.explain(q, q, q, attn_mask=mask, backend="triton").backend == "triton"
    huge = torch.zeros(1, 1, 1, 16).expand(70000, 70000, 1, 16)
    e = attnkern.explain(huge, huge, huge, backend="triton")
    assert e.backend == "none" and "2147483647 programs in one launch" in e.reason
