"""`attnkern bench`: the command-line front of the sweep (arguments -> BenchConfig -> Sweep -> outputs)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional

import torch

from ..cliutil import arg_type, non_negative_int, positive_int, resolve_device
from ..flops import __doc__ as FLOPS_DOC
from . import environment, measure, overhead, report
from .grid import (BenchConfig, default_config, parse_causal, parse_dtypes, parse_kv_seqlen, parse_length,
                   parse_window, parse_softcaps, parse_alibi, parse_dropouts,
                   parse_lengths, parse_modes, parse_positive_ints)
from .overhead import parse_shape
from .progress import Progress
from .providers import by_name, default_providers, left_out_by_default, parse_providers
from .runner import ERROR, MODES_DOC, OK, Sweep
from .varlen import parse_batch_lengths

DESCRIPTION = """\
Measure attention throughput over sequence lengths: every attnkern backend available on the device,
torch's SDPA (its default choice and each of its kernels), FlexAttention (compiled) and the naive
reference, per (shape, mode). Writes a table, a JSON file with every cell, and a PNG plot.
Without options: FlashAttention's benchmark grid on a GPU; on a CPU a small grid that takes about a minute."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid (defaults: FlashAttention's benchmark grid on a GPU, a one-minute grid on a CPU)")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--seqlens", type=arg_type(parse_lengths), metavar="L,...",
                   help="query lengths, k = 1024 (e.g. 512,1k,2k)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--tokens", type=arg_type(parse_length), metavar="N",
                      help="total tokens per cell: B = N // L (default 16k GPU, 4k CPU)")
    size.add_argument("--batch", type=arg_type(positive_int), metavar="B", help="a fixed batch size instead of --tokens")
    g.add_argument("--heads", type=arg_type(positive_int), metavar="H",
                   help="query heads (default: --model-dim / E)")
    g.add_argument("--model-dim", type=arg_type(positive_int), metavar="D",
                   help="H·E when --heads is not given (default 2048 GPU, 64 CPU)")
    g.add_argument("--head-dims", type=arg_type(parse_positive_ints), metavar="E,...", help="head dims (default 64,128 GPU; 64 CPU)")
    g.add_argument("--v-head-dim", type=arg_type(positive_int), metavar="Ev", help="value head dim (default: = E)")
    g.add_argument("--kv-seqlen", type=arg_type(parse_kv_seqlen), metavar="S|xR",
                   help="key length: fixed (e.g. 8k) or a multiple of the query length (e.g. x2); default = L")
    g.add_argument("--causal", type=arg_type(parse_causal), metavar="both|yes|no",
                   help="causal (top-left, torch's is_causal), not, or both (default both)")
    g.add_argument("--gqa", type=arg_type(positive_int), metavar="R", help="query heads per key/value head (default 1)")
    g.add_argument("--window", type=arg_type(parse_window), metavar="LEFT,RIGHT",
                   help="a sliding window in every cell (attention's window=, -1 unbounded; with causal: a causal "
                        "window); providers without windows get the same pattern as a dense bool mask")
    g.add_argument("--softcap", type=arg_type(parse_softcaps), metavar="C,...",
                   help="soft-capping of the scores (attention's softcap=), one variant per value, 0 none: "
                        "0,30 measures both side by side; providers that cannot cap say so")
    g.add_argument("--alibi", type=arg_type(parse_alibi), metavar="both|yes|no",
                   help="ALiBi (BLOOM's slopes 2^(-8 h / H)) in every cell, none, or both side by side "
                        "(default no); torch's SDPA gets the bias as a float mask")
    g.add_argument("--dropout", type=arg_type(parse_dropouts), metavar="P,...",
                   help="attention dropout probabilities, one variant per value, 0 none: 0,0.1 measures both "
                        "side by side (torch's SDPA gets dropout_p)")
    g.add_argument("--dtypes", type=arg_type(parse_dtypes), metavar="D,...", help="fp16, bf16, fp32, fp64 (default bf16,fp16 GPU; fp32 CPU)")
    g.add_argument("--modes", type=arg_type(parse_modes), metavar="M,...", help="fwd, bwd, fwd+bwd (default all three on a GPU; fwd,fwd+bwd on a CPU)")
    g.add_argument("--providers", type=arg_type(parse_providers), metavar="P,...",
                   help="providers to compare (default: every one that runs on the device; 'all' for all; "
                        "see --list-providers)")
    g.add_argument("--baseline", default="sdpa", help="provider the speedups are relative to (default sdpa)")
    t = p.add_argument_group("timing")
    t.add_argument("--repeats", type=arg_type(positive_int), help="timed runs per cell (default 30 GPU, 3 CPU)")
    t.add_argument("--warmup", type=arg_type(non_negative_int), help="untimed runs first (default 5 GPU, 1 CPU; the first run always happens)")
    t.add_argument("--input-sets", type=arg_type(non_negative_int), metavar="N",
                   help="input sets rotated across repeats (default 0: enough to exceed the caches)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    t.add_argument("--threads", type=arg_type(positive_int), help="CPU threads for torch (default: torch's choice)")
    v = p.add_argument_group("call overhead (--overhead; see attnkern/tools/bench/overhead.py)")
    v.add_argument("--overhead", action="store_true",
                   help="instead of the sweep: host time per call of a tiny problem, attnkern.scaled_dot_product_"
                        "attention, attnkern.attention and the kernel alone against torch's SDPA, with and "
                        "without autograd, measured interleaved (--repeats rounds, default 15; --dtypes: the first)")
    v.add_argument("--overhead-shape", type=arg_type(parse_shape), metavar="B,H,L,S,E",
                   help="the problem of --overhead (default 1,8,1,256,64)")
    v.add_argument("--calls", type=arg_type(positive_int), metavar="N",
                   help="calls per timed batch of --overhead (default 200)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default="attnkern-bench", help="directory of the default output files")
    o.add_argument("--json", metavar="PATH", help="results file (default OUT_DIR/bench-<device>-<time>.json)")
    o.add_argument("--plot", metavar="PATH", help="PNG plot (default: the results file's name with .png)")
    o.add_argument("--no-plot", action="store_true", help="write no plot")
    o.add_argument("--markdown", metavar="PATH", help="also write a markdown summary (for bench/results/)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--strict", action="store_true", help="exit 1 if any cell ended in an error (not unsupported/OOM)")
    o.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two results files instead of running: per-cell speedup of B over A")
    o.add_argument("--summarize", metavar="RESULTS.json",
                   help="print the markdown summary of a results file instead of running")
    o.add_argument("--list-providers", action="store_true", help="list the providers and whether they run here")
    d = p.add_argument_group("decode (instead of the sweep)")
    d.add_argument("--decode", action="store_true",
                   help="time a decode step (B=1 CPU, 8 GPU; Hq=32, Hkv=8, E=128, Lq=1) against KV caches of "
                        "--decode-caches keys: attention_with_kvcache (contiguous and paged) beside torch's SDPA "
                        "(enable_gqa, and K/V repeated) and flash_attn_with_kvcache if importable; takes --device, "
                        "--batch, --dtypes (default fp32,bf16 CPU, bf16 GPU), --repeats, --warmup, --threads, "
                        "--seed, --json")
    d.add_argument("--decode-caches", type=arg_type(parse_lengths), metavar="S,...",
                   help="cache lengths of --decode, k = 1024 (default 4k,8k,16k,32k)")
    w = p.add_argument_group("packed variable-length batches (--varlen; see attnkern/tools/bench/varlen.py)")
    w.add_argument("--varlen", action="store_true",
                   help="instead of the sweep: varlen_attention on packed batches of mixed lengths against the "
                        "same batch padded through torch's SDPA; one batch per --seqlens value (its longest "
                        "length; default 1k,4k CPU, 4k,16k GPU), takes --heads, --gqa, --head-dims (the first), "
                        "--dtypes, --causal (default yes), --modes, the timing and output options")
    w.add_argument("--varlen-lengths", type=arg_type(parse_batch_lengths), metavar="N,...|LO..HIxN",
                   help="one batch's sequence lengths instead of the --seqlens batches")
    w.add_argument("--varlen-backend", default="auto", help="attnkern backend of --varlen (default auto)")
    c = p.add_argument_group("context parallelism (instead of the sweep; see attnkern/tools/bench/context_parallel.py)")
    c.add_argument("--context-parallel", type=arg_type(parse_positive_ints), nargs="?", const=[1, 2, 4],
                   metavar="P,...",
                   help="time ring (or Ulysses) attention forward+backward with the sequence split over P local "
                        "gloo processes, for each P (default 1,2,4): time, scaling efficiency, exposed "
                        "communication, bytes sent and peak extra memory per rank; takes --heads (8), --gqa, "
                        "--head-dims (the first, 64), --batch (1), --causal yes|no (yes), --dtypes (the first, fp32), "
                        "--repeats (3), --json")
    c.add_argument("--cp-method", choices=("ring", "ulysses"), default="ring", help="context-parallel method")
    c.add_argument("--cp-layout", choices=("zigzag", "contiguous"), default="zigzag", help="sequence layout")
    c.add_argument("--cp-length", type=arg_type(parse_length), default=4096, metavar="L",
                   help="the full sequence length (default 4k)")
    c.add_argument("--cp-backend", default="cpu", help="attnkern backend of each rank's attention (default cpu)")


def run_cp(args, parser, out) -> int:
    from .context_parallel import CPConfig, run_context_parallel

    if args.causal is not None and len(args.causal) != 1:
        parser.error("argument --causal: --context-parallel takes yes or no, not both")
    heads = args.heads or 8
    gqa = args.gqa or 1
    if heads % gqa:
        parser.error(f"argument --gqa: {gqa} does not divide the {heads} heads")
    cfg = CPConfig(procs=args.context_parallel, method=args.cp_method, layout=args.cp_layout,
                   causal=args.causal[0] if args.causal else True, backend=args.cp_backend,
                   batch=args.batch or 1, heads=heads, kv_heads=heads // gqa, length=args.cp_length,
                   dim=args.head_dims[0] if args.head_dims else 64,
                   dtype=str(args.dtypes[0]) if args.dtypes else "fp32", repeats=args.repeats or 3)
    run_context_parallel(cfg, out, args.json)
    return 0


def _device(args, parser) -> torch.device:
    return resolve_device(args.device, parser)


def build_config(args, parser, device: torch.device) -> BenchConfig:
    cfg = default_config(device)
    for field in ("seqlens", "heads", "model_dim", "head_dims", "v_head_dim", "kv_seqlen", "window", "causal", "gqa",
                  "softcap", "alibi", "dropout", "dtypes", "modes", "repeats", "warmup", "input_sets", "seed", "threads", "baseline"):
        value = getattr(args, field)
        if value is not None:
            setattr(cfg, field, value)
    if args.batch is not None:
        cfg.batch, cfg.tokens = args.batch, None
    elif args.tokens is not None:
        cfg.tokens = args.tokens
    requested = args.providers or ["default"]
    names: List[str] = []
    for n in requested:
        names += default_providers(device) if n == "default" else [n]
    cfg.providers = list(dict.fromkeys(names))
    if cfg.baseline not in by_name():
        parser.error(f"argument --baseline: unknown provider {cfg.baseline!r}; known: {', '.join(by_name())}")
    for flag, message in cfg.validate():
        parser.error(f"argument {flag}: {message}")
    return cfg


def _list_providers(device: torch.device, out) -> int:
    left_out = left_out_by_default(device)
    print(f"providers on {device}:", file=out)
    for name, p in by_name().items():
        state = "default" if name not in left_out else left_out[name]
        print(f"  {name:<20} {p.description}\n  {'':<20}   -> {state}", file=out)
    return 0


def _output_paths(args, device: torch.device, kind: str = "bench"):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(args.out_dir, f"{kind}-{environment.device_tag(device)}-{stamp}.json")
    plot_path = None if args.no_plot else (args.plot or os.path.splitext(json_path)[0] + ".png")
    return json_path, plot_path


def run(args, parser: argparse.ArgumentParser, out=None) -> int:
    out = out or sys.stdout
    if args.compare:
        try:
            a, b = (report.load_json(path) for path in args.compare)
        except ValueError as exc:
            parser.error(f"argument --compare: {exc}")
        return 0 if report.compare(a, b, out, *args.compare) else 1
    if args.summarize:
        try:
            doc = report.load_json(args.summarize)
        except ValueError as exc:
            parser.error(f"argument --summarize: {exc}")
        print(report.markdown_summary(doc), file=out, end="")
        return 0
    if args.decode:
        from .decode import run_decode

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        run_decode(args.decode_caches, args.dtypes, repeats=args.repeats or 10,
                   warmup=args.warmup if args.warmup is not None else 2, seed=args.seed, out=out,
                   json_path=args.json, device=_device(args, parser), batch=args.batch)
        return 0
    if args.context_parallel is not None:
        return run_cp(args, parser, out)
    device = _device(args, parser)
    if args.list_providers:
        return _list_providers(device, out)
    if args.overhead:
        return run_overhead(args, device, out)
    if args.varlen:
        return run_varlen_grid(args, parser, device, out)
    for flag, given in (("--overhead-shape", args.overhead_shape), ("--calls", args.calls)):
        if given is not None:
            parser.error(f"argument {flag}: only with --overhead")
    cfg = build_config(args, parser, device)
    json_path, plot_path = _output_paths(args, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    left_out = {n: why for n, why in left_out_by_default(device).items() if n not in cfg.providers}
    shapes = cfg.shapes()
    print(f"attnkern bench on {environment.device_info(device)['name']} ({device})", file=out)
    print(f"providers: {', '.join(cfg.providers)}", file=out)
    for name, why in left_out.items():
        print(f"  not included: {name}: {why}", file=out)
    print(f"grid: {len(shapes)} shapes x {len(cfg.modes)} modes x {len(cfg.providers)} providers; "
          f"{cfg.repeats} timed runs per cell after {max(cfg.warmup, 1)} warm-up", file=out, flush=True)

    progress = Progress(len(shapes) * len(cfg.providers), enabled=not args.no_progress)
    try:
        cells = Sweep(cfg, progress).run()
    finally:
        progress.close()

    memory = (measure.MEMORY_METHODS["cuda"] if device.type == "cuda"
              else measure.cpu_memory_method() or measure.MEMORY_METHODS["cpu"])
    notes = {
        "flops": " ".join(FLOPS_DOC.split()),
        "timing": ("CUDA events around each call, one synchronization at the end" if device.type == "cuda"
                   else f"time.perf_counter around each call, {torch.get_num_threads()} threads")
                  + "; median and quartiles of the timed runs; input sets rotate across runs",
        "modes": MODES_DOC,
        "peak_memory": memory,
        "layout": "contiguous (B, H, L, E) inputs; causal = top-left (torch's is_causal)",
        "left_out_by_default": left_out,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    doc = report.document(environment.environment(device), cfg.to_dict(),
                          {n: by_name()[n].description for n in cfg.providers}, cells, notes)
    report.print_table(cells, cfg.baseline, out)
    return write_outputs(args, doc, cells, json_path, plot_path, out)


def write_outputs(args, doc, cells, json_path: str, plot_path: Optional[str], out) -> int:
    """The results file, the plot and the markdown summary of a grid's cells (already printed as a
    table), then what was not measured; returns the exit status."""
    status = 0
    try:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        report.write_json(doc, json_path)
        print(f"\nresults: {json_path}", file=out)
    except OSError as exc:
        print(f"\ncould not write the results file {json_path}: {exc}", file=sys.stderr)
        status = 1
    if plot_path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
            from .plot import write_plot

            write_plot(doc, plot_path)
            print(f"plot:    {plot_path}", file=out)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'attnkern[bench]')", file=sys.stderr)
        except OSError as exc:
            print(f"could not write the plot {plot_path}: {exc}", file=sys.stderr)
            status = 1
    if args.markdown:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(report.markdown_summary(doc))
            print(f"summary: {args.markdown}", file=out)
        except OSError as exc:
            print(f"could not write the summary {args.markdown}: {exc}", file=sys.stderr)
            status = 1
    for line in report.marked_summary(cells):
        print(f"  {line}", file=out)
    if not any(c["status"] == OK for c in cells):
        print("no cell could be measured", file=sys.stderr)
        status = 1
    errors = [c for c in cells if c["status"] == ERROR]
    if errors:
        print(f"{len(errors)} cell(s) failed with an error, e.g. {errors[0]['provider']}: {errors[0]['reason']}",
              file=sys.stderr)
        if args.strict:
            status = 1
    return status


def run_varlen_grid(args, parser, device: torch.device, out) -> int:
    """`--varlen`: packed batches against the padded batch through torch's SDPA (varlen.py), with the
    sweep's table, JSON, plot and markdown outputs."""
    from . import varlen

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = device.type != "cuda"
    heads = args.heads or (4 if cpu else 16)
    gqa = args.gqa or 1
    if heads % gqa:
        parser.error(f"argument --gqa: must divide the query heads {heads}")
    E = (args.head_dims or [64 if cpu else 128])[0]
    dtypes = args.dtypes or (["fp32"] if cpu else ["bf16"])
    modes = args.modes or (["fwd", "fwd+bwd"] if cpu else ["fwd", "bwd", "fwd+bwd"])
    causal = args.causal or [True]
    repeats = args.repeats or (3 if cpu else 30)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    batches = varlen.batches_of(args.seqlens, args.varlen_lengths, device)
    json_path, plot_path = _output_paths(args, device, "varlen")
    print(f"attnkern bench --varlen on {environment.device_info(device)['name']} ({device}), "
          f"{torch.get_num_threads()} threads", file=out)
    for lengths in batches:
        print(f"batch: {len(lengths)} sequences, lengths {min(lengths)}..{max(lengths)} (mean "
              f"{sum(lengths) / len(lengths):.0f}, {sum(lengths)} tokens, padded {len(lengths) * max(lengths)})",
              file=out)
    providers = [p for p in varlen.PROVIDERS if not cpu or p != "sdpa:flash padded"]
    progress = Progress(len(batches) * len(dtypes) * len(causal) * len(providers), enabled=not args.no_progress)
    try:
        cells = varlen.run_varlen(device, batches, dtypes, heads, gqa, E, causal, modes, repeats, warmup,
                                  args.input_sets or 2, args.seed, args.varlen_backend, progress)
    finally:
        progress.close()
    config = dict(device=str(device), batches=batches, dtypes=dtypes, heads=heads, gqa=gqa, head_dim=E,
                  causal=causal, modes=modes, repeats=repeats, warmup=warmup, seed=args.seed,
                  backend=args.varlen_backend, baseline=varlen.BASELINE)
    doc = report.document(environment.environment(device), config,
                          {p: p for p in providers}, cells, varlen.notes(device, args.varlen_backend))
    report.print_table(cells, varlen.BASELINE, out)
    return write_outputs(args, doc, cells, json_path, plot_path, out)


def run_overhead(args, device: torch.device, out) -> int:
    """`--overhead`: the call-overhead table and its JSON (overhead.py)."""
    cfg = overhead.OverheadConfig(device=str(device), seed=args.seed)
    if args.overhead_shape:
        for name, value in args.overhead_shape.items():
            setattr(cfg, name, value)
    if args.dtypes:
        cfg.dtype = args.dtypes[0]
    for name, value in (("calls", args.calls), ("rounds", args.repeats), ("warmup", args.warmup)):
        if value is not None:
            setattr(cfg, name, value)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"attnkern bench --overhead on {environment.device_info(device)['name']} ({device}), "
          f"{torch.get_num_threads()} threads", file=out, flush=True)
    results = overhead.run_overhead(cfg)
    overhead.print_table(cfg, results, out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.json or os.path.join(args.out_dir, f"overhead-{environment.device_tag(device)}-{stamp}.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        report.write_json(overhead.document(environment.environment(device), cfg, results), path)
        print(f"\nresults: {path}", file=out)
    except OSError as exc:
        print(f"\ncould not write the results file {path}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkern bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)
