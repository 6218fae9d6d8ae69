"""The tolerance rule (FlashAttention's test-suite rule, as attnkern applies it).

`ref64` is the reference in float64; `ref_lp` the same reference run in the input dtype.
- float16/bfloat16: max|x − ref64| <= factor · max|ref_lp − ref64| + 1e-5   (factor 2 for outputs,
  3 for gradients)
- float32 (and float64): ‖x − ref64‖ / ‖ref64‖ <= 1e-5. A reference that is exactly or nearly zero
  (e.g. dQ when every row sees a single key: softmax is then constant) makes a relative norm
  meaningless, so the bound gets a floor of 1e-6 per element in the norm (‖·‖ ≤ 1e-6·√n), far below
  what any wrong kernel produces on unit-scale random inputs. A gradient that is a sum of very many
  terms whose exact total is about zero (a scalar or per-head mask bias summed over every row and key)
  can sit above that floor in any float32 computation, torch's own SDPA and the naive float32 reference
  included; when `ref_lp` (the reference run in float32) is given, the floor is the larger of 1e-6·√n
  and `factor`·‖ref_lp − ref64‖: a float32 result is never held to beating the naive float32 math.
Non-finite values must sit exactly where the reference has the same non-finite value (−inf
log-sum-exp of fully masked rows); NaN never passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Verdict:
    """What the rule found for one tensor: the measured error, the bound it must not exceed, and why it
    failed ('' when it passed). `measure` says which quantity `error` and `bound` are."""

    name: str
    passed: bool
    measure: str = ""  # "max abs error" (fp16/bf16) or "error norm" (fp32/fp64); "" if not measured
    error: Optional[float] = None
    bound: Optional[float] = None
    message: str = ""


def evaluate(name: str, x: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor, dtype: torch.dtype,
             factor: float = 2.0) -> Verdict:
    """Apply the rule to `x` against `ref64` (and `ref_lp` for fp16/bf16); see the module docstring."""
    if x is None or ref64 is None:
        if x is None and ref64 is None:
            return Verdict(name, True)
        return Verdict(name, False, message=f"{name}: one of result/reference is missing")
    if tuple(x.shape) != tuple(ref64.shape):
        return Verdict(name, False, message=f"{name}: shape {tuple(x.shape)} != reference {tuple(ref64.shape)}")
    x = x.detach().to(torch.float64).cpu()
    ref64 = ref64.detach().to(torch.float64).cpu()
    if torch.isnan(x).any():
        return Verdict(name, False, message=(
            f"{name}: {int(torch.isnan(x).sum())} NaN values "
            f"(first at {tuple(torch.nonzero(torch.isnan(x))[0].tolist())})"))
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(x[~finite], ref64[~finite]):
        bad = torch.nonzero(torch.isfinite(x) != finite)
        where = tuple(bad[0].tolist()) if len(bad) else "?"
        return Verdict(name, False, message=f"{name}: non-finite values differ from the reference (first at {where})")
    x, ref64 = x[finite], ref64[finite]
    if x.numel() == 0:
        return Verdict(name, True)
    if dtype in LOW_PRECISION:
        ref_lp = ref_lp.detach().to(torch.float64).cpu()[finite]
        err = (x - ref64).abs().max().item()
        bound = factor * (ref_lp - ref64).abs().max().item() + 1e-5
        what = "max abs error"
    else:
        err = (x - ref64).norm().item()
        floor = 1e-6 * math.sqrt(x.numel())
        if ref_lp is not None and dtype == torch.float32:
            floor = max(floor, factor * (ref_lp.detach().to(torch.float64).cpu()[finite] - ref64).norm().item())
        bound = 1e-5 * ref64.norm().item() + floor
        what = "error norm"
    if err <= bound:
        return Verdict(name, True, what, err, bound)
    return Verdict(name, False, what, err, bound, f"{name}: {what} {err:.3e} > bound {bound:.3e} (dtype {dtype})")


def check(name: str, x: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor, dtype: torch.dtype,
          factor: float = 2.0) -> str:
    """'' if `x` passes the rule against `ref64`, else a message saying by how much it fails."""
    return evaluate(name, x, ref64, ref_lp, dtype, factor).message


def assert_all(results) -> None:
    """Raise AssertionError listing every failing message of `check` results."""
    failures = [msg for msg in results if msg]
    if failures:
        raise AssertionError("\n".join(failures))
