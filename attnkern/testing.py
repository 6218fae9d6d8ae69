"""Gradient validation for any attention function with torch's SDPA signature.

    report = attnkern.testing.check_gradients(my_attention, q, k, v, is_causal=True)
    print(report)            # per tensor: errors against the float64 and the same-dtype reference
    assert report.passed

`check_gradients` runs `fn` forward and backward (with a random upstream gradient), runs the naive
reference (`attnkern.reference_attention`) on the same inputs in float64 and in the input dtype, and
judges the output and every gradient (dq, dk, dv, and d_mask for a float mask that requires grad) by the
project's tolerance rule (attnkern.tolerance). A NaN or Inf anywhere is a failure that says where.
Optionally it also runs `torch.autograd.gradcheck` on float64 copies of the inputs, when `fn` runs in
float64. `attnkern check-grads` is the command-line front of this function.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import tolerance
from .reference import reference_attention

OUTPUT_FACTOR = 2.0  # the rule's factor for the output ...
GRADIENT_FACTOR = 3.0  # ... and for gradients (fp16/bf16)
# gradcheck compares full Jacobians up to this many input elements (2 forward calls per element).
FULL_GRADCHECK_ELEMENTS = 2048
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclass
class TensorCheck:
    """One output or gradient: its errors and the rule's verdict.

    max_abs_err / rel_err: against the float64 reference (rel = ‖x − ref64‖ / ‖ref64‖).
    max_abs_err_same_dtype / rel_err_same_dtype: against the reference run in the input dtype.
    reference_err: max|ref_same_dtype − ref64|, the error the input dtype itself costs the reference.
    measure / error / bound: what the rule compared (max abs error for fp16/bf16, error norm for fp32).
    """

    name: str
    passed: bool
    message: str = ""
    shape: Optional[List[int]] = None
    max_abs_err: Optional[float] = None
    rel_err: Optional[float] = None
    max_abs_err_same_dtype: Optional[float] = None
    rel_err_same_dtype: Optional[float] = None
    reference_err: Optional[float] = None
    measure: str = ""
    error: Optional[float] = None
    bound: Optional[float] = None


@dataclass
class GradcheckResult:
    ran: bool
    passed: Optional[bool] = None  # None: not run
    message: str = ""
    fast_mode: bool = True


@dataclass
class GradientReport:
    """What `check_gradients` found. `passed` is True when every tensor passed and gradcheck (if it ran)
    passed; `failures()` lists why not."""

    name: str
    dtype: str
    device: str
    inputs: Dict[str, str]
    options: Dict[str, object]
    tensors: List[TensorCheck] = field(default_factory=list)
    gradcheck: Optional[GradcheckResult] = None

    @property
    def passed(self) -> bool:
        ok = all(t.passed for t in self.tensors)
        return ok and (self.gradcheck is None or not self.gradcheck.ran or bool(self.gradcheck.passed))

    def failures(self) -> List[str]:
        out = [t.message for t in self.tensors if not t.passed]
        if self.gradcheck is not None and self.gradcheck.ran and not self.gradcheck.passed:
            out.append(f"gradcheck: {self.gradcheck.message}")
        return out

    def to_dict(self) -> Dict:
        return {"name": self.name, "passed": self.passed, "dtype": self.dtype, "device": self.device,
                "inputs": self.inputs, "options": self.options, "tensors": [asdict(t) for t in self.tensors],
                "gradcheck": None if self.gradcheck is None else asdict(self.gradcheck),
                "failures": self.failures()}

    def table(self) -> str:
        def f(x):
            return "-" if x is None else f"{x:.2e}"

        lp = "ref_" + _SHORT.get(self.dtype, self.dtype)  # the reference in the input dtype
        lines = [f"  {'tensor':<7} {'max|x-ref64|':>12} {'rel(ref64)':>10} {'max|x-' + lp + '|':>15} "
                 f"{'rel(' + lp + ')':>12} {'max|' + lp + '-ref64|':>19}  rule"]
        for t in self.tensors:
            if t.measure:
                rule = f"{t.measure} {f(t.error)} {'<=' if t.passed else '>'} {f(t.bound)}"
            else:
                rule = ""
            verdict = "PASS" if t.passed else "FAIL"
            lines.append(f"  {t.name:<7} {f(t.max_abs_err):>12} {f(t.rel_err):>10} {f(t.max_abs_err_same_dtype):>15} "
                         f"{f(t.rel_err_same_dtype):>12} {f(t.reference_err):>19}  {rule}  {verdict}")
            if not t.passed and t.message and not t.measure:
                lines.append(f"          {t.message}")
        if self.gradcheck is not None:
            g = self.gradcheck
            mode = "fast mode: weak on large inputs" if g.fast_mode else "full Jacobian"
            state = ("PASS" if g.passed else "FAIL") if g.ran else "skipped"
            lines.append(f"  gradcheck (float64, {mode}): {state}" + (f": {g.message}" if g.message else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"{'PASS' if self.passed else 'FAIL'}  {self.name}  {self.dtype} on {self.device}  "
                + "  ".join(f"{k} {v}" for k, v in self.inputs.items())
                + "  " + " ".join(f"{k}={v}" for k, v in self.options.items()))
        return head + "\n" + self.table()


def _describe(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "none"
    kind = "bool " if t.dtype == torch.bool else ""
    return f"{kind}{tuple(t.shape)}"


def _check_input(name: str, t, allow_neg_inf: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool:
        if name == "attn_mask":
            return
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    bad = torch.isnan(t) | (torch.isinf(t) & ~(torch.isneginf(t) if allow_neg_inf else torch.zeros_like(t, dtype=torch.bool)))
    if bad.any():
        where = tuple(torch.nonzero(bad)[0].tolist())
        allowed = " (−inf is allowed: it masks)" if allow_neg_inf else ""
        raise ValueError(f"{name} has non-finite values (first at {where}){allowed}; the check needs finite inputs")


def _nonfinite(name: str, x: torch.Tensor) -> str:
    """'' if x is all finite, else a message saying how many NaN/Inf values and where the first is."""
    bad = ~torch.isfinite(x)
    if not bad.any():
        return ""
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    where = tuple(torch.nonzero(bad)[0].tolist())
    return f"{name}: {n_nan} NaN and {n_inf} Inf value(s), first at index {where}"


def _errors(x: torch.Tensor, ref: torch.Tensor):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if x.shape != ref.shape or x.numel() == 0:
        return None, None
    diff = x - ref
    max_abs = diff.abs().max().item()
    denom = ref.norm().item()
    rel = diff.norm().item() / denom if denom > 0 else (0.0 if diff.norm().item() == 0 else math.inf)
    return max_abs, rel


def _call_kwargs(attn_mask, is_causal, scale, enable_gqa, variants: Dict) -> Dict:
    """Only the arguments that differ from SDPA's defaults, so simpler callables (q, k, v) work too;
    `variants` (window, softcap, ...: `_variants`) as they are."""
    kw = dict(variants)
    if attn_mask is not None:
        kw["attn_mask"] = attn_mask
    if is_causal:
        kw["is_causal"] = True
    if scale is not None:
        kw["scale"] = scale
    if enable_gqa:
        kw["enable_gqa"] = True
    return kw


def _leaves(tensors, dtype=None):
    """Fresh leaf copies (optionally cast); the mask keeps its kind and requires grad only if the original did."""
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        c = t.detach().clone()
        if dtype is not None and c.is_floating_point():
            c = c.to(dtype)
        grad = i < 3 or (t.is_floating_point() and t.requires_grad)
        out.append(c.requires_grad_(grad))
    return out


def _forward(fn, leaves, kwargs_of):
    q, k, v, mask = leaves
    out = fn(q, k, v, **kwargs_of(mask))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fn must return the attention output as one tensor, got {type(out).__name__}")
    return out


def _backward(out, leaves, grad_out):
    """Gradients with respect to the leaves that require grad (None where fn's graph does not reach one)."""
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    if not out.requires_grad:
        return [None] * len(wrt)
    g = grad_out.to(device=out.device, dtype=out.dtype)
    return list(torch.autograd.grad(out, wrt, g, allow_unused=True))


def _variants(window, softcap, alibi_slopes, dropout_p, dropout_rng) -> Dict:
    """The `attnkern.attention` arguments beyond SDPA's that a check uses (those given), as fn and the
    reference both get them. Dropout needs a fixed rng: both then drop the same probabilities."""
    if dropout_p and dropout_rng is None:
        raise ValueError("dropout_p > 0 needs a fixed dropout_rng (int64 (2,): seed, offset), so that fn and "
                         "the reference drop the same probabilities (in the forward and the backward)")
    given = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                 dropout_p=dropout_p or None, dropout_rng=dropout_rng if dropout_p else None)
    return {k: v for k, v in given.items() if v is not None}


def _reference(q, k, v, mask, is_causal, scale, enable_gqa, dtype, grad_out, variants: Dict):
    leaves = _leaves((q, k, v, mask), dtype)
    out = reference_attention(*leaves[:3], leaves[3], causal=bool(is_causal), scale=scale,
                              enable_gqa=enable_gqa, **variants)[0]
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(device=out.device, dtype=out.dtype))
    return out, list(grads)


def _run_gradcheck(fn, leaves, kwargs_of, fast_mode: bool) -> GradcheckResult:
    inputs64 = _leaves(leaves, torch.float64)
    diff_inputs = [t for t in inputs64 if t is not None and t.requires_grad]
    q, k, v, mask = inputs64

    def f(*diff):
        it = iter(diff)
        args = [next(it) if (t is not None and t.requires_grad) else t for t in inputs64]
        return fn(args[0], args[1], args[2], **kwargs_of(args[3]))

    try:
        out = f(*diff_inputs)
    except Exception as exc:  # noqa: BLE001 - "does not run in float64" is a skip, whatever the error
        return GradcheckResult(False, None, f"fn does not run in float64 ({type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''})", fast_mode)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        return GradcheckResult(False, None, f"fn returned {got} for float64 inputs", fast_mode)
    try:
        torch.autograd.gradcheck(f, tuple(diff_inputs), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=fast_mode)
    except Exception as exc:  # noqa: BLE001 - GradcheckError or an error in the backward: both fail
        text = " ".join(str(exc).split())
        return GradcheckResult(True, False, f"{type(exc).__name__}: {text[:400]}", fast_mode)
    return GradcheckResult(True, True, "", fast_mode)


def check_gradients(
    fn: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    grad_out: Optional[torch.Tensor] = None,
    seed: int = 0,
    gradcheck: bool = False,
    gradcheck_fast_mode: Optional[bool] = None,
    name: Optional[str] = None,
    window=None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_rng: Optional[torch.Tensor] = None,
) -> GradientReport:
    """Check `fn`'s output and gradients against the naive reference by the tolerance rule.

    fn: any callable with torch's SDPA signature, `fn(query, key, value, attn_mask=None, dropout_p=0.0,
        is_causal=False, scale=None, enable_gqa=False)`; only the arguments that differ from those
        defaults are passed, so `fn(q, k, v)` suffices for a plain case. It must return the output tensor.
    query, key, value: the inputs (any float dtype and device); they are copied, never modified.
    attn_mask: None, a bool mask (True = attend) or a float mask added to the scores. A float mask that
        requires grad gets its gradient checked (d_mask).
    is_causal, scale, enable_gqa: as in SDPA (is_causal is top-left aligned).
    window: a sliding window (left, right) as `attnkern.attention` takes it (FlashAttention's window_size);
        fn is then also passed `window=` (SDPA itself has no such argument).
    softcap, alibi_slopes: logit soft-capping and ALiBi slopes as `attnkern.attention` takes them; fn is
        passed them (`softcap=`, `alibi_slopes=`) where given.
    dropout_p, dropout_rng: dropout with a fixed (seed, offset) (int64 (2,), as `attnkern.attention`'s
        dropout_rng), required with dropout_p > 0: fn is passed both, and the reference drops the same
        probabilities, in the forward and the backward (gradcheck reruns fn with the same rng).
    grad_out: the upstream gradient of the output (default: standard normal, drawn with `seed`).
    gradcheck: also run torch.autograd.gradcheck on float64 copies of the inputs (skipped, and said so,
        when fn does not run in float64). Meant for small inputs: by default (gradcheck_fast_mode=None)
        it compares full Jacobians when q, k, v and the mask have at most FULL_GRADCHECK_ELEMENTS elements
        in all, and otherwise uses gradcheck's fast mode, whose tolerance grows with the input size (a
        backward that is 10% off can pass it on inputs of a few thousand elements).
    Returns a GradientReport; `report.passed` is the verdict, `print(report)` the readable form.
    Raises TypeError/ValueError for unusable inputs (non-tensors, non-finite values).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (an attention function with SDPA's signature), got {type(fn).__name__}")
    for arg, t in (("query", query), ("key", key), ("value", value)):
        _check_input(arg, t)
    if attn_mask is not None:
        _check_input("attn_mask", attn_mask, allow_neg_inf=True)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    dtype = query.dtype
    dtype_name = str(dtype).replace("torch.", "")

    variants = _variants(window, softcap, alibi_slopes, dropout_p, dropout_rng)

    def kwargs_of(mask):
        return _call_kwargs(mask, is_causal, scale, enable_gqa, variants)

    leaves = _leaves((query, key, value, attn_mask))
    mask_grad = leaves[3] is not None and leaves[3].requires_grad
    names = ["dq", "dk", "dv"] + (["d_mask"] if mask_grad else [])

    # The output's shape by the reference's semantics, computed on the meta device (no memory, no math).
    meta = [None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta") for t in leaves]
    out_shape = tuple(reference_attention(*meta[:3], meta[3], causal=bool(is_causal), window=window, scale=scale,
                                          enable_gqa=enable_gqa)[0].shape)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    elif tuple(grad_out.shape) != out_shape:
        raise ValueError(f"grad_out must have the output's shape {out_shape}, got {tuple(grad_out.shape)}")

    out = _forward(fn, leaves, kwargs_of)
    if tuple(out.shape) == out_shape:
        grads = _backward(out, leaves, grad_out)
    else:
        grads = ["the output's shape is wrong" for _ in names]
    ref64, grads64 = _reference(*leaves, is_causal, scale, enable_gqa, torch.float64, grad_out, variants)
    ref_lp, grads_lp = _reference(*leaves, is_causal, scale, enable_gqa, dtype, grad_out, variants)

    report = GradientReport(
        name=name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn),
        dtype=dtype_name, device=str(query.device),
        inputs={"q": _describe(query), "k": _describe(key), "v": _describe(value), "mask": _describe(attn_mask)
                + ("" if attn_mask is None or attn_mask.dtype == torch.bool else
                   f" {str(attn_mask.dtype).replace('torch.', '')}" + (" (grad)" if mask_grad else ""))},
        options={"is_causal": bool(is_causal), "scale": "default" if scale is None else scale,
                 "enable_gqa": bool(enable_gqa), **_describe_variants(variants)},
    )
    items = [("out", out, ref64, ref_lp, OUTPUT_FACTOR)]
    items += [(n, g, g64, glp, GRADIENT_FACTOR) for n, g, g64, glp in zip(names, grads, grads64, grads_lp)]
    for tname, x, r64, rlp, factor in items:
        report.tensors.append(_judge(tname, x, r64, rlp, dtype, factor))
    if gradcheck:
        if gradcheck_fast_mode is None:
            numel = sum(t.numel() for t in leaves if t is not None and t.requires_grad)
            gradcheck_fast_mode = numel > FULL_GRADCHECK_ELEMENTS
        report.gradcheck = _run_gradcheck(fn, leaves, kwargs_of, gradcheck_fast_mode)
    return report


def _describe_variants(variants: Dict) -> Dict:
    """The report's (JSON-friendly) form of the variants."""
    out = {}
    for k, v in variants.items():
        out[k] = v.tolist() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, tuple) else v
    return out


def _judge(name, x, ref64, ref_lp, dtype, factor) -> TensorCheck:
    shape = list(ref64.shape)
    if isinstance(x, str):  # could not be computed; x says why
        return TensorCheck(name, False, f"{name}: not checked: {x}", shape)
    if x is None:
        which = {"dq": "query", "dk": "key", "dv": "value", "d_mask": "attn_mask"}.get(name, name)
        return TensorCheck(name, False, f"{name}: fn gave no gradient for {which} (is its output differentiable "
                                        f"through autograd?)", shape)
    check = TensorCheck(name, True, shape=list(x.shape))
    check.reference_err = _errors(ref_lp, ref64)[0]
    bad = _nonfinite(name, x.detach())
    if bad:
        check.passed, check.message = False, bad
        return check
    check.max_abs_err, check.rel_err = _errors(x, ref64)
    check.max_abs_err_same_dtype, check.rel_err_same_dtype = _errors(x, ref_lp)
    verdict = tolerance.evaluate(name, x, ref64, ref_lp, dtype, factor)
    check.passed, check.message = verdict.passed, verdict.message
    check.measure, check.error, check.bound = verdict.measure, verdict.error, verdict.bound
    return check
