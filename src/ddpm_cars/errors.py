"""The kinds of failure, and the exit code the command line gives each.

A :class:`UserError` is bad input -- a flag, a path, a config file, a data folder -- and
its message says what was wrong and what is allowed: one ``ddpm-cars: error:`` line, exit
2. A :class:`RunDiverged` is a training run whose loss stopped being finite: one line
naming the checkpoint to resume from and what to try, exit 3. An environment failure (a
full disk, a permission, a lost mount: :func:`is_environment_failure`) is one line, exit 1.
Any other exception is a bug in ddpm-cars and keeps its traceback (exit 1). Input is
validated once, where it enters (the config dataclasses, the command line, the data
loaders, the run directory); inside the library invariants are trusted or asserted.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # the environment refused, or a bug
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# 128 + the signal's number when interrupted: 130 for SIGINT (Ctrl-C), 143 for SIGTERM

# errors of the machine, not of ddpm-cars: the disk, permissions, mounts, limits
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO", "EMFILE", "ENFILE", "ENOMEM", "ESTALE",
                 "ENOTCONN", "ETIMEDOUT", "EBUSY", "EXDEV")
    if hasattr(errno, name)
)  # fmt: skip


class UserError(ValueError):
    """Bad input the user can fix; the message is one line saying what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a run directory should hold) is not there."""


class RunDiverged(RuntimeError):
    """A training run stopped because its loss was not finite, its last good weights saved;
    the message names the checkpoint to resume from and what to try."""


class EnvironmentFailure(OSError):
    """The machine refused a write or a read (see :data:`ENVIRONMENT_ERRNOS`), reported in one line."""


def is_environment_failure(err: BaseException) -> bool:
    """Whether ``err`` is the machine's doing (a full disk, a permission, a lost mount) rather than a bug."""
    return isinstance(err, EnvironmentFailure) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)
