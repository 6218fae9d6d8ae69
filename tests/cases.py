"""The test suite's hand-written cases, in the vocabulary of attnkern/tools/cases.py (which also has the
input generator, the reference runner and random_case; they are re-exported here for the tests).
Adding a backend to the test matrix gives it all of these cases at once."""
from __future__ import annotations

from attnkern.tools.cases import (  # noqa: F401
    RANDOM_MAX_WORK, Case, DecodeCase, as_kwargs, decode_kwargs, describe, detached, grad_leaves, make_decode_inputs,
    make_inputs, mask_shape, random_case, run_decode_reference,
    random_empty_case, run_reference, upstream_grads,
)

# ---------------------------------------------------------------------------------------------------
# The cases. Each line covers one concern; together they cover lengths 1, 17, 113, 203, 256, Lq ≠ Lk
# both ways, head dims 16..256 with Ev ≠ E, every mask kind and broadcast shape, fully masked rows,
# GQA 6:2 and 4:1, non-contiguous layouts, 3-D and 5-D inputs, and all causal alignments.
CASES = [
    Case("L1_S1", L=1, S=1, E=16),
    Case("L1_S17_causal", L=1, S=17, E=16, causal="top_left"),
    Case("L17_S1_br", L=17, S=1, E=16, causal="bottom_right"),
    Case("L17_e40_causal", L=17, S=17, E=40, causal="top_left"),
    Case("L113_S203_e64", L=113, S=203, E=64),
    Case("L203_S113_e80", L=203, S=113, E=80, B=2, Hq=1),
    Case("L256_e128_causal", L=256, S=256, E=128, Hq=1, causal="top_left"),
    Case("L113_S203_e32_causal_tl", L=113, S=203, E=32, causal="top_left"),
    Case("L203_S113_e32_causal_tl", L=203, S=113, E=32, causal="top_left"),
    Case("L17_S203_e256_br", L=17, S=203, E=256, Hq=1, causal="bottom_right"),
    Case("L203_S17_e16_br", L=203, S=17, E=16, causal="bottom_right"),  # first 186 rows see nothing
    Case("L113_S113_e64_br", L=113, S=113, E=64, causal="bottom_right"),
    Case("e40_ev80", L=113, S=17, E=40, Ev=80),
    Case("e96_ev16_causal", L=17, S=113, E=96, Ev=16, causal="bottom_right"),
    Case("gqa_6_2_e96", L=17, S=113, E=96, Hq=6, Hkv=2),
    Case("gqa_4_1_causal", L=113, S=113, E=64, Hq=4, Hkv=1, causal="top_left"),
    Case("gqa_4_2_mask_float_grad", L=17, S=113, E=32, Hq=4, Hkv=2, mask="float_grad", mask_dims="hls"),
    Case("mask_bool_ls", L=113, S=203, E=64, mask="bool", mask_dims="ls"),
    Case("mask_bool_keypad", L=17, S=113, E=64, B=2, mask="bool", mask_dims="bs"),
    Case("mask_bool_bhls_causal", L=113, S=113, E=16, B=2, mask="bool", mask_dims="bhls", causal="top_left"),
    Case("mask_bool_rows_masked", L=113, S=17, E=40, mask="bool", mask_dims="ls", masked_rows=(0, 5, 112)),
    Case("mask_float_hls", L=113, S=113, E=64, mask="float", mask_dims="hls"),
    Case("mask_float_rows_masked", L=17, S=113, E=64, mask="float", mask_dims="bhls", masked_rows=(3, 16)),
    Case("mask_grad_ls", L=113, S=203, E=32, B=2, mask="float_grad", mask_dims="ls"),
    Case("mask_grad_bhls_br", L=113, S=113, E=32, B=2, mask="float_grad", mask_dims="bhls",
         causal="bottom_right"),
    Case("mask_grad_keypad", L=113, S=17, E=16, B=2, mask="float_grad", mask_dims="bs"),
    Case("mask_grad_h1s", L=17, S=113, E=16, mask="float_grad", mask_dims="hs"),
    Case("mask_grad_row_bias", L=113, S=17, E=16, mask="float_grad", mask_dims="l"),
    Case("mask_grad_s_only", L=17, S=203, E=16, mask="float_grad", mask_dims="s", causal="top_left"),
    Case("mask_grad_rows_masked", L=17, S=17, E=16, mask="float_grad", mask_dims="hls", masked_rows=(4,)),
    Case("mask_float_lowest_rows", L=17, S=40, E=16, mask="float_grad", mask_dims="ls", min_rows=(2, 9)),
    Case("layout_blhe", L=113, S=113, E=64, B=2, Hq=3, layout="blhe"),
    Case("layout_padded_gqa", L=17, S=203, E=40, Hq=4, Hkv=2, layout="padded"),
    Case("layout_e_strided", L=113, S=17, E=32, layout="e_strided", causal="top_left"),
    Case("rank3", L=113, S=17, E=64, rank=3, Hq=2),
    Case("rank5_mask", L=17, S=113, E=32, rank=5, mask="float_grad", mask_dims="bls"),
    Case("kv_batch_broadcast", L=17, S=113, E=32, B=2, kv_batch_broadcast=True),
    Case("kv_head_broadcast", L=17, S=113, E=32, Hq=3, Hkv=1, kv_head_broadcast=True),
    # Sliding windows (FlashAttention's window_size, bottom-right unless causal says top-left).
    Case("window_5_3_gqa", L=113, S=203, E=32, Hq=4, Hkv=2, window=(5, 3)),
    Case("window_left_Lq_gt_Lk", L=203, S=17, E=40, window=(4, -1)),  # rows past the keys see few or none
    Case("window_right_keypad", L=17, S=113, E=64, B=2, window=(-1, 8), mask="bool", mask_dims="bs"),
    Case("window_diagonal_only", L=65, S=65, E=16, window=(0, 0)),
    Case("window_causal_tl_mask_grad", L=113, S=113, E=16, causal="top_left", window=(17, -1), mask="float_grad",
         mask_dims="ls"),
    Case("window_causal_br_e96", L=40, S=203, E=96, Ev=16, causal="bottom_right", window=(30, -1)),
    Case("window_mask_e128", L=40, S=70, E=128, causal="top_left", window=(9, -1), mask="float", mask_dims="ls"),
    Case("gpu_L2048_window_256", L=2048, S=2048, E=128, Hq=4, causal="top_left", window=(255, 0), gpu_only=True),
    # Soft-capping, ALiBi and dropout (score_mods.py): dropout with a fixed rng, so the reference drops
    # exactly what the kernel drops.
    Case("softcap_causal_e40", L=113, S=113, E=40, causal="top_left", softcap=2.0),
    Case("softcap_mask_grad_gqa", L=17, S=203, E=64, Hq=4, Hkv=2, softcap=1.5, mask="float_grad", mask_dims="ls"),
    Case("alibi_h_br_e80", L=40, S=113, E=80, Hq=4, causal="bottom_right", alibi="h"),
    Case("alibi_bh_window_keypad", L=65, S=65, E=32, B=2, window=(16, -1), alibi="bh", mask="bool", mask_dims="bs"),
    Case("alibi_Lq_gt_Lk", L=203, S=17, E=16, alibi="h", mask="float_grad", mask_dims="s"),
    Case("dropout_e64", L=113, S=113, E=64, dropout=0.2),
    Case("dropout_mqa_br_mask_grad", L=17, S=203, E=40, Hq=4, Hkv=1, causal="bottom_right", dropout=0.3,
         mask="float_grad", mask_dims="ls"),
    Case("dropout_masked_rows", L=17, S=17, E=16, B=2, dropout=0.5, mask="bool", masked_rows=(3,)),
    Case("all_mods_e128", L=40, S=70, E=128, causal="top_left", window=(9, -1), softcap=3.0, alibi="h", dropout=0.1,
         mask="float", mask_dims="ls"),
    Case("gpu_L2048_all_mods", L=2048, S=2048, E=128, Hq=4, causal="top_left", softcap=30.0, alibi="h",
         dropout=0.1, gpu_only=True),
    # Sizes for a GPU: the interpreter would take minutes.
    Case("gpu_L1024_e64_causal", L=1024, S=1024, E=64, B=2, Hq=8, causal="top_left", gpu_only=True),
    Case("gpu_L2048_e128", L=2048, S=2048, E=128, B=1, Hq=4, gpu_only=True),
    Case("gpu_L1000_S3000_e128_gqa", L=1000, S=3000, E=128, Hq=8, Hkv=2, causal="bottom_right", gpu_only=True),
    Case("gpu_L4096_e64_mask_grad", L=1537, S=4096, E=64, B=2, Hq=2, mask="float_grad", mask_dims="hls",
         gpu_only=True),
    Case("gpu_L2049_e256_causal", L=2049, S=2049, E=256, Hq=2, causal="top_left", gpu_only=True),
    Case("gpu_L777_e80_keypad", L=777, S=777, E=80, B=4, Hq=4, mask="bool", mask_dims="bs", gpu_only=True),
]


# Decode steps (attention_with_kvcache): Lq 1..16 against caches of 0..8k keys, ragged per batch element
# (an empty one included: its rows see nothing), contiguous and paged (pages of 16..256 in random order),
# GQA 8:1 mostly, appending or not. The 8k caches are in two cases only, to keep the CPU cost small.
DECODE_CASES = [
    DecodeCase("dec_lq1_contig_gqa8", Lq=1, cache=(700, 1, 2047), Lnew=1),
    DecodeCase("dec_lq1_paged16_gqa8_e128", Lq=1, cache=(33, 1500, 0), Lnew=1, Hq=16, Hkv=2, E=128, page_size=16),
    DecodeCase("dec_lq4_paged256_causal", Lq=4, cache=(3000, 257), Lnew=4, page_size=256, causal=True),
    DecodeCase("dec_lq16_contig_causal_e80", Lq=16, cache=(100, 1030), Lnew=16, E=80, causal=True),
    DecodeCase("dec_lq7_noappend_mha_ev24", Lq=7, cache=(9, 1200, 0), Hq=4, Hkv=4, E=40, Ev=24),
    DecodeCase("dec_lq2_paged32_mods", Lq=2, cache=(77, 301), Lnew=1, page_size=32, causal=True, window=(100, -1),
               softcap=3.0, alibi=True),
    DecodeCase("dec_lq1_cache8k_paged64", Lq=1, cache=(8191, 40), Lnew=1, page_size=64),
    DecodeCase("dec_lq16_cache8k_contig_causal", Lq=16, cache=(8176, 3), Lnew=16, causal=True),
    DecodeCase("gpu_dec_lq1_cache32k_b8", Lq=1, cache=(32768, 1, 30000, 4097, 16384, 100, 32000, 7), Hq=32, Hkv=8,
               E=128, page_size=256, gpu_only=True),
]


def decode_cases(device_type: str):
    return [c for c in DECODE_CASES if device_type == "cuda" or not c.gpu_only]


def case_by_name(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def cases(device_type: str):
    return [c for c in CASES if device_type == "cuda" or not c.gpu_only]
