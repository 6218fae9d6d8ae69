"""The Triton kernels on packed variable-length batches (their VARLEN switch), under the interpreter.

Forward and every gradient against the float64 reference run one sequence at a time (tolerance rule,
test_varlen.check_against_reference), fp32 and fp16, on small mixed lengths with empty and 1-token
sequences, Lq != Lk per sequence, causal and window bands, GQA, softcap, per-sequence ALiBi and dropout;
the dropout mask read back bit for bit against the cpu kernels and the reference; one launch per kernel
over every sequence; the opt-in single pass, batch slices and kv-group parts on packed launches.
"""
import pytest
import torch

import attnkern
from attnkern.reference import reference_varlen_attention
from matrix import BACKEND_DTYPES
from test_varlen import _cu, check_against_reference

pytestmark = pytest.mark.skipif("triton" not in BACKEND_DTYPES, reason="the Triton backend does not run here")

RNG = torch.tensor([1234, (7 << 32) + 5678], dtype=torch.int64)  # an offset past 2^32: taken mod 2^32

# (name, query lengths, key lengths, Hq, Hkv, E, Ev, varlen_attention keywords)
CASES = [
    ("gqa_causal_empty_seqs", [1, 17, 0, 33, 5], [3, 17, 4, 20, 0], 4, 2, 16, 16, dict(causal=True)),
    ("window_ev24", [17, 1, 33], [17, 1, 33], 2, 2, 32, 24, dict(window=(5, 3))),
    ("cross_e40_mqa", [1, 33, 17], [17, 9, 40], 2, 1, 40, 40, {}),
    ("causal_window_softcap_alibi", [33, 17, 2], [20, 40, 2], 2, 2, 16, 16,
     dict(causal=True, window=(7, -1), softcap=5.0, alibi_slopes=torch.tensor([[0.5, 0.25], [0.1, 1.0], [2.0, 0.3]]))),
    ("dropout_gqa_causal", [1, 17, 33], [9, 17, 40], 4, 2, 16, 16, dict(causal=True, dropout_p=0.3, dropout_rng=RNG)),
]


def _inputs(case, dtype, seed):
    name, lq, lk, Hq, Hkv, E, Ev, kw = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, E, generator=gen).to(dtype)
    k = torch.randn(sum(lk), Hkv, E, generator=gen).to(dtype)
    v = torch.randn(sum(lk), Hkv, Ev, generator=gen).to(dtype)
    dout = torch.randn(sum(lq), Hq, Ev, generator=gen).to(dtype)
    dlse = torch.randn(Hq, sum(lq), generator=gen)
    return lq, lk, q, k, v, dout, dlse, kw


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_varlen_matches_reference(case, dtype):
    check_against_reference(*_inputs(case, dtype, seed=len(case[0])), dtype, "triton")


class _Launches:
    """Records the grid of every launch of the wrapped kernels: {name: [grid, ...]}."""

    def __init__(self, monkeypatch, module, names):
        self.grids = {n: [] for n in names}
        for n in names:
            monkeypatch.setattr(module, n, self._wrap(n, getattr(module, n)))

    def _wrap(self, name, kernel):
        grids = self.grids[name]

        class Wrapped:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    grids.append(grid(dict(kwargs, BLOCK_M=16, BLOCK_N=16)) if callable(grid) else grid)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Wrapped()


@pytest.mark.parametrize("single_pass", [False, True], ids=["two_pass", "single_pass"])
def test_triton_varlen_is_one_launch_per_kernel(monkeypatch, single_pass):
    """One launch of each kernel over every sequence: grid (tiles of the longest sequence, heads, B)."""
    import attnkern.triton.backward as bwd
    import attnkern.triton.forward as fwd

    if single_pass:
        monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")
    f = _Launches(monkeypatch, fwd, ["_attn_fwd_kernel"])
    names = ["_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_onepass_kernel"]
    b = _Launches(monkeypatch, bwd, names)
    lq, lk, q, k, v, dout, dlse, kw = _inputs(CASES[0], torch.float32, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnkern.varlen_attention(*leaves, _cu(lq), _cu(lk), max(lq), max(lk), enable_gqa=True, backend="triton",
                                    **kw)
    torch.autograd.grad((out * dout).sum(), leaves)
    B, Hq, Hkv = len(lq), q.shape[1], k.shape[1]
    assert f.grids["_attn_fwd_kernel"] == [(3, Hq, B)]  # 33 rows: 3 tiles of 16
    assert b.grids["_bwd_preprocess_kernel"] == [(1, Hq, 1)]  # every packed row in one problem
    if single_pass:
        assert b.grids["_attn_bwd_onepass_kernel"] == [(2, Hkv, B)] and not b.grids["_attn_bwd_dq_kernel"]
    else:
        assert b.grids["_attn_bwd_dkdv_kernel"] == [(2, Hkv, B)]  # 20 keys: 2 tiles of 16
        assert b.grids["_attn_bwd_dq_kernel"] == [(3, Hq, B)] and not b.grids["_attn_bwd_onepass_kernel"]


def test_triton_varlen_dropout_mask_bit_for_bit():
    """The kept scores of every sequence, head, row and key equal the cpu kernels' and the reference's
    (sequence b drawn as its own problem with offset + b). q = 0 makes every visible probability positive,
    V = identity rows (v_j = e_j) makes out[i, j] = P_ij Z_ij, and dO = identity rows makes
    dV[j, i] = P_ij Z_ij: a score is kept exactly where those entries are nonzero, in the forward and in
    the dK/dV kernel."""
    lq, lk, H = [1, 17, 9, 20], [9, 17, 20, 1], 2
    Tq, Tk, D = sum(lq), sum(lk), 20
    q, k = torch.zeros(Tq, H, 16), torch.randn(Tk, H, 16, generator=torch.Generator().manual_seed(0))
    eye = lambda lens: torch.cat([torch.eye(n, D) for n in lens]).unsqueeze(1).expand(-1, H, -1).contiguous()  # noqa
    v, dout = eye(lk), eye(lq)
    kw = dict(dropout_p=0.4, dropout_rng=RNG)

    def kept(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if backend == "reference":
            out, _ = reference_varlen_attention(*leaves, _cu(lq), _cu(lk), **kw)
        else:
            out = attnkern.varlen_attention(*leaves, _cu(lq), _cu(lk), max(lq), max(lk), backend=backend, **kw)
        dv = torch.autograd.grad((out * dout).sum(), leaves[2])[0]
        return out != 0, dv != 0

    out_t, dv_t = kept("triton")
    dropped = 1 - out_t.sum().item() / (H * sum(a * b for a, b in zip(lq, lk)))
    assert 0.25 < dropped < 0.55  # about p of them
    for backend in ("cpu", "reference"):
        out_o, dv_o = kept(backend)
        assert torch.equal(out_t, out_o), f"forward dropout mask differs from {backend}'s"
        assert torch.equal(dv_t, dv_o), f"dK/dV dropout mask differs from {backend}'s"


@pytest.mark.parametrize("deterministic", [False, True], ids=["single_pass", "two_pass"])
def test_triton_varlen_batch_slices_and_kv_parts(monkeypatch, deterministic):
    """Packed launches past grid axis 2's limit run in batch slices (each with its sequences' offsets,
    ALiBi rows and dropout streams); the dK/dV programs' kv-group split is summed as on padded problems."""
    import attnkern.triton.backward as bwd
    import attnkern.triton.common as tcommon

    monkeypatch.setattr(tcommon, "MAX_GRID_YZ", 2)  # 5 sequences: 3 slices
    monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")  # deterministic=True: the two-pass kernels
    monkeypatch.setattr(bwd, "kv_group_parts", lambda *args: 2)
    lq, lk = [1, 17, 0, 9, 5], [3, 9, 4, 17, 0]
    kw = dict(causal=True, alibi_slopes=torch.rand(5, 4, generator=torch.Generator().manual_seed(2)),
              dropout_p=0.2, dropout_rng=RNG)
    case = ("slices", lq, lk, 4, 2, 16, 16, kw)
    check_against_reference(*_inputs(case, torch.float32, seed=5), torch.float32, "triton", deterministic)


def test_triton_varlen_explain_and_declines():
    """explain_varlen shows triton taking a packed batch; a top-left band (only the raw ops can carry one:
    varlen_attention aligns bottom-right) is declined with the reason."""
    from attnkern import backends
    from attnkern.band import Band
    from attnkern.varlen import VarlenProblem

    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    with attnkern.use_backend("triton"):
        e = attnkern.explain_varlen(q, k, v, _cu([3, 5]), _cu([3, 5]), 5, 5, causal=True)
    assert e.backend == "triton" and "varlen" in e.problem and "two-pass" in e.backward
    top_left = VarlenProblem(q, k, v, _cu([3, 5]), _cu([3, 5]), 5, 5, 0.25, Band(False, -1, 0))
    assert "bottom-right" in backends.why_not("triton", top_left)
