"""`attnkern bench`: attention throughput over sequence lengths, attnkern against torch's kernels.

    grid.py         the configuration and the shapes it expands into (FlashAttention's benchmark grid by default)
    providers.py    the implementations compared (attnkern backends, torch SDPA and its kernels, flex, naive)
    measure.py      timing (CUDA events / wall clock) and peak extra memory
    runner.py       the sweep: every (shape, provider, mode) cell, measured or marked
    report.py       the results JSON, the terminal table, the comparison of two runs
    plot.py         the PNG: TFLOP/s against sequence length
    command.py      the command line
    overhead.py     --overhead: host time per call of a tiny problem against torch's SDPA
"""
from .command import main
from .grid import BenchConfig, Shape, default_config
from .runner import Sweep

__all__ = ["BenchConfig", "Shape", "Sweep", "default_config", "main"]
