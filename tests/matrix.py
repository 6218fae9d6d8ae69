"""Which (backend, dtype) pairs the shared cases run on, on this machine.

A fused backend joins the matrix by adding its name here. Pairs a backend cannot run here (the
interpreter's broken bfloat16 dots, say) are left out of the matrix and tested instead to be refused
with a clear reason (test_api.py).
"""
import torch

from conftest import DEVICE, ON_GPU

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

if ON_GPU:
    BACKEND_DTYPES = {"triton": (F16, BF16, F32), "reference": (F16, BF16, F32)}
    from attnkern.backends import extension

    if extension.has_kernels_for("CUDA"):  # the CUDA C++ kernels, when the build compiled them
        BACKEND_DTYPES = {"cuda": (F16, BF16), **BACKEND_DTYPES}
else:
    BACKEND_DTYPES = {"cpu": (F32, F16, BF16), "triton": (F32, F16), "reference": (F32, F16, BF16)}
    from attnkern.backends import cuda_emu

    if cuda_emu.build_error() is None:  # the CUDA kernels under the SIMT emulator (built on first use)
        BACKEND_DTYPES["cuda-emu"] = (F16, BF16)

# The backend "auto" picks for ordinary calls on this device, and the fused backends that run here.
# cuda-emu (the CUDA kernels under the emulator: float16/bfloat16, by name only) runs the shared case
# matrix, pairs(), but not the API tests written for the general-purpose backends.
AUTO = "triton" if ON_GPU else "cpu"
FUSED = [b for b in BACKEND_DTYPES if b not in ("reference", "cuda-emu")]


def count_fused_calls(monkeypatch):
    """Wrap the forward and backward of the backend `auto` picks here so they count their calls; the
    returned dict fills in as they run (monkeypatch undoes the wrapping)."""
    from attnkern import backends

    calls = {"forward": 0, "backward": 0}
    b = backends.get(AUTO)
    for method in calls:
        orig = getattr(b, method)

        def counting(*args, _orig=orig, _method=method):
            calls[_method] += 1
            return _orig(*args)

        monkeypatch.setattr(b, method, counting)
    return calls


def pairs():
    return [(b, d) for b, ds in BACKEND_DTYPES.items() for d in ds]


def pair_id(pair) -> str:
    backend, dtype = pair
    return f"{backend}-{str(dtype).replace('torch.', '')}"


__all__ = ["AUTO", "DEVICE", "BACKEND_DTYPES", "FUSED", "count_fused_calls", "pairs", "pair_id"]
