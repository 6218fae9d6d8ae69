"""Build script: the C++ operator library as the Python extension attnkern._C.

Metadata lives in pyproject.toml. Install with `pip install --no-build-isolation -e .` (torch must already
be installed: the extension is compiled against it). The source lists are csrc/sources_cpu.txt and, when
torch has CUDA and nvcc is found, csrc/sources_cuda.txt (the CUDA kernels, for TORCH_CUDA_ARCH_LIST,
default "8.0;9.0+PTX"); CMakeLists.txt reads the same lists. ATTNKERN_NO_EXTENSION=1 skips the C++ build
(attnkern then runs without its "cpu" backend and says so); ATTNKERN_NO_CUDA=1 skips the CUDA kernels.
"""
import os
import platform

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_sources(list_file):
    with open(os.path.join(HERE, list_file)) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def cpu_flags():
    """Optimization and ISA flags: AVX2/FMA on x86-64 (ATen's Vectorized then uses 256-bit lanes)."""
    flags = ["-O3", "-fopenmp", "-DNDEBUG", "-Wall", "-Wno-unknown-pragmas"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def with_cuda():
    """Whether to compile the CUDA kernels: a CUDA build of torch and an nvcc (CUDA_HOME)."""
    if os.environ.get("ATTNKERN_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def nvcc_flags():
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG"]


def extensions():
    if os.environ.get("ATTNKERN_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = read_sources("csrc/sources_cpu.txt") + ["csrc/module.cpp"]
    if with_cuda():
        # Ampere and Hopper (the kernels use mma.sync, ldmatrix and cp.async: sm80 and newer), plus
        # sm_90's PTX, which the driver compiles for newer GPUs (capability 10.x, 12.x): without it they
        # would get "no kernel image" while the backend says it is available.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = CUDAExtension(
            "attnkern._C",
            sources + read_sources("csrc/sources_cuda.txt"),
            extra_compile_args={"cxx": cpu_flags(), "nvcc": nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "attnkern._C",
            sources,
            extra_compile_args={"cxx": cpu_flags()},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
