"""Compile the Triton kernels for a GPU target without a GPU, exactly as a call would launch them.

    python -m attnkern.tools.triton_compile [--arch 90 86 80] [--ci] [--json out.json]
    (the Triton part of `attnkern compile-report`, which adds the CUDA kernels; same rules)

The Triton interpreter (what the CPU test suite runs) accepts code the GPU compiler rejects, and says
nothing of shared memory, registers, spills or how the tensor cores are used. This compiles what runs:

- the launch: `attention_forward` / `attention_backward` (or, for the decode kernels, `decode_forward`)
  run on CPU tensors of a problem's shapes with each kernel replaced by a recorder, so the arguments are
  those the launch code really passes;
- the specialization: the recorded arguments go through Triton's own argument binder for the target,
  as a launch does (16-divisible pointers, strides and sizes marked so, unit strides and GROUP = 1 made
  constant); CPU and CUDA allocations are both 16-byte aligned. A ragged problem (head dim 8 short of
  its tier, length 1000) has row strides and lengths that are not multiples of 16, and partial tiles;
- the configs: every config the kernel's autotuner can choose on the target (its own config list
  through its own early-prune hook, run for that target: configs.for_target), each with the heuristics
  (EVEN_M, EVEN_N) the autotune wrapper would compute and the warps and stages it launches with; a
  kernel launched without autotuning compiles with the options of its launch (num_stages defaults as
  Triton's launch defaults it).

Per compiled kernel it records shared memory (Triton's metadata), registers and spills (the `-v` log of
the ptxas run that makes the cubin, with Triton's own ptxas options), and the main-loop figures of
attnkern.tools.asm_stats (MMA work over useful work, exps per score, shared loads per MMA, asynchronous tile
loads). Adding a kernel to the report is one KernelEntry in KERNELS. TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile: unset TRITON_INTERPRET (kernels decorated for the interpreter cannot compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from . import asm_stats  # noqa: E402
from .. import config  # noqa: E402
from .compile_report import MAX_SHARED, Record  # noqa: E402
from ..band import make_band  # noqa: E402
from ..masks import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT  # noqa: E402
from ..score_mods import NONE, ScoreMods  # noqa: E402
from ..triton import backward, configs, decode, forward  # noqa: E402

TARGETS = (90, 86, 80)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Problem:
    """The call whose launches are compiled. Aligned: head dim = its tier, L = S = 1024; ragged: head
    dim 8 short of the tier (row strides not 16-divisible), L = S = 1000 (partial tiles). Masks are
    (1, H, L, S): 1 = bool, 2 = float (learned, so the mask-gradient pass runs). i64 forces the kernels'
    int64 indexing (a tensor of 2**31 elements is not allocated here). mods: the score-modification
    variant with all three (softcap, ALiBi slopes per head, dropout; score_mods.py)."""

    dtype: str
    tier: int
    mask: int = 0
    causal: bool = True
    ragged: bool = False
    i64: bool = False
    mods: bool = False

    @property
    def head_dim(self) -> int:
        return self.tier - 8 if self.ragged else self.tier

    @property
    def length(self) -> int:
        return 1000 if self.ragged else 1024

    def in_grid(self) -> bool:
        """A problem of the benchmark grid (attnkern.tools.bench: fp16/bf16, E = 64, 128, no mask, lengths
        multiples of 512)."""
        return self.dtype != "float32" and self.tier in (64, 128) and self.mask == 0 and not self.ragged \
            and not self.i64 and not self.mods

    def label(self) -> str:
        return (f"{self.dtype} E={self.head_dim} mask={self.mask} causal={int(self.causal)}"
                + (" ragged" if self.ragged else "") + (" i64" if self.i64 else "") + (" mods" if self.mods else ""))


# Products of one main-loop iteration, as (rows, cols, depth) over the block names: useful MMA work.
Products = Tuple[Tuple[str, str, str], ...]


@dataclass(frozen=True)
class KernelEntry:
    """One Triton kernel of the report. `attr` names the kernel in attnkern.triton.forward/backward
    (its launch is recorded under that name); `products` are the main loop's matrix products;
    `residual`/`mask_grad`/`deterministic` say which call launches it (training forward; learned-mask
    backward; the backward under torch.use_deterministic_algorithms, or None: either way)."""

    name: str
    attr: str
    products: Products
    residual: bool = False
    mask_grad: bool = False
    in_grid: bool = True  # run by the benchmark grid's calls
    deterministic: Optional[bool] = None
    decode: bool = False  # launched by attention_with_kvcache (record_decode_launches), not attention
    varlen: bool = False  # launched by varlen_attention (record_varlen_launches): the VARLEN variant

    def runs_for(self, p: "Problem") -> bool:
        """Whether a call of problem p launches this kernel: decode kernels only for the plain problems
        (no mask, no score modifications, aligned), which record_decode_launches turns into a decode
        call; attention kernels for every problem but float32 ones' residual forward (float32 outputs
        save none) and, for the mask-gradient pass, only learned (float) masks."""
        if self.decode or self.varlen:  # neither takes an attention mask
            return p.mask == 0 and not (p.mods or p.ragged or p.i64) and not (self.residual and p.dtype == "float32")
        if self.residual and p.dtype == "float32":
            return False
        return not self.mask_grad or p.mask == 2

    def useful_macs(self, blocks: Dict[str, int]) -> int:
        return sum(blocks[a] * blocks[b] * blocks[c] for a, b, c in self.products)


QK = ("M", "N", "E")  # S = Q Kᵀ: BLOCK_M × BLOCK_N over the head dim
# Adding a kernel to the report is one entry here.
KERNELS = (
    KernelEntry("fwd", "_attn_fwd_kernel", (QK, ("M", "EV", "N"))),
    KernelEntry("fwd+lo", "_attn_fwd_kernel", (QK, ("M", "EV", "N")), residual=True),
    # The two-pass backward: the default (and the deterministic path).
    KernelEntry("dkdv", "_attn_bwd_dkdv_kernel", (QK, ("N", "EV", "M"), ("N", "M", "EV"), ("N", "E", "M"))),
    KernelEntry("dq", "_attn_bwd_dq_kernel", (QK, ("M", "N", "EV"), ("M", "E", "N"))),
    # The single-pass backward, opted into with ATTNKERN_SINGLE_PASS=1 (not what the grid runs): S and dP
    # once, dV, dK and dQ (by atomics) from them.
    KernelEntry("onepass", "_attn_bwd_onepass_kernel",
                (QK, ("N", "EV", "M"), ("N", "M", "EV"), ("N", "E", "M"), ("M", "E", "N")), deterministic=False,
                in_grid=False),
    KernelEntry("dmask", "_attn_bwd_dmask_kernel", (QK, ("M", "N", "EV")), mask_grad=True, in_grid=False),
    # KV-cache decoding (triton/decode.py): the split-KV pass (M: the GQA group's query rows), and the
    # merge of the splits (no products).
    KernelEntry("decode", "_decode_split_kernel", (QK, ("M", "EV", "N")), in_grid=False, decode=True),
    KernelEntry("decode-merge", "_decode_merge_kernel", (), in_grid=False, decode=True),
    # Packed variable-length batches (varlen_attention): the same kernels with VARLEN set (per-sequence
    # offsets and bounds read in the prologue, programs past their sequence return; never EVEN_M/N).
    KernelEntry("varlen-fwd+lo", "_attn_fwd_kernel", (QK, ("M", "EV", "N")), residual=True, in_grid=False,
                varlen=True),
    KernelEntry("varlen-dkdv", "_attn_bwd_dkdv_kernel", (QK, ("N", "EV", "M"), ("N", "M", "EV"), ("N", "E", "M")),
                in_grid=False, deterministic=True, varlen=True),
    KernelEntry("varlen-dq", "_attn_bwd_dq_kernel", (QK, ("M", "N", "EV"), ("M", "E", "N")), in_grid=False,
                deterministic=True, varlen=True),
)
KERNEL_BY_NAME = {k.name: k for k in KERNELS}
LAUNCH_MODULES = (forward, backward, decode)


@dataclass
class Launch:
    kernel: object  # the decorated kernel (autotuner, heuristics, JIT function)
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _recording(launches: Dict[str, Launch]):
    """Replace every kernel of LAUNCH_MODULES by a recorder of its launch arguments."""
    saved = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches[self.name] = Launch(self.kernel, args, kwargs)
            return launch

    for mod in LAUNCH_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.KernelInterface):
                saved.append((mod, name, obj))
                setattr(mod, name, Recorder(name, obj))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


@contextlib.contextmanager
def _deterministic(mode: Optional[bool]):
    """True: torch's deterministic switch (the two-pass backward); False: the single pass opted into
    (config.SINGLE_PASS_ENV); None: the default."""
    saved = torch.are_deterministic_algorithms_enabled(), os.environ.get(config.SINGLE_PASS_ENV)
    if mode is not None:
        torch.use_deterministic_algorithms(mode)
    if mode is False:
        os.environ[config.SINGLE_PASS_ENV] = "1"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        if saved[1] is None:
            os.environ.pop(config.SINGLE_PASS_ENV, None)
        else:
            os.environ[config.SINGLE_PASS_ENV] = saved[1]


def record_launches(p: Problem, residual: bool, mask_grad: bool,
                    deterministic: Optional[bool] = None) -> Dict[str, Launch]:
    """The launches of one forward and one backward call of problem `p`, by kernel attribute name."""
    torch.manual_seed(0)
    B, H, L, E = 2, 2, p.length, p.head_dim
    dt = DTYPES[p.dtype]
    q, k, v = (torch.randn(B, H, L, E, dtype=dt) for _ in range(3))
    mask = None
    if p.mask == 1:
        mask = torch.ones(1, H, L, L, dtype=torch.bool)
    elif p.mask == 2:
        mask = torch.zeros(1, H, L, L, dtype=dt)
    # Causal (top-left; L = S either way) or every key: the band of band.py the launchers take.
    band = make_band(CAUSAL_TOP_LEFT if p.causal else CAUSAL_NONE, None)
    mods = NONE
    if p.mods:  # Gemma 2's cap, BLOOM-like slopes, dropout 0.1
        mods = ScoreMods(softcap=30.0, alibi=torch.rand(1, H), dropout_p=0.1,
                         rng=torch.tensor([1234, 5678], dtype=torch.int64))
    launches: Dict[str, Launch] = {}
    with _recording(launches), _deterministic(deterministic):
        out, lse, stats, out_lo = forward.attention_forward(q, k, v, mask, 0.125, band, residual, mods)
        backward.attention_backward(torch.randn_like(out), None, q, k, v, mask, out, out_lo, stats, 0.125,
                                    band, mask_grad, mods=mods)
    if p.i64:
        for launch in launches.values():
            launch.kwargs["I64"] = True
    return launches


def record_decode_launches(p: Problem) -> Dict[str, Launch]:
    """The launches of one attention_with_kvcache call of p's dtype and head dim: GQA 8:1 (Hq = 32,
    Hkv = 4), one query per sequence, B = 4 sequences of up to 4096 keys in a cache of 256-key pages
    (one page lookup per key tile), causal per p; split in 8 as the interpreter's rule splits it (on a
    GPU the split count depends on its SM count, not on the kernels' code), so both kernels launch."""
    torch.manual_seed(0)
    B, Hq, Hkv, E, page, pages = 4, 32, 4, p.head_dim, 256, 16
    dt = DTYPES[p.dtype]
    q = torch.randn(B, 1, Hq, E, dtype=dt)
    k_cache, v_cache = (torch.randn(B * pages, page, Hkv, E, dtype=dt) for _ in range(2))
    table = torch.arange(B * pages, dtype=torch.int32).reshape(B, pages)
    seqlens = torch.full((B,), page * pages, dtype=torch.int32)
    band = make_band(CAUSAL_BOTTOM_RIGHT if p.causal else CAUSAL_NONE, None)
    launches: Dict[str, Launch] = {}
    with _recording(launches):
        decode.decode_forward(q, k_cache, v_cache, seqlens, table, band, 0.125, 0.0, None, 0)
    return launches


def record_varlen_launches(p: Problem, residual: bool, deterministic: Optional[bool]) -> Dict[str, Launch]:
    """The launches of one varlen forward and backward of p's dtype and head dim: 3 sequences of
    p.length, p.length // 2 + 3 and 17 tokens (queries and keys alike), 2 heads, causal per p."""
    torch.manual_seed(0)
    lengths = [p.length, p.length // 2 + 3, 17]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    T, H, E, dt = sum(lengths), 2, p.head_dim, DTYPES[p.dtype]
    q, k, v = (torch.randn(T, H, E, dtype=dt) for _ in range(3))
    band = make_band(CAUSAL_BOTTOM_RIGHT if p.causal else CAUSAL_NONE, None)
    launches: Dict[str, Launch] = {}
    with _recording(launches), _deterministic(deterministic):
        out, lse, stats, out_lo = forward.varlen_forward(q, k, v, cu, cu, max(lengths), max(lengths), 0.125, band,
                                                         residual)
        backward.varlen_backward(torch.randn_like(out), None, q, k, v, cu, cu, max(lengths), max(lengths), out,
                                 out_lo, stats, 0.125, band, deterministic=bool(deterministic))
    return launches


def _jit(kernel):
    """The JITFunction under the autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _heuristics(kernel) -> list:
    out = []
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if isinstance(kernel, triton.runtime.autotuner.Heuristics):
            out.append(kernel.values)
        kernel = kernel.fn
    return out


@dataclass
class Choice:
    """One way a launch can run: the meta-parameters (an autotune config's, or the launch's own), and
    whether the kernel's early prune keeps it on the target."""

    meta: dict
    num_warps: int
    num_stages: int
    chosen: bool = True
    default: bool = True  # what a call runs without autotuning (ATTNKERN_AUTOTUNE=0, or no autotuner)


def launch_choices(launch: Launch, arch: int, include_pruned: bool) -> List[Choice]:
    """Every config the launch can run with on `arch` (pruned ones too if asked, marked so)."""
    fn = _jit(launch.kernel)
    tuner = launch.kernel if isinstance(launch.kernel, triton.runtime.autotuner.Autotuner) else None
    if tuner is None:
        defaults = make_backend(GPUTarget("cuda", arch, 32)).parse_options({})
        meta = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
        return [Choice(meta, launch.kwargs.get("num_warps", defaults.num_warps),
                       launch.kwargs.get("num_stages", defaults.num_stages))]
    named = dict(zip(fn.arg_names, launch.args))
    prune = tuner.early_config_prune or (lambda cs, *a, **k: cs)
    with _autotune_on():
        # The autotuner's own list and prune hook, for the same arguments a launch passes it.
        with configs.for_target(arch):
            kept = prune(tuner.configs, named, **launch.kwargs)
        with configs.for_target(arch, duplication_rule=False):
            every = prune(tuner.configs, named, **launch.kwargs) if include_pruned else kept
    return [Choice(dict(launch.kwargs, **c.kwargs), c.num_warps, c.num_stages, c in kept, c is kept[0])
            for c in every]


@contextlib.contextmanager
def _autotune_on():
    saved = os.environ.get("ATTNKERN_AUTOTUNE")
    os.environ["ATTNKERN_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ATTNKERN_AUTOTUNE"]
        else:
            os.environ["ATTNKERN_AUTOTUNE"] = saved


def _assembled(source: ASTSource, target: GPUTarget, options: dict):
    """triton.compile, forced to assemble afresh with Triton's own ptxas run's log captured (its
    -v output: the registers and spills of the cubin that launches, under the options Triton passes)."""
    log = io.StringIO()
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(source, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return k, log.getvalue()


def ptxas_figures(log: str) -> Tuple[int, int]:
    """(registers, spill-store bytes) from a ptxas -v log; (-1, -1) if it has none."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    if not regs:
        return -1, -1
    return int(regs.group(1)), sum(int(s) for s in spills)


def _config_label(c: Choice) -> str:
    tile = f"{c.meta.get('BLOCK_M')}x{c.meta['BLOCK_N']}" if "BLOCK_N" in c.meta else f"{c.meta.get('BLOCK_M')}"
    return f"{tile} w{c.num_warps} s{c.num_stages}"


@dataclass(frozen=True)
class Job:
    kernel: str
    problem: Problem
    arch: int
    include_pruned: bool = False
    default_only: bool = False  # only the config a call takes without autotuning


def run_job(job: Job) -> List[Record]:
    """Compile every choice of one kernel's launch for one problem and target."""
    entry = KERNEL_BY_NAME[job.kernel]
    with configs.for_target(job.arch):  # launch code that picks a config per GPU picks it for this one
        if entry.decode:
            launches = record_decode_launches(job.problem)
        elif entry.varlen:
            launches = record_varlen_launches(job.problem, entry.residual, entry.deterministic)
        else:
            launches = record_launches(job.problem, entry.residual, entry.mask_grad, entry.deterministic)
        # The single pass has no config for some head dims and dtypes on some GPUs (backward.onepass_runs):
        # there the call takes the two-pass kernels, which is no error to report.
        declined = entry.attr == "_attn_bwd_onepass_kernel" and not backward.onepass_runs(
            job.problem.head_dim, job.problem.head_dim, DTYPES[job.problem.dtype])
    launch = launches.get(entry.attr)
    if launch is None and declined:
        return []
    base = dict(backend="triton", kernel=entry.name, target=f"sm_{job.arch}", problem=job.problem.label(),
                in_grid=entry.in_grid and job.problem.in_grid())
    if launch is None:
        return [Record(config="-", chosen=True, error="not launched by this call", **base)]
    choices = launch_choices(launch, job.arch, job.include_pruned)
    if not any(c.chosen for c in choices):
        return [Record(config="-", chosen=True, error="the early prune leaves no config", **base)]
    if job.default_only:
        choices = [c for c in choices if c.default]
    return [compile_choice(entry, launch, c, job.arch, base) for c in choices]


def compile_choice(entry: KernelEntry, launch: Launch, c: Choice, arch: int, base: dict) -> Record:
    fn = _jit(launch.kernel)
    rec = Record(config=_config_label(c), chosen=c.chosen, default=c.default, smem_limit=MAX_SHARED.get(arch, 48 * 1024),
                 exps_needed=2 if c.meta.get("SOFTCAP") else 1, **base)  # soft-capping's tanh takes an exp
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    meta = dict(c.meta)
    named = dict(zip(fn.arg_names, launch.args), **meta)
    for values in _heuristics(launch.kernel):
        for key, rule in values.items():
            meta[key] = named[key] = rule(named)
    kwargs = dict(meta, num_warps=c.num_warps, num_stages=c.num_stages)
    try:
        # Triton's own binder and packing: the signature, constants and divisibility a launch gets.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        k, log = _assembled(ASTSource(fn, signature, constexprs, attrs), target, options.__dict__)
    except Exception as exc:  # report, don't stop: the point is the whole list
        rec.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return rec
    rec.smem_bytes = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    rec.registers, rec.spill_bytes = ptxas_figures(log)
    blocks = {name: meta.get(f"BLOCK_{name}", 1) for name in ("M", "N", "E", "EV")}  # the merge has no N, E
    passes = 3 if meta.get("PRECISION") == "tf32x3" else 1
    eff = asm_stats.efficiency(ptx, c.num_warps, entry.useful_macs(blocks) * passes, blocks["M"] * blocks["N"])
    rec.mma_efficiency, rec.exp_per_score = eff.mma_efficiency, eff.exp_per_score
    rec.fops_per_score = eff.fops_per_score
    rec.smem_loads_per_mma, rec.async_kv, rec.mma_kind = eff.smem_loads_per_mma, eff.async_kv, eff.mma_kind
    return rec


def grid_problems() -> List[Problem]:
    """The benchmark grid's problems in fp16 (bf16 compiles to the same figures, other MMA operands):
    E = 64 and 128, causal and not."""
    return [Problem("float16", t, 0, c) for t in (64, 128) for c in (False, True)]


def default_problems() -> List[Problem]:
    """The full report: the benchmark grid's problems (fp16, bf16; E = 64, 128; causal and not), every
    head-dim tier in fp16 and fp32 with a float mask (the heaviest form), a bool mask at E = 128, and the
    ragged form of each tier."""
    out = [Problem(dt, t, 0, c) for dt in ("float16", "bfloat16") for t in (64, 128) for c in (False, True)]
    out += [Problem(dt, t, 2, True) for dt in ("float16", "float32") for t in configs.TIERS]
    out += [Problem("float16", 128, 1, True)]
    out += [Problem("float16", t, 0, True, ragged=True) for t in configs.TIERS]
    out += mods_problems() + mods_dmask_problems()
    return out


def mods_problems() -> List[Problem]:
    """The score-modification variant (softcap + ALiBi + dropout) at the grid's head dims, fp16 causal:
    what a Gemma-2-like model trains with (not in the benchmark grid)."""
    return [Problem("float16", t, 0, True, mods=True) for t in (64, 128)]


def mods_dmask_problems() -> List[Problem]:
    """The same under a learned float mask: its gradient pass with every score modification."""
    return [Problem("float16", t, 2, True, mods=True) for t in (64, 128)]


def jobs_for(problems, archs, kernels=None, include_pruned=False) -> List[Job]:
    out = []
    for arch in archs:
        for p in problems:
            for entry in KERNELS:
                if kernels and entry.name not in kernels:
                    continue
                if entry.runs_for(p):
                    out.append(Job(entry.name, p, arch, include_pruned))
    return out


def ci_jobs() -> List[Job]:
    """What CI compiles (a few minutes on 2 cores): every config the grid's fp16 problems can run
    with on sm_90 and sm_86 (the causal form, whose full-tile loop is the non-causal loop; sm_86 has
    sm_80's code and the smaller shared memory), the ragged E = 120 problem on sm_90, and on sm_90 the
    default config of every kernel, tier and dtype class in its heaviest form (float mask, causal),
    plus one int64-indexing forward; the default config of the forward and both backward paths with
    every score modification (mods_problems) on sm_90 and sm_80, and their mask-gradient pass at E = 64
    on sm_90; the decode kernel's split pass at E = 128 in fp16 and bf16 on sm_90; the varlen forward and
    two-pass backward at E = 128, fp16, causal, on sm_90."""
    grid = [Problem("float16", 64), Problem("float16", 128)]
    out = jobs_for(grid, [90, 86], [k.name for k in KERNELS if not (k.decode or k.varlen)])
    out += jobs_for([Problem("float16", 128, ragged=True)], [90], ["fwd", "dkdv", "dq"])
    heavy = [Problem(dt, t, 2, True) for dt in ("float16", "float32") for t in configs.TIERS]
    out += [Job(j.kernel, j.problem, j.arch, default_only=True)
            for j in jobs_for(heavy, [90], ["fwd", "dkdv", "dq", "dmask"])]
    out.append(Job("fwd", Problem("float16", 128, 2, True, i64=True), 90, default_only=True))
    out += [Job(j.kernel, j.problem, j.arch, default_only=True)
            for j in jobs_for(mods_problems(), [90, 80], ["fwd", "fwd+lo", "dkdv", "dq", "onepass"])
            + jobs_for(mods_dmask_problems()[:1], [90], ["dmask"])]
    out += [Job("decode", Problem(dt, 128), 90, default_only=True) for dt in ("float16", "bfloat16")]
    out += [Job(k.name, Problem("float16", 128, 0, True), 90, default_only=True) for k in KERNELS if k.varlen]
    return out


def run_jobs(jobs: List[Job], n_jobs: int) -> List[Record]:
    if n_jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_jobs) as pool:
            results = list(pool.map(run_job, jobs))
    else:
        results = [run_job(j) for j in jobs]
    return [r for rs in results for r in rs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    ap.add_argument("--kernel", nargs="+", help=f"only these ({', '.join(KERNEL_BY_NAME)})")
    ap.add_argument("--ci", action="store_true", help="the CI subset (ci_jobs; --arch, --kernel ignored)")
    ap.add_argument("--include-pruned", action="store_true", help="also compile configs the prune drops")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    from .compile_report import failures, print_table, violations

    jobs = ci_jobs() if args.ci else jobs_for(default_problems(), args.arch, args.kernel, args.include_pruned)
    records = run_jobs(jobs, args.jobs)
    bad = violations(records)
    print_table(records, bad)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    return 1 if failures(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
