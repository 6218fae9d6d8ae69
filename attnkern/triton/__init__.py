"""Triton kernels: forward (forward.py), backward (backward.py), tile helpers (common.py) and the
block-size/autotuning policy (configs.py); packed variable-length batches run the same kernels
(varlen_forward / varlen_backward: their VARLEN switch). Importing this package imports triton; the rest of
attnkern imports it only when the Triton backend is used."""
from .backward import attention_backward, varlen_backward
from .forward import attention_forward, varlen_forward

__all__ = ["attention_forward", "attention_backward", "varlen_forward", "varlen_backward"]
