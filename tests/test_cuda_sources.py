"""The CUDA kernels' sources, checked without a GPU: the generated instantiation units are current,
ptxas's report is parsed right, and (where nvcc is installed) every unit compiles for sm_80 and sm_90a
with no register spill in any kernel, and the op layer parses against torch's
headers. `python csrc/cuda/compile_check.py` prints the same check as a per-kernel table.

Runtime correctness of these kernels is tested by the shared backend matrix (tests/matrix.py adds
"cuda" on a GPU where they were built, and "cuda-emu", the same sources under the CPU emulator, where
the CUDA headers are found); nothing here runs them.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CUDA_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


generate_instances = _load("generate_instances")
compile_check = _load("compile_check")
needs_nvcc = pytest.mark.skipif(compile_check.nvcc_path() is None, reason="nvcc is not installed")


def test_generated_units_are_current():
    assert generate_instances.stale_files() == []


def test_generated_head_dims_match_dispatch():
    # dispatch.h's kHeadDims and the generator's list must agree, or a head dim links to nothing.
    text = open(os.path.join(CUDA_DIR, "dispatch.h")).read()
    line = next(ln for ln in text.splitlines() if "kHeadDims[]" in ln)
    dims = tuple(int(x) for x in line.split("{")[1].split("}")[0].split(","))
    assert dims == generate_instances.HEAD_DIMS


def test_parse_ptxas_report():
    report = """ptxas info    : Compiling entry function '_Z3fooi' for 'sm_90a'
ptxas info    : Function properties for _Z3fooi
    72 bytes stack frame, 68 bytes spill stores, 68 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bari' for 'sm_80'
ptxas info    : Function properties for _Z3bari
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, 1024 bytes smem, 400 bytes cmem[0]
"""
    rows = compile_check.parse_ptxas(report)
    assert [(r["arch"], r["registers"], r["spills"], r["smem"]) for r in rows] == [
        ("sm_90a", 255, 68, 0), ("sm_80", 168, 0, 1024)]


def test_kernel_names_mark_the_mask_and_window_variants():
    short = compile_check.short_kernel_name
    assert short("void attnkern::cuda::attention_fwd_kernel<FwdTraits<64, 128, 4, __half>, true>(AttentionParams)") \
        == "attention_fwd_kernel[mask]"
    assert short("void attnkern::cuda::attention_fwd_kernel<FwdTraits<64, 128, 4, __half>, false>(AttentionParams)") \
        == "attention_fwd_kernel"
    assert short("void attnkern::cuda::attention_fwd_kernel<FwdTraits<64, 128, 4, __half>, false, true>"
                 "(AttentionParams)") == "attention_fwd_kernel[window]"
    assert short("void attnkern::cuda::attention_bwd_dkdv_kernel<BwdTraits<128, 32, 4, 2, __half>, true, true>"
                 "(AttentionParams, float const*)") == "attention_bwd_dkdv_kernel[mask][window]"


def test_kernel_names_mark_the_score_modification_variants():
    # kMods is the third flag of the forward and dK/dV, the second of dQ, the only one of dMask.
    short = compile_check.short_kernel_name
    assert short("void attnkern::cuda::attention_fwd_kernel<FwdTraits<64, 64, 4, __half>, true, true, true>"
                 "(AttentionParams)") == "attention_fwd_kernel[mask][window][mods]"
    assert short("void attnkern::cuda::attention_fwd_kernel<FwdTraits<64, 128, 4, __half>, false, false, false>"
                 "(AttentionParams)") == "attention_fwd_kernel"
    assert short("void attnkern::cuda::attention_bwd_dkdv_kernel<BwdTraits<64, 32, 4, 1, __half>, true, true, true>"
                 "(AttentionParams, float const*)") == "attention_bwd_dkdv_kernel[mask][window][mods]"
    assert short("void attnkern::cuda::attention_bwd_dq_kernel<DqTraits<64, 64, 4, __half>, true, true>"
                 "(AttentionParams, float const*)") == "attention_bwd_dq_kernel[mask][mods]"
    assert short("void attnkern::cuda::attention_bwd_dq_kernel<DqTraits<64, 64, 4, __half>, true, false>"
                 "(AttentionParams, float const*)") == "attention_bwd_dq_kernel[mask]"
    assert short("void attnkern::cuda::attention_bwd_dmask_kernel<DqTraits<64, 64, 4, __half>, true>"
                 "(AttentionParams, float const*, float*)") == "attention_bwd_dmask_kernel[mods]"
    assert short("void attnkern::cuda::attention_bwd_dmask_kernel<DqTraits<64, 64, 4, __half>, false>"
                 "(AttentionParams, float const*, float*)") == "attention_bwd_dmask_kernel"


def test_kernel_names_of_the_decode_kernels():
    short = compile_check.short_kernel_name
    assert short("void attnkern::cuda::decode_splitkv_kernel<attnkern::cuda::FwdTraits<64, 64, 4, __half>>"
                 "(attnkern::DecodeParams, attnkern::cuda::DecodeWorkspace)") == "decode_splitkv_kernel"
    assert short("void attnkern::cuda::decode_combine_kernel<__half, 64>(attnkern::DecodeParams, "
                 "attnkern::cuda::DecodeWorkspace)") == "decode_combine_kernel"


@needs_nvcc
def test_every_unit_compiles_for_sm80_and_sm90a_without_spills():
    # Every instantiation unit through nvcc + ptxas for sm_90a, and the head-dim 64/128 units (the
    # benchmarked ones) for sm_80 too: a compile error or a register spill anywhere fails (score-modification
    # and decode kernels included). (`python csrc/cuda/compile_check.py` compiles every unit for both; in CI
    # the other head dims' sm_80 pass would add minutes.)
    units = sorted(glob.glob(os.path.join(CUDA_DIR, "inst", "*.cu")))
    assert len(units) == len(generate_instances.expected_files()) - 1
    ruled = [u for u in units if "hdim64_" in u or "hdim128_" in u]
    results = compile_check.compile_units(ruled, ["80", "90a"], os.cpu_count() or 1)
    results += compile_check.compile_units([u for u in units if u not in ruled], ["90a"], os.cpu_count() or 1)
    errors = {r["unit"]: r["error"] for r in results if r["error"]}
    assert errors == {}
    violations = [(r["unit"], k["arch"], k["kernel"], k["spills"]) for r in results for k in r["kernels"]
                  if compile_check.is_violation(k)]
    assert violations == []
    for r in results:
        kernels = {(k["arch"], k["kernel"]) for k in r["kernels"]}
        # Both archs, and the maskless and masked variants of each kernel, are in every unit; the forward and
        # dK/dV also with the window's left bound ([window]; a masked dK/dV always has it). The mods units
        # hold the general variant of each pass (any mask, band and score modification).
        if r["unit"].startswith("fwd"):
            expected = {"attention_fwd_kernel", "attention_fwd_kernel[mask]", "attention_fwd_kernel[window]",
                        "attention_fwd_kernel[mask][window]"}
        elif r["unit"].startswith("bwd"):
            expected = {"attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel",
                        "attention_bwd_dkdv_kernel[window]", "attention_bwd_dkdv_kernel[mask][window]",
                        "attention_bwd_dq_kernel", "attention_bwd_dq_kernel[mask]", "attention_bwd_dmask_kernel",
                        "attention_bwd_sum_kv_parts_kernel"}  # the GQA group split's sum of the dK/dV parts
        elif r["unit"].startswith("decode"):  # KV-cache decoding: the split-KV kernel and the split merge
            expected = {"decode_splitkv_kernel", "decode_combine_kernel"}
        else:
            assert r["unit"].startswith("mods"), r["unit"]
            expected = {"attention_fwd_kernel[mask][window][mods]", "attention_bwd_preprocess_kernel",
                        "attention_bwd_dkdv_kernel[mask][window][mods]", "attention_bwd_dq_kernel[mask][mods]",
                        "attention_bwd_dmask_kernel[mods]", "attention_bwd_sum_kv_parts_kernel"}
        archs = ("sm_80", "sm_90a") if "hdim64_" in r["unit"] or "hdim128_" in r["unit"] else ("sm_90a",)
        assert kernels == {(a, n) for a in archs for n in expected}, r["unit"]
        assert all(0 < k["registers"] <= 255 for k in r["kernels"]), r["unit"]


@needs_nvcc
def test_op_layer_parses_against_torch_headers():
    assert compile_check.syntax_check_ops() == ""
    assert compile_check.syntax_check_ops("decode_ops_cuda.cpp") == ""
