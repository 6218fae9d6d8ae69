"""`python -m attnkern`: check this install on this machine (see selfcheck.py)."""
import sys

from .selfcheck import main

sys.exit(main(sys.argv[1:]))
