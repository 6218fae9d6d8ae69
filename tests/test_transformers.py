"""The transformers integration: registration, from_pretrained/set_attn_implementation, decoding with a
KV cache, and fallbacks to transformers' own sdpa function. Tiny models, random weights, no downloads."""
import copy
import logging
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest
import torch

import attnkern
from attnkern import backends
from attnkern.band import Band
from attnkern.interop import dispatch
from attnkern.score_mods import ScoreMods
from attnkern.tolerance import assert_all, check
from matrix import AUTO, DEVICE

transformers = pytest.importorskip("transformers", reason="needs the transformers extra (pip install -e .[test])")
from attnkern.interop import transformers as integration  # noqa: E402  (needs transformers)

VOCAB = 97


@pytest.fixture(autouse=True)
def registered():
    assert attnkern.register_transformers() == "attnkern"
    dispatch._logged.clear()


@pytest.fixture
def calls(monkeypatch):
    """What ran each attention: the fused backend's forward, or transformers' sdpa function."""
    seen = []
    b = backends.get(AUTO)
    monkeypatch.setattr(b, "forward", lambda *a, _o=b.forward: (seen.append(AUTO), _o(*a))[1])
    sdpa = integration.sdpa_attention_forward
    monkeypatch.setattr(integration, "sdpa_attention_forward",
                        lambda *a, **kw: (seen.append("transformers-sdpa"), sdpa(*a, **kw))[1])
    return seen


def llama(attn="attnkern", **overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg), attn_implementation=attn)
    return model.to(DEVICE)


def tokens(length=10, left_pad=3):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, length), generator=gen)
    keep = torch.ones(2, length, dtype=torch.long)
    keep[1, :left_pad] = 0
    return ids.to(DEVICE), keep.to(DEVICE)


def test_from_pretrained_and_set_attn_implementation(tmp_path, calls):
    llama("sdpa").save_pretrained(tmp_path)  # a local checkpoint: no hub access
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkern").to(DEVICE)
    assert model.config._attn_implementation == "attnkern"
    ids, keep = tokens()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=keep).logits
        assert calls == [AUTO, AUTO]
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=keep).logits
        model.set_attn_implementation("attnkern")
        again = model(input_ids=ids, attention_mask=keep).logits
    assert calls == [AUTO] * 4 and model.config._attn_implementation == "attnkern"
    assert torch.equal(ours, again)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_decoding_with_a_kv_cache_matches_float64_sdpa(calls):
    """Prefill, then single-token steps (no causal flag, the padding mask over the cache)."""
    ids, keep = tokens(length=9)
    runs = {}
    for name, dtype, attn in (("ours", torch.float32, "attnkern"), ("ref64", torch.float64, "sdpa")):
        model = llama(attn).to(dtype).eval()
        logits, cache, mask, step_ids = [], None, keep, ids
        with torch.no_grad():
            for _ in range(3):
                out = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        runs[name] = torch.stack(logits)
    assert calls == [AUTO] * 6  # 2 layers x (prefill + 2 decoding steps), none on the fallback
    assert_all([check("logits", runs["ours"], runs["ref64"], None, torch.float32)])


def test_gqa_reads_kv_heads_in_place(monkeypatch):
    """The kernels get the key/value heads as they are (enable_gqa), not repeated to the query heads."""
    seen = []
    b = backends.get(AUTO)
    monkeypatch.setattr(b, "forward", lambda q, k, v, *a, _o=b.forward: (seen.append((q.shape[1], k.shape[1])),
                                                                         _o(q, k, v, *a))[1])
    ids, keep = tokens()
    with torch.no_grad():
        llama()(input_ids=ids, attention_mask=keep)
    assert seen == [(4, 2), (4, 2)]


def test_dropout_in_training_falls_back_to_transformers_sdpa_where_no_kernel_fuses_it(calls, caplog, monkeypatch):
    for name in backends.AUTO_ORDER:  # as backends whose kernels do not fuse dropout
        b = backends.get(name)
        monkeypatch.setattr(b, "unsupported_reason", lambda problem, _o=b.unsupported_reason: (
            "dropout_p: not fused here" if problem.dropout_p > 0 else _o(problem)))
    caplog.set_level(logging.INFO, logger="attnkern")
    model = llama(attention_dropout=0.2).train()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids, keep = tokens()
    torch.manual_seed(5)
    ours = model(input_ids=ids, attention_mask=keep).logits
    torch.manual_seed(5)
    theirs = reference(input_ids=ids, attention_mask=keep).logits
    assert calls == ["transformers-sdpa"] * 2
    assert torch.equal(ours, theirs)  # the very same computation, dropout masks included
    logged = [r for r in caplog.records if "attnkern transformers" in r.getMessage()]
    # Logged once, at INFO: dropout is a routine reason, not one a WARNING should flag.
    assert len(logged) == 1 and "dropout" in logged[0].getMessage() and logged[0].levelno == logging.INFO
    model.eval()  # no dropout at inference: the kernels run again
    with torch.no_grad():
        model(input_ids=ids, attention_mask=keep)
    assert calls[2:] == [AUTO, AUTO]


@pytest.mark.parametrize("backend", ["reference", AUTO])
def test_dropout_in_training_runs_fused_where_the_backend_takes_it(backend, kernel_calls):
    """attention_dropout in training on a backend with fused dropout (the reference backend; auto's where
    its kernels fuse it, as the C++ CPU kernels do): the kernels draw the mask from torch's generator, so a
    seed reproduces it. Where auto's kernels do not fuse it, transformers' sdpa runs it (the test above)."""
    model = llama(attention_dropout=0.2).train()
    ids, keep = tokens()
    runs = []
    with attnkern.use_backend(backend):
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            runs.append(model(input_ids=ids, attention_mask=keep).logits)
    x = torch.empty(1, 2, 4, 8, device=DEVICE)
    if attnkern.explain(x, x, x, dropout_p=0.2, backend=backend).backend != backend:
        assert kernel_calls == []  # not fused there: transformers' sdpa ran every call
        return
    assert [(c.backend, c.mods.dropout_p) for c in kernel_calls] == [(backend, 0.2)] * 6
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_float64_model_runs_where_a_kernel_takes_it_else_falls_back(calls):
    """float64: the C++ CPU kernels take it; on a GPU (Triton: no float64) transformers' sdpa runs it."""
    model = llama().double()
    ids, keep = tokens()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=keep).logits
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=keep).logits
    if DEVICE == "cpu":
        assert calls == ["cpu"] * 2
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    else:
        assert calls == ["transformers-sdpa"] * 2 and torch.equal(ours, theirs)


def test_sdpa_model_under_replace_sdpa_runs_attnkern(calls):
    """transformers' own "sdpa" path calls torch.nn.functional.scaled_dot_product_attention by name."""
    model = llama("sdpa")
    ids, keep = tokens()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=keep).logits
        assert calls == []
        with attnkern.replace_sdpa():
            patched = model(input_ids=ids, attention_mask=keep).logits
    assert calls == [AUTO, AUTO]
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)


def test_attention_function_contract():
    """Called directly as transformers calls it: output (B, L, H, Ev), no weights; unsupported extras."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(2, h, 7, 16, device=DEVICE) for h in (4, 2, 2))
    out, weights = integration.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 7, 4, 16) and out.is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # is_causal passed by the caller wins over the module's flag
    out, _ = integration.attention_forward(module, q, k, v, None, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # attention sinks (gpt-oss's s_aux) run on the kernels
    s_aux = torch.randn(4, device=DEVICE)
    out, _ = integration.attention_forward(module, q, k, v, None, s_aux=s_aux, is_causal=True)
    ref, _ = attnkern.reference_attention(q.double(), k.double(), v.double(), causal=True, enable_gqa=True,
                                          sinks=s_aux.double())
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)
    # logit soft-capping (Gemma 2's softcap) runs on a backend that takes it; where the chosen one does not,
    # the call raises rather than run transformers' sdpa, which cannot compute it
    ref, _ = attnkern.reference_attention(q.double(), k.double(), v.double(), causal=True, enable_gqa=True,
                                          softcap=1.5)
    with attnkern.use_backend("reference"):
        out, _ = integration.attention_forward(module, q, k, v, None, softcap=1.5)
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)
    e = attnkern.explain(q, k, v, is_causal=True, enable_gqa=True, softcap=1.5)
    if e.fallback:
        with pytest.raises(NotImplementedError, match=r"soft-capping \(softcap\) on its kernels only"):
            integration.attention_forward(module, q, k, v, None, softcap=1.5)
    else:
        out, _ = integration.attention_forward(module, q, k, v, None, softcap=1.5)
        torch.testing.assert_close(out, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)


def test_register_checks_the_name_and_registers_the_mask_function():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["attnkern"] is integration.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["attnkern"] is integration.MASK_FUNCTION
    for bad in ("", "sdpa", "eager", "flash_attention_2", 3):
        with pytest.raises(ValueError, match="name must be"):
            integration.register(bad)


def test_importing_attnkern_does_not_import_transformers():
    code = "import sys, attnkern; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def loss_and_grads(cfg, attn, ids, keep=None, prepare=None):
    """One training step's loss and every parameter gradient of a random-weight model built from `cfg`
    (the same weights for every `attn`). The predictions made at padded positions are left out of the loss."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(DEVICE)
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    labels = ids.clone()
    if keep is not None:  # the logits of a padded position (fully masked rows: eager and SDPA differ there)
        labels[:, 1:].masked_fill_(keep[:, :-1] == 0, -100)
    loss = model(input_ids=ids, attention_mask=keep, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_eager(cfg, ids, keep=None, prepare=None):
    """attn_implementation="attnkern" against transformers' eager attention, float32: the loss and every
    gradient. Returns the gradients' names."""
    ours = loss_and_grads(cfg, "attnkern", ids, keep, prepare)
    assert_same_step(ours, loss_and_grads(cfg, "eager", ids, keep, prepare))
    return ours[1].keys()


def assert_same_step(ours, theirs):
    """Two (loss, gradients) of one training step agree (float32)."""
    (loss_a, grads_a), (loss_t, grads_t) = ours, theirs
    torch.testing.assert_close(loss_a, loss_t, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_t.keys()
    for n in grads_t:
        torch.testing.assert_close(grads_a[n], grads_t[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


class KernelCall(NamedTuple):
    backend: str
    mask: Optional[torch.Tensor]
    band: Band
    mods: ScoreMods


@pytest.fixture
def kernel_calls(monkeypatch):
    """Each call of a backend's forward: which backend, the mask, band and score mods it got."""
    seen = []
    for name in backends.names()[1:]:  # "auto" is a choice among them, not one
        b = backends.get(name)

        def forward(q, k, v, mask, scale, band, mods, *rest, _o=b.forward, _name=name):
            seen.append(KernelCall(_name, mask, band, mods))
            return _o(q, k, v, mask, scale, band, mods, *rest)

        monkeypatch.setattr(b, "forward", forward)
    return seen


def test_gpt_oss_sinks_match_eager_forward_and_gradients():
    """A tiny gpt-oss (attention sinks, alternating sliding-window layers), random weights: loss and every
    gradient (the sinks' included) equal transformers' own eager attention in float32."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64)

    def sinks_that_matter(model):  # sinks are zero-initialized
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)

    ids, _ = tokens(length=12, left_pad=0)
    names = assert_matches_eager(cfg, ids, prepare=sinks_that_matter)
    assert any("sinks" in n for n in names)


def mistral_config(window=4):
    return transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      sliding_window=window, max_position_embeddings=64)


@pytest.mark.parametrize("window", [1, 4, 11])
def test_mistral_sliding_window_matches_eager_without_a_dense_mask(window, kernel_calls):
    """A tiny Mistral (every layer sliding, window < length), random weights: loss and every gradient equal
    transformers' eager attention in float32, and the kernels got the window as a band, no mask."""
    ids, _ = tokens(length=12, left_pad=0)
    assert_matches_eager(mistral_config(window), ids)
    # transformers' window W: a query sees itself and the W - 1 keys before it
    assert [(c.backend, c.mask, c.band) for c in kernel_calls] == [(AUTO, None, Band(True, window - 1, 0))] * 2


def padded(keep, side):
    """The batch's padding on the left (as generate pads) or on the right (as training collators pad)."""
    return keep if side == "left" else keep.flip(-1)


def assert_band_and_key_padding(kernel_calls, bands, n_keys):
    """The kernels got each layer's causal band (bands, in call order) and the key padding alone as a
    (B, 1, 1, n) bool mask: no mask over queries x keys was built."""
    assert [(c.backend, c.band) for c in kernel_calls] == [(AUTO, band) for band in bands]
    for c in kernel_calls:
        assert c.mask.dtype == torch.bool and c.mask.shape == (2, 1, 1, n_keys), c.mask.shape


@pytest.mark.parametrize("side", ["left", "right"])
def test_mistral_sliding_window_with_padding_gets_the_band_and_the_key_padding(side, kernel_calls):
    """A padded batch: the window goes as the band and only the key padding as a mask; loss and every
    gradient equal eager's."""
    ids, keep = tokens(length=12, left_pad=3)
    assert_matches_eager(mistral_config(), ids, padded(keep, side))
    assert_band_and_key_padding(kernel_calls, [Band(True, 3, 0)] * 2, 12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_gemma2_padded_batch_gets_the_band_and_the_key_padding(side, kernel_calls):
    """Gemma 2 (soft-capping; a sliding layer, then a global causal one) on a padded batch: both layers get
    their band (the global one bottom-right: its mask came as padding) and the key padding alone."""
    ids, keep = tokens(length=12, left_pad=3)
    q = torch.empty(2, 4, 12, 8, device=DEVICE)
    if attnkern.explain(q, q, q, causal=True, softcap=2.0).backend != AUTO:
        pytest.skip(f"{AUTO} does not take softcap")
    assert_matches_eager(gemma2_config(), ids, padded(keep, side), prepare=sharp_scores)
    assert_band_and_key_padding(kernel_calls, [Band(True, 3, 0), Band(True, -1, 0)], 12)


def test_llama_padded_batch_gets_the_causal_band_and_the_key_padding(kernel_calls):
    """A full-attention causal model with padding: the causal band and the key padding, no 4-D mask."""
    ids, keep = tokens(length=12, left_pad=3)
    assert_matches_eager(llama("eager").config, ids, keep)
    assert_band_and_key_padding(kernel_calls, [Band(True, -1, 0)] * 2, 12)


@pytest.mark.parametrize("model", ["mistral", "gemma2"])
def test_static_cache_generation_gets_the_band_not_a_dense_mask(model, kernel_calls):
    """generate() with a static cache on a left-padded batch: every step's logits equal eager's; the prefill
    got the band with the key padding over the prompt's keys (the cache's empty slots left out), and no
    call a (B, 1, L, S) mask."""
    ids, keep = tokens(length=6, left_pad=2)
    steps, runs = 4, {}
    for attn in ("eager", "attnkern"):
        torch.manual_seed(0)
        cfg = mistral_config() if model == "mistral" else gemma2_config()
        net = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(DEVICE).eval()
        with torch.no_grad():
            out = net.generate(ids, attention_mask=keep, max_new_tokens=steps, do_sample=False,
                               cache_implementation="static", return_dict_in_generate=True, output_scores=True,
                               pad_token_id=0)
        runs[attn] = torch.stack(out.scores)
    torch.testing.assert_close(runs["attnkern"], runs["eager"], rtol=1e-4, atol=1e-4)
    assert len(kernel_calls) == 2 * steps
    # No mask over queries x keys: the prefill gets the band and the key padding over its 6 keys; a decoding
    # step (a compiled cache's: transformers asks for the mask itself) gets its (B, 1, 1, S) mask.
    for c in kernel_calls:
        assert c.backend == AUTO and c.mask.dtype == torch.bool and c.mask.shape[:3] == (2, 1, 1)
    lefts = [3, 3] if model == "mistral" else [3, -1]
    assert [(c.band, c.mask.shape[-1]) for c in kernel_calls[:2]] == [(Band(True, left, 0), 6) for left in lefts]
    assert all(c.band.is_full for c in kernel_calls[2:])


def test_mistral_sliding_window_decoding_matches_eager(kernel_calls):
    """Prefill and decoding with transformers' sliding cache (it keeps W - 1 keys): the band takes the
    bottom-right alignment the cache gives, past the window."""
    window, steps = 4, 6
    ids, _ = tokens(length=6, left_pad=0)
    runs = {}
    for attn in ("eager", "attnkern"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(mistral_config(window), attn_implementation=attn)
        model = model.to(DEVICE).eval()
        logits, cache, step_ids = [], None, ids
        with torch.no_grad():
            for _ in range(steps):
                out = model(input_ids=step_ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
        runs[attn] = torch.stack(logits)
    torch.testing.assert_close(runs["attnkern"], runs["eager"], rtol=1e-5, atol=1e-5)
    # 2 layers x (prefill of 6 queries, then single queries over the W - 1 cached keys and the new one)
    assert [(c.backend, c.mask, c.band) for c in kernel_calls] == [(AUTO, None, Band(True, window - 1, 0))] * 2 * steps


def band_and_padding_as_dense(ours, L, S, window):
    """The (B, L, S) mask the attention function computes from what the mask function returned: the band
    (bottom-right causal, window=(W - 1, 0) for a sliding layer) over all S keys where it returned None, else
    over the first n keys with the returned (B, n) key padding, the keys past n hidden."""
    band = Band(True, -1 if window is None else window - 1, 0)
    if ours is None:
        return band.allowed(L, S).expand(2, L, S)
    n = ours.shape[-1]
    dense = torch.zeros(2, L, S, dtype=torch.bool)
    dense[..., :n] = band.allowed(L, n) & ours[:, None, :]
    return dense


def sdpa_as_dense(theirs, L, S):
    """transformers' sdpa mask as (B, L, S); None there means sdpa's is_causal (top-left) for L > 1."""
    if theirs is not None:
        return theirs[:, 0]
    return (torch.ones(L, S, dtype=torch.bool).tril() if L > 1 else torch.ones(1, S, dtype=torch.bool)).expand(2, L, S)


def test_the_mask_function_gives_the_band_and_the_key_padding_for_causal_and_sliding_masks():
    """Wherever transformers asks for its causal or sliding causal mask (kv > q - W and kv <= q, over absolute
    positions), the mask function returns None or only the key padding over the first n keys, and the band
    with it is exactly transformers' sdpa mask: no cache, a dynamic sliding cache filling up and full, a
    static cache (keys past the positions seen), fewer keys than the window; without and with padding (on
    the left, on the right, and a returned mask fed back in, as generate() does with a static cache)."""
    from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function, \
        sliding_window_causal_mask_function

    sdpa_mask = integration.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    left_out = padding_only = 0
    for window in (None, 1, 3, 5):
        fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
        W = window or 4
        # (q_length, kv_length, q_offset, kv_offset)
        for L, S, q_off, kv_off in ((8, 8, 0, 0), (1, 5, 4, 0), (3, 9, 6, 0), (1, W, 7, 8 - W),
                                    (2, W + 1, 9, 9 - W + 1), (3, 12, 2, 0), (2, 2, 0, 0), (1, 12, 5, 0)):
            # as transformers: a static cache (keys past the positions seen) asks for the mask when decoding
            static_decoding = L == 1 and S > q_off + L - kv_off
            kw = dict(batch_size=2, q_length=L, kv_length=S, q_offset=q_off, kv_offset=kv_off, mask_function=fn,
                      local_size=window, allow_is_causal_skip=not static_decoding)
            seen = torch.ones(2, q_off + L, dtype=torch.bool)
            left, right = seen.clone(), seen.clone()
            left[0, :2] = False  # the first two positions of row 0, the first key kept of row 1
            left[1, kv_off] = False
            right[0, -1] = False
            for padding in (None, seen, left, right):
                ours = integration.MASK_FUNCTION(**kw, attention_mask=padding)
                theirs = sdpa_mask(**kw, attention_mask=padding)
                where = (window, L, S, q_off, kv_off, None if padding is None else padding.tolist())
                if static_decoding:  # allow_is_causal_skip=False: the mask itself, (B, 1, 1, S)
                    assert torch.equal(ours, theirs), where
                    continue
                assert ours is None or ours.shape == (2, q_off + L - kv_off), where
                assert torch.equal(band_and_padding_as_dense(ours, L, S, window), sdpa_as_dense(theirs, L, S)), where
                left_out += ours is None and theirs is not None
                padding_only += ours is not None
                if ours is not None:  # fed back in: the same mask
                    again = integration.MASK_FUNCTION(**kw, attention_mask=ours)
                    assert again is not None and torch.equal(again, ours), where
    assert left_out >= 8 and padding_only >= 50
    # Not transformers' causal or sliding causal mask: built as sdpa builds it.
    for fn, size in ((sliding_window_causal_mask_function(4), 5),
                     (chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)), 4)):
        kw = dict(batch_size=2, q_length=8, kv_length=8, mask_function=fn, local_size=size)
        assert torch.equal(integration.MASK_FUNCTION(**kw), sdpa_mask(**kw))
    assert integration.sliding_window_of(sliding_window_causal_mask_function(6)) == 6
    assert integration.sliding_window_of(causal_mask_function) is None


def test_a_sliding_call_transformers_sdpa_runs_gets_the_window_as_a_mask(monkeypatch):
    """A call left to transformers' sdpa function (here output_attentions=True) gets the sliding mask that
    the mask function left out, built from the window."""
    seen = []
    sdpa = integration.sdpa_attention_forward
    monkeypatch.setattr(integration, "sdpa_attention_forward",
                        lambda m, q, k, v, mask, **kw: (seen.append(mask), sdpa(m, q, k, v, mask, **kw))[1])
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = (torch.randn(2, h, 9, 8, device=DEVICE) for h in (4, 2, 2))
    for extra in ({"output_attentions": True}, {}):
        out, _ = integration.attention_forward(module, q, k, v, None, sliding_window=3, **extra)
        ref, _ = attnkern.reference_attention(q.double(), k.double(), v.double(), causal="bottom_right",
                                              window=(2, 0), enable_gqa=True)
        torch.testing.assert_close(out, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)
    assert len(seen) == 1 and torch.equal(seen[0][0, 0], Band(True, 2, 0).allowed(9, 9))


@pytest.mark.parametrize("window", [None, 3])
def test_key_padding_calls_on_either_path_compute_the_band_with_the_padding(window, monkeypatch):
    """A (B, n) key padding (what the mask function returns for a padded causal or sliding layer) over the
    first n of 12 cached keys: on the kernels and on transformers' sdpa function (output_attentions=True:
    it gets the dense mask built here), the keys past n are left out and the result is the float64
    reference's with the band and the padding as a mask."""
    seen = []
    sdpa = integration.sdpa_attention_forward
    monkeypatch.setattr(integration, "sdpa_attention_forward",
                        lambda m, q, k, v, mask, **kw: (seen.append((k.shape[2], mask.shape)),
                                                        sdpa(m, q, k, v, mask, **kw))[1])
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = (torch.randn(2, h, L, 8, device=DEVICE) for h, L in ((4, 3), (2, 12), (2, 12)))
    padding = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    padding[1, :2] = False
    band = Band(True, -1 if window is None else window - 1, 0)
    for extra in ({"output_attentions": True}, {}):
        out, _ = integration.attention_forward(module, q, k, v, padding, sliding_window=window, **extra)
        allowed = band.allowed(3, 9).to(DEVICE) & padding[:, None, None, :]
        ref, _ = attnkern.reference_attention(q.double(), k[:, :, :9].double(), v[:, :, :9].double(),
                                              attn_mask=allowed, enable_gqa=True)
        torch.testing.assert_close(out, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)
    assert seen == [(9, (2, 1, 3, 9))]


def test_falcon_alibi_float_mask_runs_on_attnkern_under_replace_sdpa(kernel_calls):
    """ALiBi as transformers 5 hands it over: Falcon (alibi=True, "sdpa") adds the per-head bias to a float
    mask and calls torch's SDPA itself. (BLOOM computes its attention in its own code: neither the
    integration nor replace_sdpa sees it.) Under replace_sdpa that call runs on the kernels with the mask;
    loss and every gradient equal the same model on torch's SDPA."""
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=True, bias=True)
    ids, _ = tokens(length=12, left_pad=0)
    theirs = loss_and_grads(cfg, "sdpa", ids)
    assert kernel_calls == []
    with attnkern.replace_sdpa():
        ours = loss_and_grads(cfg, "sdpa", ids)
    assert len(kernel_calls) == 2
    for c in kernel_calls:  # the float mask with ALiBi in it: a different bias per head
        assert c.backend == AUTO and c.band.is_full and c.mask.dtype == torch.float32 and c.mask.shape[1] == 4
        assert not torch.equal(c.mask[:, 0], c.mask[:, 1])
    assert_same_step(ours, theirs)


def sharp_scores(model):
    """Larger query/key weights: attention scores of several units, which a cap of 2 bends."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(6.0)
        layer.self_attn.k_proj.weight.mul_(6.0)


def gemma2_config(softcap=2.0):
    # query_pre_attn_scalar=1: unit scaling, so the scores are large enough for the cap to bend them
    return transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                     query_pre_attn_scalar=1, attn_logit_softcapping=softcap,
                                     max_position_embeddings=64)


@pytest.mark.parametrize("backend", ["reference", AUTO])
def test_gemma2_softcap_and_sliding_layers_match_eager(backend, kernel_calls):
    """A tiny Gemma 2 (logit soft-capping; a sliding layer, then a global one), random weights: loss and every
    gradient equal transformers' eager attention in float32 on a backend that computes soft-capping. The
    calls carry softcap, the sliding layer its window, and no mask reached the kernels. A backend that does
    not take softcap makes the model raise (transformers' sdpa cannot compute it) instead of going wrong."""
    ids, _ = tokens(length=12, left_pad=0)
    q = torch.empty(2, 4, 12, 8, device=DEVICE)
    if attnkern.explain(q, q, q, causal=True, softcap=2.0, backend=backend).backend != backend:
        with attnkern.use_backend(backend), pytest.raises(NotImplementedError, match="soft-capping"):
            loss_and_grads(gemma2_config(), "attnkern", ids)
        return
    with attnkern.use_backend(backend):
        assert_matches_eager(gemma2_config(), ids, prepare=sharp_scores)
    sliding, full = Band(True, 3, 0), Band(False, -1, 0)  # the global layer: is_causal, as sdpa (top-left)
    assert [(c.backend, c.mask, c.band, c.mods.softcap) for c in kernel_calls] == [
        (backend, None, sliding, 2.0), (backend, None, full, 2.0)]
    # soft-capping matters here: without it the eager gradients differ
    capped, plain = (loss_and_grads(cfg, "eager", ids, prepare=sharp_scores)[1]
                     for cfg in (gemma2_config(), gemma2_config(None)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (capped[name] - plain[name]).norm() > 0.1 * plain[name].norm()
