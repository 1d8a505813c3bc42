"""Signals that stop a command: SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed).

``installed()`` makes each of them raise ``Interrupted``, a ``BaseException``, so no ``except
Exception`` on the way mistakes one for an error in a file. An extension module whose import is
interrupted re-raises it as ``ImportError: initialization failed``: any error that follows a
signal is that signal (``interruption``).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Interrupted(BaseException):
    """The process was asked to stop (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_received: int | None = None  # the first signal that asked this command to stop


def _stop(signum, frame):
    global _received
    _received = _received or signum
    raise Interrupted(signum)


def interruption(exc: BaseException) -> int | None:
    """The signal that ``exc`` stands for, or None (a real error): an ``Interrupted`` or
    ``KeyboardInterrupt``, an exception raised while handling one or caused by one, or any
    ``Exception`` raised once a signal came."""
    seen, chain = set(), exc
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, Interrupted):
            return chain.signum
        if isinstance(chain, KeyboardInterrupt):
            return signal.SIGINT
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return _received if isinstance(exc, Exception) else None


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """The stopping signals raise ``Interrupted`` inside the block; the previous handlers after it."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _stop) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None
