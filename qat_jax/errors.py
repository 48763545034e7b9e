"""The one type of error a user can act on: a bad config, file, flag, path or checkpoint.

Every module's own error (resolve.ConfigError, data.DataError, train.RunError, ...) derives
from UserError; the CLI prints its message, naming what is wrong and what would be valid,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """What the user gave is wrong; the message says what would do."""


class ConfigError(UserError, ValueError):
    """A config key with a value that cannot be used (resolve.resolve, or the target platform)."""


class UsageError(UserError, ValueError):
    """A bad flag, argument or --config file of a command (exit status 2)."""


def describe_os_error(e: OSError) -> str:
    """An OSError (read-only directory, full disk, a path through a file) as one line."""
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    fix = {errno.ENOSPC: "; free space on that device, or write somewhere else",
           errno.EDQUOT: "; free space within the quota, or write somewhere else",
           errno.EROFS: "; write somewhere else", errno.EACCES: "; fix its permissions, or "
           "write somewhere else"}.get(e.errno, "")
    return f"{e.strerror or type(e).__name__}{where}{fix}"


_STRERRORS = {os.strerror(n): n for n in errno.errorcode}


def os_error_in(e: Exception, filename: str) -> OSError | None:
    """The OSError that a library reported as text (array_record's and safetensors' writers
    raise their own types, naming the system's error in words): None if none is named."""
    text = str(e)
    for message, number in _STRERRORS.items():
        if message and message in text:
            return OSError(number, message, filename)
    return None
