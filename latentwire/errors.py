"""The one error type users see: a one-line message and exit code 2, never a traceback."""


class UsageError(Exception):
    """Bad input from the user: what is wrong and what to do about it, in one line."""

    exit_code = 2
