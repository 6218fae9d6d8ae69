"""KV-cache decoding: `attention_with_kvcache`, FlashAttention's `flash_attn_with_kvcache` semantics.

A generation step appends the new keys/values of each sequence to its cache, in place, then attends
with a few queries to everything cached so far. The cache is contiguous, (B, S_max, Hkv, E), or paged
(vLLM-style): (num_pages, page_size, Hkv, E) with an int32 block table (B, max_pages) that names, for
batch element b, the page holding its keys [p * page_size, (p + 1) * page_size); pages in any order.
Batch element b holds cache_seqlens[b] keys before the call and n_b = cache_seqlens[b] + Lnew after it;
its queries attend to those n_b keys, `causal` and `window` aligned bottom-right on its own length
(query row i sees key j <= i + n_b - Lq under causal).

This module holds the checks, the in-place append, the gather-based reference path (also the oracle of
the tests) and the backend choice; the CPU kernel is the C++ op attnkern_ext::decode (csrc/cpu/decode.cpp,
split-KV), the GPU kernels attnkern/triton/decode.py and csrc/cuda/decode_kernel.h (split-KV, the same
merge; backend "cuda-emu" runs the CUDA one emulated on CPU tensors). Forward only: decoding is inference,
and a call that would need a gradient is refused.
Under torch.compile a call traces as one custom op (ops_kvcache.py) that declares the append as a mutation
and makes the host checks of the lengths when it runs; eager calls run the same body (decode_step).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends, config, masks
from .backends import cuda as cuda_backend
from .band import Band, make_band, parse_window
from .buffers import _poisoned
from .problem import kernel_scale
from .reference import reference_attention
from .score_mods import check_alibi, check_softcap

#: The dtypes the CPU decode kernel takes (scores and softmax in float32; float64 in float64).
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class DecodeProblem:
    """A checked call: the tensors as given, and the canonical arguments every backend takes."""

    q: torch.Tensor  # (B, Lq, Hq, E)
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seqlens: torch.Tensor  # int32 (B,): keys per batch element after the append
    block_table: Optional[torch.Tensor]  # int32 (B, max_pages), or None for a contiguous cache
    band: Band
    scale: float  # as the kernels use it (kernel_scale)
    softcap: float
    alibi: Optional[torch.Tensor]  # float32 (1 or B, Hq) contiguous
    num_splits: int

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def summary(self) -> str:
        """One line for explain_kvcache (reads no tensor data)."""
        B, Lq, Hq, E = self.q.shape
        P, page_size, Hkv, _ = self.k_cache.shape
        cache = (f"paged cache ({P} pages of {page_size}, block_table {tuple(self.block_table.shape)})"
                 if self.block_table is not None else f"contiguous cache (S_max={page_size})")
        mods = (f" softcap={self.softcap:g}" if self.softcap else "") + (" alibi" if self.alibi is not None else "")
        return (f"decode B={B} Lq={Lq} Hq={Hq} Hkv={Hkv} E={E} Ev={self.v_cache.shape[3]} dtype={_dt(self.dtype)} "
                f"device={self.device.type} {cache} band={self.band.describe()} (on each batch element's length)"
                + mods)


def _check_float(name: str, t, dtype=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {_dt(t.dtype)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the query's dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the query's device {device}, got {t.device}")


def _check_shape(name: str, t: torch.Tensor, want, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {what} = {tuple(want)}, got {tuple(t.shape)}")


def _parse_causal(causal) -> int:
    code = masks.parse_causal(causal)
    if code == masks.CAUSAL_TOP_LEFT and causal is not True:
        raise ValueError("attention_with_kvcache: causal is aligned bottom-right on each batch element's cache "
                         "length (FlashAttention's kvcache semantics); pass True or 'bottom_right', not 'top_left'")
    return masks.CAUSAL_BOTTOM_RIGHT if code != masks.CAUSAL_NONE else code


def check_lengths(k_cache, cache_seqlens, Lnew: int, block_table) -> None:
    """The checks on values (host reads of the lengths and the block table) that bound every cache access:
    cache_seqlens + Lnew within the keys a batch element's cache holds, the pages in use within the cache.
    Arguments as checked by `check_call` on their metadata."""
    P, page_size = k_cache.shape[:2]
    capacity = page_size if block_table is None else block_table.shape[1] * page_size
    if not cache_seqlens.numel():
        return
    # One host read (a sync on a GPU); a short list costs less than the two reductions (a decode step's call
    # overhead: 1 against 7 microseconds on the CPU at B = 1).
    if cache_seqlens.numel() <= 4096:
        lens_list = cache_seqlens.tolist()
        lo, hi = min(lens_list), max(lens_list)
    else:
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(cache_seqlens)).tolist())
    if lo < 0 or hi + Lnew > capacity:
        raise ValueError(f"cache_seqlens + Lnew must lie in [0, {capacity}] (the keys the cache holds per batch "
                         f"element), got cache_seqlens in [{lo}, {hi}] with Lnew = {Lnew}")
    if block_table is not None:
        lens = cache_seqlens.to(torch.int64)
        used = (lens + Lnew + page_size - 1) // page_size if page_size else torch.zeros_like(lens)
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        pages = block_table[cols.unsqueeze(0) < used.unsqueeze(1)]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= P):
            raise ValueError(f"block_table holds page {int(pages.min()) if int(pages.min()) < 0 else int(pages.max())}"
                             f" among the pages in use, outside the cache's pages [0, {P})")


def check_call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, causal, window, softcap,
               alibi_slopes, scale, num_splits, read_values: bool = True):
    """Validate a call; returns (DecodeProblem with the lengths after the append, cache_seqlens as an int32
    (B,) tensor, Lnew). With `read_values` (eager calls) also `check_lengths`, which reads the lengths and
    the block table on the host; a traced call leaves that to the op (ops_kvcache.py)."""
    _check_float("q", q)
    dtype, device = q.dtype, q.device
    B, Lq, Hq, E = q.shape
    _check_float("k_cache", k_cache, dtype, device)
    _check_float("v_cache", v_cache, dtype, device)
    paged = block_table is not None
    layout = "(num_pages, page_size, Hkv, E)" if paged else "(B, S_max, Hkv, E)"
    P, page_size, Hkv, Ek = k_cache.shape
    Ev = v_cache.shape[3]
    if Ek != E:
        raise ValueError(f"k_cache must have shape {layout} with the query's E = {E}, got {tuple(k_cache.shape)}")
    _check_shape("v_cache", v_cache, (P, page_size, Hkv, Ev), f"{layout[:-2]}Ev) like k_cache")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query's heads Hq = {Hq} must be a multiple of the cache's heads Hkv = {Hkv} (GQA)")
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 \
                or block_table.dim() != 2 or block_table.shape[0] != B or block_table.device != device:
            got = (f"{_dt(block_table.dtype)} {tuple(block_table.shape)} on {block_table.device}"
                   if isinstance(block_table, torch.Tensor) else type(block_table).__name__)
            raise ValueError(f"block_table must be an int32 tensor of shape (B, max_pages) with B = {B} on "
                             f"{device}, got {got}")
        capacity = block_table.shape[1] * page_size
    else:
        if P != B:
            raise ValueError(f"a contiguous k_cache must have shape (B, S_max, Hkv, E) with the query's B = {B}, "
                             f"got {tuple(k_cache.shape)} (pass block_table= for a paged cache)")
        capacity = page_size
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new come together: pass both or neither")
    Lnew = 0
    if k_new is not None:
        _check_float("k_new", k_new, dtype, device)
        _check_float("v_new", v_new, dtype, device)
        Lnew = k_new.shape[1]
        _check_shape("k_new", k_new, (B, Lnew, Hkv, E), "(B, Lnew, Hkv, E)")
        _check_shape("v_new", v_new, (B, Lnew, Hkv, Ev), "(B, Lnew, Hkv, Ev)")
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), capacity - Lnew, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    elif not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 \
            or tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != device:
        got = (f"{_dt(cache_seqlens.dtype)} {tuple(cache_seqlens.shape)} on {cache_seqlens.device}"
               if isinstance(cache_seqlens, torch.Tensor) else repr(cache_seqlens))
        raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape (B,) = ({B},) on {device}, "
                         f"got {got}")
    if read_values:
        check_lengths(k_cache, cache_seqlens, Lnew, block_table)
    # The lengths after the append (int64 for the sum: a traced call has not checked them yet).
    # Contiguous: the Triton kernel indexes them densely.
    seqlens = cache_seqlens.contiguous() if Lnew == 0 else (cache_seqlens.to(torch.int64) + Lnew).to(torch.int32)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the problem), got {num_splits!r}")
    band = make_band(_parse_causal(causal), parse_window(window))
    scale = (1.0 / math.sqrt(E) if E else 1.0) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    problem = DecodeProblem(
        q, k_cache, v_cache, seqlens, block_table, band, kernel_scale(float(scale), dtype), check_softcap(softcap),
        check_alibi(alibi_slopes, (B,), B, Hq, device), num_splits)
    return problem, cache_seqlens, Lnew


def append_to_cache(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table) -> None:
    """Write k_new/v_new (B, Lnew, Hkv, E) at positions cache_seqlens[b] .. + Lnew of each batch element,
    in place (through the block table for a paged cache). Arguments as checked by `check_call`."""
    B, Lnew = k_new.shape[:2]
    if B * Lnew == 0:
        return
    device = k_cache.device
    pos = cache_seqlens.to(torch.int64).unsqueeze(1) + torch.arange(Lnew, device=device)  # (B, Lnew)
    if block_table is None:
        rows, slots = torch.arange(B, device=device).unsqueeze(1).expand(B, Lnew), pos
    else:
        page_size = k_cache.shape[1]
        rows = torch.gather(block_table.to(torch.int64), 1, pos // page_size)
        slots = pos % page_size
    k_cache[rows.reshape(-1), slots.reshape(-1)] = k_new.reshape(B * Lnew, *k_new.shape[2:])
    v_cache[rows.reshape(-1), slots.reshape(-1)] = v_new.reshape(B * Lnew, *v_new.shape[2:])


def gather_keys(cache: torch.Tensor, block_table: Optional[torch.Tensor], b: int, n: int) -> torch.Tensor:
    """The first n keys (or values) of batch element b, (n, Hkv, E), gathered from a contiguous or paged cache."""
    if block_table is None:
        return cache[b, :n]
    page_size = cache.shape[1]
    pages = block_table[b, : (n + page_size - 1) // page_size].to(torch.int64)
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


def kvcache_reference(q, k_cache, v_cache, seqlens, block_table=None, *, band: Band = Band(), scale: float,
                      softcap: float = 0.0, alibi: Optional[torch.Tensor] = None, compute_dtype=None):
    """The naive decode math: per batch element, gather its seqlens[b] keys and values and run
    reference_attention on them (bottom-right band on that length, GQA). Returns out (B, Lq, Hq, Ev) in
    q's dtype and lse (B, Hq, Lq) (float32, or float64 for float64 math). Nothing is appended."""
    B, Lq, Hq, _ = q.shape
    Ev = v_cache.shape[3]
    dtype = compute_dtype or q.dtype
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty((B, Lq, Hq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=lse_dtype, device=q.device)
    for b in range(B):
        n = int(seqlens[b])
        kb = gather_keys(k_cache, block_table, b, n).transpose(0, 1).unsqueeze(0)  # (1, Hkv, n, E)
        vb = gather_keys(v_cache, block_table, b, n).transpose(0, 1).unsqueeze(0)
        slopes = None if alibi is None else alibi[b if alibi.shape[0] > 1 else 0]
        o, l = reference_attention(q[b].transpose(0, 1).unsqueeze(0), kb, vb, band=band, scale=scale,
                                   enable_gqa=True, compute_dtype=dtype, softcap=softcap, alibi_slopes=slopes)
        out[b] = o[0].transpose(0, 1)
        lse[b] = l[0]
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Backends: the C++ CPU kernel, the Triton kernel (attnkern/triton/decode.py; GPUs, and CPU tensors
# under TRITON_INTERPRET=1), the CUDA kernel (and its emulation), and the reference.

def unsupported_reason(name: str, problem: DecodeProblem) -> Optional[str]:
    """None if backend `name` runs this decode call, else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        from .backends import extension

        if extension.EXTENSION_ERROR:
            return extension.EXTENSION_ERROR
        if not hasattr(torch.ops.attnkern_ext, "decode"):
            return "the C++ extension was built without the decode op; rebuild it"
        if problem.device.type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {problem.device.type}"
        if problem.dtype not in CPU_DTYPES:
            return f"the CPU decode kernel takes float16, bfloat16, float32 and float64, not {problem.dtype}"
        return None
    if name == "triton":
        return _triton_reason(problem)
    if name in ("cuda", "cuda-emu"):
        return _cuda_reason(name, problem)
    return f"KV-cache decoding has no {name} kernel"


def _triton_reason(problem: DecodeProblem) -> Optional[str]:
    from .backends import triton as triton_backend

    why = backends.get("triton").availability(problem.device)
    if why:
        return why
    if problem.dtype not in triton_backend.KERNEL_DTYPES:
        return f"the Triton decode kernel takes float16, bfloat16 and float32, not {problem.dtype}"
    E, Ev = problem.q.shape[3], problem.v_cache.shape[3]
    if max(E, Ev) > triton_backend.MAX_HEAD_DIM:
        return f"head dims up to {triton_backend.MAX_HEAD_DIM} (got E={E}, Ev={Ev})"
    if problem.dtype == torch.bfloat16:
        if problem.device.type == "cpu":
            return "the Triton CPU interpreter computes bfloat16 dots wrongly; bfloat16 runs on a GPU"
        if torch.cuda.get_device_capability(problem.device) < (8, 0):
            return "bfloat16 kernels need a GPU of compute capability 8.0 or newer"
    B, Hkv = problem.q.shape[0], problem.k_cache.shape[2]
    if max(B, Hkv) > triton_backend.MAX_GRID_YZ:  # grid axes 1 (kv heads) and 2 (batch)
        return f"at most {triton_backend.MAX_GRID_YZ} batch elements and kv heads (got B={B}, Hkv={Hkv})"
    return None


def _cuda_reason(name: str, problem: DecodeProblem) -> Optional[str]:
    """Why the CUDA decode kernel (or its emulation, "cuda-emu") cannot run this call, or None; the
    checks of csrc/cuda/decode_host.h, said before the op would raise."""
    why = backends.get(name).availability(problem.device)
    if why:
        return why
    if name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("attnkern_ext::decode", "CUDA"):
        return "attnkern._C was built without the CUDA decode kernels; rebuild it"
    if problem.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA decode kernels take float16 and bfloat16, not {problem.dtype}"
    E, Ev = problem.q.shape[3], problem.v_cache.shape[3]
    if max(E, Ev) > cuda_backend.MAX_HEAD_DIM:
        return f"head dims up to {cuda_backend.MAX_HEAD_DIM} (got E={E}, Ev={Ev})"
    B, Hkv = problem.q.shape[0], problem.k_cache.shape[2]
    if max(B, Hkv) > cuda_backend.MAX_GRID_YZ:
        return f"at most {cuda_backend.MAX_GRID_YZ} kv heads (grid y) and batch elements (grid z), got Hkv={Hkv} B={B}"
    return None


def choose_backend(problem: DecodeProblem, requested: str) -> str:
    if requested != "auto":
        why = unsupported_reason(requested, problem)
        if why:
            raise backends.BackendUnavailableError(f"backend={requested!r} cannot run this decode call: {why}")
        return requested
    # The CPU kernel for CPU tensors, the Triton one for GPU tensors.
    first = "triton" if problem.device.type == "cuda" else "cpu"
    why = unsupported_reason(first, problem)
    if why is None:
        return first
    if why not in _warned and not torch.compiler.is_compiling():  # as attention's fallback warning: once per reason
        _warned.add(why)
        from .api import AttnkernFallbackWarning

        warnings.warn(f"attnkern: attention_with_kvcache runs the naive reference path ({first}: {why})",
                      AttnkernFallbackWarning, stacklevel=3)
    return "reference"


_warned = set()


def _run_cpu(p: DecodeProblem):
    B, Lq, Hq, _ = p.q.shape
    out = _poisoned(p.q.new_empty((B, Lq, Hq, p.v_cache.shape[3])))
    lse = _poisoned(p.q.new_empty((B, Hq, Lq), dtype=torch.float64 if p.dtype == torch.float64 else torch.float32))
    torch.ops.attnkern_ext.decode(p.q, p.k_cache, p.v_cache, p.seqlens, p.block_table, p.scale, p.band.as_op(),
                                  p.softcap, p.alibi, p.num_splits, out, lse)
    return out, lse


def _run_triton(p: DecodeProblem):
    import contextlib

    from .triton.decode import decode_forward

    with torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext():
        return decode_forward(p.q, p.k_cache, p.v_cache, p.seqlens, p.block_table, p.band, p.scale, p.softcap,
                              p.alibi, p.num_splits)


def _run_cuda(p: DecodeProblem, name: str):
    """The CUDA decode op of backend `name` ("cuda", or "cuda-emu" on CPU tensors). Head dims that are not
    multiples of 8 run zero-padded, as the cuda backend pads them (a copy of the caches), and inputs
    its 16-byte copies cannot read in place are copied first."""
    q, k, v = (cuda_backend._ready(cuda_backend._padded(t)) for t in (p.q, p.k_cache, p.v_cache))
    B, Lq, Hq, _ = q.shape
    Ev = p.v_cache.shape[3]
    out = _poisoned(q.new_empty((B, Lq, Hq, v.shape[3])))
    lse = _poisoned(q.new_empty((B, Hq, Lq), dtype=torch.float32))
    backends.get(name)._ops().decode(q, k, v, p.seqlens, p.block_table, p.scale, p.band.as_op(), p.softcap,
                                     p.alibi, p.num_splits, out, lse)
    return (out if out.shape[3] == Ev else out[..., :Ev].contiguous()), lse


def run(problem: DecodeProblem, backend: str):
    if backend == "cpu":
        return _run_cpu(problem)
    if backend == "triton":
        return _run_triton(problem)
    if backend in ("cuda", "cuda-emu"):
        return _run_cuda(problem, backend)
    return kvcache_reference(problem.q, problem.k_cache, problem.v_cache, problem.seqlens, problem.block_table,
                             band=problem.band, scale=problem.scale, softcap=problem.softcap, alibi=problem.alibi,
                             compute_dtype=torch.float32 if problem.dtype in (torch.float16, torch.bfloat16) else None)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    cache_seqlens=None,
    *,
    block_table: Optional[torch.Tensor] = None,
    causal=False,
    window=None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    num_splits: int = 0,
    backend: Optional[str] = None,
):
    """Decode step against a KV cache (FlashAttention's flash_attn_with_kvcache semantics), forward only.

    q (B, Lq, Hq, E); k_cache/v_cache (B, S_max, Hkv, E/Ev), or paged (num_pages, page_size, Hkv, E/Ev)
    with block_table int32 (B, max_pages) (page p of batch element b holds its keys p * page_size ..
    (p + 1) * page_size - 1; pages in any order). cache_seqlens: int32 (B,) or an int, the keys each batch
    element holds before the call (None: the cache is full). k_new/v_new (B, Lnew, Hkv, E/Ev), optional,
    are written into the cache IN PLACE at cache_seqlens (cache_seqlens itself is not changed); the
    queries then attend to the first cache_seqlens[b] + Lnew keys of each batch element. Hq a multiple
    of Hkv (GQA: the cache is read in place, once per kv head, never repeated per query head).
    causal (True/'bottom_right') and window=(left, right) are aligned bottom-right on each batch
    element's own length; softcap, alibi_slopes ((Hq,) or (B, Hq) float32) and scale (default 1/sqrt(E))
    as in `attention`. Returns out (B, Lq, Hq, Ev) in q's dtype, and with return_lse also the
    log-sum-exp (B, Hq, Lq) (float32; -inf and out 0 for a row that sees no key).
    num_splits: how many parts each batch element's keys are split into across threads (0: chosen from
    the problem; never from the thread count, so results are bitwise reproducible).
    backend: "auto" (the CPU kernel for CPU tensors, the Triton kernel for CUDA tensors, else the
    reference), "cpu", "triton" (split-KV as the CPU kernel; CPU tensors only under TRITON_INTERPRET=1),
    "cuda" (float16 and bfloat16 CUDA tensors; by name only for now, like attention's), "cuda-emu" (the
    CUDA kernel emulated on CPU tensors, for tests) or "reference". None: use_backend/ATTNKERN_BACKEND.
    Inference only: a call with an input that requires grad (under grad mode) raises.
    """
    if torch.is_grad_enabled():
        needing = [n for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                                  ("v_new", v_new)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if needing:
            raise RuntimeError(f"attention_with_kvcache is forward only (inference), but {', '.join(needing)} "
                               "requires grad: call it under torch.no_grad() or torch.inference_mode(), or detach")
    compiling = torch.compiler.is_compiling()
    problem, cache_seqlens, Lnew = check_call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, causal,
                                              window, softcap, alibi_slopes, scale, num_splits,
                                              read_values=not compiling)
    requested = config.requested_backend() if backend is None else backends.check_name(backend)
    name = choose_backend(problem, requested)
    if compiling:  # the op, which tells the compiler about the in-place append (ops_kvcache.py)
        from .ops_kvcache import kvcache_decode

        out, lse = kvcache_decode(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, problem.scale,
                                  problem.band.as_op(), problem.softcap, problem.alibi, num_splits, name)
    else:
        out, lse = decode_step(problem, k_new, v_new, cache_seqlens, name)
    return (out, lse) if return_lse else out


def decode_step(problem: DecodeProblem, k_new, v_new, cache_seqlens, backend: str):
    """Append k_new/v_new (or None) in place at cache_seqlens, then attend on `backend`: (out, lse)."""
    if k_new is not None and k_new.shape[1]:
        append_to_cache(problem.k_cache, problem.v_cache, k_new, v_new, cache_seqlens, problem.block_table)
    return run(problem, backend)
