"""Errors that the entry scripts report as one line (no traceback) before exiting with status 1."""


class UsageError(ValueError):
    """Bad input from the user (arguments, data folder, checkpoint)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops without writing a checkpoint."""


class BadImageError(UsageError):
    """A file in the ImageFolder that cannot be read as an image (corrupt, truncated, not an image)."""
