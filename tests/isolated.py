"""Run code in a fresh Python process, so that a crash (a segfault in a kernel fed bad arguments) fails
the one test that ran it instead of ending the whole test run.

    res = run_isolated("import attnkern; ...")   # same interpreter, same environment (TRITON_INTERPRET,
    res.stdout                                     # ATTNKERN_POISON, sys.path of this run)

`run_isolated` raises AssertionError when the child dies from a signal or exits non-zero, with its
output; `check=False` returns the CompletedProcess whatever happened.
"""
import os
import signal
import subprocess
import sys
import textwrap


def run_isolated(code: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The child imports what this run imports: the same attnkern checkout and test helpers.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if check and res.returncode != 0:
        how = (f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0
               else f"exit status {res.returncode}")
        raise AssertionError(f"isolated run failed ({how})\n--- stdout\n{res.stdout[-4000:]}\n"
                             f"--- stderr\n{res.stderr[-4000:]}")
    return res
