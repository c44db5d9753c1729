"""`python -m fp8cookbook` is the `fp8cookbook` command (useful where the venv's bin/ is not on PATH)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
