"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class QuantkitError(Exception):
    """A user-facing failure: bad input, missing file, unsupported model. The message is one line."""
