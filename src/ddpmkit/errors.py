"""User-facing errors: their message is printed as one line, without a traceback."""


class DdpmError(Exception):
    """A problem with the user's input or environment, with a message saying how to fix it."""
