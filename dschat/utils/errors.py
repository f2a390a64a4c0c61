"""User-facing errors: bad input becomes one clear line and a non-zero exit, never a traceback.

Owns `UserError` (raise it with "<flag or file>: <what is wrong>; <what to do>") and `run_main`, the wrapper
every entry point uses. Standard library only: every module may import it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (flag, file, data), shown as one line naming what to fix."""


EXIT_USER_ERROR = 2


# Called, in order, after an entry point returned normally (see `exit_after_success`).
_ON_SUCCESS: list[Callable[[], None]] = []


def exit_after_success(hook: Callable[[], None]) -> None:
    """Register `hook` to run once `run_main`'s entry point has returned normally (the multi-rank process
    group uses it to leave without the C++ teardown that could abort a finished rank; see dschat.utils.dist)."""
    _ON_SUCCESS.append(hook)


def run_main(main: Callable[[], object]) -> None:
    """Run an entry point; turn UserError into `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    for hook in _ON_SUCCESS:
        hook()
