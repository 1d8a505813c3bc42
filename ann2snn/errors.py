"""The exceptions that front ends turn into a one-line message (the CLI: exit status 2).

A ``UserError`` is a mistake in what the user gave us (a file, an option, a model, data): never
a traceback. An ``OptionError`` names the library parameter at fault (``timesteps``,
``neuron_options``, ``dataset``...); a front end renames it to what its user typed, e.g. the
CLI's ``--timesteps`` or ``--param`` (``cli.FLAGS``)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (file, option, model, data): never a traceback."""

    def within(self, prefix: str) -> "UserError":
        """The same error, its message behind ``prefix`` (e.g. the file it came from)."""
        return UserError(prefix + str(self))


class OptionError(UserError):
    """A bad value of the library parameter ``option``; ``detail`` follows its name in the
    message, e.g. ``OptionError("timesteps", "-3: must be positive")``."""

    def __init__(self, option: str, detail: str, prefix: str = ""):
        self.option, self.detail, self.prefix = option, detail, prefix
        super().__init__(self.renamed(option))

    def renamed(self, name: str) -> str:
        """The message with the parameter called ``name`` (e.g. a command-line flag)."""
        return f"{self.prefix}{name}{'' if self.detail.startswith(':') else ' '}{self.detail}"

    def within(self, prefix: str) -> "OptionError":
        return OptionError(self.option, self.detail, prefix + self.prefix)
