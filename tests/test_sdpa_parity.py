"""Drop-in parity under replace_sdpa(): what torch's own SDPA tests (test/test_transformers.py) exercise on
a CPU, run through the patched torch.nn.functional.scaled_dot_product_attention and compared with torch's
SDPA in float64 under the tolerance rule, forward and every gradient: torch.nn.attention.bias's
CausalBias variants (patched, unpatched API, torch's builtin bound before the patch, torch.compile),
nn.MultiheadAttention / nn.TransformerEncoderLayer / nn.TransformerEncoder in eval and training, masks of
several broadcast shapes (with gradients), is_causal, enable_gqa, scale, 2-D/3-D/5-D inputs, empty dims.
Calls the kernels serve must actually run on them (counted), the rest must give torch's exact result."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attnkern
from attnkern.interop import dispatch
from attnkern.tolerance import assert_all, check
from matrix import DEVICE, count_fused_calls

TORCH_SDPA = F.scaled_dot_product_attention  # torch's builtin, bound before any patch
CAUSAL_BIASES = {"upper_left": causal_upper_left, "lower_right": causal_lower_right}
LENGTHS = [(8, 8), (5, 11), (11, 5)]  # L == S, L < S, L > S


pytestmark = pytest.mark.usefixtures("sdpa_unpatched")


def rand(*shape, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE).requires_grad_(grad)


def bool_mask(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=gen) > 0.3).to(DEVICE)


def causal_mask(variant: str, L: int, S: int) -> torch.Tensor:
    """The bool mask a CausalBias stands for (torch.tril as its docs define it): the independent oracle."""
    return torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L if variant == "lower_right" else 0)


def run(fn, tensors, dtype, call):
    """`call(fn, *leaves)` on copies of `tensors` cast to `dtype` (bool ones kept); returns the output and
    the gradients of the tensors that require grad, for a fixed random upstream gradient."""
    leaves = [t.detach().to(dtype if t.is_floating_point() else t.dtype).requires_grad_(t.requires_grad)
              for t in tensors]
    out = call(fn, *leaves)
    wanted = [t for t in leaves if t.requires_grad]
    if not wanted:
        return out, []
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, out.dtype)
    return out, list(torch.autograd.grad(out, wanted, dout))


def assert_matches_torch64(ours_fn, tensors, dtype, call, ref_call=None):
    """Run `call` with `ours_fn` in `dtype` and the reference call (`ref_call`, else `call`) with torch's
    SDPA in float64 (and in `dtype` for the low-precision bound); apply the tolerance rule."""
    ref_call = ref_call or call
    out, grads = run(ours_fn, tensors, dtype, call)
    # The oracle is torch's math kernel (on a GPU torch's fused fp16 kernels would give NaN for fully
    # masked rows, where the math kernel, attnkern and the float64 reference give 0).
    with sdpa_kernel([SDPBackend.MATH]):
        out64, grads64 = run(TORCH_SDPA, tensors, torch.float64, ref_call)
        out_lp, grads_lp = run(TORCH_SDPA, tensors, dtype, ref_call) if dtype != torch.float32 else (
            None, [None] * len(grads64))
    assert out.dtype == dtype and out.shape == out64.shape
    assert_all([check("out", out, out64, out_lp, dtype)]
               + [check(f"grad{i}", g, g64, glp, dtype, factor=3.0)
                  for i, (g, g64, glp) in enumerate(zip(grads, grads64, grads_lp))])


def qkv(L, S, E=16, B=2, H=2, grad=True):
    return rand(B, H, L, E, seed=1, grad=grad), rand(B, H, S, E, seed=2, grad=grad), rand(B, H, S, E, seed=3, grad=grad)


# --- torch.nn.attention.bias.CausalBias ------------------------------------------------------------------

def _with_bias(variant, L, S):
    bias = CAUSAL_BIASES[variant](L, S)
    return (lambda fn, q, k, v: fn(q, k, v, attn_mask=bias),
            lambda fn, q, k, v: fn(q, k, v, attn_mask=causal_mask(variant, L, S)))


@pytest.fixture
def quiet_lower_right():
    # causal_lower_right(L, S) with L > S warns about NaN (torch's fused CUDA kernels); attnkern gives 0.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Lower right causal bias")
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("L,S", LENGTHS, ids=["square", "L<S", "L>S"])
@pytest.mark.parametrize("variant", list(CAUSAL_BIASES))
def test_causal_bias_under_the_patch_matches_torch(monkeypatch, quiet_lower_right, variant, L, S, dtype):
    call, ref_call = _with_bias(variant, L, S)
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, qkv(L, S), dtype, call, ref_call)
    assert calls == {"forward": 1, "backward": 1}  # read as a causal alignment, on the kernels


@pytest.mark.parametrize("L,S", LENGTHS, ids=["square", "L<S", "L>S"])
@pytest.mark.parametrize("variant", list(CAUSAL_BIASES))
def test_causal_bias_in_attnkerns_own_function_matches_torch(quiet_lower_right, variant, L, S):
    call, ref_call = _with_bias(variant, L, S)
    assert_matches_torch64(attnkern.scaled_dot_product_attention, qkv(L, S), torch.float32, call, ref_call)
    expected = "top_left" if variant == "upper_left" or L == S else "bottom_right"
    q, k, v = qkv(L, S, grad=False)
    assert f"causal={expected}" in attnkern.explain(q, k, v, attn_mask=CAUSAL_BIASES[variant](L, S)).problem


@pytest.mark.parametrize("L,S", LENGTHS, ids=["square", "L<S", "L>S"])
@pytest.mark.parametrize("variant", list(CAUSAL_BIASES))
def test_causal_bias_through_torchs_function_bound_before_the_patch(monkeypatch, quiet_lower_right, variant,
                                                                   L, S):
    """`from torch.nn.functional import scaled_dot_product_attention` before the patch: torch's builtin,
    whose CausalBias dispatch compares against the (patched) module attribute. It runs CausalBias's own
    dispatch, which hands plain causal calls to the patched function (attnkern); on a GPU torch sends a
    non-square lower-right bias to its own fused kernels, and the result is then exactly torch's."""
    call, ref_call = _with_bias(variant, L, S)
    calls = count_fused_calls(monkeypatch)
    if DEVICE != "cpu" and variant == "lower_right" and L != S:
        want_out, want_grads = run(TORCH_SDPA, qkv(L, S), torch.float32, call)
        with attnkern.replace_sdpa():
            got_out, got_grads = run(TORCH_SDPA, qkv(L, S), torch.float32, call)
        for got, want in zip([got_out, *got_grads], [want_out, *want_grads]):
            torch.testing.assert_close(got, want, equal_nan=True)
        return
    with attnkern.replace_sdpa():
        assert_matches_torch64(TORCH_SDPA, qkv(L, S), torch.float32, call, ref_call)
    assert calls["forward"] == 1


@pytest.mark.parametrize("variant", list(CAUSAL_BIASES))
def test_causal_bias_under_torch_compile_of_the_patched_function(monkeypatch, quiet_lower_right, variant):
    torch._dynamo.reset()
    L, S = 5, 11
    bias = CAUSAL_BIASES[variant](L, S)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    with attnkern.replace_sdpa():
        torch.compile(fn, fullgraph=True, backend=record)(*qkv(L, S, grad=False))
        assert_matches_torch64(torch.compile(fn, fullgraph=True, backend="aot_eager"), qkv(L, S), torch.float32,
                               lambda f, q, k, v: f(q, k, v),
                               lambda f, q, k, v: f(q, k, v, attn_mask=causal_mask(variant, L, S)))
    assert any("attnkern.attention_forward" in g for g in graphs)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", list(CAUSAL_BIASES))
def test_causal_bias_with_is_causal_raises_torchs_value_error(variant):
    q, k, v = qkv(4, 6, grad=False)
    bias = CAUSAL_BIASES[variant](4, 6)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        TORCH_SDPA(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        attnkern.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with attnkern.replace_sdpa():
        for fn in (F.scaled_dot_product_attention, TORCH_SDPA):
            with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
                fn(q, k, v, attn_mask=bias, is_causal=True)


def _outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the exception type is the outcome compared
        return type(exc)


@pytest.mark.parametrize("Lb,Sb", [(1, 7), (3, 4)])
def test_lower_right_bias_whose_lengths_differ_from_the_inputs(quiet_lower_right, Lb, Sb):
    """attnkern reads it as torch's CPU path does: the materialized (Lb, Sb) bool mask, broadcast to the
    scores -- a (1, S) bias is one row that sees every key; a (3, 4) bias for L=5 does not broadcast
    (ValueError naming the shapes). Patched, the call gets exactly what unpatched torch gives (on a GPU
    torch's fused kernels ignore the bias's lengths)."""
    q, k, v = qkv(5, 7)
    bias = causal_lower_right(Lb, Sb)
    mask = torch.ones(Lb, Sb, dtype=torch.bool, device=DEVICE).tril(Sb - Lb)
    if Lb == 1:
        assert_matches_torch64(attnkern.scaled_dot_product_attention, (q, k, v), torch.float32,
                               lambda f, q, k, v: f(q, k, v, attn_mask=bias),
                               lambda f, q, k, v: f(q, k, v, attn_mask=mask))
    else:
        with pytest.raises(ValueError, match="attn_mask of shape \\(3, 4\\) does not broadcast"):
            attnkern.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = _outcome(TORCH_SDPA, q, k, v, attn_mask=bias)
    with attnkern.replace_sdpa():
        got = _outcome(F.scaled_dot_product_attention, q, k, v, attn_mask=bias)
    if isinstance(want, type):
        assert got is want
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- torch.nn modules --------------------------------------------------------------------------------------

def _module_cases():
    D, H = 32, 4

    def mha(batch_first):
        m = torch.nn.MultiheadAttention(D, H, batch_first=batch_first, dropout=0.0)
        return m, lambda m, x, pad, causal: m(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    def mha_causal(batch_first):
        m = torch.nn.MultiheadAttention(D, H, batch_first=batch_first, dropout=0.0)
        return m, lambda m, x, pad, causal: m(x, x, x, attn_mask=causal.to(x.dtype), need_weights=False,
                                              is_causal=True)[0]

    def encoder_layer(batch_first):
        m = torch.nn.TransformerEncoderLayer(D, H, 64, dropout=0.0, batch_first=batch_first)
        # nn.Transformer's bool masks: True = not allowed (the same type as the padding mask)
        return m, lambda m, x, pad, causal: m(x, src_mask=torch.isinf(causal), src_key_padding_mask=pad,
                                              is_causal=True)

    def encoder(batch_first):
        layer = torch.nn.TransformerEncoderLayer(D, H, 64, dropout=0.0, batch_first=batch_first, norm_first=True)
        m = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return m, lambda m, x, pad, causal: m(x, src_key_padding_mask=pad)

    return {"mha": mha, "mha_causal": mha_causal, "encoder_layer": encoder_layer, "encoder": encoder}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(_module_cases()))
def test_torch_modules_match_torch64(name, mode, batch_first):
    torch.manual_seed(0)
    module, call = _module_cases()[name](batch_first)
    module = getattr(module.to(DEVICE), mode)()
    B, L = 3, 9
    x = rand(B, L, 32, seed=4) if batch_first else rand(L, B, 32, seed=4)
    pad = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    pad[1, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    w = rand(*x.shape, seed=5)
    params = list(module.parameters())
    with attnkern.replace_sdpa():
        out = call(module, x, pad, causal)
        grads = torch.autograd.grad((out * w).sum(), params)
    ref = module.double()
    out64 = call(ref, x.double(), pad, causal.double())
    grads64 = torch.autograd.grad((out64 * w.double()).sum(), list(ref.parameters()))
    names = [n for n, _ in ref.named_parameters()]
    assert_all([check("out", out, out64, None, torch.float32)]
               + [check(n, g, g64, None, torch.float32) for n, g, g64 in zip(names, grads, grads64)])


@pytest.mark.parametrize("name", ["encoder_layer", "encoder"])
def test_torch_encoder_inference_fast_path_matches_torch(name):
    """Under no_grad in eval mode the encoder takes torch's fused fast path (no SDPA call): same result."""
    torch.manual_seed(0)
    module, call = _module_cases()[name](True)
    module = module.to(DEVICE).eval()
    x = rand(2, 7, 32, seed=4)
    pad = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    pad[0, 5:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    with torch.no_grad():
        want = call(module, x, pad, causal)
        with attnkern.replace_sdpa():
            got = call(module, x, pad, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


# --- masks, causal, GQA, scale, ranks, empty dims ----------------------------------------------------------

MASK_SHAPES = [(7, 10), (1, 10), (7, 1), (2, 7, 10), (3, 1, 7, 10), (3, 2, 1, 10), (1, 1, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["bool", "float", "float_grad"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_of_broadcast_shapes(monkeypatch, shape, kind, dtype):
    q, k, v = rand(3, 2, 7, 16, seed=1, grad=True), rand(3, 2, 10, 16, seed=2, grad=True), \
        rand(3, 2, 10, 16, seed=3, grad=True)
    if kind == "bool":
        mask = bool_mask(*shape)
        mask.view(-1)[0] = True  # keep one key per broadcast row in the tiniest shapes
    else:
        mask = rand(*shape, seed=6, grad=kind == "float_grad")
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, (q, k, v, mask), dtype,
                               lambda fn, q, k, v, m: fn(q, k, v, attn_mask=m))
    assert calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("L,S", LENGTHS, ids=["square", "L<S", "L>S"])
def test_is_causal(monkeypatch, L, S):
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, qkv(L, S), torch.float32,
                               lambda fn, q, k, v: fn(q, k, v, is_causal=True))
    assert calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("Hkv", [1, 2])
@pytest.mark.parametrize("is_causal", [False, True])
def test_enable_gqa(monkeypatch, Hkv, is_causal):
    q, k, v = rand(2, 4, 6, 16, seed=1, grad=True), rand(2, Hkv, 9, 16, seed=2, grad=True), \
        rand(2, Hkv, 9, 8, seed=3, grad=True)
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, (q, k, v), torch.float32,
                               lambda fn, q, k, v: fn(q, k, v, is_causal=is_causal, enable_gqa=True))
    assert calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("scale", [None, 0.3, 1.0, 2.5])
def test_scale(scale):
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, qkv(6, 9), torch.float32,
                               lambda fn, q, k, v: fn(q, k, v, scale=scale))


@pytest.mark.parametrize("shapes", [
    [(7, 16), (9, 16), (9, 12)],                          # 2-D: (L, E)
    [(3, 7, 16), (3, 9, 16), (3, 9, 16)],                 # 3-D: (H, L, E)
    [(2, 3, 2, 7, 16), (2, 3, 2, 9, 16), (2, 3, 2, 9, 8)],  # 5-D: (B1, B2, H, L, E)
    [(2, 3, 2, 7, 16), (1, 3, 2, 9, 16), (2, 1, 2, 9, 16)],  # 5-D with broadcast batch dims
], ids=["2d", "3d", "5d", "5d_broadcast"])
def test_input_ranks(monkeypatch, shapes):
    q, k, v = (rand(*s, seed=i, grad=True) for i, s in enumerate(shapes))
    calls = count_fused_calls(monkeypatch)
    with attnkern.replace_sdpa():
        assert_matches_torch64(F.scaled_dot_product_attention, (q, k, v), torch.float32,
                               lambda fn, q, k, v: fn(q, k, v, is_causal=True))
    assert calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("shapes", [
    [(0, 2, 5, 8), (0, 2, 6, 8), (0, 2, 6, 8)],  # no batch
    [(2, 0, 5, 8), (2, 0, 6, 8), (2, 0, 6, 8)],  # no heads
    [(2, 2, 0, 8), (2, 2, 6, 8), (2, 2, 6, 8)],  # no queries
    [(2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8)],  # no keys
    [(2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 0)],  # no value features
], ids=["B=0", "H=0", "L=0", "S=0", "Ev=0"])
def test_empty_dims_give_torchs_result(shapes):
    q, k, v = (rand(*s, seed=i, grad=True) for i, s in enumerate(shapes))
    results = []
    for patched in (False, True):
        with attnkern.replace_sdpa() if patched else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
        results.append([out, *grads])
    for got, want in zip(*results[::-1]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)
