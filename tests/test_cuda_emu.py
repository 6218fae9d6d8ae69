"""The SIMT emulator (backend "cuda-emu", csrc/cuda/emu) tested on itself, and what the shared case
matrix leaves out for the CUDA kernels.

- Deliberately broken kernels (csrc/cuda/emu/selftest.cu): each must be reported with the right check,
  naming the kernel, the block, the thread and the address.
- The warp GEMM helpers the kernels are built from (ldmatrix, ldmatrix.trans, mma.sync through the
  swizzled shared-memory tiles), against a plain matrix product, for every tile layout in use.
- The head dims the shared cases do not reach (160, 192; 256 with a mask), and the launch-limit check.
- The score-modification kernels (softcap, ALiBi, dropout) at those head dims, and over batch slices
  (the dropout mask and the ALiBi slopes of the whole batch, not of the slice).
The shared cases themselves run on "cuda-emu" through tests/matrix.py.
"""
import json
import re

import pytest
import torch

import attnkern
from attnkern.backends import cuda_emu
from attnkern.reference import reference_attention
from attnkern.tolerance import assert_all, check
from cases import Case, as_kwargs, grad_leaves, make_inputs, run_reference, upstream_grads

pytestmark = pytest.mark.skipif(cuda_emu.build_error() is not None, reason=f"cuda-emu: {cuda_emu.build_error()}")


@pytest.fixture(scope="module")
def emu():
    cuda_emu.load()
    return torch.ops.attnkern_emu


@pytest.mark.parametrize("which,pattern", [
    (0, r"shared-memory race: write-after-read hazard at shared offset 128 \(store\): thread 0 read it in the same "
        r"barrier interval \(no __syncthreads in between\)"),
    (1, r"read of shared offset \d+ \(load\) while a cp\.async into it is in flight .*not yet retired by "
        r"cp\.async\.wait_group"),
    (2, r"out-of-bounds shared write of 2 bytes at shared offset 2048 \(store; the launch has 2048 bytes"),
    (3, r"out-of-bounds global write of 4 bytes at 0x[0-9a-f]+ \(store\); nearest tensor: out .* 4 bytes past its end"),
    (4, r"deadlock: threads 0-31: waiting at __syncthreads; threads 32-127: exited"),
    (9, r"deadlock: threads 0-15: waiting at __shfl_xor_sync; threads 16-127: exited"),
    (11, r"shared-memory race: write-after-read hazard at shared offset 4 \(store\): thread 0 read it in the same "
         r"barrier interval \(same warp: no __syncwarp"),
], ids=["missing_syncthreads", "read_before_cp_async_wait", "store_past_shared_tile", "store_past_global",
        "divergent_barrier", "shuffle_missing_lanes", "warp_exchange_without_syncwarp"])
def test_broken_kernels_are_reported(emu, which, pattern):
    with pytest.raises(RuntimeError) as info:
        emu.run_broken_kernel(which)
    msg = str(info.value)
    assert re.search(pattern, msg), msg
    assert re.search(r"\[kernel (void )?attnkern::cuda::emu_(broken_|warp_exchange)", msg), msg
    assert "block (0,0,0)" in msg, msg
    if which not in (4, 9):
        assert re.search(r"thread \d+ \(warp \d+, lane \d+\)", msg), msg


def test_a_reported_launch_leaves_no_stale_state(emu):
    """A launch that fails mid-block, after 16 barriers, leaves no race records behind: a correct
    kernel that reaches the same shared bytes after 15 barriers runs clean, and so do the kernels."""
    with pytest.raises(RuntimeError, match=r"write-after-read hazard at shared offset \d+ \(store\)"):
        emu.run_broken_kernel(12)
    emu.run_broken_kernel(13)
    _check_against_reference(64, 64, False, None, torch.float16, L=200, S=450)


def test_warp_exchange_after_syncwarp_is_no_race(emu):
    """__syncwarp orders shared memory between the lanes of a warp (the CUDA memory model): no report."""
    emu.run_broken_kernel(10)


@pytest.mark.parametrize("hd", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_warp_gemm_matches_a_plain_matrix_product(emu, hd, dtype):
    gen = torch.Generator().manual_seed(hd)
    q, k, v = (torch.randn(64, hd, generator=gen).to(dtype) for _ in range(3))
    s, o, o_split = emu.warp_gemm_check(q, k, v)
    s_ref = q.double() @ k.double().T
    # fp32 accumulation of exact products: within a few fp32 ulps of the row's magnitude
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=1e-5 * hd)
    p = s.to(dtype).double()  # the kernels round P to the input type for the second product
    o_ref = p @ v.double()
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=1e-4 * hd)
    assert torch.equal(o_split, o), "the column-split product must give the same bits"


# Head dims the shared cases do not reach, each with a gradient (E=136 -> 160, 184 -> 192; 256 with a
# float mask takes the masked dK/dV configuration, split across two CTAs).
@pytest.mark.parametrize("E,Ev,causal,mask", [
    (136, 136, False, None),
    (184, 120, "bottom_right", "float"),
    (256, 256, "top_left", "float"),
    (160, 192, False, "bool"),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_head_dims(E, Ev, causal, mask, dtype):
    _check_against_reference(E, Ev, causal, mask, dtype, L=17, S=40)


# The score-modification kernels (the mods_hdim* units) at the head dims the shared cases do not reach,
# each with every modification it can take there and a mask gradient or a band.
MODS_CASES = [
    Case("mods_e136_mask_grad", L=17, S=40, E=136, softcap=2.0, alibi="h", dropout=0.2, mask="float_grad"),
    Case("mods_e184_ev120_br", L=17, S=40, E=184, Ev=120, B=2, causal="bottom_right", alibi="bh", dropout=0.3),
    Case("mods_e256_window_bool", L=17, S=40, E=256, window=(5, 3), softcap=1.0, dropout=0.1, mask="bool",
         mask_dims="bs"),
]


@pytest.mark.parametrize("case", MODS_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_score_mods_at_large_head_dims(case, dtype):
    _check_case(case, dtype)


def test_score_mods_over_batch_slices(monkeypatch):
    """Batches past grid z run as several launches over batch slices: each draws the dropout mask of its
    own batches and reads their ALiBi slopes (the emulator's launch check holds grid z to 3 here)."""
    monkeypatch.setenv("ATTNKERN_EMU_MAX_GRID_YZ", "3")
    case = Case("mods_batch_slices", L=9, S=20, E=16, B=5, Hq=3, Hkv=1, causal="bottom_right", softcap=1.5,
                alibi="bh", dropout=0.4, mask="float_grad", mask_dims="bhls")
    _check_case(case, torch.float16)


def test_gqa_group_split_rule(emu):
    """The dK/dV pass splits a kv head's query-head group over CTAs when B·Hkv key blocks of 64 leave SMs
    idle (the emulated device has 8): the fewest parts dividing the group that fill it, or the whole
    group, and no more than grid y holds."""
    assert emu.kv_group_parts(1, 1, 4, 70) == 4  # 2 key blocks -> 8 CTAs
    assert emu.kv_group_parts(1, 2, 8, 130) == 2  # 6 -> 12
    assert emu.kv_group_parts(1, 1, 6, 64) == 6  # 1 -> 6: still short, the whole group
    assert emu.kv_group_parts(2, 2, 2, 130) == 1  # 12 CTAs: no split
    assert emu.kv_group_parts(1, 4, 1, 64) == 1  # no group to split
    assert emu.kv_group_parts(1, 1, 4, 0) == 1  # no keys


def test_gqa_group_split_respects_the_grid_limit(emu, monkeypatch):
    monkeypatch.setenv("ATTNKERN_EMU_MAX_GRID_YZ", "3")
    assert emu.kv_group_parts(1, 1, 6, 64) == 3  # 6 parts would need grid y = 6
    assert emu.kv_group_parts(1, 2, 4, 64) == 1  # 2 parts: grid y = 4


# GQA/MQA backward with and without the group split (parts from the rule above, asserted per case): each
# against the reference, and bitwise equal over two runs (the parts are summed in a fixed order).
SPLIT_CASES = [
    (Case("mqa_split4", L=17, S=70, E=32, Hq=4, Hkv=1, causal="bottom_right"), 4),
    (Case("gqa_8_2_split2", L=33, S=130, E=64, Hq=8, Hkv=2), 2),
    (Case("gqa_no_split", L=17, S=130, E=32, B=2, Hq=4, Hkv=2), 1),
    (Case("mqa_split_mods_window", L=17, S=70, E=40, Hq=4, Hkv=1, window=(8, 3), softcap=1.5, dropout=0.2,
          mask="float_grad"), 4),
    (Case("mqa_split_e256_bool", L=17, S=40, E=256, Hq=2, Hkv=1, mask="bool"), 2),  # column split too
]


@pytest.mark.parametrize("case,parts", SPLIT_CASES, ids=[c.name for c, _ in SPLIT_CASES])
def test_gqa_group_split(emu, case, parts):
    assert emu.kv_group_parts(case.B, case.Hkv, case.Hq // case.Hkv, case.S) == parts
    _check_case(case, torch.float16)
    q, k, v, mask = make_inputs(case, torch.float16, "cpu", seed=3)

    def grads():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        m = mask.detach().requires_grad_(mask.requires_grad) if mask is not None else None
        out, _ = attnkern.attention(q_, k_, v_, attn_mask=m, backend="cuda-emu", **as_kwargs(case, "cpu"))
        return torch.autograd.grad(out, grad_leaves(q_, k_, v_, m), torch.ones_like(out))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def _check_case(case, dtype):
    """`case` on cuda-emu against the float64 reference (test_correctness.py's check)."""
    q, k, v, mask = make_inputs(case, dtype, "cpu", seed=len(case.name) + case.E)
    out, lse = attnkern.attention(q, k, v, attn_mask=mask, backend="cuda-emu", **as_kwargs(case, "cpu"))
    do, dlse = upstream_grads(out, lse)
    torch.autograd.backward([out, lse], [do, dlse])
    grads = [t.grad for t in grad_leaves(q, k, v, mask)]
    out64, lse64, g64 = run_reference(q, k, v, mask, case, torch.float64, do, dlse)
    out_lp, lse_lp, glp = run_reference(q, k, v, mask, case, dtype, do, dlse)
    names = ["dq", "dk", "dv", "dmask"]
    assert_all([check("out", out, out64, out_lp, dtype), check("lse", lse, lse64, lse_lp, dtype),
                *[check(n, a, b, c, dtype, factor=3.0) for n, a, b, c in zip(names, grads, g64, glp)]])


# Long loops: every pipelined kernel cycles its two shared-memory stages more than once (the forward's
# 128-key tiles, the dQ pass's 64-key tiles, the dK/dV pass's 64-row query tiles), so a missing
# barrier before a stage is refilled shows up as a race.
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_long_loops_cycle_both_pipeline_stages(causal):
    _check_against_reference(64, 64, causal, None, torch.float16, L=200, S=450)


def _check_against_reference(E, Ev, causal, mask, dtype, L, S):
    gen = torch.Generator().manual_seed(E + Ev + L)
    q = torch.randn(1, 2, L, E, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(1, 2, S, E, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(1, 2, S, Ev, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    m = None
    if mask == "float":
        m = torch.randn(L, S, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    elif mask == "bool":
        m = torch.rand(L, S, generator=gen) > 0.3
        m[:, 0] = True
    out, lse = attnkern.attention(q, k, v, attn_mask=m, causal=causal, backend="cuda-emu")
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [q, k, v] + ([m] if m is not None and m.requires_grad else [])
    grads = torch.autograd.grad(out, leaves, do)

    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in leaves]
        mm = ls[3] if len(ls) == 4 else m
        r, rl = reference_attention(ls[0], ls[1], ls[2], mm, causal=causal)
        return r, rl, torch.autograd.grad(r, ls, do.to(dt))

    out64, lse64, g64 = ref(torch.float64)
    out_lp, lse_lp, glp = ref(dtype)
    names = ["dq", "dk", "dv", "dmask"]
    assert_all([check("out", out, out64, out_lp, dtype), check("lse", lse, lse64, lse_lp, dtype),
                *[check(n, a, b, c, dtype, factor=3.0) for n, a, b, c in zip(names, grads, g64, glp)]])


@pytest.mark.parametrize("which,archs,pattern", [
    (5, "80;90", None),
    (5, "80;86;90", r"emu_noop.* needs 122880 bytes of dynamic shared memory; sm_86 allows at most 101376"),
    (6, "80;90", r"65536 bytes of dynamic shared memory \(over 48 KB\) without cudaFuncSetAttribute"),
    (7, "80;90", r"grid 1x1x65536 outside the limits"),
    (8, "80;90", r"2048 threads per block .* at most 1024"),
], ids=["smem_120k_sm80_sm90", "smem_120k_sm86", "smem_64k_no_optin", "grid_z", "block_2048"])
def test_launch_limits(emu, monkeypatch, which, archs, pattern):
    monkeypatch.setenv("ATTNKERN_EMU_ARCHS", archs)
    if pattern is None:
        emu.run_broken_kernel(which)
        return
    with pytest.raises(RuntimeError, match=pattern):
        emu.run_broken_kernel(which)


def test_shared_memory_attribute_is_set_once_per_kernel(emu):
    """cudaFuncSetAttribute is a driver call: the launchers set it once per (device, kernel)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 40, 128, generator=gen).half().requires_grad_() for _ in range(3))

    def calls():
        out, _ = attnkern.attention(q, k, v, backend="cuda-emu")
        out.sum().backward()
        return emu.attribute_calls()

    calls()  # head dim 128: the dQ pass takes 64 KB, over the 48 KB default
    first = emu.attribute_calls()
    assert calls() == first


def test_lowered_grid_limit_is_enforced(emu, monkeypatch):
    """ATTNKERN_EMU_MAX_GRID_YZ lowers the launch check's y/z limit (tests/test_grid_limits.py uses it)."""
    monkeypatch.setenv("ATTNKERN_EMU_MAX_GRID_YZ", "1")
    with pytest.raises(RuntimeError, match=r"grid 1x1x65536 outside the limits .*y and z in \[1, 1\]"):
        emu.run_broken_kernel(7)


def test_explain_and_list_providers_know_cuda_emu():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    e = attnkern.explain(q, q, q, backend="cuda-emu")
    assert e.backend == "cuda-emu"
    assert attnkern.explain(q.cuda() if torch.cuda.is_available() else q, q, q).backend != "cuda-emu"
    e = attnkern.explain(q.float(), q.float(), q.float(), backend="cuda-emu")
    assert e.backend == "none" and "float16 and bfloat16" in e.reason
    # The score modifications run on the CUDA kernels (no decline).
    slopes = torch.tensor([0.5, 0.25])
    e = attnkern.explain(q, q, q, dropout_p=0.1, softcap=5.0, alibi_slopes=slopes, backend="cuda-emu")
    assert e.backend == "cuda-emu", e.reason
    from attnkern.tools.bench.providers import by_name

    assert "attnkern:cuda-emu" in by_name()


def test_main_loop_figures_counted_on_the_emulation(emu):
    """compile-report's CUDA main-loop figures: what the kernels execute on the emulator. In the benchmark
    grid's problems (fp16, E = 64 and 128, no mask) the forward, dK/dV and dQ duplicate no product, take
    each exp once (the forward's row rescale adds 6-12.5%), and stream their tiles with cp.async only."""
    from attnkern.tools import compile_report, cuda_counts

    recs, note = cuda_counts.cuda_loop_records(compile_report._cuda_compile_check().short_kernel_name)
    assert note == "" and compile_report.failures(compile_report.violations(recs)) == []
    grid = {(r.kernel, r.problem.split()[1]): r for r in recs if r.in_grid}
    assert sorted(grid) == sorted((f"attention_{k}_kernel", f"E={e}") for k in ("fwd", "bwd_dkdv", "bwd_dq")
                                  for e in (64, 128))
    for r in grid.values():
        assert r.mma_efficiency == 1.0 and 1.0 <= r.exp_per_score < 1.13 and r.async_kv, r
    # The forward's warps own 32 query rows (two m16 tiles share each K and V fragment): 5 ldmatrix.x4 per
    # 16 MMAs at E = 64 (FlashAttention-2: 0.31), 6 at E = 128, whose 32-key tiles (registers) rescale the
    # rows every 32 keys (4 exps per row and tile, one per thread of the quad: 1.125 per score).
    fwd64, fwd128 = (grid[("attention_fwd_kernel", f"E={e}")] for e in (64, 128))
    assert (fwd64.smem_loads_per_mma, fwd128.smem_loads_per_mma) == (0.312, 0.375)
    assert (fwd64.exp_per_score, fwd128.exp_per_score) == (1.062, 1.125)
    # dQ's warps too at E = 64 (10 loads per 24 MMAs); at E = 128 only with a user mask (below).
    assert grid[("attention_bwd_dq_kernel", "E=64")].smem_loads_per_mma == 0.417
    # A user mask that changes every tile is read element by element from global memory: 1 byte per score
    # (bool) in the forward, plus its block map's flags (one byte per lane and key tile).
    masked = {(r.kernel, r.problem.split()[-1]): r for r in recs if "mask" in r.problem}
    assert 1.0 < masked[("attention_fwd_kernel[mask]", "bool-mask")].sync_bytes_per_score < 1.05
    assert masked[("attention_bwd_dq_kernel[mask]", "bool-mask")].smem_loads_per_mma == 0.417
    # Masked kernels at E = 128 (dK/dV on 16-row query tiles, without the column split) duplicate nothing
    # either (the masked forward's 32-key tiles rescale its rows twice as often: 1.12 exps per score);
    # above 128 dK/dV's column split recomputes S and dP (KNOWN).
    assert len(masked) == 7 and all(r.mma_efficiency == 1.0 and r.exp_per_score < 1.13 for r in masked.values())
    (split,) = [r for r in recs if r.kernel == "attention_bwd_dkdv_kernel" and "E=256" in r.problem]
    assert (split.mma_efficiency, split.exp_per_score) == (1.5, 2.0)


def _forward_counts(emu, q, k, v, mask, mask_map):
    B, H, L, E = q.shape
    out, lse, stats = torch.empty_like(q), torch.empty(B, H, L), torch.empty(B, H, L, 2)
    emu.reset_kernel_counts()
    emu.forward(q, k, v, mask, 0.125, [0, -1, -1], 0.0, None, 0.0, None, out, lse, stats, None, mask_map)
    (counts,) = json.loads(emu.kernel_counts()).values()
    return (out, lse, stats), counts


@pytest.mark.parametrize("E", [64, 128])
def test_block_map_skips_hidden_tiles_and_unchanged_mask_reads(emu, E):
    """The forward, dQ and dK/dV with the mask's block map: tiles a bool mask hides whole are neither
    loaded nor computed, tiles the mask leaves unchanged are not read; the results are bitwise
    those of the element-by-element path (the hidden tiles' scores are -inf: P = 0, statistics unchanged)."""
    from attnkern import block_map

    g = torch.Generator().manual_seed(5)
    B, H, L, S = 2, 2, 70, 300
    q, k, v = (torch.randn(B, H, n, E, generator=g, dtype=torch.float16) for n in (L, S, S))
    pad = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    pad[0, ..., :90] = True  # batch 0 sees 90 keys, batch 1 all of them but the last 7
    pad[1, ..., : S - 7] = True
    bias = torch.randn(1, H, L, S, generator=g, dtype=torch.float16)
    bias[..., 128:] = 0  # unchanged from key 128 on: no reads there
    dout = torch.randn(B, H, L, E, generator=g, dtype=torch.float16)
    for mask in (pad.expand(B, 1, L, S), bias):
        flags = block_map.block_map(mask, L, S).flags
        plain, c_plain = _forward_counts(emu, q, k, v, mask, None)
        mapped, c_map = _forward_counts(emu, q, k, v, mask, flags)
        for a, b in zip(plain, mapped):
            assert torch.equal(a, b)
        # dQ and dK/dV read the map too: the same gradients, fewer products where tiles hide, fewer mask
        # reads where tiles are unchanged.
        grads = []
        for mask_map in (None, flags):
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            emu.reset_kernel_counts()
            emu.backward(dout, None, q, k, v, mask, plain[0], None, plain[2], 0.125, [0, -1, -1], 0.0, None, 0.0, None,
                         dq, dk, dv, None, mask_map)
            counts = json.loads(emu.kernel_counts())
            grads.append(((dq, dk, dv), [next(c for n, c in counts.items() if f"bwd_{kernel}_kernel" in n)
                                         for kernel in ("dq", "dkdv")]))
        for a, b in zip(grads[0][0], grads[1][0]):
            assert torch.equal(a, b)
        for bwd_plain, bwd_map in zip(grads[0][1], grads[1][1]):
            assert (bwd_map["mma"] < bwd_plain["mma"]) == (mask.dtype == torch.bool)
            assert bwd_map["sync_load_bytes"]["attn_mask"] < bwd_plain["sync_load_bytes"]["attn_mask"]
        if mask.dtype == torch.bool:  # dK/dV's hidden query tiles are not loaded either
            dkdv_plain, dkdv_map = grads[0][1][1], grads[1][1][1]
            assert dkdv_map["async_load_bytes"]["query"] < dkdv_plain["async_load_bytes"]["query"]
        read, read_plain = c_map["sync_load_bytes"]["attn_mask"], c_plain["sync_load_bytes"]["attn_mask"]
        if mask.dtype == torch.bool:
            # Batch 0's blocks skip the key tiles past key 90: fewer products and fewer K bytes loaded;
            # only the tiles that cross key 90 (batch 0) or key 293 (batch 1) read the mask.
            assert c_map["mma"] < c_plain["mma"] and c_map["async_load_bytes"]["key"] < c_plain["async_load_bytes"]["key"]
        else:  # a float mask hides nothing: every tile is computed, the zero ones without reads
            assert c_map["mma"] == c_plain["mma"]
        assert 0 < read < read_plain
    # Through the op (the backend builds and caches the map) against the float64 reference.
    ref64 = attnkern.attention(q.double(), k.double(), v.double(), attn_mask=pad, scale=0.125, backend="reference")
    ref_lp = attnkern.attention(q, k, v, attn_mask=pad, scale=0.125, backend="reference")
    out = attnkern.attention(q, k, v, attn_mask=pad, scale=0.125, backend="cuda-emu")
    assert_all([check(n, x, r, lp, torch.float16, 2.0) for n, x, r, lp in zip(("out", "lse"), out, ref64, ref_lp)])


def test_block_map_over_batch_slices(emu, monkeypatch):
    """Launches over batch slices (grid z limited to 2 here) read each slice's own rows of the block map:
    per-batch padding masks give the same outputs and gradients as without the map, and the reference's."""
    from attnkern import block_map

    monkeypatch.setenv("ATTNKERN_EMU_MAX_GRID_YZ", "2")
    g = torch.Generator().manual_seed(9)
    B, H, L, S, E = 5, 1, 40, 160, 32
    q, k, v, dout = (torch.randn(B, H, n, E, generator=g, dtype=torch.float16) for n in (L, S, S, L))
    pad = torch.zeros(B, 1, L, S, dtype=torch.bool)
    for b, n in enumerate((160, 20, 150, 33, 64)):
        pad[b, ..., :n] = True
    flags = block_map.block_map(pad, L, S).flags
    runs = []
    for mask_map in (None, flags):
        out, lse, stats = torch.empty_like(q), torch.empty(B, H, L), torch.empty(B, H, L, 2)
        emu.forward(q, k, v, pad, 0.2, [0, -1, -1], 0.0, None, 0.0, None, out, lse, stats, None, mask_map)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        emu.backward(dout, None, q, k, v, pad, out, None, stats, 0.2, [0, -1, -1], 0.0, None, 0.0, None, dq, dk, dv,
                     None, mask_map)
        runs.append((out, lse, dq, dk, dv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref64 = attnkern.attention(q.double(), k.double(), v.double(), attn_mask=pad, scale=0.2, backend="reference")
    ref_lp = attnkern.attention(q, k, v, attn_mask=pad, scale=0.2, backend="reference")
    assert_all([check(n, x, r, lp, torch.float16, 2.0) for n, x, r, lp in zip(("out", "lse"), runs[1][:2], ref64, ref_lp)])
