"""The error types users see: a one-line message and an exit code, never a traceback."""

import os


class UsageError(Exception):
    """Bad input from the user: what is wrong and what to do about it, in one line."""

    exit_code = 2


class StorageError(Exception):
    """A write that failed (a full disk, an I/O error, a read-only folder): which path, why,
    and that what was written before it stays. Exit code 1: the input was fine."""

    exit_code = 1

    def __init__(self, path, err: OSError):
        reason = err.strerror or os.strerror(err.errno) if err.errno else str(err)
        super().__init__(f"cannot write {path} ({reason}); everything written before it is "
                         "kept: free space or fix the folder, then run the same command again "
                         "(a training run with --resume)")
