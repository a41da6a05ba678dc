"""The error every command reports the same way: one line on stderr, exit status 2.

Imports nothing of the package, so core modules, the doors and the CLI can all raise it.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A bad input: the command reports it as one line and exits with status 2."""


def error(msg: str) -> int:
    """Report a user mistake as one line on stderr; the caller returns this exit status (2)."""
    print(f"razor-gguf: error: {msg}", file=sys.stderr)
    return 2
