"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """A mistake in what the user gave us (file, option, model, data): never a traceback."""
