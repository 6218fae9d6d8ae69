"""Bad input gets a clear Python error that names the argument and what was expected."""
import pytest
import torch

import attnkern
from matrix import DEVICE


def qkv(B=2, H=4, L=5, S=7, E=8, Hkv=None, dtype=torch.float32, device=DEVICE):
    Hkv = Hkv or H
    return (torch.randn(B, H, L, E, dtype=dtype, device=device), torch.randn(B, Hkv, S, E, dtype=dtype, device=device),
            torch.randn(B, Hkv, S, E, dtype=dtype, device=device))


SDPA = attnkern.scaled_dot_product_attention


def test_rank_too_small():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query must have at least 2 dims"):
        SDPA(q[0, 0, 0], k, v)
    with pytest.raises(ValueError, match=r"value must have at least 2 dims"):
        SDPA(q, k, v[0, 0, 0])


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"batch dims .* must broadcast.*query.shape=\(2, 4, 5, 8\).*key.shape=\(3"):
        SDPA(q, torch.randn(3, 4, 7, 8), torch.randn(3, 4, 7, 8))


def test_head_mismatch_without_gqa():
    q, k, v = qkv(H=6, Hkv=2)
    with pytest.raises(ValueError, match=r"head counts .* query has 6, key 2.*enable_gqa=True"):
        SDPA(q, k, v)


def test_gqa_heads_not_a_multiple():
    q, k, v = qkv(H=6, Hkv=4)
    with pytest.raises(ValueError, match=r"enable_gqa=True .* multiple .* query has 6 heads .* key 4"):
        SDPA(q, k, v, enable_gqa=True)


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key's last dim \(head dim\) must equal query's.*E=8.*E=6"):
        SDPA(q, k[..., :6], v)


def test_key_value_length_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key and value must have the same length"):
        SDPA(q, k, v[..., :6, :])


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"same dtype.*key.dtype=torch.float64"):
        SDPA(q, k.double(), v)


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"same device.*key.device=meta"):
        SDPA(q, k.to("meta"), v)


def test_integer_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor.*torch.int64"):
        SDPA(q.long(), k.long(), v.long())


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"key must be a torch.Tensor, got list"):
        SDPA(q, [1, 2], v)


def test_mask_does_not_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 7\) does not broadcast .* \(2, 4, 5, 7\)"):
        SDPA(q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(1, 2, 4, 5, 7\) does not broadcast"):
        SDPA(q, k, v, attn_mask=torch.ones(1, 2, 4, 5, 7, dtype=torch.bool))


def test_mask_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"attn_mask must be a bool tensor .* got attn_mask.dtype=torch.int32"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"attn_mask.dtype=torch.float64"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.float64))


def test_mask_wrong_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attn_mask must be on the query's device"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))


def test_mask_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor or None, got list"):
        SDPA(q, k, v, attn_mask=[[True]])


def test_sparse_mask_names_the_layout():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"attn_mask must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool).to_sparse())


def test_bad_dropout_and_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\], got 1.5"):
        SDPA(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"scale must be a finite float or None, got nan"):
        SDPA(q, k, v, scale=float("nan"))


def test_bad_causal_value():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"causal must be False, True, 'top_left' or 'bottom_right', got 'lower'"):
        attnkern.attention(q, k, v, causal="lower")


def test_unknown_backend_name(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'cpu', 'triton', 'cuda', 'cuda-emu', 'reference'.*got 'cudnn'"):
        attnkern.attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'flash'"):
        with attnkern.use_backend("flash"):
            pass
    monkeypatch.setenv("ATTNKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"ATTNKERN_BACKEND: backend must be one of .* got 'fast'"):
        SDPA(q, k, v)


def test_explicit_backend_that_cannot_run_the_call_is_refused():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(attnkern.BackendUnavailableError, match=r"backend='triton' cannot run this call: .*float64"):
        attnkern.attention(q, k, v, backend="triton")
    q, k, v = qkv(E=320)
    with pytest.raises(attnkern.BackendUnavailableError, match=r"head dims up to 256 \(got E=320"):
        attnkern.attention(q, k, v, backend="triton")
    q, k, v = qkv()  # dropout is fused in the Triton kernels: no refusal
    assert attnkern.explain(q, k, v, dropout_p=0.1, backend="triton").backend == "triton"


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bfloat16 limitation is a CPU-only matter")
def test_bf16_under_the_interpreter_is_refused_not_wrong():
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(attnkern.BackendUnavailableError, match=r"interpreter computes bfloat16 dots wrongly"):
        attnkern.attention(q, k, v, backend="triton")
