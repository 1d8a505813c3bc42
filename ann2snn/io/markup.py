"""Names that are not ours (paths, data set and model names, a file's fields) as printed text.

Rich reads ``[...]`` in what it prints as markup: a file named ``r[/x]`` was an error in the
middle of the output. Every such name goes through ``literal`` before rich renders it, in a
line, a table cell or a title; our own markup (``[yellow]...[/]``) stays markup. ``printable``
shows what a terminal cannot take as it is (a file name's bytes that are not UTF-8, control
characters) as escapes, in output and in error messages alike.
"""

from __future__ import annotations

from rich.markup import escape


def printable(text: str) -> str:
    """``text`` as one printable line: bytes of a file name that are not UTF-8 as ``\\xff``, lone
    surrogates and control characters (newline, escape) as Python writes them in a string."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        pass
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def literal(value: object) -> str:
    """``value`` as markup that rich prints as ``printable(str(value))``, whatever follows it."""
    text = printable(str(value))
    head = text.rstrip("\\")
    tail = text[len(head):]  # trailing backslashes: doubled before an empty span, so they escape nothing
    return escape(head) + (tail * 2 + "[b][/b]" if tail else "")
