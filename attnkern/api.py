"""Public entry points: `scaled_dot_product_attention` (torch's signature and semantics), `attention`
(the richer API) and `explain` (which path a call takes, and why; `explain_varlen` and
`explain_kvcache` for the packed and the KV-cache entry points).

Every call goes the same way: normalize the arguments into one AttentionProblem (problem.py), choose a
backend (backends/__init__.py), run it through the custom ops (ops.py), view the result back into the
caller's shape. A call shaped like the previous one takes the previous problem and choice with its own
tensors (fastpath.py), and the op does not repeat the checks made here (ops.run_forward).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import backends, config, fastpath, masks, ops
from .problem import AttentionProblem, normalize
from .score_mods import ready_to_run
from .sinks import apply_sinks, check_sinks


class AttnkernFallbackWarning(UserWarning):
    """A call to attnkern's own functions (backend "auto") runs the naive O(L*S)-memory reference path
    because no fused kernel covers it (a device without kernels, a dtype or head dim none takes, ...).
    Issued once per set of reasons, never under torch.compile, never by replace_sdpa() (which sends such
    calls to torch and only logs); silence it with
    warnings.filterwarnings("ignore", category=AttnkernFallbackWarning)."""


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


def _prepare(entry: str, query, key, value, attn_mask, args: tuple, backend: Optional[str], normalize_call):
    """(problem, choice) of a call: the previous call's when it had the same signature (fastpath.py),
    else normalize_call() and backends.select."""
    try:
        requested = _requested(backend)
    except ValueError:
        normalize_call()  # the arguments' own errors come first, as they always have
        raise
    sig = fastpath.signature(entry, query, key, value, attn_mask, args, requested)
    hit = fastpath.lookup(sig, query, key, value, attn_mask)
    if hit is not None:
        return hit
    problem = normalize_call()
    choice = backends.select(problem, requested)
    fastpath.remember(sig, query, key, value, attn_mask, problem, choice)
    return problem, choice


def _run(problem: AttentionProblem, backend: Optional[str], sinks: Optional[torch.Tensor] = None,
         choice: Optional[backends.Choice] = None, want_lse: bool = True):
    """Run a normalized call on `choice` (default: backends.select with `backend`) -> (out, lse) in the
    caller's shapes (lse None unless `want_lse`)."""
    if choice is None:
        choice = backends.select(problem, _requested(backend))
    _warn_fallback(choice)
    records_grad = problem.needs_grad
    # The op's arguments were checked by normalize and select: ops.run_forward does not check them again.
    out, lse, _, out_lo = ops.run_forward(
        problem.q, problem.k, problem.v, problem.mask, problem.scale, problem.band.as_op(),
        *ready_to_run(problem.mods, problem.device).op_args(), choice.backend,
        records_grad or (sinks is not None and sinks.requires_grad and torch.is_grad_enabled()),
        problem.deterministic, records_grad,
    )
    if sinks is not None:  # exact rescale by the lse, on every backend (sinks.py)
        out, lse = apply_sinks(out, lse, sinks, out_lo)
    shape = problem.output_shape()
    out = out if out.shape == shape else out.reshape(shape)
    return out, (lse.reshape(problem.lse_shape()) if want_lse else None)


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
    ValueError as in torch. `dropout_p` > 0 drops probabilities in the kernels (as torch does whether or not
    the module is training: callers pass 0 in eval), its mask drawn from torch's generator for the device
    (reproducible under torch.manual_seed) and regenerated in the backward. Fully masked rows give 0.
    `scale` (default 1/sqrt(E)) may be any finite value, 0 and negative included; it multiplies q·k (never q or k alone). fp16/bf16/fp32 inputs compute scores
    in float32: their scale is rounded to float32, and |scale| beyond float32's range raises ValueError
    (torch returns NaN there). Zero-sized inputs give torch's empty results. The backend is the one set by
    `use_backend` or ATTNKERN_BACKEND (auto); `torch.nn.attention.sdpa_kernel` concerns torch's SDPA and is
    not consulted here (under `replace_sdpa()` it sends calls to torch).
    Nested jagged tensors (torch.nested, layout=torch.jagged, (B, H, j, E)) are taken as torch takes them
    (no attn_mask, no is_causal) and run on the packed varlen path without padding (nested.py); the
    result is a nested jagged tensor like torch's.
    """
    if isinstance(query, torch.Tensor) and query.is_nested:  # nested jagged tensors: the varlen path
        from .nested import nested_sdpa

        return nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    problem, choice = _prepare(
        "sdpa", query, key, value, attn_mask, (dropout_p, is_causal, scale, enable_gqa), None,
        lambda: normalize(query, key, value, attn_mask, dropout_p,
                          masks.CAUSAL_TOP_LEFT if is_causal else masks.CAUSAL_NONE, scale, enable_gqa),
    )
    return _run(problem, None, choice=choice, want_lse=False)[0]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal=False,
    window=None,
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
    dropout_rng: Optional[torch.Tensor] = None,
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
    softcap: None or c > 0 (Gemma 2's logit soft-capping): the scaled scores s become c * tanh(s / c)
        before ALiBi, attn_mask and the softmax; the gradient is exact.
    alibi_slopes: None or float32 (Hq,) or (*batch, Hq): FlashAttention's ALiBi, the bias
        -slope * |i + Lk - Lq - j| added to the (capped) scores, computed in the kernels, never stored.
        The slopes are constants (no gradient; a learned bias is a float attn_mask).
    dropout_p: the probability of dropping each attention probability (kept ones are scaled by
        1 / (1 - p)), fused: the mask is regenerated in the backward from a counter-based generator
        (philox.py), never stored. dropout_rng: None draws (seed, offset) from torch's generator for the
        device (reproducible under torch.manual_seed, advancing it); an int64 tensor (2,) fixes the mask
        (the same rng gives the same mask on every backend).
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
    def normalize_call():
        return normalize(
            query, key, value, attn_mask, dropout_p, masks.parse_causal(causal), scale, enable_gqa, window=window,
            deterministic=deterministic, softcap=softcap, alibi_slopes=alibi_slopes, dropout_rng=dropout_rng,
        )

    if alibi_slopes is None and dropout_rng is None:
        problem, choice = _prepare("attention", query, key, value, attn_mask,
                                   (causal, window, softcap, scale, enable_gqa, dropout_p, deterministic),
                                   backend, normalize_call)
    else:  # their tensors are made canonical per call: no fast path
        problem = normalize_call()
        choice = backends.select(problem, _requested(backend))
    sinks = check_sinks(sinks, problem.Hq, problem.device)
    out, lse = _run(problem, backend, sinks, choice=choice, want_lse=return_lse)
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
    causal=None, window=None, softcap=None, alibi_slopes=None, backend: Optional[str] = None,
    deterministic: bool = False,
) -> Explanation:
    """Say which path a call with these arguments takes and why, without running it.

    Takes SDPA's arguments, plus `causal=`, `window=`, `softcap=`, `alibi_slopes=`, `backend=` and
    `deterministic=` (as in `attention`; causal overrides is_causal). It draws no dropout mask (torch's
    generator is left as it is). `backward` says which backward kernels a gradient would run
    now (with torch.are_deterministic_algorithms_enabled() as it is at this call).
    An explicit backend that cannot run the call is reported, not raised. Inside a
    `torch.nn.attention.sdpa_kernel(...)` block a note says that under `replace_sdpa()` torch runs the call.
    """
    code = masks.parse_causal(causal) if causal is not None else (
        masks.CAUSAL_TOP_LEFT if is_causal else masks.CAUSAL_NONE)
    problem = normalize(query, key, value, attn_mask, dropout_p, code, scale, enable_gqa, window=window,
                        deterministic=deterministic, softcap=softcap, alibi_slopes=alibi_slopes)
    notes = list(problem.notes)
    from .interop.dispatch import torch_kernel_restriction  # dispatch imports this module

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


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window=None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_rng: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
    deterministic: bool = False,
):
    """Attention over a packed batch of variable-length sequences (FlashAttention's varlen layout and
    semantics; varlen.py describes it). Returns out or, with return_lse=True, (out, lse).

    q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev); cu_seqlens_q/k int32 (B + 1,) on q's
    device, the start offsets of the B sequences followed by the totals; max_seqlen_q/k at least the longest
    sequence. Sequence b's queries see only its own keys. out (total_q, Hq, Ev); lse (Hq, total_q), float32
    (float64 for float64 inputs), differentiable. Hkv may divide Hq with enable_gqa=True.
    causal: bottom-right aligned per sequence (FlashAttention's), so a sequence with more queries than
    keys has rows that see nothing (output 0, lse -inf). window (left, right): FlashAttention's
    window_size, per sequence. scale, softcap, alibi_slopes ((Hq,) or (B, Hq)), backend, deterministic:
    dropout_p, dropout_rng as in `attention`; sequence b's mask is that of its own problem drawn with
    (seed, offset + b) (varlen.sequence_rng).
    The offsets' values (starting at 0, non-decreasing, ending at the totals, within max_seqlen) are
    checked when the call runs. Backends without varlen kernels decline with a reason (`explain_varlen`).
    """
    from . import ops_varlen
    from .varlen import normalize_varlen

    problem = normalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                               window=window, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_rng=dropout_rng,
                               deterministic=deterministic)
    choice = backends.select(problem, _requested(backend))
    _warn_fallback(choice)
    out, lse, _, _ = ops_varlen.varlen_forward(
        problem.q, problem.k, problem.v, problem.cu_q, problem.cu_k, problem.max_q, problem.max_k, problem.scale,
        problem.band.as_op(), *ready_to_run(problem.mods, problem.device).op_args(), choice.backend, problem.needs_grad, problem.deterministic,
    )
    return (out, lse) if return_lse else out


def explain_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, window=None,
                   scale=None, enable_gqa=False, softcap=None, alibi_slopes=None, backend: Optional[str] = None,
                   deterministic: bool = False) -> Explanation:
    """`explain` for `varlen_attention`'s arguments: which backend runs the packed batch, and why the
    others decline it. Reads no tensor data."""
    from .varlen import normalize_varlen

    problem = normalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                               window=window, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
                               alibi_slopes=alibi_slopes, deterministic=deterministic)
    try:
        choice = backends.select(problem, _requested(backend))
    except backends.BackendUnavailableError as exc:
        return Explanation("none", str(exc), False, problem.summary())
    backward = backends.get(choice.backend).backward_path(config.deterministic_backward(deterministic))
    return Explanation(choice.backend, choice.reason, choice.fallback, problem.summary(), dict(choice.rejected),
                       [], backward)


def explain_kvcache(q, k_cache, v_cache, k_new=None, v_new=None, cache_seqlens=None, *, block_table=None,
                    causal=False, window=None, softcap=None, alibi_slopes=None, scale=None, return_lse: bool = False,
                    num_splits: int = 0, backend: Optional[str] = None) -> Explanation:
    """`explain` for `attention_with_kvcache`'s arguments (the same signature): which backend runs the decode
    step, and why each of the others declines it. Appends nothing. Checks the arguments as the call would
    (reading the lengths and the block table); an explicit backend that cannot run the call is reported,
    not raised."""
    from . import kvcache

    problem, _, _ = kvcache.check_call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, causal, window,
                                       softcap, alibi_slopes, scale, num_splits)
    requested = _requested(backend)
    rejected = {}
    for name in backends.names():
        why = None if name in ("auto", "reference") else kvcache.unsupported_reason(name, problem)
        if why:
            rejected[name] = why
    try:
        with warnings.catch_warnings():  # the fallback warning is what this call reports
            warnings.simplefilter("ignore")
            chosen = kvcache.choose_backend(problem, requested)
    except backends.BackendUnavailableError as exc:
        return Explanation("none", str(exc), False, problem.summary(), rejected)
    fallback = requested == "auto" and chosen == "reference"
    if requested != "auto":
        reason = "requested explicitly"
    elif fallback:
        reason = ("no decode kernel covers this call; the naive reference path runs it (each batch element's "
                  "keys gathered, then the reference attention)")
    else:
        reason = f"auto: the {chosen} decode kernel runs {problem.device.type} calls like this one"
    rejected.pop(chosen, None)
    return Explanation(chosen, reason, fallback, problem.summary(), rejected, [], "none (decoding is forward only)")
