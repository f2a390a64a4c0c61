"""Bounds on the work an input can make a run do: a hostile or broken input ends in one line, not a hang.

`time_budget(seconds, what)` stops the code inside it (pure Python work such as rendering a chat template,
whose nested `range(100000)` loops would otherwise run for hours) with a UserError naming `what` and the
fix. It uses the real-time interval timer (SIGALRM), so it works in the main thread of a process; elsewhere
(another thread) the code runs unbounded rather than failing.

Standard library and `dschat.utils.errors` only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from dschat.utils.errors import UserError

# One chat-template rendering of one conversation takes milliseconds; this is a thousand times that.
TEMPLATE_RENDER_BUDGET_S = 5.0


def template_render_budget() -> float:
    """Seconds one chat-template rendering may take (`DSCHAT_TEMPLATE_BUDGET_S` overrides, for tests)."""
    try:
        return float(os.environ.get("DSCHAT_TEMPLATE_BUDGET_S", TEMPLATE_RENDER_BUDGET_S))
    except ValueError:
        return TEMPLATE_RENDER_BUDGET_S


class _OverBudget(BaseException):
    """Raised by the timer inside the bounded code (a BaseException, so the code's own `except Exception`
    cannot swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: float, what: str, fix: str) -> Iterator[None]:
    """Run the body for at most `seconds` of wall time; then UserError("<what> took more than N s; <fix>").
    An interval timer already running (an outer budget) is paused meanwhile and resumed with what it had left."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def expire(signum, frame):  # noqa: ARG001 - signal API
        if armed:
            raise _OverBudget

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _OverBudget:
        raise UserError(f"{what} took more than {seconds:g} s; {fix}") from None
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(1e-6, outer_left - (time.monotonic() - start)))
