"""Compile the CUDA kernels for sm80 and sm90a without a GPU, and check what the GPU would get.

    python csrc/cuda/compile_check.py [--jobs N] [--arch 80 90a] [--only fwd_hdim64] [--json out.json]

Every unit in csrc/cuda/inst/ goes through nvcc with `-Xptxas -v`; per kernel it reports registers,
spill bytes and static shared memory. It fails on a compile error, and on any register spill, in every
head dim and variant (forward, backward, score modifications, KV-cache decode). The op layer
(ops_cuda.cpp and decode_ops_cuda.cpp, host code) is syntax-checked against torch's headers with the host
compiler. Needs nvcc, not a GPU and not a CUDA build of torch: the kernel units include no torch headers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
# The units of the head dims the throughput benchmarks time (the compile report's grid).
BUDGETED = re.compile(r"(fwd|bwd|mods|decode)_hdim(64|128)_")
SPILL_BUDGET = 0  # bytes of spill stores allowed in any kernel


def nvcc_path():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        return out.splitlines()
    except OSError:
        return names


def short_kernel_name(name: str) -> str:
    m = re.search(r"((?:attention|decode)_\w+_kernel)", name)
    if not m:
        return name[:60]
    # The variants are the kernel template's trailing bools: for the forward and dK/dV passes kHasMask
    # (reads a user mask), kLeft (the band may have a left bound: a sliding window), kMods (the score
    # modifications: softcap, ALiBi, dropout); for dQ kHasMask, kMods; for dMask kMods.
    flags = re.search(r"((?:, (?:true|false))+)>\(", name)
    bools = [b.strip() == "true" for b in flags.group(1).split(",")[1:]] if flags else []
    names = {"attention_bwd_dq_kernel": ("mask", "mods"), "attention_bwd_dmask_kernel": ("mods",)}
    tags = [tag for tag, on in zip(names.get(m.group(1), ("mask", "window", "mods")), bools) if on]
    return m.group(1) + "".join(f"[{t}]" for t in tags)


def parse_ptxas(text: str):
    """[(arch, kernel, registers, spill_bytes, smem_bytes)] from ptxas -v output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": -1, "spills": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            cur["spills"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["smem"] = int(m.group(1))
    names = demangle([r["kernel"] for r in rows])
    for r, n in zip(rows, names):
        r["kernel"] = short_kernel_name(n)
    return rows


def compile_unit(path: str, archs):
    nvcc = nvcc_path()
    gencode = []
    for a in archs:
        gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v", *gencode,
               "-I", CSRC, "-c", path, "-o", os.path.join(tmp, "unit.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    unit = os.path.basename(path)
    if res.returncode != 0:
        return {"unit": unit, "error": (res.stderr or res.stdout).strip()[-3000:], "kernels": []}
    return {"unit": unit, "error": "", "kernels": parse_ptxas(res.stderr + res.stdout)}


def cuda_include_dir(nvcc: str):
    """The toolkit's include directory: CUDA_HOME's, else next to nvcc (which may be a wrapper script)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    cands += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    try:  # `nvcc -v` with no input still prints the toolkit's paths (TOP=...)
        res = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "/dev/null"], capture_output=True, text=True)
        m = re.search(r"#\$ TOP=(\S+)", res.stderr + res.stdout)
        if m:
            cands.append(m.group(1))
    except OSError:
        pass
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def syntax_check_ops(unit: str = "ops_cuda.cpp") -> str:
    """'' if the op-layer unit (ops_cuda.cpp, decode_ops_cuda.cpp) parses against torch's and CUDA's
    headers, else the errors."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    nvcc = nvcc_path()
    cuda_include = cuda_include_dir(nvcc)
    if cuda_include is None:
        return f"no CUDA include directory (cuda_runtime_api.h) found near {nvcc}; set CUDA_HOME"
    with tempfile.TemporaryDirectory() as shim:
        # A CPU build of torch ships c10/cuda's headers but not the one its CMake generates; a CUDA
        # build's version of it only defines this macro.
        os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
        with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-fsyntax-only", "-I", CSRC, "-I", cuda_include]
        for p in include_paths():
            cmd += ["-I", p]
        cmd += ["-idirafter", shim, os.path.join(HERE, unit)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    return "" if res.returncode == 0 else res.stderr.strip()[-3000:]


def compile_units(units, archs, jobs):
    """compile_unit over `units` on `jobs` parallel nvcc processes, results in the order of `units`."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda u: compile_unit(u, archs), units))


def is_violation(kernel) -> bool:
    """Whether a compiled kernel breaks the spill rule (every unit is held to it: until 2026-12-02 head
    dims 96 and 160-256 spilled up to 108 B and were only reported)."""
    return kernel["spills"] > SPILL_BUDGET


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90a"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="compile only units whose name contains this")
    ap.add_argument("--json", help="write the per-kernel results here")
    args = ap.parse_args(argv)
    if nvcc_path() is None:
        print("compile_check: nvcc not found (set NVCC or put it on PATH)")
        return 1
    units = sorted(u for u in glob.glob(os.path.join(HERE, "inst", "*.cu")) if args.only in os.path.basename(u))
    results = compile_units(units, args.arch, args.jobs)
    failed = 0
    for r in results:
        if r["error"]:
            failed += 1
            print(f"FAIL  {r['unit']}: does not compile\n{r['error']}")
            continue
        for k in r["kernels"]:
            bad = is_violation(k)
            failed += bad
            print(f"{'FAIL' if bad else 'ok  '}  {r['unit']:<22} {k['arch']:<6} {k['kernel']:<36} "
                  f"regs {k['registers']:>3}  spills {k['spills']:>5}  smem {k['smem']}")
    for host_unit in ("ops_cuda.cpp", "decode_ops_cuda.cpp"):
        ops_error = syntax_check_ops(host_unit)
        if ops_error:
            failed += 1
            print(f"FAIL  {host_unit} does not parse:\n{ops_error}")
        else:
            print(f"ok    {host_unit} parses against torch's and CUDA's headers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{len(units)} units, {sum(len(r['kernels']) for r in results)} kernels; {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
