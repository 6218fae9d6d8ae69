"""pytest-benchmark suite over the same cells as `attnkern bench` (see bench/README.md).

    pytest bench/ --benchmark-only                     the default grid of this device, every default provider
    pytest bench/ --benchmark-only --bench-seqlens 1k,4k --bench-providers attnkern:triton,sdpa

Not part of the test suite (pyproject's testpaths is tests/). Nothing here sets TRITON_INTERPRET: on a
CPU the Triton backend is then unavailable and its cells are skipped, as `attnkern bench` leaves it out.
"""
import pytest
import torch

from attnkern.tools.bench.grid import (default_config, parse_causal, parse_dtypes, parse_length, parse_lengths,
                                 parse_modes, parse_positive_ints)
from attnkern.tools.bench.providers import default_providers, parse_providers

OPTIONS = {
    # option: (parser, BenchConfig field, help)
    "--bench-seqlens": (parse_lengths, "seqlens", "query lengths, e.g. 512,1k"),
    "--bench-tokens": (parse_length, "tokens", "B = tokens // L"),
    "--bench-head-dims": (parse_positive_ints, "head_dims", "head dims, e.g. 64,128"),
    "--bench-dtypes": (parse_dtypes, "dtypes", "fp16, bf16, fp32"),
    "--bench-modes": (parse_modes, "modes", "fwd, bwd, fwd+bwd"),
    "--bench-causal": (parse_causal, "causal", "both, yes or no"),
    "--bench-providers": (parse_providers, "providers", "providers (attnkern bench --list-providers)"),
    "--bench-rounds": (int, "repeats", "timed rounds per cell"),
}


def pytest_addoption(parser):
    group = parser.getgroup("attnkern bench", "the cells to benchmark (default: attnkern bench's grid)")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda if available)")
    for flag, (_, _, text) in OPTIONS.items():
        group.addoption(flag, default=None, help=text)


def _config(config):
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = default_config(device)
    cfg.providers = default_providers(device)
    for flag, (parse, field, _) in OPTIONS.items():
        value = config.getoption(flag)
        if value is not None:
            try:
                setattr(cfg, field, parse(value))
            except ValueError as exc:
                raise pytest.UsageError(f"{flag}: {exc}") from None
    if "default" in cfg.providers:
        cfg.providers = list(dict.fromkeys(
            n for p in cfg.providers for n in (default_providers(device) if p == "default" else [p])))
    problems = cfg.validate()
    if problems:
        raise pytest.UsageError("; ".join(f"{flag}: {msg}" for flag, msg in problems))
    return cfg


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return
    cfg = _config(metafunc.config)
    metafunc.config._attnkern_bench = cfg
    cells, ids = [], []
    for shape in cfg.shapes():
        for mode in cfg.modes:
            for provider in cfg.providers:
                cells.append((shape, mode, provider))
                ids.append(f"{shape.label().replace(' ', '_')}-{mode}-{provider}")
    metafunc.parametrize("cell", cells, ids=ids)


@pytest.fixture
def bench_config(request):
    return request.config._attnkern_bench
