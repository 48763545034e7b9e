"""The one type of error a user can act on: a bad config, file, flag, path or checkpoint.

Every module's own error (validate.ConfigError, data.DataError, train.RunError, ...) derives
from UserError; the CLI prints its message, naming what is wrong and what would be valid,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """What the user gave is wrong; the message says what would do."""


class ConfigError(UserError, ValueError):
    """A config key with a value that cannot be used (validate.check, or the target platform)."""


class UsageError(UserError, ValueError):
    """A bad flag, argument or --config file of a command (exit status 2)."""


def describe_os_error(e: OSError) -> str:
    """An OSError (read-only directory, full disk, a path through a file) as one line."""
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or type(e).__name__}{where}"
