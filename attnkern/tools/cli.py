"""The `attnkern` command (also `python -m attnkern`):

    attnkern bench          attention throughput over sequence lengths (attnkern/tools/bench/)
    attnkern check-grads    outputs and gradients against the float64 reference (attnkern/tools/check_grads.py)
    attnkern compile-report what the GPU kernels compile to, checked without a GPU (attnkern/tools/compile_report.py)
    attnkern selfcheck      check this install on this machine (attnkern/tools/selfcheck.py); the default
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import check_grads, compile_report, selfcheck
from .bench import command as bench_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkern", description="attnkern's tools. Without a command: selfcheck.",
        epilog="Run `attnkern COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="throughput over sequence lengths against torch's kernels",
                           description=bench_command.DESCRIPTION)
    bench_command.add_arguments(bench)
    bench.set_defaults(handler=bench_command.run, command_parser=bench)
    grads = sub.add_parser("check-grads", help="outputs and gradients against the float64 reference",
                           description=check_grads.__doc__.split("\n\n")[0])
    check_grads.add_arguments(grads)
    grads.set_defaults(handler=check_grads.run, command_parser=grads)
    report = sub.add_parser("compile-report", help="registers, spills, shared memory and tensor-core use of "
                            "the GPU kernels, from the compiler (no GPU needed)",
                            description=compile_report.DESCRIPTION)
    compile_report.add_arguments(report)
    report.set_defaults(handler=compile_report.run, command_parser=report)
    sub.add_parser("selfcheck", help="which backends run here, and a few checked and timed calls",
                   description=selfcheck.__doc__.split("\n\n")[0])
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is not None:
        # The command's own parser reports its errors, so they read "attnkern bench: error: ...".
        return args.handler(args, args.command_parser)
    return selfcheck.main([])


if __name__ == "__main__":
    sys.exit(main())
