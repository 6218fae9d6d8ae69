"""Compile the Triton kernels for a GPU target without a GPU, and report what the GPU would get.

    python -m attnkern.triton.compile_check [--arch 90 80] [--all-configs] [--json out.json]

The Triton interpreter (what the CPU test suite runs) accepts code the GPU compiler rejects, and says
nothing of shared memory, registers or spills. This compiles each kernel variant (dtype × mask kind ×
causal × head-dim tier × block config) for the target with Triton's own compiler, then reads the
register and spill counts from `ptxas -v`. It fails if a variant does not compile, needs more shared
memory than the target has, or (with --no-spills) spills registers. TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (kernels decorated for the interpreter cannot compile)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import backward, configs, forward  # noqa: E402

# Shared memory per block, opt-in maximum (bytes).
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass
class Variant:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    mask: int
    causal: bool
    block_m: int
    block_n: int
    warps: int
    stages: int
    i64: bool = False
    max_spill: int = -1  # fail above this many spilled bytes (-1: no limit)
    shared: int = -1
    registers: int = -1
    spill_bytes: int = -1
    error: str = ""

    def label(self) -> str:
        return (f"{self.kernel:<6} sm{self.arch} {self.dtype:<8} E={self.head_dim:<3} mask={self.mask} "
                f"causal={int(self.causal)} {self.block_m}x{self.block_n} w{self.warps} s{self.stages}"
                + (" i64" if self.i64 else ""))


def _jit(kernel):
    """The JITFunction under the autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(fn, pointer_types: Dict[str, str], constexprs: Dict[str, object], floats=()):
    """Argument types the way a launch would specialize them: unit strides of the last dim as constant 1."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("e"):
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32"
    return sig


def _ptxas(arch: int) -> Optional[str]:
    """The ptxas Triton itself assembles with for `arch` (its PTX may be newer than the system's)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        return shutil.which("ptxas")


def _ptxas_stats(ptx: str, arch: int):
    """(registers, spill bytes) of the kernel in `ptx`, from ptxas -v; (-1, -1) if ptxas is unusable."""
    exe = _ptxas(arch)
    if exe is None:
        return -1, -1
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([exe, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    if res.returncode != 0 or not regs:
        return -1, -1
    return int(regs.group(1)), sum(int(s) for s in spills)


def _compile(v: Variant, fn, sig, constexprs):
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", v.arch, 32),
                           options={"num_warps": v.warps, "num_stages": v.stages})
    except Exception as exc:  # report, don't stop: the point is the whole list
        v.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return v
    v.shared = int(k.metadata.shared)
    v.registers, v.spill_bytes = _ptxas_stats(k.asm["ptx"], v.arch)
    if v.shared > MAX_SHARED.get(v.arch, 48 * 1024):
        v.error = f"needs {v.shared} bytes of shared memory, sm{v.arch} has {MAX_SHARED.get(v.arch)}"
    elif v.max_spill >= 0 and v.spill_bytes > v.max_spill:
        v.error = f"spills {v.spill_bytes} bytes of registers (allowed: {v.max_spill})"
    return v


def variants(archs: List[int], all_configs: bool, dtypes=("float16", "bfloat16", "float32"),
             masks=(0, 1, 2), causals=(False, True)) -> List[Variant]:
    out = []
    for arch, tier in itertools.product(archs, configs.TIERS):
        for kernel, candidates in (("fwd", configs.FWD_CONFIGS), ("dkdv", configs.BWD_CONFIGS),
                                   ("dq", configs.BWD_CONFIGS), ("onepass", configs.ONEPASS_CONFIGS)):
            for dtype in dtypes:
                tier_cfgs = [c for c in candidates if c.attnkern_tier == (tier, configs.dtype_class(dtype))]
                for cfg in (tier_cfgs if all_configs else tier_cfgs[:1]):
                    for mask, causal in itertools.product(masks, causals):
                        out.append(Variant(kernel, arch, dtype, tier, mask, causal, cfg.kwargs["BLOCK_M"],
                                           cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages))
        for dtype in dtypes:
            bm, bn, warps = backward.dmask_blocks(tier, tier, dtype)
            out.append(Variant("dmask", arch, dtype, tier, 2, True, bm, bn, warps, 1))
    return out


# Spill budget (bytes) of the kernels the benchmarks time: a few registers' worth. (The dK/dV pass at
# E=128 spills 12 bytes since it holds two per-row statistics, the row max and log2 of the denominator,
# which keep P exact for huge scores.) Regressions that matter cost hundreds of bytes.
SPILL_BUDGET = 64


def ci_variants() -> List[Variant]:
    """What CI compiles (a few minutes on 2 cores): for sm90, the first config of every kernel, tier and
    dtype class in its heaviest form (float mask, causal), and for half precision also plain forms (no
    mask: forward both ways, dQ causal, dK/dV not causal), which must stay within SPILL_BUDGET at
    E <= 128, where the throughput benchmarks time them; one int64-indexing variant; plain half forms
    for sm80."""
    out = []
    for v in variants([90], False, dtypes=("float16", "float32"), masks=(0, 2), causals=(False, True)):
        heaviest = v.mask == 2 and v.causal
        plain = v.mask == 0 and v.dtype == "float16"
        if v.kernel == "dmask" or heaviest:
            out.append(v)
        elif plain and (v.kernel == "fwd" or (v.kernel == "dq") == v.causal):
            if v.head_dim <= 128:
                v.max_spill = SPILL_BUDGET
            out.append(v)
    i64 = [v for v in out if v.kernel == "fwd" and v.dtype == "float16" and v.head_dim == 128 and v.mask == 2][0]
    out.append(Variant(**{**asdict(i64), "i64": True}))
    out += [v for v in variants([80], False, dtypes=("float16",), masks=(0,), causals=(True,))
            if v.head_dim <= 128 and v.kernel != "dmask"]
    return out


def check_variant(v: Variant) -> Variant:
    t = TORCH_TO_TRITON[v.dtype]
    mask_t = {0: "*fp16", 1: "*u8", 2: f"*{t}"}[v.mask]
    e = v.head_dim
    # PRECISION only matters to float32 dots: the default there is tf32x3 (see forward.precision_for).
    precision = forward.precision_for(v.dtype)
    common = dict(E=e, EV=e, BLOCK_E=e, BLOCK_EV=e, PRECISION=precision, BLOCK_M=v.block_m, BLOCK_N=v.block_n,
                  I64=v.i64)
    floats = ("scale",)
    if v.kernel == "fwd":
        fn = _jit(forward._attn_fwd_kernel)
        # The budgeted plain forms are the inference forward the benchmarks time (no rounding residual);
        # the heaviest (float mask, causal) half forms compile the training forward, which stores it.
        cx = dict(common, MASK_KIND=v.mask, IS_CAUSAL=v.causal, EVEN_M=False, EVEN_N=False,
                  HAS_LO=v.dtype != "float32" and v.mask == 2 and v.causal)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", M=mask_t, O=f"*{t}", O_LO=f"*{t}", LSE="*fp32", STATS="*fp32")
    elif v.kernel == "onepass":
        fn = _jit(backward._attn_bwd_onepass_kernel)
        cx = dict(common, MASK_KIND=v.mask, IS_CAUSAL=v.causal, EVEN_M=False, EVEN_N=False)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", M=mask_t, DO=f"*{t}", STATS="*fp32", DELTA="*fp32",
                    DK=f"*{t}", DV=f"*{t}", DQ_ACC="*fp32")
    elif v.kernel in ("dkdv", "dq"):
        fn = _jit(backward._attn_bwd_dkdv_kernel if v.kernel == "dkdv" else backward._attn_bwd_dq_kernel)
        cx = dict(common, MASK_KIND=v.mask, IS_CAUSAL=v.causal, EVEN_M=False, EVEN_N=False)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", M=mask_t, DO=f"*{t}", STATS="*fp32", DELTA="*fp32",
                    DK=f"*{t}", DV=f"*{t}", DQ=f"*{t}")
    else:
        fn = _jit(backward._attn_bwd_dmask_kernel)
        cx = dict(common, IS_CAUSAL=v.causal, SUM_B=True, SUM_H=False, SUM_L=False, SUM_S=False)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", M=mask_t, DO=f"*{t}", STATS="*fp32", DELTA="*fp32",
                    DM="*fp32")
    sig = _signature(fn, ptrs, cx, floats)
    return _compile(v, fn, sig, cx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 80)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    ap.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(configs.TIERS))
    ap.add_argument("--kernel", nargs="+", default=["fwd", "dkdv", "dq", "onepass", "dmask"])
    ap.add_argument("--no-spills", action="store_true", help="fail on any register spill")
    ap.add_argument("--worst-case", action="store_true", help="only the float-mask causal variants (most registers)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--ci", action="store_true", help="the CI selection (see ci_variants); other filters ignored")
    args = ap.parse_args(argv)

    todo = ci_variants() if args.ci else [v for v in variants(args.arch, args.all_configs, dtypes=args.dtype)
            if v.head_dim in args.head_dim and v.kernel in args.kernel
            and (not args.worst_case or (v.mask == 2 and v.causal))]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(check_variant, todo))
    else:
        results = [check_variant(v) for v in todo]
    failed = 0
    for v in results:
        spill_fail = args.no_spills and v.spill_bytes > 0
        bad = bool(v.error) or spill_fail
        failed += bad
        stats = f"shared {v.shared:>6}  regs {v.registers:>3}  spills {v.spill_bytes:>5}"
        print(f"{'FAIL' if bad else 'ok  '}  {v.label()}  {stats}  {v.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in results], f, indent=1)
    print(f"{len(results) - failed}/{len(results)} variants compiled within limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
