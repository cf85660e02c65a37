"""The two kinds of failure: what the user can fix, and bugs.

A :class:`UserError` is bad input -- a flag, a path, a config file, a data folder -- and
its message says what was wrong and what is allowed. The command line prints it as one
``ddpm-cars: error:`` line and exits 2. Any other exception is a bug in ddpm-cars and
keeps its traceback (exit 1). Input is validated once, where it enters (the config
dataclasses, the command line, the data loaders, the run directory); inside the library
invariants are trusted or asserted.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message is one line saying what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a run directory should hold) is not there."""
