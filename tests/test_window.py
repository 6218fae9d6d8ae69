"""Sliding windows (`attention(window=(left, right))`, FlashAttention's window_size) beyond the shared
case matrix, which runs the window cases of tests/cases.py on every backend: the band's own arithmetic
against a brute-force count, argument errors, explain, check-grads, the bench's --window and FLOPs."""
import itertools
import json

import pytest
import torch

import attnkern
from attnkern.tools import cli
from attnkern.band import Band, make_band, parse_window
from attnkern.tools.flops import attention_flops, window_pairs
from attnkern.masks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT


def _brute_allowed(L, S, offset, left, right):
    return torch.tensor([[(right < 0 or j <= i + offset + right) and (left < 0 or j >= i + offset - left)
                          for j in range(S)] for i in range(L)])


@pytest.mark.parametrize("L,S", [(1, 1), (7, 19), (19, 7), (16, 16)])
def test_band_ranges_agree_with_a_brute_force_pattern(L, S):
    for br, left, right in itertools.product((False, True), (-1, 0, 2, 9), (-1, 0, 3, 11)):
        band = Band(br, left, right)
        want = _brute_allowed(L, S, S - L if br else 0, left, right)
        got = band.allowed(L, S)
        assert torch.equal(got if got is not None else torch.ones(L, S, dtype=torch.bool), want), band
        assert window_pairs(L, S, band) == int(want.sum())
        for r0, r1 in [(0, L), (0, 1), (L // 2, L), (L - 1, L)]:  # key range of a row block
            cols = want[r0:r1].any(0).nonzero().flatten()
            b, e = band.key_range(r0, r1, L, S)
            if len(cols):
                assert (b, e) == (int(cols[0]), int(cols[-1]) + 1), (band, r0, r1)
            else:
                assert b >= e or not want[r0:r1, b:e].any()
        for c0, c1 in [(0, S), (S // 2, S), (0, 1)]:  # query range of a key block
            rows = want[:, c0:c1].any(1).nonzero().flatten()
            b, e = band.query_range(c0, c1, L, S)
            if len(rows):
                assert (b, e) == (int(rows[0]), int(rows[-1]) + 1), (band, c0, c1)


def test_make_band_composes_causal_and_window():
    assert make_band(CAUSAL_NONE, None).is_full
    assert make_band(CAUSAL_TOP_LEFT, None) == Band(False, -1, 0)
    assert make_band(CAUSAL_BOTTOM_RIGHT, None) == Band(True, -1, 0)
    assert make_band(CAUSAL_NONE, (4, 2)) == Band(True, 4, 2)  # FlashAttention: bottom-right
    assert make_band(CAUSAL_TOP_LEFT, (4, 2)) == Band(False, 4, 0)  # causal: right = 0, top-left


@pytest.mark.parametrize("window,message", [
    ((-2, 0), r"window\[0\] \(left\) must be an int >= -1"),
    ((0, 1.5), r"window\[1\] \(right\) must be an int >= -1"),
    (5, r"window must be None or a pair \(left, right\)"),
    ((1, 2, 3), r"window must be None or a pair"),
    ((True, 1), r"window\[0\] \(left\) must be an int"),
])
def test_bad_windows_are_clear_errors(window, message):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=message):
        attnkern.attention(q, q, q, window=window)
    with pytest.raises(ValueError, match=message):
        attnkern.explain(q, q, q, window=window)


def test_explain_shows_the_window_and_its_band():
    q = torch.randn(1, 2, 5, 8)
    text = str(attnkern.explain(q, q, q, window=(3, 0), causal="top_left", backend="cpu"))
    assert "window=(3, 0)" in text and "band: window (3, 0) top_left" in text


def test_check_grads_takes_a_window(capsys):
    rc = cli.main(["check-grads", "--backends", "cpu,reference,torch", "--dtypes", "fp32", "--seqlen", "40",
                   "--kv-seqlen", "57", "--head-dim", "16", "--window", "5,2", "--quiet", "--json", "-"])
    doc = json.loads(capsys.readouterr().out)
    status = {c["target"]: c["status"] for c in doc["checks"]}
    assert rc == 0 and status == {"cpu": "PASS", "reference": "PASS", "torch": "SKIP"}
    assert doc["checks"][0]["report"]["options"]["window"] == [5, 2]


def test_bench_window_cells_and_flops(tmp_path, capsys):
    out = tmp_path / "w.json"
    rc = cli.main(["bench", "--device", "cpu", "--seqlens", "64", "--batch", "1", "--heads", "2", "--head-dims", "16",
                   "--window", "7,0", "--causal", "yes", "--modes", "fwd,fwd+bwd", "--repeats", "1", "--warmup", "0",
                   "--providers", "attnkern:cpu,sdpa,naive", "--no-progress", "--no-plot", "--json", str(out)])
    capsys.readouterr()
    assert rc == 0
    cells = json.loads(out.read_text())["cells"]
    assert {c["provider"] for c in cells} == {"attnkern:cpu", "sdpa", "naive"}
    assert all(c["status"] == "ok" and c["window"] == [7, 0] for c in cells), cells
    pairs = window_pairs(64, 64, make_band(CAUSAL_TOP_LEFT, (7, 0)))
    assert pairs == sum(min(i, 7) + 1 for i in range(64))
    assert attention_flops(1, 2, 64, 64, 16, causal=True, window=(7, 0)) == 2 * 2 * pairs * 32
    with pytest.raises(SystemExit):
        cli.main(["bench", "--window", "3"])
    assert parse_window((3, -1)) == (3, -1)
