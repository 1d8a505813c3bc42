"""The ``ann2snn`` command's entry point: signal handling first, then the (slow) imports.

Ctrl-C (SIGINT) and SIGTERM end the command with one line on stderr and the shell's status
(130, 143), whenever they arrive - during start-up too. They are raised as ``Interrupted``, a
``BaseException``, so no ``except Exception`` on the way mistakes them for an error in a file;
every output on the way is a temporary file that its ``finally`` removes.
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


def _stop(signum, frame):
    raise Interrupted(signum)


def main() -> None:
    """Run the command line; exit with its status."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _stop) for s in handled}
    try:
        from .cli import run

        code = run()
    except (Interrupted, KeyboardInterrupt) as exc:
        print("ann2snn: error: interrupted; no partial output was written", file=sys.stderr)
        code = 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (| head): what it wanted it has; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
