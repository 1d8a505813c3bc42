"""The exceptions that front ends turn into a one-line message (the CLI: exit status 2).

A ``UserError`` is a mistake in what the user gave us (a file, an option, a model, data): never
a traceback. An ``OptionError`` names the library parameter at fault (``timesteps``,
``neuron_options``, ``dataset``...). A message names other parameters as ``{{name}}``. The
library's own text shows library names (``timesteps -3: must be positive``); a front end
renders its user's words instead (the CLI: ``--timesteps -3: must be positive``, ``cli.flag``).
"""

from __future__ import annotations

import re
from typing import Callable

_NAME = re.compile(r"\{\{(\w+)\}\}")


def _plain(name: str) -> str:
    return name


_names: Callable[[str], str] = _plain


def name_parameters(names: Callable[[str], str] | None) -> None:
    """How ``str(error)`` names parameters from now on (a front end's words; None: the library's)."""
    global _names
    _names = names or _plain


class UserError(Exception):
    """A mistake in what the user gave us (file, option, model, data): never a traceback."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.render(_names)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every parameter named by ``name`` (e.g. its command-line flag)."""
        return _NAME.sub(lambda m: name(m.group(1)), self.message)

    def within(self, prefix: str) -> "UserError":
        """The same error, its message behind ``prefix`` (e.g. the file it came from)."""
        return UserError(prefix + self.message)


class OptionError(UserError):
    """A bad value of the library parameter ``option``; ``detail`` follows its name in the
    message, e.g. ``OptionError("timesteps", "-3: must be positive")``."""

    def __init__(self, option: str, detail: str, prefix: str = ""):
        self.option, self.detail, self.prefix = option, detail, prefix
        super().__init__(f"{prefix}{{{{{option}}}}}{'' if detail.startswith(':') else ' '}{detail}")

    def within(self, prefix: str) -> "OptionError":
        return OptionError(self.option, self.detail, prefix + self.prefix)
