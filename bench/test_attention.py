"""One pytest-benchmark test per (shape, mode, provider) cell of `attnkern bench`'s grid.

The cell's inputs, callables and classification of failures are attnkern.tools.bench's own, so both measure
the same thing; here pytest-benchmark does the timing (wall clock, synchronized on a GPU), the untimed
setup of each round picks the next input set (and runs the forward for `bwd`). A provider that does not
support a cell, or runs out of memory, skips it with the reason; any other failure fails the test.
"""
import itertools

import pytest
import torch

from attnkern.tools.bench import measure
from attnkern.tools.bench.providers import by_name
from attnkern.tools.bench.runner import ERROR, classify, input_set_count, make_input_sets, mode_callables


# The cells come shape by shape: keep one shape's input sets and built callables (FlexAttention compiles
# in build(), tens of seconds) for all its modes and providers, and drop them when the shape changes.
_shape_cache = {"shape": None, "sets": None, "fns": {}}


def _for_shape(shape, device, seed):
    if _shape_cache["shape"] != shape:
        _shape_cache.update(shape=None, sets=None, fns={})
        _shape_cache["sets"] = make_input_sets(shape, device, input_set_count(shape, device), seed)
        _shape_cache["shape"] = shape
    return _shape_cache


def test_attention(benchmark, cell, bench_config):
    shape, mode, provider_name = cell
    device = torch.device(bench_config.device)
    provider = by_name()[provider_name]
    why = provider.availability(device)
    if why:
        pytest.skip(f"unsupported: {why}")
    try:
        cache = _for_shape(shape, device, bench_config.seed)
        sets = cache["sets"]
        why = provider.check(shape, (sets[0].q, sets[0].k, sets[0].v))
        if why:
            pytest.skip(f"unsupported: {why}")
        if provider_name not in cache["fns"]:
            cache["fns"][provider_name] = provider.build(shape, device)
        fn = cache["fns"][provider_name]
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # noqa: BLE001
        status, reason = classify(exc)
        if status == ERROR:
            raise
        pytest.skip(f"{status}: {reason}")
    setup, run = mode_callables(fn, mode, sets)
    counter = itertools.count()

    def next_round():
        state = setup(next(counter))
        measure.synchronize(device)
        return (state,), {}

    def timed(state):
        run(state)
        measure.synchronize(device)

    with provider.context():
        try:  # the first call compiles/autotunes and shows whether the cell runs at all
            timed(*next_round()[0])
        except Exception as exc:  # noqa: BLE001
            status, reason = classify(exc)
            if status == ERROR:
                raise
            pytest.skip(f"{status}: {reason}")
        benchmark.group = f"{shape.label()} {mode}"
        benchmark.extra_info.update(provider=provider_name, mode=mode, flops=shape.flops(mode), **vars(shape))
        benchmark.pedantic(timed, setup=next_round, rounds=bench_config.repeats,
                           warmup_rounds=bench_config.warmup)
    median = benchmark.stats.stats.median
    benchmark.extra_info["tflops"] = shape.flops(mode) / median / 1e12 if median > 0 else None
