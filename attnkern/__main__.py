"""`python -m attnkern [bench | check-grads | selfcheck]`; without a command, the self-check."""
import sys

from .tools.cli import main

sys.exit(main(sys.argv[1:]))
