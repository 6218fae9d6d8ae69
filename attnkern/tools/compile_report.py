"""`attnkern compile-report`: what the GPU kernels compile to, and the rules they must meet. No GPU needed.

Triton kernels: attnkern.tools.triton_compile compiles every kernel as a call launches it, for every
config its autotuner can choose on sm_80, sm_86 and sm_90 (registers, spills, shared memory, and the
main-loop figures of attnkern.tools.asm_stats). CUDA kernels (a source checkout with nvcc): every unit of
csrc/cuda/inst through nvcc with `ptxas -v` (registers, spills, static shared memory: their tiles live
in dynamic shared memory sized at launch, which ptxas does not see), and their main-loop figures
counted on their CPU emulation (target "emulated", attnkern.tools.cuda_counts: the instructions the
kernels execute on a few problems, not read from PTX).

A record breaks a rule (exit status 1) when, for a config the target can choose:
- it does not compile, or its autotuner's prune leaves a call no config;
- its main loop executes more MMA work than the tile needs (mma_efficiency > 1), or takes each exp
  more than once (exp_per_score >= 1.5; the forward's per-row rescale adds a few percent to 1; a
  soft-capped kernel needs 2 per score, its tanh's and the softmax's: >= 2.5 there);
- it needs more shared memory than the target has, and is the config a call takes without autotuning
  (the first config the prune keeps, or the fixed config of a kernel that is not autotuned). The
  autotuner itself never picks such a config: Triton times a config that fails to launch as infinitely
  slow. The table notes the others;
- and, for what the benchmark grid runs (in_grid: fp16/bf16, E = 64, 128, no mask): it spills
  registers, or its main loop loads its streamed tiles synchronously (no cp.async/TMA);
- the forward or two-pass backward (RAGGED_ASYNC) in fp16/bf16 at a ragged head dim (row strides
  multiples of 8, not 16: the kernels take the strides' alignment as a constant) loads synchronously
  in a config of two or more stages.
Violations that no config can fix are listed in KNOWN with the reason: the report prints them as
KNOWN and they do not fail it; everything else does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

DESCRIPTION = __doc__.split("\n\n")[0]
# Shared memory per block, opt-in maximum (bytes): A100, A10/RTX 30xx/L4 (sm_86, sm_89), H100/H200.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Record:
    """One kernel × config × target × problem: the report's row (`attnkern compile-report --json`)."""

    backend: str
    kernel: str
    config: str
    target: str
    problem: str
    in_grid: bool
    chosen: bool  # the target's early prune keeps this config (it can run there)
    default: bool = True  # the config a call takes without autotuning
    registers: int = -1
    spill_bytes: int = -1
    smem_bytes: int = -1
    smem_limit: int = -1
    mma_efficiency: Optional[float] = None
    exp_per_score: Optional[float] = None
    fops_per_score: Optional[float] = None  # measured, no rule (asm_stats)
    smem_loads_per_mma: Optional[float] = None
    async_kv: Optional[bool] = None
    mma_kind: str = ""
    error: str = ""
    exps_needed: int = 1  # exps each score needs: 2 with soft-capping (its tanh), else 1
    sync_bytes_per_score: Optional[float] = None  # plain global loads per score (CUDA, emulated)


# Kernels that load their tiles asynchronously at a ragged head dim too (triton/common.py: stride_align).
RAGGED_ASYNC = ("fwd", "fwd+lo", "dkdv", "dq", "varlen-fwd+lo", "varlen-dkdv", "varlen-dq")
MMA_TOLERANCE = 1.01  # executed / useful above this: duplicated work
EXP_DUPLICATED = 1.5


@dataclass(frozen=True)
class Known:
    """A violation not fixed today, stated here so that the report shows it (as KNOWN, with the
    reason) while every other violation still fails: records of one of `kernels` on one of `targets`,
    for a problem with one of `head_dims` (and one of `dtypes`, if given), breaking `rule`. Remove an
    entry once its fix lands."""

    rule: str
    kernels: Tuple[str, ...]
    targets: Tuple[str, ...]
    head_dims: Tuple[int, ...]
    reason: str
    dtypes: Tuple[str, ...] = ()
    backend: str = "triton"

    def matches(self, r, rule: str) -> bool:
        words = r.problem.split()
        return (rule == self.rule and r.backend == self.backend and r.kernel in self.kernels
                and r.target in self.targets and any(f"E={e}" in words for e in self.head_dims)
                and (not self.dtypes or words[0] in self.dtypes))


ALL_TARGETS = ("sm_80", "sm_86", "sm_90")
KNOWN = (
    Known("spill", ("dkdv",), ("sm_80", "sm_86"), (64, 128),
          "dK/dV keeps Kᵀ, V and both fp32 accumulators in registers; every config that duplicates no "
          "work (4 warps, 64x64) spills on the mma.sync targets: 170-480 B at E=64, 24-52 B at E=128. "
          "The kernel needs restructuring (the single-pass backward), not another config"),
    Known("spill", ("dkdv",), ("sm_90",), (128,),
          "the same at E=128 on sm_90 in the causal form: 64x64 with 4 warps spills 128-140 B, and 8 "
          "warps compute S and dP twice (1.5x the MMA work, 2 exps per score)"),
    Known("exp", ("fwd", "fwd+lo", "dkdv"), ALL_TARGETS, (248, 256),
          "at head dim 256 the score tile is exponentiated in a replicated layout (1.5-5 exps per score "
          "with nothing duplicated in the products); cause not diagnosed yet. Not in the benchmark grid"),
    Known("exp", ("fwd", "dkdv"), ALL_TARGETS, (64, 128), dtypes=("float32",),
          reason="the same with float32 (tf32x3) operands at E=64 and 128 under a float mask; cause not "
                 "diagnosed yet. Not in the benchmark grid"),
    Known("mma", ("attention_bwd_dkdv_kernel", "attention_bwd_dkdv_kernel[mask][window]"), ("emulated",),
          (160, 192, 256), backend="cuda",
          reason="the CUDA dK/dV kernel splits dK/dV's columns over 2 CTAs above head dim 128, where the two "
                 "fp32 accumulators would not fit in registers beside Kᵀ and V; each CTA recomputes S and dP: "
                 "1.5x the products, 2 exps per score. Not in the benchmark grid"),
    Known("exp", ("attention_bwd_dkdv_kernel", "attention_bwd_dkdv_kernel[mask][window]"), ("emulated",),
          (160, 192, 256), backend="cuda", reason="the same column split, seen in the exps"),
)


def violations(records) -> List[Tuple[object, str]]:
    """(record, reason) for every rule a record breaks (see the module docstring), known ones
    (KNOWN) included, their reason prefixed with "KNOWN" and ending in the KNOWN entry's number
    ("[known 1]")."""
    out = []

    def add(r, rule, why):
        known = next((i for i, k in enumerate(KNOWN) if k.matches(r, rule)), None)
        out.append((r, f"KNOWN {why} [known {known + 1}]" if known is not None else why))

    for r in records:
        if not r.chosen:
            continue
        if r.error:
            add(r, "compile", r.error)
            continue
        if r.mma_efficiency is not None and r.mma_efficiency > MMA_TOLERANCE:
            add(r, "mma", f"duplicated MMA work: {r.mma_efficiency:.2f}x the useful products")
        if r.exp_per_score is not None and r.exp_per_score >= EXP_DUPLICATED + r.exps_needed - 1:
            add(r, "exp", f"duplicated exps: {r.exp_per_score:.2f} per score element")
        if r.smem_limit > 0 and r.smem_bytes > r.smem_limit and r.default:
            add(r, "smem", f"needs {r.smem_bytes} B of shared memory, {r.target} has {r.smem_limit}")
        if r.in_grid and r.spill_bytes > 0:
            add(r, "spill", f"spills {r.spill_bytes} B in a benchmarked config")
        if r.in_grid and r.async_kv is False:
            add(r, "sync", "synchronous tile loads in the main loop of a benchmarked config")
        elif _ragged_half(r) and r.async_kv is False:
            add(r, "sync", "synchronous tile loads in the main loop at a ragged head dim")
    return out


def _ragged_half(r) -> bool:
    """An fp16/bf16 record of a RAGGED_ASYNC kernel at a ragged head dim, in a config of 2 or more stages
    (one stage pipelines nothing at any head dim: the E = 256 tier's backward configs)."""
    words = r.problem.split()
    stages = re.search(r"\bs(\d+)$", r.config)
    return (r.kernel in RAGGED_ASYNC and "ragged" in words and words[0] in ("float16", "bfloat16")
            and stages is not None and int(stages.group(1)) > 1)


def failures(bad) -> list:
    """The violations that fail the report: all but the KNOWN ones."""
    return [(r, why) for r, why in bad if not why.startswith("KNOWN")]


def _fmt(x, spec="") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec)


COLUMNS = ("backend", "kernel", "target", "problem", "config", "regs", "spill", "smem", "mma", "mma_eff",
           "exp/score", "ld/mma", "async", "syncB/score", "grid", "note")


def table_rows(records, bad) -> List[List[str]]:
    reasons = {}
    for r, why in bad:
        reasons.setdefault(id(r), []).append(why)
    rows = []
    for r in records:
        note = "; ".join(reasons.get(id(r), []))
        if r.chosen and not r.default and r.smem_limit > 0 and r.smem_bytes > r.smem_limit:
            note = "over the shared memory: autotune skips it"
        if not r.chosen:
            note = "pruned on this target" + (f" ({r.error})" if r.error else "")
        unset = lambda x: None if x < 0 else x  # noqa: E731 (-1: not measured for this record)
        rows.append([r.backend, r.kernel, r.target, r.problem, r.config, _fmt(unset(r.registers)),
                     _fmt(unset(r.spill_bytes)), _fmt(unset(r.smem_bytes)), r.mma_kind or "-", _fmt(r.mma_efficiency, ".2f"), _fmt(r.exp_per_score, ".2f"),
                     _fmt(r.smem_loads_per_mma, ".2f"), _fmt(r.async_kv), _fmt(r.sync_bytes_per_score, ".2f"),
                     _fmt(r.in_grid),
                     (("" if note.startswith("KNOWN") else "FAIL: ") + note) if id(r) in reasons else note])
    return rows


def print_table(records, bad, markdown: bool = False, file=None) -> None:
    file = file or sys.stdout
    rows = table_rows(records, bad)
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |", file=file)
        print("|" + "|".join("---" for _ in COLUMNS) + "|", file=file)
        for row in rows:
            print("| " + " | ".join(row) + " |", file=file)
    else:
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
        print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip(), file=file)
        for row in rows:
            print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip(), file=file)
    print(f"{len(records)} records, {len(failures(bad))} violations, {len(bad) - len(failures(bad))} known",
          file=file)
    used = sorted({int(why.rsplit("[known ", 1)[1].rstrip("]")) for _, why in bad if why.startswith("KNOWN")})
    for i in used:
        print(f"{'- ' if markdown else ''}[known {i}] {KNOWN[i - 1].reason}.", file=file)


def _cuda_compile_check():
    """csrc/cuda/compile_check.py of a source checkout, or None (an installed package has no csrc/)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above attnkern/
    path = os.path.join(root, "csrc", "cuda", "compile_check.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("attnkern_cuda_compile_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_records(archs: List[str], jobs: int, only: str = "", loops: bool = True):
    """Records of the CUDA kernels (registers, spills, static shared memory; with `loops`, the main-loop
    figures counted on the CPU emulation, attnkern.tools.cuda_counts), or [] with a reason."""
    cc = _cuda_compile_check()
    if cc is None:
        return [], "no csrc/cuda here (not a source checkout)"
    if cc.nvcc_path() is None:
        return [], "nvcc not found"
    import glob

    units = sorted(u for u in glob.glob(os.path.join(os.path.dirname(cc.__file__), "inst", "*.cu"))
                   if only in os.path.basename(u))
    out = []
    for res in cc.compile_units(units, archs, jobs):
        if res["error"]:
            out.append(Record("cuda", res["unit"], "-", "-", "-", False, True, error="does not compile: "
                              + res["error"].splitlines()[-1][:200]))
            continue
        for k in res["kernels"]:
            arch = int(k["arch"].replace("sm_", "").rstrip("a"))
            out.append(Record("cuda", k["kernel"], res["unit"].replace(".cu", ""), k["arch"], "-",
                              cc.BUDGETED.match(res["unit"]) is not None, True, registers=k["registers"],
                              spill_bytes=k["spills"], smem_bytes=k["smem"],
                              smem_limit=MAX_SHARED.get(arch, 48 * 1024)))
    if not loops:
        return out, ""
    from .cuda_counts import cuda_loop_records

    more, note = cuda_loop_records(cc.short_kernel_name)
    return out + more, note


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 86, 80], help="compute capabilities (90 86 80)")
    ap.add_argument("--backend", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    ap.add_argument("--kernel", nargs="+", help="only these Triton kernels (fwd fwd+lo dkdv dq dmask)")
    ap.add_argument("--ci", action="store_true", help="the bounded subset CI runs (Triton only; see "
                    "attnkern.tools.triton_compile.ci_jobs; --arch and --kernel ignored)")
    ap.add_argument("--grid", action="store_true", help="only the benchmark grid's problems (fp16, E = 64 "
                    "and 128, causal and not; the table of bench/README.md)")
    ap.add_argument("--include-pruned", action="store_true",
                    help="also compile the configs a target's prune drops (shown, never violations)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--json", metavar="FILE", help="write one record per kernel, config, target and problem")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--from-json", metavar="FILE", help="check and print the records of an earlier --json "
                    "instead of compiling")


def run(args, parser=None) -> int:
    records, note = [], ""
    if args.from_json:
        with open(args.from_json) as f:
            records = [Record(**d) for d in json.load(f)]
    else:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("attnkern compile-report: unset TRITON_INTERPRET (interpreted kernels cannot compile)")
            return 2
        if "triton" in args.backend:
            from . import triton_compile as tc

            problems = tc.grid_problems() if args.grid else tc.default_problems()
            jobs = tc.ci_jobs() if args.ci else tc.jobs_for(problems, args.arch, args.kernel, args.include_pruned)
            records += tc.run_jobs(jobs, args.jobs)
        if "cuda" in args.backend:
            cuda_archs = [f"{a}a" if a >= 90 else str(a) for a in args.arch]
            more, note = cuda_records(cuda_archs, args.jobs)
            records += more
    bad = violations(records)
    print_table(records, bad, markdown=args.markdown)
    if note:
        print(f"CUDA kernels not compiled: {note}")
    for r, why in failures(bad):
        print(f"VIOLATION {r.backend} {r.kernel} {r.target} {r.problem} {r.config}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    return 1 if failures(bad) else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="attnkern compile-report", description=DESCRIPTION)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
