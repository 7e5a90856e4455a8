"""Errors that the entry scripts report as one line (no traceback) before exiting with status 1."""


class UsageError(ValueError):
    """Bad input from the user (arguments, data folder, checkpoint)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops without writing a checkpoint."""


class Preempted(RuntimeError):
    """A preemption signal stopped training after writing ``checkpoint-last.pth`` with the position in the epoch;
    the process exits with ``util.preemption.REQUEUE_EXIT_CODE`` so that the job script can requeue the job."""


class BadImageError(UsageError):
    """A file in the ImageFolder that cannot be read as an image (corrupt, truncated, not an image)."""
