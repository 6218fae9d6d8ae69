"""The "cuda-emu" backend: the CUDA kernels of csrc/cuda run on the CPU under a SIMT emulator.

The kernel sources are the same (csrc/cuda/inst/*.cu compiled as host C++ with ATTNKERN_CUDA_EMU,
which maps the PTX primitives of ptx.h to csrc/cuda/emu/runtime.cpp); each CUDA thread runs as a
fiber, and every shared and global access is checked (races, cp.async reads before their wait,
out-of-bounds, launch limits). It exists to test the CUDA kernels without a GPU: it is slow, takes
CPU tensors, and is chosen by name only (backend="cuda-emu"), never by "auto". It also counts what
each kernel executes (torch.ops.attnkern_emu.kernel_counts(): MMA, ldmatrix, exp, bytes loaded per
tensor), from which `attnkern compile-report` computes the CUDA kernels' main-loop figures.

It goes through the "cuda" backend's Python glue (padding, layouts, cut-back) unchanged; only the ops
differ (torch.ops.attnkern_emu, same schemas as attnkern_ext). The emulator is built on first use
(about a minute on 2 cores), with g++ and the CUDA headers (cuda_fp16.h, cuda_runtime.h; no GPU and no
nvcc needed), and cached under build/cuda-emu next to the package (ATTNKERN_EMU_BUILD_DIR overrides).
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

from .cuda import CudaBackend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
EMU_DIR = os.path.join(CSRC, "cuda", "emu")

# The kernel units are instrumented: gcc calls __asan_{load,store}N for every access, which the
# emulator's runtime (not instrumented) implements as its checks.
INSTRUMENT = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
              "--param", "asan-stack=0", "--param", "asan-globals=0"]
KERNEL_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-x", "c++", "-DATTNKERN_CUDA_EMU", "-w"]


def cuda_include_dir() -> Optional[str]:
    """A CUDA toolkit include directory (cuda_fp16.h, cuda_runtime.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


def build_dir() -> str:
    return os.environ.get("ATTNKERN_EMU_BUILD_DIR") or os.path.join(ROOT, "build", "cuda-emu")


def _headers() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.h")) + glob.glob(os.path.join(EMU_DIR, "*.h")) +
                  [os.path.join(CSRC, n) for n in ("params.h", "op_args.h", "decode_params.h", "decode_op.h")])


def _sources_digest(files: List[str], extra: str) -> str:
    """A digest of the files' paths and contents, every header the units include, and `extra`."""
    h = hashlib.sha256(extra.encode())
    for f in sorted(set(files)) + _headers():
        with open(f, "rb") as fh:
            h.update(f.encode() + fh.read())
    return h.hexdigest()[:16]


def _kernel_units() -> List[str]:
    """The instantiation units of csrc/cuda/inst and the emulator's own test kernels."""
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "inst", "*.cu"))) + [os.path.join(EMU_DIR, "selftest.cu")]


def _compile_kernels(include: str, out_dir: str, jobs: int, flags: str) -> List[str]:
    """One object per instantiation unit of csrc/cuda/inst, compiled `jobs` at a time; each object's
    name carries the digest of its unit, the headers and the flags, so only stale ones recompile."""
    units = _kernel_units()
    cxx = os.environ.get("CXX", "g++")

    def one(unit):
        digest = _sources_digest([unit], flags + cxx)
        obj = os.path.join(out_dir, f"{os.path.basename(unit)[:-3]}-{digest}.o")
        if os.path.exists(obj):
            return obj
        cmd = [cxx, *KERNEL_FLAGS, *INSTRUMENT, "-I", CSRC, "-I", include, "-c", unit, "-o", obj + ".tmp"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"cuda-emu: compiling {unit} failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(obj + ".tmp", obj)
        return obj

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, units))


_lock = threading.Lock()
_built: Optional[str] = None  # '' once loaded, else the error


def load(verbose: bool = False) -> None:
    """Build (if needed) and load the emulator library, registering torch.ops.attnkern_emu; raises
    RuntimeError with the reason when it cannot."""
    global _built
    with _lock:
        if _built == "":
            return
        if _built is not None:
            raise RuntimeError(_built)
        try:
            _build_and_load(verbose)
            _built = ""
        except Exception as exc:  # keep the reason for availability()
            _built = f"the cuda-emu build failed: {exc}"
            raise RuntimeError(_built) from exc


def _build_and_load(verbose: bool) -> None:
    from torch.utils import cpp_extension

    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("no CUDA headers found (set CUDA_HOME)")
    host = [os.path.join(EMU_DIR, "runtime.cpp"), os.path.join(EMU_DIR, "ops_emu.cpp"),
            os.path.join(CSRC, "op_args.cpp"), os.path.join(CSRC, "decode_op.cpp")]
    units = _kernel_units()
    flags = " ".join(KERNEL_FLAGS + INSTRUMENT) + include
    # Kernel objects are keyed by what each compiles from; the module by all of it and the host sources.
    digest = _sources_digest(host + units, flags + sys.version + torch.__version__)
    obj_dir = os.path.join(build_dir(), "kernels")
    out = os.path.join(build_dir(), "module-" + digest)
    os.makedirs(obj_dir, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    jobs = int(os.environ.get("ATTNKERN_EMU_JOBS", "0")) or max(1, min(len(os.sched_getaffinity(0)), 8))
    objs = _compile_kernels(include, obj_dir, jobs, flags)
    os.environ.setdefault("MAX_JOBS", str(jobs))
    cpp_extension.load(
        name=f"attnkern_cuda_emu_{digest}",
        sources=host,
        # decode_op.cpp for its argument checks only: attnkern._C defines the attnkern_ext::decode op.
        extra_cflags=["-O2", "-std=c++20", f"-I{include}", f"-I{CSRC}", "-w", "-DATTNKERN_DECODE_PARAMS_ONLY"],
        extra_ldflags=objs,
        build_directory=out,
        is_python_module=False,
        verbose=verbose,
    )


def build_error() -> Optional[str]:
    """Why the emulator cannot be built here (checked without building), else None."""
    if _built:
        return _built
    if cuda_include_dir() is None:
        return "the SIMT emulator needs the CUDA headers (cuda_fp16.h, cuda_runtime.h): none found (set CUDA_HOME)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "the SIMT emulator needs a C++ compiler (g++ or $CXX)"
    if sysconfig.get_platform().split("-")[0] != "linux":
        return "the SIMT emulator runs on Linux only (ucontext fibers)"
    return None


class CudaEmuBackend(CudaBackend):
    name = "cuda-emu"

    def _ops(self):
        load()
        return torch.ops.attnkern_emu

    def availability(self, device):
        why = build_error()
        if why:
            return why
        if device.type != "cpu":
            return f"the emulated CUDA kernels take CPU tensors, not {device.type}"
        return None
