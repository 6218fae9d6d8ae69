"""replace_sdpa(): torch.nn.functional.scaled_dot_product_attention runs attnkern where its fused kernels
serve the call and torch's original function everywhere else; patches nest, restore and show themselves."""
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_upper_left

import attnkern
from attnkern import backends
from attnkern.interop import dispatch, patching
from attnkern.tolerance import assert_all, check
from matrix import AUTO, DEVICE, count_fused_calls

TORCH_SDPA = F.scaled_dot_product_attention


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


pytestmark = pytest.mark.usefixtures("sdpa_unpatched")


@pytest.fixture
def counted(monkeypatch):
    """Forward calls each attnkern backend receives, and calls of the function the patch wraps."""
    calls = []
    for name in backends.names()[1:]:
        b = backends.get(name)
        monkeypatch.setattr(b, "forward", lambda *a, _o=b.forward, _n=name: (calls.append(_n), _o(*a))[1])

    def torch_sdpa(*args, **kwargs):
        calls.append("torch")
        return TORCH_SDPA(*args, **kwargs)

    # Installed before replace_sdpa, so the patch takes it for the original (and restores it).
    monkeypatch.setattr(F, "scaled_dot_product_attention", torch_sdpa)
    return calls, torch_sdpa


def test_context_manager_patches_and_restores(counted):
    calls, original = counted
    q, k, v = rand(2, 4, 9, 16), rand(2, 2, 11, 16), rand(2, 2, 11, 16)
    with attnkern.replace_sdpa() as patch:
        assert F.scaled_dot_product_attention is not original and patch.active
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert F.scaled_dot_product_attention is original and not patch.active
    assert calls == [AUTO]
    ref64 = TORCH_SDPA(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert_all([check("out", out, ref64, None, torch.float32)])


def test_plain_call_and_restore_sdpa(counted):
    calls, original = counted
    patch = attnkern.replace_sdpa()
    assert F.scaled_dot_product_attention is patching.scaled_dot_product_attention
    assert attnkern.restore_sdpa() is True
    assert F.scaled_dot_product_attention is original and not patch.active
    assert attnkern.restore_sdpa() is False  # nothing left to undo: a no-op
    assert patch.restore() is False
    with pytest.raises(RuntimeError, match="already restored"):
        with patch:
            pass


def test_nesting_restores_only_at_the_outermost_level_and_pins_backends(counted):
    calls, original = counted
    q = rand(1, 2, 5, 16)
    with attnkern.replace_sdpa():
        with attnkern.replace_sdpa(backend="reference"):
            F.scaled_dot_product_attention(q, q, q)  # the innermost pin applies
            inner = attnkern.replace_sdpa()  # a plain call inside, undone by restore_sdpa
            F.scaled_dot_product_attention(q, q, q)
            attnkern.restore_sdpa()
            assert not inner.active
            F.scaled_dot_product_attention(q, q, q)
        assert F.scaled_dot_product_attention is patching.scaled_dot_product_attention
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is original
    F.scaled_dot_product_attention(q, q, q)
    assert calls == ["reference", AUTO, "reference", AUTO, "torch"]


def test_an_exception_inside_the_context_still_restores(counted):
    _, original = counted
    with pytest.raises(KeyError):
        with attnkern.replace_sdpa():
            with attnkern.replace_sdpa():
                raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


def test_out_of_order_restores_and_restore_all(counted):
    _, original = counted
    a, b, c = attnkern.replace_sdpa(), attnkern.replace_sdpa(backend="reference"), attnkern.replace_sdpa()
    assert a.restore() and F.scaled_dot_product_attention is patching.scaled_dot_product_attention
    assert attnkern.restore_sdpa(all_patches=True) is True
    assert not b.active and not c.active and F.scaled_dot_product_attention is original


def test_patch_is_visible_in_repr_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="attnkern")
    with attnkern.replace_sdpa(backend="triton") as patch:
        fn = F.scaled_dot_product_attention
        assert "attnkern.replace_sdpa" in repr(fn) and fn.__name__ == "scaled_dot_product_attention"
        assert fn.__wrapped__ is TORCH_SDPA and fn.__module__ == "attnkern.interop.patching"
        assert "backend=triton active" in repr(patch)
    assert "backend=triton restored" in repr(patch)
    messages = [r.getMessage() for r in caplog.records if r.name == "attnkern"]
    assert any("now runs attnkern (backend=triton" in m for m in messages)
    assert any("restored to" in m for m in messages)


def test_bad_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        attnkern.replace_sdpa(backend="cudnn")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def _no_fused_kernels(monkeypatch):
    """Make every fused backend unavailable, as on a device attnkern has no kernels for."""
    for name in backends.AUTO_ORDER:
        monkeypatch.setattr(backends.get(name), "availability", lambda device: "no kernels here")


def _no_fused_dropout(monkeypatch):
    """Make every fused backend decline dropout, as one whose kernels do not fuse it."""
    for name in backends.AUTO_ORDER:
        b = backends.get(name)
        monkeypatch.setattr(b, "unsupported_reason", lambda problem, _o=b.unsupported_reason: (
            "dropout_p: not fused here" if problem.dropout_p > 0 else _o(problem)))


@pytest.mark.parametrize("why", ["float64", "dropout", "head_dim", "mask_and_causal", "no_kernels_here"])
def test_unsupported_calls_run_torch_function(counted, caplog, monkeypatch, why):
    """Calls the fused kernels do not serve go to torch's function -- never attnkern's reference path --
    and give exactly torch's result; the reason is logged once: as a WARNING only where no fused kernel
    runs on the device at all, at INFO for the routine reasons (test suites asserting no warnings pass)."""
    calls, _ = counted
    dtype = torch.float64 if why == "float64" else torch.float32
    E = 264 if why == "head_dim" else 16
    # float64 and head dims over 256 are refused by the Triton kernels on every device (the C++ CPU kernels
    # take both: see test_float64_and_large_head_dims_run_on_the_cpu_kernels), so pin triton for them;
    # dropout, which every backend fuses, is declined below by a stand-in backend.
    pin = "triton" if why in ("float64", "head_dim") else None
    q, k, v = rand(2, 2, 6, E, dtype=dtype), rand(2, 2, 8, E, dtype=dtype), rand(2, 2, 8, E, dtype=dtype)
    kwargs = {"dropout_p": 0.3} if why == "dropout" else {}
    if why == "mask_and_causal":
        kwargs = {"attn_mask": torch.ones(6, 8, dtype=torch.bool, device=DEVICE), "is_causal": True}
    if why == "no_kernels_here":  # as on a device attnkern has no kernels for
        _no_fused_kernels(monkeypatch)
    if why == "dropout":  # as a backend without fused dropout (those with it run such calls: see below)
        _no_fused_dropout(monkeypatch)
    caplog.set_level(logging.INFO, logger="attnkern")
    results = []
    with attnkern.replace_sdpa(backend=pin):
        for _ in range(2):
            torch.manual_seed(0)
            try:
                results.append(F.scaled_dot_product_attention(q, k, v, **kwargs))
            except RuntimeError as exc:  # torch's own verdict stands (its math backend refuses mask+causal)
                results.append(str(exc))
    assert calls == ["torch", "torch"]
    torch.manual_seed(0)
    try:
        want = TORCH_SDPA(q, k, v, **kwargs)
    except RuntimeError as exc:
        want = str(exc)
    for got in results:
        assert got == want if isinstance(want, str) else torch.equal(got, want)
    logged = [r for r in caplog.records if "torch's SDPA runs this call" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == (logging.WARNING if why == "no_kernels_here" else logging.INFO)


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernels take CPU tensors")
def test_float64_and_large_head_dims_run_on_the_cpu_kernels(counted):
    calls, _ = counted
    q = rand(1, 2, 5, 264, dtype=torch.float64)
    with attnkern.replace_sdpa():
        out = F.scaled_dot_product_attention(q, q, q)
    assert calls == ["cpu"]
    torch.testing.assert_close(out, TORCH_SDPA(q, q, q), rtol=1e-10, atol=1e-10)


def _jagged(lengths, H, E, grad=False):
    values = torch.randn(sum(lengths), H, E, dtype=torch.float32, device=DEVICE)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    nt = torch.nested.nested_tensor_from_jagged(values.requires_grad_(grad), offsets)
    return nt.transpose(1, 2), values  # (B, H, j, E)


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ varlen kernels take CPU tensors")
def test_nested_jagged_tensors_run_the_varlen_kernels(counted, monkeypatch):
    """Nested jagged q/k/v go to attnkern's packed varlen path (no padding) where a fused backend takes
    it, with torch's result and gradients; attn_mask/is_causal with nested inputs stay torch's to refuse."""
    calls, _ = counted
    cpu = backends.get("cpu")
    monkeypatch.setattr(cpu, "varlen_forward", lambda *a, _o=cpu.varlen_forward: (calls.append("cpu varlen"),
                                                                                  _o(*a))[1])
    (q, q_vals), (k, _), (v, _) = (_jagged([3, 1, 6], 2, 8, grad=True), _jagged([4, 2, 5], 2, 8),
                                   _jagged([4, 2, 5], 2, 8))
    with attnkern.replace_sdpa():
        out = F.scaled_dot_product_attention(q, k, v)
    assert calls == ["cpu varlen"] and out.is_nested
    ref = TORCH_SDPA(q, k, v)
    torch.testing.assert_close(out.values(), ref.values(), rtol=1e-5, atol=1e-5)
    (dq,) = torch.autograd.grad(out.values().sum(), q_vals)
    (dq_ref,) = torch.autograd.grad(ref.values().sum(), q_vals)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-5, atol=1e-5)
    route = dispatch.route_sdpa(q, k, v, is_causal=True)
    assert route.to_torch and "is_causal" in route.reason


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernels take CPU tensors")
def test_dropout_runs_the_cpu_kernels(counted):
    """SDPA's dropout_p runs fused on the CPU kernels, its mask drawn from torch's generator: the same
    seed gives attnkern.scaled_dot_product_attention's result exactly."""
    calls, _ = counted
    q, k, v = rand(2, 2, 6, 16), rand(2, 2, 8, 16), rand(2, 2, 8, 16)
    with attnkern.replace_sdpa():
        torch.manual_seed(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert calls == ["cpu"]
    torch.manual_seed(0)
    assert torch.equal(out, attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
    assert not torch.equal(out, TORCH_SDPA(q, k, v))


def test_devices_without_kernels_skip_the_argument_work(counted, monkeypatch):
    """On a device no fused backend runs on, every call goes to torch without being normalized first."""
    calls, _ = counted
    _no_fused_kernels(monkeypatch)
    monkeypatch.setattr(dispatch, "normalize", lambda *a, **kw: pytest.fail("normalized a call no kernel runs"))
    q = rand(1, 2, 5, 16)
    with attnkern.replace_sdpa():
        F.scaled_dot_product_attention(q, q, q)
    assert calls == ["torch"]


def test_arguments_attnkern_refuses_go_to_torch_too(counted):
    """torch decides about arguments attnkern does not take: here an int mask, which torch refuses."""
    calls, _ = counted
    q = rand(1, 2, 5, 16)
    with attnkern.replace_sdpa():
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32, device=DEVICE))
    assert calls == ["torch"]


def test_gradients_flow_through_the_patch():
    q, k, v = rand(2, 4, 9, 16, grad=True), rand(2, 2, 11, 16, grad=True), rand(2, 2, 11, 16, grad=True)
    mask = rand(4, 9, 11, grad=True)
    with attnkern.replace_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, mask), dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    out64 = TORCH_SDPA(*leaves64[:3], attn_mask=leaves64[3], enable_gqa=True)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    assert_all([check("out", out, out64, None, torch.float32)]
               + [check(f"d{n}", g, g64, None, torch.float32) for n, g, g64 in zip("qkvm", grads, grads64)])


def test_autocast_casts_like_torch(counted):
    calls, _ = counted
    q, k, v = rand(1, 2, 7, 16), rand(1, 2, 9, 16), rand(1, 2, 9, 16)
    with attnkern.replace_sdpa(), torch.autocast(DEVICE, dtype=torch.float16):
        out = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ref_lp = TORCH_SDPA(q, k, v)
    assert calls == [AUTO] and out.dtype == ref_lp.dtype == torch.float16
    ref64 = TORCH_SDPA(q.double(), k.double(), v.double())
    assert_all([check("out", out, ref64, ref_lp, torch.float16)])


def test_torch_compile_traces_the_patched_function_without_graph_breaks():
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).square().sum()

    leaves = [rand(2, 4, 9, 16, grad=True), rand(2, 2, 11, 16, grad=True), rand(2, 2, 11, 16, grad=True)]
    mask = rand(9, 11)
    with attnkern.replace_sdpa():
        loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves, mask)
        loss.backward()
        torch.compile(fn, fullgraph=True, backend=record)(*leaves, mask)
    assert any("attnkern.attention_forward" in g for g in graphs)
    got = [loss.detach()] + [t.grad for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss64 = TORCH_SDPA(*leaves64, attn_mask=mask.double(), enable_gqa=True).square().sum()
    want = [loss64.detach()] + list(torch.autograd.grad(loss64, leaves64))
    assert_all([check(f"t{i}", a, b, None, torch.float32) for i, (a, b) in enumerate(zip(got, want))])
    torch._dynamo.reset()


def test_concurrent_patches_from_threads_leave_torch_restored(counted):
    """Threads entering and leaving patches at once leave torch's function in place at the end. The calls
    are float64: on a GPU that is torch's path; on the CPU the C++ kernels take them (they are thread-safe;
    the Triton CPU interpreter, which float64 also keeps away, is not)."""
    calls, original = counted
    q = rand(1, 2, 5, 16, dtype=torch.float64)
    errors = []
    barrier = threading.Barrier(4)

    def worker():
        try:
            barrier.wait()
            for _ in range(25):
                with attnkern.replace_sdpa():
                    F.scaled_dot_product_attention(q, q, q)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and F.scaled_dot_product_attention is original and not patching._active
    assert calls == ["cpu" if DEVICE == "cpu" else "torch"] * 100


def test_a_patch_installed_over_ours_is_left_in_place(counted, caplog):
    calls, original = counted

    def theirs(*args, **kwargs):  # another library's patch, calling what it found: our wrapper
        calls.append("theirs")
        return ours(*args, **kwargs)

    patch = attnkern.replace_sdpa()
    ours = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = theirs
    caplog.set_level(logging.WARNING, logger="attnkern")
    patch.restore()
    assert F.scaled_dot_product_attention is theirs
    assert any("leaving it in place" in r.getMessage() for r in caplog.records)
    q = rand(1, 2, 5, 16)
    assert torch.equal(theirs(q, q, q), TORCH_SDPA(q, q, q))  # our wrapper inside passes straight through
    assert calls == ["theirs", "torch"]
    # Patching again while theirs is in place: no cycle, our wrapper inside their chain runs attnkern.
    with attnkern.replace_sdpa():
        assert patching.original_sdpa() is original and F.scaled_dot_product_attention is theirs
        F.scaled_dot_product_attention(q, q, q)
        with sdpa_kernel(SDPBackend.MATH):  # a call attnkern leaves to torch
            F.scaled_dot_product_attention(q, q, q)
    assert calls == ["theirs", "torch", "theirs", AUTO, "theirs", "torch"]
    F.scaled_dot_product_attention = original
    # Once they are gone, patching installs as usual.
    with attnkern.replace_sdpa():
        assert F.scaled_dot_product_attention is patching.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original


def _torch_module_cases():
    def mha():
        m = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        return m, lambda m, x, pad: m(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    def encoder_layer():
        m = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return m, lambda m, x, pad: m(x, src_key_padding_mask=pad, is_causal=False)

    def decoder_layer():
        m = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(10, device=DEVICE)
        return m, lambda m, x, pad: m(x, x.flip(1), tgt_mask=causal.to(x.dtype), tgt_is_causal=True,
                                      memory_key_padding_mask=pad)

    return {"mha": mha, "encoder_layer": encoder_layer, "decoder_layer": decoder_layer}


@pytest.mark.parametrize("name", list(_torch_module_cases()))
def test_torch_modules_in_training_mode_run_attnkern(monkeypatch, name):
    torch.manual_seed(0)
    module, call = _torch_module_cases()[name]()
    module = module.to(DEVICE).train()
    x = rand(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool, device=DEVICE)
    pad[1, 7:] = True  # True = padding, as torch's key_padding_mask
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        out = call(module, x, pad)
    # A random projection: a plain sum of squares after a LayerNorm hardly depends on the parameters.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((out * w).sum(), list(module.parameters()))
    sdpa_calls = {"mha": 1, "encoder_layer": 1, "decoder_layer": 2}[name]
    assert calls == {"forward": sdpa_calls, "backward": sdpa_calls}
    ref = module.double()
    out64 = call(ref, x.double(), pad)
    grads64 = torch.autograd.grad((out64 * w.double()).sum(), list(ref.parameters()))
    names = [n for n, _ in ref.named_parameters()]
    assert_all([check("out", out, out64, None, torch.float32)]
               + [check(n, g, g64, None, torch.float32) for n, g, g64 in zip(names, grads, grads64)])


# --- torch.nn.attention.sdpa_kernel ----------------------------------------------------------------------

SDPA_KERNEL_CHOICES = {
    "math": ([SDPBackend.MATH], False),
    "flash_or_math": ([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], False),
    # every kernel still enabled, only their priority changed
    "priority": ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.CUDNN_ATTENTION, SDPBackend.OVERRIDEABLE], True),
}


@pytest.mark.parametrize("choice", list(SDPA_KERNEL_CHOICES))
def test_sdpa_kernel_inside_the_patch_sends_calls_to_torch_with_that_choice(counted, caplog, choice):
    calls, _ = counted
    kernels, set_priority = SDPA_KERNEL_CHOICES[choice]
    q, k, v = rand(2, 2, 6, 16), rand(2, 2, 9, 16), rand(2, 2, 9, 16)
    caplog.set_level(logging.INFO, logger="attnkern")
    with attnkern.replace_sdpa():
        with sdpa_kernel(kernels, set_priority=set_priority):
            got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            note = str(attnkern.explain(q, k, v, is_causal=True))
            want = TORCH_SDPA(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)  # outside the block: attnkern again
    assert calls == ["torch", AUTO]
    assert torch.equal(got, want)
    assert "under replace_sdpa() torch's SDPA runs this call: torch.nn.attention.sdpa_kernel restricts" in note
    assert "sdpa_kernel" not in str(attnkern.explain(q, k, v, is_causal=True))
    logged = [r for r in caplog.records if "torch's SDPA runs this call" in r.getMessage()]
    assert len(logged) == 1 and "sdpa_kernel" in logged[0].getMessage() and logged[0].levelno == logging.INFO


def test_sdpa_kernel_restriction_is_read_against_the_flags_at_import():
    """The baseline is the flags as they were at import (some are off by default, e.g. fa3 on torch 2.13):
    unchanged, there is no restriction; switching a flag, in a block or globally, is one."""
    assert dispatch.torch_kernel_restriction() is None
    with sdpa_kernel([SDPBackend.MATH]):
        assert "[math]" in dispatch.torch_kernel_restriction()
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        assert "mem_efficient" not in dispatch.torch_kernel_restriction()
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(True)
    assert dispatch.torch_kernel_restriction() is None


def test_sdpa_kernel_inside_compiled_code_is_honoured():
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    def restricted(q):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, q, q)

    q = rand(1, 2, 5, 16)
    with attnkern.replace_sdpa():
        out = torch.compile(restricted, backend=record)(q)
    assert graphs and not any("attnkern" in g for g in graphs)
    torch.testing.assert_close(out, TORCH_SDPA(q, q, q))
    torch._dynamo.reset()


# --- torch.nn.attention.bias.CausalBias: the patch's hook ------------------------------------------------

def test_causal_bias_hook_lives_exactly_as_long_as_the_patch():
    # (A patch left stranded under someone else's keeps the hook until the next restore: start from torch's.)
    own = patching._causal_bias_own_torch_function or CausalBias.__dict__["__torch_function__"]
    with attnkern.replace_sdpa():
        with attnkern.replace_sdpa():
            assert CausalBias.__dict__["__torch_function__"] is not own
        assert CausalBias.__dict__["__torch_function__"] is not own
    assert CausalBias.__dict__["__torch_function__"] is own
    q = rand(1, 2, 5, 16)
    # Unpatched, torch's CausalBias dispatch is untouched.
    torch.testing.assert_close(TORCH_SDPA(q, q, q, attn_mask=causal_upper_left(5, 5)),
                               TORCH_SDPA(q, q, q, is_causal=True))


# --- TorchScript ---------------------------------------------------------------------------------------

_SCRIPT_CHECK = r"""
import os, sys, torch
os.environ.setdefault("TRITON_INTERPRET", "1")
import attnkern
patched = sys.argv[1] == "patched"
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
modules = {
    "mha": (torch.nn.MultiheadAttention(16, 2, batch_first=True),
            lambda m, x: m(x, x, x, need_weights=False)[0]),
    "encoder_layer": (torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                      lambda m, x: m(x)),
    "encoder": (torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), lambda m, x: m(x)),
}
x = torch.randn(2, 7, 16)
patch = attnkern.replace_sdpa() if patched else None
for name, (module, call) in modules.items():
    for mode in ("train", "eval"):
        getattr(module, mode)()
        scripted = torch.jit.script(module)  # the first scripting in this process: nothing cached
        want = call(module, x)
        got = call(scripted, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {mode}")
        print(name, mode, "ok")
if patch is not None:
    assert torch.nn.functional.scaled_dot_product_attention is attnkern.interop.patching.scaled_dot_product_attention
    patch.restore()
"""


@pytest.mark.parametrize("state", ["patched", "unpatched"])
def test_torchscript_of_torch_attention_modules_works_patched_or_not(state, tmp_path):
    """Scripted while patched, nn.MultiheadAttention / TransformerEncoderLayer / TransformerEncoder compile
    (the wrapper is TorchScript's aten::scaled_dot_product_attention) and equal the eager module. A fresh
    process, so that no function TorchScript compiled earlier is reused."""
    script = tmp_path / "script_modules.py"
    script.write_text(_SCRIPT_CHECK)
    done = subprocess.run([sys.executable, str(script), state], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 6


@pytest.mark.parametrize("pin", ["reference", None])
def test_transformer_encoder_layer_trains_with_its_default_dropout(counted, caplog, pin):
    """nn.TransformerEncoderLayer's default dropout (0.1) in training: under replace_sdpa its attention
    runs on attnkern, dropout fused, wherever the backend (pinned, or auto's choice) takes dropout; where
    it does not, on torch's SDPA with the reason logged. Either way the model trains: the loss goes down."""
    calls, _ = counted
    caplog.set_level(logging.INFO, logger="attnkern")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).to(DEVICE)
    assert layer.self_attn.dropout == 0.1  # the default
    head = torch.nn.Linear(32, 1).to(DEVICE)
    x, target = rand(4, 16, 32), rand(4, 16, 1)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    dropouts = []
    backend = pin or AUTO
    b = backends.get(backend)
    forward = b.forward  # counted's wrapper: also record the dropout each kernel call got
    b.forward = lambda q, k, v, mask, scale, band, mods, *rest: (dropouts.append(mods.dropout_p),
                                                                forward(q, k, v, mask, scale, band, mods, *rest))[1]
    losses = []
    with attnkern.replace_sdpa(backend=pin):
        for _ in range(15):
            loss = F.mse_loss(head(layer(x)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    q = torch.empty(4, 4, 16, 8, device=DEVICE)
    e = attnkern.explain(q, q, q, dropout_p=0.1, backend=backend)
    if e.backend == backend and not e.fallback:
        assert calls == [backend] * 15 and dropouts == [pytest.approx(0.1)] * 15
    else:
        assert calls == ["torch"] * 15
        logged = [r.getMessage() for r in caplog.records if "torch's SDPA runs this call" in r.getMessage()]
        assert len(logged) == 1 and "dropout_p" in logged[0]
    layer.eval()  # no dropout at inference: the fused kernels (auto's, or the pinned backend)
    calls.clear()
    with attnkern.replace_sdpa(backend=pin):
        layer.self_attn(x, x, x, need_weights=False)
    assert calls == [backend]
    assert losses[-1] < 0.5 * losses[0], losses
