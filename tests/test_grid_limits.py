"""Grid limits: axes y and z hold at most 65535 blocks (x: 2**31 - 1). The Triton and CUDA launches keep
heads on y and batches (or mask slices) on z, and run a batch larger than z holds as several launches
over batch slices (triton/common.py batch_slices, csrc/cuda/launch.h for_batch_slices).

65536 batches are far too slow for the Triton interpreter and the CUDA emulator, so the limit is lowered
instead (triton: common.MAX_GRID_YZ; cuda-emu: ATTNKERN_EMU_MAX_GRID_YZ, which its launch check enforces)
and a small problem with more batches and mask slices than that must still match the reference."""
import pytest
import torch

import attnkern
from attnkern.backends import cuda_emu
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from attnkern.triton import backward as tbwd
from attnkern.triton import common as tcommon
from attnkern.triton import forward as tfwd

LIMIT = 3  # the lowered y/z limit: heads (3) fit, batches (5) and per-batch mask slices (5 x 3) do not
B, HQ, HKV, L, S, E = 5, 3, 1, 9, 20, 16
CASES = [  # (causal, mask shape or None, with a dlse)
    (False, (B, HQ, L, S), True),      # dMask: one batch of mask slices per launch
    ("bottom_right", (1, HQ, 1, S), False),  # a mask shared by the batch: summed in one launch
    ("top_left", None, True),
]
TRITON_KERNELS = [(tfwd, "_attn_fwd_kernel"), (tbwd, "_bwd_preprocess_kernel"), (tbwd, "_attn_bwd_onepass_kernel"),
                  (tbwd, "_attn_bwd_dkdv_kernel"), (tbwd, "_attn_bwd_dq_kernel"), (tbwd, "_attn_bwd_dmask_kernel")]


class _Recording:
    """Stands in for a Triton kernel: kernel[grid](...) launches the real one and records its grid."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            def resolved(meta):
                g = tuple(grid(meta) if callable(grid) else grid)
                self.grids.append(g)
                return g
            return self.kernel[resolved](*args, **kwargs)
        return launch


def _run_and_check(backend, causal, mask_shape, with_dlse, deterministic=False):
    dtype, gen = torch.float16, torch.Generator().manual_seed(7)
    leaves = [torch.randn(B, h, n, E, generator=gen).to(dtype).requires_grad_()
              for h, n in ((HQ, L), (HKV, S), (HKV, S))]
    if mask_shape is not None:
        leaves.append(torch.randn(mask_shape, generator=gen).to(dtype).requires_grad_())
    do = torch.randn(B, HQ, L, E, generator=gen).to(dtype)
    dl = torch.randn(B, HQ, L, generator=gen) if with_dlse else None

    def run(fn, dt):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        out, lse = fn(*ls)
        outs, grads_in = [out], [do.to(dt)]
        if dl is not None:
            outs.append(lse), grads_in.append(dl.to(lse.dtype))
        return out, lse, torch.autograd.grad(outs, ls, grads_in)

    def kernels(q, k, v, m=None):
        return attnkern.attention(q, k, v, attn_mask=m, causal=causal, enable_gqa=True, backend=backend,
                                  deterministic=deterministic)

    def ref(q, k, v, m=None):
        return reference_attention(q, k, v, m, causal=causal, enable_gqa=True)

    out, lse, grads = run(kernels, dtype)
    out64, lse64, g64 = run(ref, torch.float64)
    out_lp, lse_lp, glp = run(ref, dtype)
    names = ["dq", "dk", "dv", "dmask"]
    assert_all([check("out", out, out64, out_lp, dtype), check("lse", lse, lse64, lse_lp, dtype),
                *[check(n, a, b, c, dtype, factor=3.0) for n, a, b, c in zip(names, grads, g64, glp)]])


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "twopass"])
@pytest.mark.parametrize("causal,mask_shape,with_dlse", CASES)
def test_triton_runs_batches_past_the_grid_limit_in_slices(monkeypatch, causal, mask_shape, with_dlse, deterministic):
    monkeypatch.setattr(tcommon, "MAX_GRID_YZ", LIMIT)
    monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")  # the single pass opted into; deterministic=True: two-pass
    grids = {name: [] for _, name in TRITON_KERNELS}
    for module, name in TRITON_KERNELS:
        monkeypatch.setattr(module, name, _Recording(getattr(module, name), grids[name]))
    _run_and_check("triton", causal, mask_shape, with_dlse, deterministic)
    launched = {name: gs for name, gs in grids.items() if gs}
    backward = {"_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} if deterministic else {"_attn_bwd_onepass_kernel"}
    assert set(launched) == {"_attn_fwd_kernel", "_bwd_preprocess_kernel"} | backward | (
        {"_attn_bwd_dmask_kernel"} if mask_shape else set())
    for name, gs in launched.items():
        assert all(1 <= g[1] <= LIMIT and 1 <= g[2] <= LIMIT for g in gs), (name, gs)
    assert [g[2] for g in grids["_attn_fwd_kernel"]] == [3, 2]  # batches 0-2, then 3-4
    if mask_shape == (B, HQ, L, S):
        assert [g[2] for g in grids["_attn_bwd_dmask_kernel"]] == [HQ] * B  # one batch's 3 mask slices each


@pytest.mark.skipif(cuda_emu.build_error() is not None, reason=f"cuda-emu: {cuda_emu.build_error()}")
@pytest.mark.parametrize("causal,mask_shape,with_dlse", CASES)
def test_cuda_runs_batches_past_the_grid_limit_in_slices(monkeypatch, causal, mask_shape, with_dlse):
    """The emulator's launch check fails any launch with y or z over the lowered limit."""
    monkeypatch.setenv("ATTNKERN_EMU_MAX_GRID_YZ", str(LIMIT))
    _run_and_check("cuda-emu", causal, mask_shape, with_dlse)


def test_batch_slices_are_16_aligned_and_cover_the_batch():
    assert [(b0, b1) for b0, b1, _ in tcommon.batch_slices(70000)] == [(0, 65520), (65520, 70000)]
    assert [(b0, b1) for b0, b1, _ in tcommon.batch_slices(300, per_batch=300)] == [
        (0, 208), (208, 300)]  # 65535 // 300 = 218 batches of mask slices, rounded down to 16s
    (_, _, whole), = tcommon.batch_slices(8)
    t = torch.zeros(8, 2)
    assert whole(t) is t
    (_, _, part), _ = tcommon.batch_slices(70000)
    assert part(torch.zeros(70000, 1)).shape[0] == 65520 and part(torch.zeros(1, 3)).shape[0] == 1
    with pytest.raises(ValueError, match="programs per batch on grid axis 2"):
        tcommon.batch_slices(4, per_batch=70000)


@pytest.mark.parametrize("backend", ["triton", "cuda-emu"])
def test_only_heads_past_grid_y_are_declined(backend):
    """Batch and Bm * Hm over 65535 run (explain: expanded tensors, nothing allocated); more than 65535
    query heads (grid y) are declined with the reason."""
    if backend == "cuda-emu" and cuda_emu.build_error() is not None:
        pytest.skip(f"cuda-emu: {cuda_emu.build_error()}")
    one = torch.zeros(1, 1, 1, 16, dtype=torch.float16)
    mask = torch.zeros(1, 1, 1, 1).expand(70000, 8, 1, 1).requires_grad_()
    q = one.expand(70000, 8, 1, 16)
    assert attnkern.explain(q, q, q, attn_mask=mask, backend=backend).backend == backend
    many_heads = one.expand(1, 70000, 1, 16)
    e = attnkern.explain(many_heads, many_heads, many_heads, backend=backend)
    assert e.backend == "none" and "at most 65535 query heads" in e.reason
