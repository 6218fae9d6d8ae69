"""Test-session setup: runs before attnkern (and triton) are imported.

Without a GPU the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, which must be set
before triton is imported). Every kernel output buffer is poisoned with NaN (ATTNKERN_POISON=1) so an
element a kernel fails to write cannot pass. Autotuning is off (one heuristic config per kernel) to keep
GPU test runs short; bench/ measures with it on.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNKERN_POISON", "1")
os.environ.setdefault("ATTNKERN_AUTOTUNE", "0")

DEVICE = "cuda" if ON_GPU else "cpu"

# torch's own SDPA, bound before any test can patch it.
TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.fixture
def sdpa_unpatched():
    """The test starts and ends with torch's own SDPA in place and fresh log-once state; a
    replace_sdpa() patch left in effect fails it (the patch tests use it for every test)."""
    import attnkern
    from attnkern.interop import dispatch

    assert torch.nn.functional.scaled_dot_product_attention is TORCH_SDPA
    dispatch._logged.clear()
    yield
    leaked = attnkern.restore_sdpa(all_patches=True)
    torch.nn.functional.scaled_dot_product_attention = TORCH_SDPA
    assert not leaked, "a test left a replace_sdpa() patch in effect"
