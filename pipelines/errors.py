"""How a driver refuses: one line on stderr naming the bad value, exit code 2."""

from __future__ import annotations

import sys


def exit_with_error(message: str) -> None:
    """The drivers' one way to refuse: one line on stderr, exit code 2."""
    print(f"distlens: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
