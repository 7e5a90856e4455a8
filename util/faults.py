"""Fault injection for the fault-tolerance tests: the process SIGKILLs itself at a chosen point.

Set by the tests only. Unset (always, in real runs) it costs nothing in the training step: the engines ask
``step_killer()`` once per epoch and get None; a checkpoint write makes one environment lookup.

    MAE_FAULT_INJECT=step:5           before global training step 5 (epoch * steps_per_epoch + step)
    MAE_FAULT_INJECT=save:1           partway through writing the checkpoint of epoch 1 (the temporary file)
    MAE_FAULT_INJECT=step:5@rank1     only on rank 1
    MAE_FAULT_INJECT=signal:5         SIGUSR1 (not SIGKILL) to itself before global step 5: a preemption notice
    MAE_FAULT_INJECT=stop:5           SIGSTOP to itself before global step 5: a rank that hangs
    MAE_FAULT_INJECT_ONCE=PATH        fire only if PATH does not exist, creating it first: once across restarts

SIGKILL, not an exception: nothing runs after it (no ``finally``, no flush), as with ``kill -9`` or the OOM killer.
"""

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from util.dist import get_rank

logger = logging.getLogger(__name__)

ENV = "MAE_FAULT_INJECT"
ENV_ONCE = "MAE_FAULT_INJECT_ONCE"
MIDWAY_BYTES = 64 * 1024  # a checkpoint write is killed after this many bytes (tiny test checkpoints hold MBs)


def _armed(point: str, value: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    where, _, rank = spec.partition("@rank")
    if where != f"{point}:{value}" or (rank and int(rank) != get_rank()):
        return False
    once = os.environ.get(ENV_ONCE)
    if once:
        try:
            Path(once).touch(exist_ok=False)
        except FileExistsError:
            return False
    return True


def _kill(what: str) -> None:
    logger.warning("fault injection (%s): SIGKILL at %s", ENV, what)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_point(point: str, value: int) -> None:
    """SIGKILL this process if ``MAE_FAULT_INJECT`` names ``point:value`` (and this rank)."""
    if _armed(point, value):
        _kill(f"{point} {value}")


def step_killer() -> Callable[[int], None] | None:
    """For the engines, once per epoch: a function of the global step that kills (``step:``) or signals
    (``signal:``) at the armed step, or None when ``MAE_FAULT_INJECT`` arms neither (so the step loop makes no call
    at all)."""
    spec = os.environ.get(ENV, "")
    if spec.startswith("step:"):
        return lambda global_step: kill_point("step", global_step)
    if spec.startswith("signal:"):
        return lambda global_step: _armed("signal", global_step) and os.kill(os.getpid(), signal.SIGUSR1)
    if spec.startswith("stop:"):
        return lambda global_step: _armed("stop", global_step) and os.kill(os.getpid(), signal.SIGSTOP)
    return None


class _KillMidway:
    """A write-only file proxy that flushes and SIGKILLs the process once ``MIDWAY_BYTES`` have been written."""

    def __init__(self, f: BinaryIO, what: str):
        self._f, self._what, self._written = f, what, 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self._written += len(data)
        if self._written >= MIDWAY_BYTES:
            self._f.flush()
            os.fsync(self._f.fileno())  # the partial file is really on disk, as after a crash
            _kill(f"{self._what} after {self._written} bytes")
        return n

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def writer(f: BinaryIO, point: str, value: int | None) -> BinaryIO:
    """``f``, or a proxy that kills the process partway through the write if ``point:value`` is armed."""
    if value is not None and _armed(point, value):
        return _KillMidway(f, f"{point} {value}")
    return f
