"""One exception type for everything a user can get wrong, so the CLI can print it as one line."""

from __future__ import annotations


class Fp8CookbookError(Exception):
    """A problem with the user's input (file, tensor, option). The CLI prints it without a traceback."""
