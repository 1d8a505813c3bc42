"""The ``ann2snn`` command's entry point: signal handling first, then the (slow) imports.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) end the command with one line on
stderr and the shell's status (130, 143, 129), whenever they arrive - during start-up too. They
are raised as ``signals.Interrupted``; every output on the way is a temporary file that its
``finally`` removes.
"""

from __future__ import annotations

import os
import sys

from ann2snn.signals import installed, interruption


def main() -> None:
    """Run the command line; exit with its status."""
    with installed():
        try:
            from ann2snn.app.cli import run

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
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (| head): what it wanted it has; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
