"""One-line summaries of exceptions, for error messages that name a file or key and say what failed."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-empty line of the exception's message, or its type name when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def summary(exc: BaseException) -> str:
    """`TypeName: first line`, for causes the user did not write (a decoder, a capture, a file system)."""
    line = first_line(exc)
    name = type(exc).__name__
    return name if line == name else f"{name}: {line}"


class ExplainedError(RuntimeError):
    """A failure whose one-line message says all the user needs (what failed, which file, what to do next):
    command-line tools print the line and exit non-zero, without a traceback."""
