"""The ``ann2snn`` command's entry point: signal handling first, then the (slow) imports.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) end the command with one line on
stderr and the shell's status (130, 143, 129), whenever they arrive - during start-up too. They
are raised as ``Interrupted``, a ``BaseException``, so no ``except Exception`` on the way mistakes
them for an error in a file; every output on the way is a temporary file that its ``finally``
removes. An extension module whose import is interrupted re-raises it as ``ImportError:
initialization failed``: any error that follows a signal is that signal (``interruption``).
"""

from __future__ import annotations

import os
import signal
import sys


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


def main() -> None:
    """Run the command line; exit with its status."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _stop) for s in HANDLED}
    try:
        from .cli import run

        code = run()
    except BaseException as exc:
        signum = interruption(exc)
        if signum is None:
            raise
        try:
            print("ann2snn: error: interrupted; no partial output was written", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal may be gone
            pass
        code = 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (| head): what it wanted it has; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
