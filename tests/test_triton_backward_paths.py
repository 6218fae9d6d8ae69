"""The Triton backward's two paths and what chooses between them.

The default is the two-pass dK/dV + dQ kernels (no atomics, bitwise reproducible), which the shared
case matrix runs. The single-pass kernel (dK, dV and dQ in one sweep over the query tiles, dQ summed with
float32 atomics) is opted into with ATTNKERN_SINGLE_PASS=1 (its compile report still shows spills and
synchronous loads: it becomes the default once a GPU measurement says so); the tests here run with it set
(the `single_pass` fixture), except the one that pins the default. With it set, the two-pass kernels are
still chosen by `attention(..., deterministic=True)` or by torch.use_deterministic_algorithms(True) at the
time the backward runs; the SDPA entry points have no such argument, so there only torch's switch applies.
Which kernels launch is recorded by wrapping them.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import ops
from attnkern.tolerance import assert_all, check
from cases import as_kwargs, case_by_name, grad_leaves, make_inputs, run_reference, upstream_grads
from matrix import BACKEND_DTYPES, DEVICE

TRITON_DTYPES = BACKEND_DTYPES.get("triton", ())
pytestmark = pytest.mark.skipif(not TRITON_DTYPES, reason="the Triton backend does not run here")

ONEPASS, TWOPASS = ["onepass"], ["dkdv", "dq"]
KERNELS = {"onepass": "_attn_bwd_onepass_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


@pytest.fixture(autouse=True)
def single_pass(monkeypatch):
    """The single pass opted into (config.SINGLE_PASS_ENV), read when each backward runs."""
    monkeypatch.setenv("ATTNKERN_SINGLE_PASS", "1")


def test_the_default_is_the_two_pass_backward(monkeypatch, launches):
    monkeypatch.delenv("ATTNKERN_SINGLE_PASS")
    _backward(*_problem())
    assert launches == TWOPASS
    assert "two-pass" in attnkern.explain(*_problem()[:3], enable_gqa=True, backend="triton").backward


@pytest.fixture
def launches(monkeypatch):
    """The names of the backward kernels launched during the test, in order."""
    import attnkern.triton.backward as bwd

    seen = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            seen.append(self.name)
            return self.kernel[grid]

    for name, attr in KERNELS.items():
        monkeypatch.setattr(bwd, attr, Recorded(name, getattr(bwd, attr)))
    return seen


@contextlib.contextmanager
def torch_deterministic(warn_only=False):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, 23, 16), (1, 2, 19, 16), (1, 2, 19, 16)]  # GQA 4:2, Lq != Lk
    return [torch.randn(*s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]


def _backward(q, k, v, **kw):
    out = attnkern.attention(q, k, v, enable_gqa=True, causal="bottom_right", return_lse=False, backend="triton",
                             **kw)
    out.backward(torch.ones_like(out))


def test_opted_in_backward_is_the_single_pass(launches):
    _backward(*_problem())
    assert launches == ONEPASS


def test_deterministic_argument_selects_the_two_pass_backward(launches):
    _backward(*_problem(), deterministic=True)
    assert launches == TWOPASS
    launches.clear()
    _backward(*_problem(), deterministic=False)
    assert launches == ONEPASS


@pytest.mark.parametrize("warn_only", [False, True])
def test_torch_switch_selects_the_two_pass_backward(launches, warn_only):
    with torch_deterministic(warn_only):
        _backward(*_problem())
    assert launches == TWOPASS


def test_torch_switch_is_read_when_the_backward_runs(launches):
    q, k, v = _problem()
    out = attnkern.attention(q, k, v, enable_gqa=True, return_lse=False, backend="triton")
    with torch_deterministic():
        out.backward(torch.ones_like(out))
    assert launches == TWOPASS
    launches.clear()
    with torch_deterministic():
        out = attnkern.attention(q, k, v, enable_gqa=True, return_lse=False, backend="triton")
    out.backward(torch.ones_like(out))
    assert launches == ONEPASS


def test_sdpa_entry_points_follow_the_torch_switch(launches, sdpa_unpatched):
    q, k, v = _problem()
    with attnkern.use_backend("triton"):
        attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()
        assert launches == ONEPASS
        with torch_deterministic():
            attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()
        assert launches == ONEPASS + TWOPASS
    launches.clear()
    with attnkern.replace_sdpa(backend="triton"), torch_deterministic():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward()
    assert launches == TWOPASS


def test_explain_names_the_backward():
    q, k, v = _problem()
    assert "single-pass" in attnkern.explain(q, k, v, enable_gqa=True, backend="triton").backward
    assert "two-pass" in attnkern.explain(q, k, v, enable_gqa=True, backend="triton", deterministic=True).backward
    with torch_deterministic():
        e = attnkern.explain(q, k, v, enable_gqa=True, backend="triton")
    assert "two-pass" in e.backward and "backward: two-pass" in str(e)
    assert "bitwise reproducible" in attnkern.explain(q, k, v, enable_gqa=True, backend="reference").backward


def test_deterministic_must_be_a_bool():
    q, k, v = _problem()
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        attnkern.attention(q, k, v, enable_gqa=True, deterministic=1)
    out, lse, stats, out_lo = ops.attention_forward(q.detach(), k.detach(), v.detach(), None, 0.25, [1, -1, -1],
                                                    0.0, None, 0.0, None, "triton", False)
    with pytest.raises((TypeError, RuntimeError), match="deterministic"):  # the op schema's own check
        ops.attention_backward(out, None, q.detach(), k.detach(), v.detach(), None, out, out_lo, stats, 0.25,
                               [1, -1, -1], 0.0, None, 0.0, None, False, "triton", "yes")


# A slice of the shared cases for the two-pass path (the single pass runs them all in
# test_correctness.py): each mask kind with and without a gradient, both causal alignments, GQA and MQA,
# Lq != Lk both ways, lengths 1 to 203, fully masked rows, Ev != E.
DETERMINISTIC_CASES = [
    "L1_S17_causal", "L17_S1_br", "L113_S203_e32_causal_tl", "L203_S17_e16_br", "e96_ev16_causal",
    "gqa_4_1_causal", "gqa_4_2_mask_float_grad", "mask_bool_rows_masked", "mask_float_rows_masked",
    "mask_grad_row_bias",
]


def _run_case(case, dtype, runs=1, **kw):
    """`runs` forward+backward runs of `case` on Triton: the inputs and, per run, [out, lse, *grads]."""
    q, k, v, mask = make_inputs(case, dtype, DEVICE, seed=7)
    results = []
    for _ in range(runs):
        out, lse = attnkern.attention(q, k, v, attn_mask=mask, backend="triton", **as_kwargs(case, q.device), **kw)
        do, dlse = upstream_grads(out, lse)
        torch.autograd.backward([out, lse], [do, dlse])
        results.append([out.detach(), lse.detach()] + [t.grad.clone() for t in grad_leaves(q, k, v, mask)])
        for t in grad_leaves(q, k, v, mask):
            t.grad = None
    return (q, k, v, mask, do, dlse), results


def _assert_matches_reference(case, dtype, inputs, result):
    q, k, v, mask, do, dlse = inputs
    out, lse, *grads = result
    out64, lse64, grads64 = run_reference(q, k, v, mask, case, torch.float64, do, dlse)
    out_lp, lse_lp, grads_lp = run_reference(q, k, v, mask, case, dtype, do, dlse)
    assert_all([
        check("out", out, out64, out_lp, dtype),
        check("lse", lse, lse64, lse_lp, dtype),
        *[check(n, g, g64, glp, dtype, factor=3.0)
          for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)],
    ])


@pytest.mark.parametrize("name", DETERMINISTIC_CASES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_deterministic_path_matches_reference_and_repeats_bitwise(launches, dtype, name):
    case = case_by_name(name)
    inputs, runs = _run_case(case, dtype, runs=2, deterministic=True)
    assert launches == TWOPASS * 2
    _assert_matches_reference(case, dtype, inputs, runs[0])
    for n, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], *runs):
        assert torch.equal(a, b), f"{n} differs between two deterministic runs"


def test_kv_group_parts_fill_the_sms(monkeypatch):
    """GQA/MQA dK/dV programs split a kv head's query-head group only when the grid would leave SMs
    idle, into the fewest parts (a divisor of the group) that fill them."""
    import attnkern.triton.backward as bwd

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(bwd, "_sm_count", lambda device: 132 if device.type == "cuda" else 0)
    assert bwd.kv_group_parts(1, 1, 32, 4096, 64, cuda) == 4  # MQA: 64 programs -> 256
    assert bwd.kv_group_parts(1, 1, 6, 4096, 64, cuda) == 3  # 64 -> 192 (2 parts: 128 < 132)
    assert bwd.kv_group_parts(1, 1, 3, 1000, 128, cuda) == 3  # 8 -> 24: still short, the whole group
    assert bwd.kv_group_parts(8, 8, 4, 4096, 64, cuda) == 1  # 4096 programs: no split
    assert bwd.kv_group_parts(1, 4, 1, 128, 64, cuda) == 1  # no group to split
    assert bwd.kv_group_parts(1, 1, 8, 4096, 64, cpu) == 1  # the interpreter: no SMs to fill


# (case, parts): the group of 4, 3 or 2 query heads per kv head split into `parts`.
SPLIT_CASES = [("gqa_4_1_causal", 2), ("gqa_6_2_e96", 3), ("gqa_4_2_mask_float_grad", 2)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("name, parts", SPLIT_CASES, ids=[n for n, _ in SPLIT_CASES])
def test_kv_group_split_matches_reference(monkeypatch, launches, name, parts, deterministic):
    import attnkern.triton.backward as bwd

    split = []
    monkeypatch.setattr(bwd, "kv_group_parts", lambda *args: split.append(parts) or parts)
    case = case_by_name(name)
    dtype = TRITON_DTYPES[0]
    inputs, runs = _run_case(case, dtype, runs=1 + deterministic, deterministic=deterministic)
    assert launches == (TWOPASS if deterministic else ONEPASS) * len(runs) and split == [parts] * len(runs)
    _assert_matches_reference(case, dtype, inputs, runs[0])
    if deterministic:  # the parts are summed in a fixed order
        for n, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], *runs):
            assert torch.equal(a, b), f"{n} differs between two deterministic runs"


# Soft-capping, ALiBi and dropout (score_mods.py) on both paths: the default two-pass path runs every
# shared mods case in test_correctness.py; the single pass is opt-in, so its mods coverage is here.
MODS_CASES = ["softcap_mask_grad_gqa", "alibi_bh_window_keypad", "alibi_Lq_gt_Lk", "dropout_mqa_br_mask_grad",
              "dropout_masked_rows", "all_mods_e128"]


# Every case in the first dtype (float32), three in the second (float16) too.
MODS_RUNS = [(n, TRITON_DTYPES[0]) for n in MODS_CASES] + [
    (n, d) for n in ("softcap_mask_grad_gqa", "dropout_mqa_br_mask_grad", "all_mods_e128") for d in TRITON_DTYPES[1:2]]


@pytest.mark.parametrize("deterministic", [False, True], ids=["single_pass", "two_pass"])
@pytest.mark.parametrize("name, dtype", MODS_RUNS, ids=[f"{n}-{str(d).replace('torch.', '')}" for n, d in MODS_RUNS])
def test_both_paths_compute_score_mods(launches, name, dtype, deterministic):
    case = case_by_name(name)
    inputs, runs = _run_case(case, dtype, runs=1 + deterministic, deterministic=deterministic)
    assert launches == (TWOPASS if deterministic else ONEPASS) * len(runs)
    _assert_matches_reference(case, dtype, inputs, runs[0])
    if deterministic:  # the dropout mask is regenerated identically: bitwise repeatable
        for n, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], *runs):
            assert torch.equal(a, b), f"{n} differs between two deterministic runs"
