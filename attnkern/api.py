"""Public entry points: `scaled_dot_product_attention` (torch's signature and semantics), `attention`
(the richer API) and `explain` (which path a call takes, and why).

Every call goes the same way: normalize the arguments into one AttentionProblem (problem.py), choose a
backend (backends/__init__.py), run it through the custom ops (ops.py), view the result back into the
caller's shape.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import backends, config, masks, ops, reference
from .problem import AttentionProblem, normalize
from .sinks import apply_sinks, check_sinks


class AttnkernFallbackWarning(UserWarning):
    """A call to attnkern's own functions (backend "auto") runs the naive O(L*S)-memory reference path
    because no fused kernel covers it (dropout, a device without kernels, ...). Issued once per set of
    reasons, never under torch.compile, never by replace_sdpa() (which sends such calls to torch and only
    logs); silence it with warnings.filterwarnings("ignore", category=AttnkernFallbackWarning)."""


_warned = set()


def _warn_fallback(choice: backends.Choice) -> None:
    if not choice.fallback or torch.compiler.is_compiling():
        return
    key = tuple(sorted(choice.rejected.items()))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"attnkern: {choice.reason}", AttnkernFallbackWarning, stacklevel=4)


def _requested(backend: Optional[str]) -> str:
    return config.requested_backend() if backend is None else backends.check_name(backend)


def _run(problem: AttentionProblem, backend: Optional[str], sinks: Optional[torch.Tensor] = None):
    choice = backends.select(problem, _requested(backend))
    _warn_fallback(choice)
    if choice.backend == "reference" and problem.dropout_p > 0.0:
        # Dropout needs its random mask in the backward: the differentiable naive path keeps it.
        out, lse = reference.reference_attention(
            problem.q, problem.k, problem.v, problem.mask, band=problem.band, scale=problem.scale,
            enable_gqa=True, dropout_p=problem.dropout_p,
            compute_dtype=torch.float64 if problem.dtype == torch.float64 else torch.float32,
        )
        out_lo = None
    else:
        out, lse, _, out_lo = ops.attention_forward(
            problem.q, problem.k, problem.v, problem.mask, problem.scale, problem.band.as_op(), choice.backend,
            problem.needs_grad or (sinks is not None and sinks.requires_grad and torch.is_grad_enabled()),
            problem.deterministic,
        )
    if sinks is not None:  # exact rescale by the lse, on every backend (sinks.py)
        out, lse = apply_sinks(out, lse, sinks, out_lo)
    return out.reshape(problem.output_shape()), lse.reshape(problem.lse_shape())


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`: same signature, same result.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev).
    A bool mask marks the keys to attend (True); a float mask is added to the scaled scores; masks
    broadcast to (N, ..., Hq, L, S). `is_causal` is top-left aligned and combines with `attn_mask`.
    attn_mask may also be torch.nn.attention.bias's `causal_upper_left(...)` (top-left causal) or
    `causal_lower_right(...)` (bottom-right), read as torch reads them; with is_causal=True they raise
    ValueError as in torch. Fully masked rows give 0. `scale` (default 1/sqrt(E)) may be any finite value,
    0 and negative included; it multiplies q·k (never q or k alone). fp16/bf16/fp32 inputs compute scores
    in float32: their scale is rounded to float32, and |scale| beyond float32's range raises ValueError
    (torch returns NaN there). Zero-sized inputs give torch's empty results. The backend is the one set by
    `use_backend` or ATTNKERN_BACKEND (auto); `torch.nn.attention.sdpa_kernel` concerns torch's SDPA and is
    not consulted here (under `replace_sdpa()` it sends calls to torch).
    """
    problem = normalize(
        query, key, value, attn_mask, dropout_p,
        masks.CAUSAL_TOP_LEFT if is_causal else masks.CAUSAL_NONE, scale, enable_gqa,
    )
    return _run(problem, None)[0]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal=False,
    window=None,
    sinks: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
    return_lse: bool = True,
    backend: Optional[str] = None,
    deterministic: bool = False,
):
    """Attention with the options SDPA lacks. Returns (out, lse) or, with return_lse=False, out.

    causal: False, "top_left" (= True, SDPA's is_causal) or "bottom_right" (FlashAttention's: the last
        query row sees the last key, so with Lq > Lk the first Lq - Lk rows see nothing and give 0).
    window: None or (left, right), FlashAttention's window_size: query i sees keys
        i + Lk - Lq - left .. i + Lk - Lq + right, -1 meaning unbounded on that side. With `causal` the
        right bound is 0 and the alignment is causal's ("top_left": offset 0 instead of Lk - Lq).
        Composes with attn_mask and GQA; the kernels skip the tiles outside the band, so the cost grows
        with Lq * window rather than Lq * Lk.
    sinks: None or a float tensor (Hq,), one logit per query head (gpt-oss's attention sinks): it joins
        each row's softmax denominator and attends to nothing; differentiable. A fully masked row then
        gives 0 and lse = sink. Applied exactly through the log-sum-exp on every backend (sinks.py).
    lse: the natural-log log-sum-exp of each row's scaled, masked scores, (N, ..., Hq, L), float32
        (float64 for float64 inputs); -inf for a fully masked row. It is differentiable.
    backend: "auto", "triton", "reference", ...; None means `use_backend(...)`/ATTNKERN_BACKEND/auto.
        An explicit backend that cannot run the call raises BackendUnavailableError with the reason.
    deterministic: True asks for a backward that is bitwise reproducible run to run. The Triton backend's
        default backward is a single pass that sums dQ with float32 atomics (faster, but the last bits
        of dQ may vary on a GPU); this selects its two-pass backward instead, as
        torch.use_deterministic_algorithms(True) does for every call (read when the backward runs). The
        other backends' backward is always deterministic.
    """
    problem = normalize(
        query, key, value, attn_mask, dropout_p, masks.parse_causal(causal), scale, enable_gqa, window=window,
        deterministic=deterministic,
    )
    sinks = check_sinks(sinks, problem.Hq, problem.device)
    out, lse = _run(problem, backend, sinks)
    return (out, lse) if return_lse else out


@dataclass
class Explanation:
    """What `explain` found: the backend a call runs on, why, and what normalization did."""

    backend: str
    reason: str
    fallback: bool
    problem: str
    rejected: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    backward: str = ""  # which backward kernels a gradient of this call would run

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}" + (" (fallback)" if self.fallback else ""),
                 f"why: {self.reason}", f"problem: {self.problem}"]
        lines += [f"backward: {self.backward}"] if self.backward else []
        lines += [f"not {name}: {why}" for name, why in self.rejected.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
    causal=None, window=None, backend: Optional[str] = None, deterministic: bool = False,
) -> Explanation:
    """Say which path a call with these arguments takes and why, without running it.

    Takes SDPA's arguments, plus `causal=`, `window=`, `backend=` and `deterministic=` (as in
    `attention`; causal overrides is_causal). `backward` says which backward kernels a gradient would run
    now (with torch.are_deterministic_algorithms_enabled() as it is at this call).
    An explicit backend that cannot run the call is reported, not raised. Inside a
    `torch.nn.attention.sdpa_kernel(...)` block a note says that under `replace_sdpa()` torch runs the call.
    """
    code = masks.parse_causal(causal) if causal is not None else (
        masks.CAUSAL_TOP_LEFT if is_causal else masks.CAUSAL_NONE)
    problem = normalize(query, key, value, attn_mask, dropout_p, code, scale, enable_gqa, window=window,
                        deterministic=deterministic)
    notes = list(problem.notes)
    from .dispatch import torch_kernel_restriction  # dispatch imports this module

    restriction = torch_kernel_restriction()
    if restriction is not None:
        notes.append(f"under replace_sdpa() torch's SDPA runs this call: {restriction}")
    requested = _requested(backend)
    try:
        choice = backends.select(problem, requested)
    except backends.BackendUnavailableError as exc:
        return Explanation("none", str(exc), False, problem.summary(), notes=notes)
    backward = backends.get(choice.backend).backward_path(config.deterministic_backward(deterministic))
    return Explanation(choice.backend, choice.reason, choice.fallback, problem.summary(),
                       dict(choice.rejected), notes, backward)
