"""User-facing errors: one clear line, exit code 2, no traceback (see DESIGN.md, Conventions)."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """An error the user caused (bad config key, malformed data line, missing file, corrupt checkpoint).

    The message is a single line that names the file, line or key at fault.
    """


def exit_on_user_error(main: F) -> F:
    """Decorate a script's `main` so a `UserError` prints `error: <message>` to stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
