"""Test-session setup: runs before attnkern (and triton) are imported.

Without a GPU the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, which must be set
before triton is imported). Every kernel output buffer is poisoned with NaN (ATTNKERN_POISON=1) so an
element a kernel fails to write cannot pass. Autotuning is off (one heuristic config per kernel) to keep
GPU test runs short; bench/ measures with it on.
"""
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNKERN_POISON", "1")
os.environ.setdefault("ATTNKERN_AUTOTUNE", "0")

DEVICE = "cuda" if ON_GPU else "cpu"
