"""The model-level entry: examples/train_context_parallel.py trains a tiny model with its sequence split
over gloo processes inside attnkern.distributed.context_parallel, and its losses equal the single-process
run (torch's SDPA on the full sequence)."""
import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("procs,method,layout,length", [(2, "ring", "zigzag", 29), (4, "ulysses", "contiguous", 24)])
def test_context_parallel_training_matches_single_process(capsys, monkeypatch, procs, method, layout, length):
    # Importable by name: the spawned ranks unpickle the example's functions by module (sys.path is inherited).
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("train_context_parallel")
    result = module.main(["--procs", str(procs), "--method", method, "--layout", layout, "--steps", "3",
                          "--length", str(length), "--hidden", "32", "--layers", "1"])
    printed = capsys.readouterr().out
    assert "largest loss difference" in printed and f"{procs} processes" in printed
    single, sharded = result["single"], result["sharded"]
    assert len(single) == len(sharded) == 3
    for a, b in zip(single, sharded):
        assert abs(a - b) <= 1e-5 * abs(a), (single, sharded)
    assert single[0] != single[-1]  # it trained


@pytest.mark.parametrize("method,layout", [("ring", "zigzag"), ("ulysses", "contiguous")])
def test_transformers_llama_under_context_parallel(method, layout):
    """A tiny Llama with attn_implementation="attnkern", sequence sharded over 2 gloo processes inside
    context_parallel: loss and all parameter gradients equal the single-process run (checks.check_llama)."""
    pytest.importorskip("transformers")
    import distributed_checks as checks
    from attnkern.distributed import run_local

    failures = run_local(checks.check_llama, 2, method, layout, timeout=200)
    assert not any(failures), "\n".join(m for f in failures for m in f)


def test_transformers_calls_context_parallel_refuses():
    """Inside context_parallel, what a sharded sequence cannot mean raises ValueError naming it (checked
    before any communication: no process group needed)."""
    import torch

    from attnkern.distributed import context
    from attnkern.distributed.context import context_parallel, transformers_attention, transformers_mask

    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with context_parallel():
        for kwargs, words in (({"attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)}, "attention mask"),
                              ({"kwargs": {"softcap": 30.0}}, "softcap"),
                              ({"kwargs": {"s_aux": torch.zeros(2)}}, "s_aux"),
                              ({"kwargs": {"sliding_window": 3}}, "sliding_window")):
            args = dict(attention_mask=None, dropout=0.0, scaling=None, is_causal=True, kwargs={})
            args.update(kwargs)
            with pytest.raises(ValueError, match=words):
                transformers_attention(module, q, q, q, **args)
        transformers_mask(None)
        transformers_mask(torch.ones(1, 4, dtype=torch.bool))  # nothing padded: fine
        with pytest.raises(ValueError, match="key_padding_mask"):
            transformers_mask(torch.tensor([[True, True, False, True]]))
    assert context.active() is None
