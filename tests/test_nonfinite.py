"""NaN and Inf in the inputs propagate as in torch's math path, on every backend, forward and backward.

Ground truth is torch's math SDPA in float64 on the same (rounded) inputs: NaN and ±Inf must sit in
exactly the same places of the output and of every gradient, and the finite values must pass the
tolerance rule. A row whose scores hold NaN or +inf (a NaN or ±Inf in its query, a key or its mask
row) is NaN throughout, and so, through that row's probabilities, are dK and dV; a NaN value spreads
through its column. The C++ CPU kernels once dropped them (a clamp in their exponential turned NaN
into 2^-126, and a row max that ignored NaN made a NaN query row look fully masked).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkern
from attnkern.reference import reference_attention
from attnkern.tolerance import check
from matrix import DEVICE, pair_id, pairs

# numpy (under the Triton interpreter) warns about the NaN it is asked to compute.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
B, H, L, S, E = 1, 2, 7, 9, 16
ROW, KEY = 2, 4  # the query row and the key that receive the non-finite value


def _poison(name, value):
    """Set one element: a query row, a key, a value or a float-mask entry."""
    def apply(q, k, v, mask):
        if name == "q":
            q[0, 1, ROW, 3] = value
        elif name == "k":
            k[0, 1, KEY, 5] = value
        elif name == "v":
            v[0, 1, KEY, 5] = value
        else:
            mask[ROW, KEY] = value
    return apply


SCENARIOS = {
    "nan_in_one_query_row": ("q", NAN),
    "nan_in_one_key": ("k", NAN),
    "nan_in_one_value": ("v", NAN),
    "pos_inf_in_query": ("q", INF),
    "neg_inf_in_query": ("q", -INF),
    "pos_inf_in_key": ("k", INF),
    "neg_inf_in_key": ("k", -INF),
    "nan_in_float_mask": ("mask", NAN),
    "pos_inf_in_float_mask": ("mask", INF),
    "neg_inf_in_float_mask": ("mask", -INF),
}


def _inputs(scenario, dtype):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, S, E, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, S, E, generator=gen, dtype=torch.float64)
    mask = torch.randn(L, S, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    where, value = SCENARIOS[scenario]
    _poison(where, value)(q, k, v, mask)
    # Round to the dtype first, so that every path sees the same numbers.
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, mask, do)]


def _torch_math(q, k, v, mask, do):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
    out.backward(do.double())
    return out.detach(), [t.grad for t in leaves]


def _reference(q, k, v, mask, do, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, mask)]
    out, lse = reference_attention(*leaves[:3], leaves[3])
    out.backward(do.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _compare(name, x, ref64, ref_lp, dtype, factor):
    """Non-finite values in the same places (NaN where torch has NaN, ±Inf where it has ±Inf), finite
    values by the tolerance rule."""
    x, ref64, ref_lp = (t.detach().double().cpu() for t in (x, ref64, ref_lp))
    if not torch.equal(torch.isnan(x), torch.isnan(ref64)):
        diff = torch.nonzero(torch.isnan(x) != torch.isnan(ref64))
        return (f"{name}: NaN at {int(torch.isnan(x).sum())} places, torch has {int(torch.isnan(ref64).sum())} "
                f"(first difference at {tuple(diff[0].tolist())})")
    inf = torch.isinf(ref64)
    if not torch.equal(torch.isinf(x), inf) or not torch.equal(x[inf], ref64[inf]):
        return f"{name}: infinities differ from torch's"
    finite = torch.isfinite(ref64) & torch.isfinite(ref_lp)
    return check(name, x[finite], ref64[finite], ref_lp[finite], dtype, factor)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_nonfinite_inputs_propagate_like_torch_math(pair, scenario):
    backend, dtype = pair
    q, k, v, mask, do = _inputs(scenario, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, mask)]
    out, lse = attnkern.attention(*leaves[:3], attn_mask=leaves[3], backend=backend)
    out.backward(do)
    grads = [t.grad for t in leaves]

    out64, grads64 = _torch_math(q, k, v, mask, do)
    _, lse64, _ = _reference(q, k, v, mask, do, torch.float64)
    out_lp, lse_lp, grads_lp = _reference(q, k, v, mask, do, dtype)
    # Every scenario but the -inf mask entry (an ordinary masked key) makes some of torch's output NaN.
    assert torch.isfinite(out64).all() == (scenario == "neg_inf_in_float_mask")

    failures = [_compare("out", out, out64, out_lp, dtype, 2.0), _compare("lse", lse, lse64, lse_lp, dtype, 2.0)]
    failures += [_compare(n, g, g64, glp, dtype, 3.0)
                 for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_reference_propagates_nonfinite_inputs_like_torch_math(scenario):
    """The oracle itself (float64): the same NaN/Inf places as torch's math path, and the same values."""
    q, k, v, mask, do = _inputs(scenario, torch.float64)
    out, _, grads = _reference(q, k, v, mask, do, torch.float64)
    out64, grads64 = _torch_math(q, k, v, mask, do)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dmask"], [out, *grads], [out64, *grads64]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_fully_masked_rows_stay_zero_beside_a_nan_row(pair):
    """A row whose keys are all masked (bool mask) gives 0, lse -inf and a zero dQ row, never NaN, even
    when another row of the same head is NaN."""
    backend, dtype = pair
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, n, E, generator=gen).to(dtype).to(DEVICE) for n in (L, S, S))
    q[0, 1, ROW, 0] = NAN
    allowed = torch.ones(L, S, dtype=torch.bool, device=DEVICE)
    allowed[5] = False
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = attnkern.attention(*leaves, attn_mask=allowed, backend=backend)
    out.backward(torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE))
    assert torch.isnan(out[0, 1, ROW]).all() and torch.isnan(lse[0, 1, ROW])
    assert torch.all(out[:, :, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))
    assert torch.all(q.grad[:, :, 5] == 0)
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(q.grad[0, 0]).all(), "head 0 has no NaN input"


@pytest.mark.parametrize("dlse_value", [INF, -INF, NAN], ids=["inf", "neg_inf", "nan"])
@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_nonfinite_dlse_on_fully_masked_rows_changes_nothing(pair, dlse_value):
    """A fully masked row has P = 0 and lse = -inf (a constant), so its upstream dlse, which a
    log-sum-exp merge can make inf or NaN, must not reach dS: the gradients equal those computed with
    dlse = 0 on that row, and every other row's dlse still counts."""
    backend, dtype = pair
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, n, E, generator=gen, dtype=torch.float64) for n in (L, S, S))
    mask = torch.randn(L, S, generator=gen, dtype=torch.float64)
    mask[5] = -INF  # row 5: every key masked
    do = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    dlse = torch.randn(B, H, L, generator=gen, dtype=torch.float64)
    q, k, v, mask, do = (t.to(dtype) for t in (q, k, v, mask, do))
    dlse_bad = dlse.clone()
    dlse_bad[:, :, 5] = dlse_value
    dlse[:, :, 5] = 0.0

    def run(fn, dt, dl):
        leaves = [t.to(dt).to(DEVICE).clone().requires_grad_() for t in (q, k, v, mask)]
        out, lse = fn(*leaves)
        torch.autograd.backward([out, lse], [do.to(dt).to(DEVICE), dl.to(lse.dtype).to(DEVICE)])
        return [t.grad for t in leaves]

    grads = run(lambda q, k, v, m: attnkern.attention(q, k, v, attn_mask=m, backend=backend), dtype, dlse_bad)
    grads64 = run(lambda q, k, v, m: reference_attention(q, k, v, m), torch.float64, dlse)
    grads_lp = run(lambda q, k, v, m: reference_attention(q, k, v, m), dtype, dlse)
    assert all(torch.isfinite(g).all() for g in grads), "a non-finite dlse on a fully masked row leaked into dS"
    assert torch.all(grads[0][:, :, 5] == 0) and torch.all(grads[3][5] == 0)
    failures = [check(n, g, g64, glp, dtype, 3.0)
                for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("pair", pairs(), ids=pair_id)
def test_a_bool_mask_hides_a_nonfinite_key(pair):
    """A bool mask replaces the scores it hides (as the reference's masked_fill does, and as the kernels'
    skipping of hidden tiles implies), so a NaN key every row has masked off changes nothing: output and
    gradients are finite, the masked key's dK is 0. torch's math path, which adds -inf to the NaN score,
    returns NaN here; the CUDA kernels once did the same (their mask was added, not applied)."""
    backend, dtype = pair
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(B, H, n, E, generator=gen, dtype=torch.float64) for n in (L, S, S, L))
    k[0, 1, KEY, :] = NAN
    mask = torch.ones(L, S, dtype=torch.bool)
    mask[:, KEY] = False
    q, k, v, do = (t.to(dtype).to(DEVICE) for t in (q, k, v, do))
    mask = mask.to(DEVICE)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = attnkern.attention(*leaves, attn_mask=mask, backend=backend)
    out.backward(do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = reference_attention(*ref, mask)
    out64.backward(do.double())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    out_lp, lse_lp = reference_attention(*low, mask)
    out_lp.backward(do)
    assert torch.isfinite(out64).all() and torch.equal(ref[1].grad[0, 1, KEY], torch.zeros_like(ref[1].grad[0, 1, KEY]))
    failures = [_compare("out", out, out64, out_lp, dtype, 2.0), _compare("lse", lse, lse64, lse_lp, dtype, 2.0)]
    failures += [_compare(n, t.grad, r.grad, lp.grad, dtype, 3.0) for n, t, r, lp in zip(["dq", "dk", "dv"], leaves, ref, low)]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
