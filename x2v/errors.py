"""Errors x2v raises for bad input. Each message names the file, what was expected, and the fix."""


class X2VError(Exception):
    """Base class for every error caused by the user's files or settings."""


class CheckpointError(X2VError):
    """A checkpoint file is missing, truncated, corrupt, or does not hold what was expected."""


class UnsupportedModelError(X2VError):
    """The checkpoint is recognized but x2v cannot run it (yet)."""


class ConfigError(X2VError, ValueError):
    """A setting has the wrong type or value, or model_cls / task are unknown. The message names the key and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type when the message is empty), for one-line notices."""
    return str(error).partition("\n")[0] or type(error).__name__
