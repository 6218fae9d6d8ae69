"""Randomized tests: every backend that runs here against the float64 reference, and invalid calls.

Each case is drawn from a seed by `cases.random_case` (random ranks, batch and head counts with GQA/MQA
and broadcast, lengths 1..300, head dims 1..256 with Ev != E, causal alignments, masks of random kinds
and broadcast shapes with fully masked and finfo.min rows, strided layouts, random scales) and judged
by the tolerance rule on the output, the log-sum-exp and every gradient (dq, dk, dv and the float
mask's), as test_correctness.py judges the hand-written cases; a few seeds more with one size zero
(`cases.random_empty_case`). Random invalid calls (tests/bad_inputs.py) run in a subprocess.

    ATTNKERN_RANDOM_SEED=123 pytest tests/test_random_oracle.py -k cpu-float16   # one case again
    ATTNKERN_RANDOM_CASES=2000 pytest tests/test_random_oracle.py                # a soak run
    ATTNKERN_RANDOM_START=10000 ...                                               # other seeds

ATTNKERN_RANDOM_SEED takes a comma-separated list of seeds. ATTNKERN_RANDOM_CASES=N runs N cases per
(backend, dtype) pair, and N / TRITON_SHARE per Triton pair under the interpreter. Seeds are shared by
the pairs: seed 123 is the same case for cpu-float16 and reference-float16 (the interpreter's cases are
drawn smaller, so its seeds name other cases).
"""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.tolerance import evaluate
from cases import (RANDOM_MAX_WORK, as_kwargs, describe, grad_leaves, make_inputs, random_case,
                   random_empty_case, run_reference, upstream_grads)
from matrix import DEVICE, ON_GPU, pair_id, pairs

# Cases per (backend, dtype) pair by default: a CPU-kernel or reference case costs ~0.1 s of CPU time
# (its two reference runs included), an interpreted Triton case ~10x more, so the interpreter gets fewer
# and smaller cases (on a GPU Triton is as cheap as any). The whole file: ~150 s of CPU time.
DEFAULT_CASES = 120
TRITON_SHARE = 8  # the interpreter runs 1/TRITON_SHARE as many cases ...
TRITON_MAX_WORK = RANDOM_MAX_WORK // 4  # ... each at most a quarter of the size
INTERPRETED = ("triton",) if not ON_GPU else ()


def _seeds_for(backend: str):
    chosen = os.environ.get("ATTNKERN_RANDOM_SEED", "").strip()
    if chosen:
        return [int(s) for s in chosen.split(",") if s.strip()]
    n = int(os.environ.get("ATTNKERN_RANDOM_CASES", DEFAULT_CASES))
    if backend in INTERPRETED:
        n = max(1, n // TRITON_SHARE)
    start = int(os.environ.get("ATTNKERN_RANDOM_START", "0"))
    return range(start, start + n)


def _max_work(backend: str) -> int:
    return TRITON_MAX_WORK if backend in INTERPRETED else RANDOM_MAX_WORK


PARAMS = [pytest.param(pair, seed, id=f"{pair_id(pair)}-seed{seed}") for pair in pairs() for seed in _seeds_for(pair[0])]
# Zero-sized problems: a few seeds per pair (the first of each pair's seeds).
EMPTY_CASES = 12
EMPTY_PARAMS = [pytest.param(pair, seed, id=f"{pair_id(pair)}-seed{seed}") for pair in pairs()
                for seed in list(_seeds_for(pair[0]))[:EMPTY_CASES]]


def _lse_has_grad(seed: int) -> bool:
    """Whether the case's upstream gradient reaches the log-sum-exp too (most do), drawn from the seed."""
    return random.Random(seed * 7919 + 1).random() < 0.7


def _header(test: str, pair, seed, case) -> str:
    return (f"random case seed={seed} on {pair_id(pair)}: {describe(case)}, lse gradient: {_lse_has_grad(seed)}\n"
            f"  reproduce: ATTNKERN_RANDOM_SEED={seed} pytest tests/test_random_oracle.py::{test} -k {pair_id(pair)}")


@pytest.mark.parametrize("pair, seed", PARAMS)
def test_random_case_matches_float64_reference(pair, seed):
    _check_case(pair, seed, random_case(seed, _max_work(pair[0])), "test_random_case_matches_float64_reference")


@pytest.mark.parametrize("pair, seed", EMPTY_PARAMS)
def test_random_empty_case_matches_float64_reference(pair, seed):
    """A zero-sized batch, head count, length or value dim: empty (or zero) results and gradients."""
    _check_case(pair, seed, random_empty_case(seed, _max_work(pair[0])),
                "test_random_empty_case_matches_float64_reference")


def _check_case(pair, seed, case, test):
    backend, dtype = pair
    header = _header(test, pair, seed, case)
    q, k, v, mask = make_inputs(case, dtype, DEVICE, seed=seed)
    try:
        out, lse = attnkern.attention(q, k, v, attn_mask=mask, backend=backend, **as_kwargs(case, q.device))
        do, dlse = upstream_grads(out, lse, seed=seed + 1)
        if _lse_has_grad(seed):
            torch.autograd.backward([out, lse], [do, dlse])
        else:  # the kernels' other backward path: no gradient reaches the log-sum-exp
            dlse = None
            out.backward(do)
    except Exception as exc:  # a valid case must run: report which one did not
        raise AssertionError(f"{header}\n  raised {type(exc).__name__}: {exc}") from exc
    grads = [t.grad for t in grad_leaves(q, k, v, mask)]

    out64, lse64, grads64 = run_reference(q, k, v, mask, case, torch.float64, do, dlse)
    out_lp, lse_lp, grads_lp = run_reference(q, k, v, mask, case, dtype, do, dlse)

    verdicts = [
        evaluate("out", out, out64, out_lp, dtype),
        evaluate("lse", lse, lse64, lse_lp, dtype),
        *[evaluate(n, g, g64, glp, dtype, factor=3.0)
          for n, g, g64, glp in zip(["dq", "dk", "dv", "dmask"], grads, grads64, grads_lp)],
    ]
    failures = [v.message for v in verdicts]
    # A bound the half-precision reference made infinite would pass anything: a case that cannot fail.
    failures += [f"{v.name}: the rule's bound is {v.bound} (the reference in {dtype} overflowed): the case "
                 "tests nothing" for v in verdicts if v.bound is not None and not math.isfinite(v.bound)]
    if out.dtype != dtype or lse.dtype != torch.float32:
        failures.append(f"dtypes: out {out.dtype} (want {dtype}), lse {lse.dtype} (want torch.float32)")
    # Rows the oracle finds fully masked give exactly 0, with exactly 0 gradient for their queries.
    empty = torch.isneginf(lse64.detach()).to(out.device)
    if empty.any():
        if not torch.all(out.detach()[empty] == 0):
            failures.append(f"out: {int(empty.sum())} fully masked rows are not exactly 0")
        if grads[0] is not None and not torch.all(grads[0][empty] == 0):
            failures.append("dq: fully masked rows do not get exactly 0 gradient")
    failures = [f for f in failures if f]
    if failures:
        raise AssertionError(header + "\n  " + "\n  ".join(failures))


# --- random invalid calls -------------------------------------------------------------------------
# Drawn by tests/bad_inputs.py and run there, in a subprocess: a call that crashes the process (a kernel
# reading out of bounds) fails this test, naming the call, instead of ending the test run.
BAD_CASES = {"api": 300, "ops": 150}
BAD_INPUTS = os.path.join(os.path.dirname(__file__), "bad_inputs.py")
_MAX_CRASHES = 5  # after this many crashes the rest of the batch is not run


def _run_bad_batch(entry: str, start: int, count: int):
    """Run seeds start..start+count-1 of `entry`; returns the failure lines (crashes included). After a
    crash the batch resumes at the next seed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(attnkern.__file__)))  # the attnkern this test imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    failures, crashes, end = [], 0, start + count
    while start < end:
        proc = subprocess.run([sys.executable, BAD_INPUTS, entry, str(start), str(end - start)], env=env,
                              capture_output=True, text=True, timeout=600)
        lines = proc.stdout.splitlines()
        failures += [line for line in lines if line.startswith("FAIL")]
        if proc.returncode == 0:
            break
        running = [line for line in lines if line.startswith("RUN")]
        if not running:
            failures.append(f"CRASH before any call (exit {proc.returncode}): {proc.stderr[-2000:]}")
            break
        last = running[-1]
        failures.append(f"CRASH (exit {proc.returncode}) {last[4:]}")
        crashes += 1
        start = int(last.split()[1]) + 1
        if crashes >= _MAX_CRASHES:
            failures.append(f"{_MAX_CRASHES} crashes: seeds {start}..{end - 1} not run")
            break
    return failures


@pytest.mark.parametrize("entry", sorted(BAD_CASES))
def test_random_bad_inputs_raise_clear_errors(entry):
    """Random invalid calls through the public API ("api") and the custom ops anyone can call ("ops")
    raise TypeError/ValueError/RuntimeError naming the broken argument, and never crash."""
    chosen = os.environ.get("ATTNKERN_RANDOM_SEED", "").strip()
    if chosen:
        batches = [(int(s), 1) for s in chosen.split(",") if s.strip()]
    else:
        n = int(os.environ.get("ATTNKERN_RANDOM_CASES", DEFAULT_CASES)) * BAD_CASES[entry] // DEFAULT_CASES
        batches = [(int(os.environ.get("ATTNKERN_RANDOM_START", "0")), max(1, n))]
    failures = [f for start, count in batches for f in _run_bad_batch(entry, start, count)]
    if failures:
        raise AssertionError(
            f"{len(failures)} bad {entry} calls were not refused with a clear error "
            f"(reproduce one: PYTHONPATH=. python tests/bad_inputs.py {entry} SEED 1):\n  " + "\n  ".join(failures))
