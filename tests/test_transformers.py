"""The transformers integration: registration, from_pretrained/set_attn_implementation, decoding with a
KV cache, and fallbacks to transformers' own sdpa function. Tiny models, random weights, no downloads."""
import copy
import logging
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import backends, dispatch
from attnkern.tolerance import assert_all, check
from matrix import AUTO, DEVICE

transformers = pytest.importorskip("transformers", reason="needs the transformers extra (pip install -e .[test])")
from attnkern.integrations import transformers as integration  # noqa: E402  (needs transformers)

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


def test_dropout_in_training_falls_back_to_transformers_sdpa(calls, caplog):
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
    with pytest.raises(NotImplementedError, match="softcapping"):  # some versions' sdpa would ignore it
        integration.attention_forward(module, q, k, v, None, softcap=30.0)


def test_register_checks_the_name_and_registers_the_sdpa_masks():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["attnkern"] is integration.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["attnkern"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    for bad in ("", "sdpa", "eager", "flash_attention_2", 3):
        with pytest.raises(ValueError, match="name must be"):
            integration.register(bad)


def test_importing_attnkern_does_not_import_transformers():
    code = "import sys, attnkern; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpt_oss_sinks_match_eager_forward_and_gradients():
    """A tiny gpt-oss (attention sinks, alternating sliding-window layers), random weights: loss and every
    gradient (the sinks' included) equal transformers' own eager attention in float32."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64)

    def run(attn):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(DEVICE)
        with torch.no_grad():  # sinks are zero-initialized: make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
        ids, _ = tokens(length=12, left_pad=0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = run("eager")
    loss_a, grads_a = run("attnkern")
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_e.keys() and any("sinks" in n for n in grads_a)
    for n in grads_e:
        torch.testing.assert_close(grads_a[n], grads_e[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
