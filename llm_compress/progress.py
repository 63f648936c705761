"""Where a long stage is, for whoever runs it: ``report(fraction, note)`` from inside the algorithms.

Stages stay free of Prefect; the flow installs a reporter for the duration of a stage (a Prefect progress artifact
on the task run, so the UI shows a multi-hour distillation's step) and nothing is reported otherwise::

    with reporting(lambda fraction, note: ...):   # the flow, around one stage
        ...  report((step + 1) / steps, f"step {step + 1}/{steps}, loss {loss:.3f}")   # the algorithm

A report is cheap when no reporter is installed (one context-variable read). Reporters should throttle themselves.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

Reporter = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("stage_progress", default=None)


def report(fraction: float, note: str) -> None:
    """Tell the installed reporter (if any) that ``fraction`` of the current stage's work is done."""
    fn = _reporter.get()
    if fn is not None:
        fn(min(max(float(fraction), 0.0), 1.0), note)


def current_reporter() -> Reporter | None:
    """The installed reporter, to hand on (a stage that waits for worker processes feeds it their reports)."""
    return _reporter.get()


@contextlib.contextmanager
def reporting(fn: Reporter) -> Iterator[None]:
    """Install ``fn`` as the reporter of the stage run inside the block."""
    token = _reporter.set(fn)
    try:
        yield
    finally:
        _reporter.reset(token)
