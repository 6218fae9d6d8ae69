"""The transformers integration on packed batches (several documents in one row): causal per document on
the varlen path, with position_ids restarting or with the flash-attention kwargs cu_seq_lens_q/k, against
the same documents as a padded batch. A tiny Llama built from its config, no downloads."""
import pytest
import torch

import attnkern
import attnkern.api as api
from attnkern.tolerance import assert_all, check

transformers = pytest.importorskip("transformers", reason="needs the transformers extra (pip install -e .[test])")

LENGTHS = [5, 1, 17, 9]


@pytest.fixture
def varlen_calls(monkeypatch):
    calls = []
    real = api.varlen_attention

    def spy(*args, **kwargs):
        calls.append(args[3].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "varlen_attention", spy)
    return calls


def _model(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attnkern.register_transformers())
    return model.to(dtype)


def _loss_and_grads(model, logits_of_docs, weights):
    """A loss over the documents' real tokens only (so packed and padded see the same terms)."""
    model.zero_grad()
    loss = sum((logits.float() * w).sum() for logits, w in zip(logits_of_docs, weights))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_padded_batch(form, varlen_calls):
    model = _model(torch.float32)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=gen) for n in LENGTHS]
    weights = [torch.randn(n, 97, generator=gen) for n in LENGTHS]
    ids = torch.cat(docs)[None]
    kwargs = dict(position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None], use_cache=False)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    if form == "cu_seq_lens":
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    logits = model(input_ids=ids, **kwargs).logits[0]
    assert varlen_calls == [cu.tolist()] * 2  # both layers ran on the varlen path
    packed = logits.split(LENGTHS)
    loss, grads = _loss_and_grads(model, packed, weights)

    padded_ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(padded_ids)
    for i, d in enumerate(docs):
        padded_ids[i, :len(d)], mask[i, :len(d)] = d, 1
    plogits = model(input_ids=padded_ids, attention_mask=mask, use_cache=False).logits
    padded = [plogits[i, :n] for i, n in enumerate(LENGTHS)]
    ploss, pgrads = _loss_and_grads(model, padded, weights)

    results = [check("logits", torch.cat(packed), torch.cat(padded).double(), None, torch.float32),
               check("loss", loss, ploss.double(), None, torch.float32)]
    results += [check(n, grads[n], pgrads[n].double(), None, torch.float32) for n in pgrads]
    assert_all(results)


def test_unpacked_and_cached_calls_stay_dense(varlen_calls):
    model = _model(torch.float32)
    ids = torch.randint(0, 97, (1, 12))
    model(input_ids=ids, use_cache=False)  # positions 0..11: one document
    model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]]))  # a cache: dense
    assert varlen_calls == []
