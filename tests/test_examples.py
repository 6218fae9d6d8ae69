"""The examples run, with tiny settings, and show what they claim."""
import importlib.util
from pathlib import Path

import torch

from attnkern import backends
from matrix import AUTO, DEVICE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    import sys

    if str(EXAMPLES) not in sys.path:  # as when run as a script: the examples import lm_training beside them
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tiny_transformer(capsys, monkeypatch):
    example = _load("train_tiny_transformer")
    calls = []
    b = backends.get(AUTO)
    monkeypatch.setattr(b, "forward", lambda *a, _o=b.forward: (calls.append(1), _o(*a))[1])
    results = example.main(["--steps", "3", "--batch", "2", "--length", "16", "--hidden", "32", "--heads", "2",
                            "--layers", "1", "--vocab", "31", "--device", DEVICE, "--dtype", "float32"])
    printed = capsys.readouterr().out
    # Here the fused kernels run (Triton on a GPU, the C++ kernels on the CPU).
    assert results["path"] == f"attnkern, backend '{AUTO}'" and "attention runs on: attnkern" in printed
    assert len(calls) == 3  # 1 layer x 3 steps, in the attnkern run only
    ours, theirs = results["attnkern"]["losses"], results["torch SDPA"]["losses"]
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert ours[0] != ours[-1]  # it trained
    assert "tokens/s" in printed and "largest loss difference" in printed


def test_train_sliding_window(capsys, monkeypatch):
    example = _load("train_sliding_window")
    calls = []
    b = backends.get(AUTO)

    def forward(q, k, v, mask, scale, band, *rest, _o=b.forward):
        calls.append((mask, band))
        return _o(q, k, v, mask, scale, band, *rest)

    monkeypatch.setattr(b, "forward", forward)
    results = example.main(["--steps", "3", "--batch", "2", "--length", "24", "--window", "5", "--hidden", "32",
                            "--heads", "4", "--kv-heads", "2", "--layers", "2", "--vocab", "31",
                            "--device", DEVICE, "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert results["path"] == f"attnkern, backend '{AUTO}'" and "runs on: attnkern" in printed
    # 2 layers x 3 steps, in the attnkern run only: the window as a band (a token and the 4 before it),
    # causal, no mask
    assert [(m, (band.left, band.right)) for m, band in calls] == [(None, (4, 0))] * 6
    ours, theirs = results["attnkern"]["losses"], results["dense mask"]["losses"]
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    assert ours[0] != ours[-1]  # it trained
    assert "tokens/s" in printed and "largest loss difference" in printed


def test_sliding_window_example_mask_is_the_band():
    """The comparison run's dense mask is the band attnkern computes (a token and the window - 1 before it)."""
    from attnkern.band import make_band
    from attnkern.masks import CAUSAL_TOP_LEFT

    example = _load("train_sliding_window")
    for window in (1, 3, 9):
        band = make_band(CAUSAL_TOP_LEFT, (window - 1, 0)).allowed(9, 9)
        assert torch.equal(example.dense_window_mask(9, window, "cpu"), band)
