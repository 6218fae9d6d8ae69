"""The tools built on the core: `attnkern bench` (bench/), `attnkern check-grads` (check_grads.py),
`attnkern selfcheck` (selfcheck.py), `attnkern compile-report` (compile_report.py with asm_stats.py and
triton_compile.py), the command line (cli.py), and the case vocabulary they and the tests share (cases.py).
Nothing in the core imports these."""
