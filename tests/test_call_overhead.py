"""The per-call fast paths give exactly the full path's results: a call shaped like the previous one
reuses its normalization and backend choice (fastpath.py) and misses whenever anything but the tensors'
data changes; API calls skip the op's repeated checks while direct op calls keep them; eager calls run
the op's body directly (ops.run_forward) except where something watches ops. And `attnkern bench
--overhead` writes its table and JSON."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkern
from attnkern import api, backends, fastpath, ops
from attnkern.tools import cli
from matrix import AUTO, DEVICE


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


@pytest.fixture(autouse=True)
def fresh_cache():
    fastpath.forget()
    yield
    fastpath.forget()


@pytest.fixture
def normalizations(monkeypatch):
    """Counts the full normalizations (cache misses) of API calls."""
    count = [0]
    real = api.normalize

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "normalize", counted)
    return count


def _full_path(fn, *args, **kwargs):
    """fn's result with the fast path's entry dropped first (so the call normalizes in full)."""
    fastpath.forget()
    out = fn(*args, **kwargs)
    fastpath.forget()
    return out


def _equal(a, b):
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def test_a_repeated_shape_reuses_the_normalization_with_the_new_tensors(normalizations):
    calls = [(rand(2, 4, 5, 16), rand(2, 4, 9, 16), rand(2, 4, 9, 16)) for _ in range(3)]
    outs = [attnkern.scaled_dot_product_attention(*t, is_causal=True) for t in calls]
    assert normalizations[0] == 1  # the first call only
    for t, out in zip(calls, outs):
        assert torch.equal(out, _full_path(attnkern.scaled_dot_product_attention, *t, is_causal=True))
        assert torch.equal(out, attnkern.scaled_dot_product_attention(*t, is_causal=True))
    # attention: the same, its lse included
    first = attnkern.attention(*calls[0], causal="bottom_right", window=(3, 0))
    hit = attnkern.attention(*calls[1], causal="bottom_right", window=(3, 0))
    n = normalizations[0]
    assert _equal(hit, _full_path(attnkern.attention, *calls[1], causal="bottom_right", window=(3, 0)))
    assert normalizations[0] == n + 1 and not _equal(first, hit)


def test_the_cache_holds_no_tensor():
    import gc
    import weakref

    q = rand(1, 2, 4, 8)
    attnkern.scaled_dot_product_attention(q, q, q)
    alive = weakref.ref(q)
    del q
    gc.collect()
    assert alive() is None


def test_what_changes_the_problem_misses(normalizations):
    q, k, v = rand(2, 4, 5, 16), rand(2, 4, 9, 16), rand(2, 4, 9, 16)
    mask = rand(2, 1, 5, 9) > 0
    base = dict(attn_mask=mask)
    variants = [
        ((q, k, v), base),
        # strides: the same shape laid out as (B, L, H, E)
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v), base),
        # the mask: none, float instead of bool, another broadcast shape
        ((q, k, v), {}),
        ((q, k, v), dict(attn_mask=torch.where(mask, 0.0, -1.5))),
        ((q, k, v), dict(attn_mask=(rand(1, 4, 1, 9) > 0))),
        # flags
        ((q, k, v), dict(base, is_causal=False, scale=0.3)),
        ((q, k, v), dict(base, scale=0.3000001)),
        ((q, k, v), dict(is_causal=True)),
        # dtype
        ((q.double(), k.double(), v.double()), dict(is_causal=True)),
    ]
    for i in range(1, len(variants)):
        (previous, previous_kwargs), (tensors, kwargs) = variants[i - 1], variants[i]
        fastpath.forget()
        attnkern.scaled_dot_product_attention(*previous, **previous_kwargs)  # the entry a hit would use
        before = normalizations[0]
        attnkern.scaled_dot_product_attention(*previous, **previous_kwargs)
        assert normalizations[0] == before, f"variant {i - 1} does not reuse its own problem"
        out = attnkern.scaled_dot_product_attention(*tensors, **kwargs)
        assert normalizations[0] == before + 1, f"variant {i} reused the previous call's problem"
        assert torch.equal(out, _full_path(attnkern.scaled_dot_product_attention, *tensors, **kwargs))


def test_grad_mode_and_requires_grad_miss_and_gradients_match_the_full_path(normalizations):
    q, k, v = rand(1, 2, 6, 16, grad=True), rand(1, 2, 6, 16, grad=True), rand(1, 2, 6, 16, grad=True)
    with torch.no_grad():
        inference = attnkern.scaled_dot_product_attention(q, k, v)
    assert normalizations[0] == 1 and inference.grad_fn is None
    out = attnkern.scaled_dot_product_attention(q, k, v)  # grad mode on: a miss
    assert normalizations[0] == 2 and out.grad_fn is not None
    again = attnkern.scaled_dot_product_attention(q, k, v)  # a hit, recorded by autograd all the same
    assert normalizations[0] == 2 and again.grad_fn is not None
    # the same tensors without requires_grad: a miss, no graph
    plain = attnkern.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert normalizations[0] == 3 and plain.grad_fn is None
    do = torch.randn_like(out)
    grads = torch.autograd.grad(again, (q, k, v), do)
    full = _full_path(attnkern.scaled_dot_product_attention, q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(full, (q, k, v), do)))
    assert torch.equal(inference, again.detach()) and torch.equal(inference, plain)


def test_a_backend_change_misses(monkeypatch, normalizations):
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    ran = []
    for name in (AUTO, "reference"):
        b = backends.get(name)
        real = b.forward
        monkeypatch.setattr(b, "forward", lambda *a, _n=name, _f=real, **kw: (ran.append(_n), _f(*a, **kw))[1])
    attnkern.scaled_dot_product_attention(q, k, v)
    with attnkern.use_backend("reference"):
        attnkern.scaled_dot_product_attention(q, k, v)
    attnkern.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("ATTNKERN_BACKEND", "reference")
    attnkern.scaled_dot_product_attention(q, k, v)
    monkeypatch.setenv("ATTNKERN_BACKEND", "auto")
    attnkern.scaled_dot_product_attention(q, k, v)
    attnkern.attention(q, k, v, backend="reference")
    attnkern.attention(q, k, v)
    assert ran == [AUTO, "reference", AUTO, "reference", AUTO, "reference", AUTO]
    assert normalizations[0] == 7  # a miss each time: the requested backend changed
    # a backend that became unavailable is not taken from the cache: the full path says why
    attnkern.attention(q, k, v, backend=AUTO)
    monkeypatch.setattr(backends.get(AUTO), "availability", lambda device: "switched off (test)")
    with pytest.raises(attnkern.BackendUnavailableError, match="switched off"):
        attnkern.attention(q, k, v, backend=AUTO)


def test_bad_arguments_still_raise_after_a_cached_call():
    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    attnkern.attention(q, k, v, softcap=1.0, backend="reference")
    with pytest.raises(ValueError, match="softcap"):  # True == 1 but is refused
        attnkern.attention(q, k, v, softcap=True, backend="reference")
    attnkern.scaled_dot_product_attention(q, k, v, scale=0.5)
    with pytest.raises(ValueError, match="scale"):
        attnkern.scaled_dot_product_attention(q, k, v, scale=float("nan"))
    # the argument's error comes before the bad backend name's, as it always has
    with pytest.raises(ValueError, match="head dim"):
        attnkern.attention(q, rand(1, 2, 7, 8), v, backend="no-such-backend")
    # a direct call of the op is checked in full, right after an API call with the same query
    attnkern.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attnkern op: the query's heads"):
        ops.attention_forward(q, rand(1, 3, 7, 16), rand(1, 3, 7, 16), None, 0.25, [1, -1, -1], 0.0, None, 0.0,
                              None, AUTO, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_direct_eager_path_equals_the_op(monkeypatch, dtype):
    """ops.run_forward's direct body call (and its autograd) against the dispatched op: bitwise equal
    outputs and gradients, the mask's included."""
    q, k, v = (rand(2, 4, 5, 16, dtype=dtype, grad=True), rand(2, 4, 7, 16, dtype=dtype, grad=True),
               rand(2, 4, 7, 16, dtype=dtype, grad=True))
    mask = rand(1, 4, 5, 7, grad=True)
    do = rand(2, 4, 5, 16, dtype=dtype)
    results = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(ops, "_nothing_intercepts", lambda *a: False)
        out, lse = attnkern.attention(q, k, v, attn_mask=mask, causal=True)
        name = type(out.grad_fn).__name__
        assert ("attention_forward" in name) != direct, name
        grads = torch.autograd.grad((out * do).sum() + lse.sum(), (q, k, v, mask))
        with torch.no_grad():
            inference = attnkern.attention(q, k, v, attn_mask=mask, causal=True)
        results.append((out, lse, *grads, *inference))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_dispatch_mode_sees_the_op():
    """Where something watches ops, the call goes through the op (not the direct path)."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q = rand(1, 2, 4, 8)
    with torch.no_grad(), Record():
        attnkern.scaled_dot_product_attention(q, q, q)
    assert any(f"attention_forward_{ops.CONTRACT}" in f for f in seen), seen


def test_bench_overhead_writes_its_table_and_json(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    rc = cli.main(["bench", "--overhead", "--overhead-shape", "1,2,1,16,16", "--repeats", "3", "--calls", "2",
                   "--warmup", "1", "--device", "cpu", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == "attnkern-bench-overhead/1" and doc["baseline"] == "torch.sdpa"
    assert doc["config"]["B"] == 1 and doc["config"]["S"] == 16 and doc["config"]["rounds"] == 3
    got = {(r["mode"], r["provider"]) for r in doc["results"]}
    assert got == {(m, p) for m in ("no_grad", "grad")
                   for p in ("attnkern.sdpa", "attnkern.attention", "torch.sdpa", "kernel")} | {
                       ("no_grad", "attnkern.kvcache")}  # decoding: forward only
    for r in doc["results"]:
        assert len(r["times_us"]) == 3 and r["min_us"] <= r["median_us"] and r["vs_torch"] > 0
        if r["provider"] == "torch.sdpa":
            assert r["vs_torch"] == 1.0
    assert "call overhead: B=1 H=2 L=1 S=16 E=16" in out and "x torch" in out and str(path) in out


def test_overhead_flags_need_overhead(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--calls", "5", "--device", "cpu"])
    assert "--calls: only with --overhead" in capsys.readouterr().err
