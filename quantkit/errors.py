"""The exceptions that the CLI turns into a one-line error and a non-zero exit."""


class QuantkitError(Exception):
    """A user-facing failure: bad input, missing file, unsupported model. The message is one line."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class OptionError(QuantkitError):
    """A command-line option (or API argument) with a value it does not allow: exit code 2, as for usage errors."""
