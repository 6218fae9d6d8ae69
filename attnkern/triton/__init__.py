"""Triton kernels: forward (forward.py), backward (backward.py), tile helpers (common.py) and the
block-size/autotuning policy (configs.py). Importing this package imports triton; the rest of
attnkern imports it only when the Triton backend is used."""
from .backward import attention_backward
from .forward import attention_forward

__all__ = ["attention_forward", "attention_backward"]
