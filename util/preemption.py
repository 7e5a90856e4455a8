"""Checkpoints inside an epoch, and preemption: stop at a step, save the position, resume there exactly.

Three things make ``checkpoint-last.pth`` inside an epoch:

- a signal: SIGUSR1 (SLURM's ``--signal=USR1@120`` before the time limit), and SIGTERM (what SLURM sends before it
  preempts or cancels a job) when the process was not started by torchrun (torchrun's agent itself sends SIGTERM to
  tear its workers down); the run then stops after that checkpoint and exits with ``REQUEUE_EXIT_CODE``;
- ``--save_every_min M``: M minutes since the last checkpoint, on rank 0's clock;
- ``--save_every_steps N``: every N update steps of the epoch.

The ranks agree on when: the flags ride on the loss all-reduce that the engines' ``StepMetrics`` makes at every
progress line anyway (no extra sync), and the step they stop at is the first update step (a multiple of
``--accum_iter``) from there. Resuming repeats the uninterrupted run exactly: the sampler skips the batches done, and
each rank's torch / CUDA / numpy / Python RNG states are those of the uninterrupted run at that step (saved in the
checkpoint). Augmentation does not depend on the worker that loads an image (``util.datasets`` seeds it per image),
so the DataLoader workers may differ.
"""

import argparse
import logging
import os
import random
import signal
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from util.dist import barrier, get_rank, get_world_size, is_dist_avail_and_initialized
from util.errors import Preempted

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 3  # the job script requeues on it (scontrol requeue $SLURM_JOB_ID)


REPEAT_WINDOW_S = 5.0  # the same signal again this soon is the same preemption, delivered twice


class StopSignals:
    """Catch the signals that announce a preemption; ``requested`` turns True at the first. The same signal again
    later than ``REPEAT_WINDOW_S`` is not caught: the process stops at once, as without this handler. Within the
    window it is the same announcement, delivered twice: SLURM signals the tasks and ``srun``, which forwards the
    signal to them again."""

    def __init__(self) -> None:
        self.requested = False
        self.received: str | None = None
        self.received_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch the signals from now on (a new run: nothing requested yet)."""
        self.uninstall()
        self.requested, self.received = False, None
        signals = [signal.SIGUSR1]
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # under torchrun SIGTERM is the agent's teardown
            signals.append(signal.SIGTERM)
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): no preemption support
                return

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and name == self.received:
            if time.monotonic() - self.received_at < REPEAT_WINDOW_S:
                logger.warning("%s received again: still checkpointing at the next progress line", name)
                return
            self.uninstall()  # the same signal again, later: do what it would have done
            signal.raise_signal(signum)
            return
        if self.requested:  # another of the two (SIGTERM after SIGUSR1): already on the way out
            logger.warning("%s received: already stopping at the next progress line", name)
            return
        self.requested, self.received, self.received_at = True, name, time.monotonic()
        logger.warning("%s received: checkpointing at the next progress line, then stopping", self.received)


SIGNALS = StopSignals()


def rng_states() -> dict:
    """This process's RNG states as plain data (loadable with ``weights_only=True``); CUDA's of this process's
    device only, and only when CUDA is in use (so a CPU run on a GPU machine does not initialise it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss],
    }


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"][0])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (on every rank)."""
    mine = rng_states()
    if not is_dist_avail_and_initialized():
        return [mine]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, mine)
    return states


class EpochControl:
    """One epoch's checkpoints inside it: where it starts (a resumed position), the flags that go into the
    progress-line all-reduce, and what to do after each step.

    ``save(step, rng)``: writes ``checkpoint-last.pth`` with the position ``step`` (the next step to run) and the
    ranks' RNG states; called on every rank (rank 0 writes).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        save: Callable[[int, list[dict]], None],
        start_step: int = 0,
        rng: list[dict] | None = None,
    ):
        self.save, self.start_step, self.rng = save, start_step, rng
        self.accum_iter = args.accum_iter
        self.writes = bool(getattr(args, "output_dir", ""))
        self.every_steps = getattr(args, "save_every_steps", 0) or 0
        every_min = getattr(args, "save_every_min", 0) or 0
        self.every_s = every_min * 60
        self.last_save = time.monotonic()
        self.stop_agreed = self.save_agreed = False

    def batches(self, loader) -> "_Batches":
        """``loader``'s batches from ``start_step`` (its sampler already skips the earlier ones), with this rank's
        RNG states of the uninterrupted run restored once the loader's iterator exists (creating it draws a
        seed)."""
        return _Batches(loader, self._restore)

    def _restore(self) -> None:
        if self.rng is not None:
            state = self.rng[get_rank()] if len(self.rng) == get_world_size() else None
            if state is None:
                logger.warning(
                    "the checkpoint's RNG states are of %d ranks, this run has %d: the rest of the "
                    "epoch draws other random numbers than the interrupted run",
                    len(self.rng),
                    get_world_size(),
                )
            else:
                set_rng_states(state)

    def local_flags(self) -> list[float]:
        """[stop, save] as this rank sees them (time on rank 0 only, so that the ranks need no common clock)."""
        due = self.every_s > 0 and get_rank() == 0 and time.monotonic() - self.last_save >= self.every_s
        return [float(SIGNALS.requested), float(due)]

    def agree(self, flags: list[float]) -> None:
        """The flags summed over ranks: any rank's request holds for all."""
        self.stop_agreed |= flags[0] > 0
        self.save_agreed |= flags[1] > 0

    def after_step(self, step: int, update: bool, steps: int) -> None:
        """Checkpoint after an update step when one is due (and then stop, on a signal). After the epoch's last
        step the epoch's own checkpoint follows: the caller stops after it (``stop_agreed``)."""
        if not update or step + 1 == steps:
            return
        due = self.stop_agreed or self.save_agreed
        if self.every_steps and (step + 1) // self.accum_iter % self.every_steps == 0:
            due = True
        if not due:
            return
        if self.writes:
            self.save(step + 1, gather_rng_states())
        self.last_save = time.monotonic()
        self.save_agreed = False
        if self.stop_agreed:
            barrier()  # every rank waits for rank 0's checkpoint before any exits (srun kills the rest at one exit)
            saved = "checkpoint-last.pth holds the position: resume with --resume auto"
            raise Preempted(
                f"stopped on {SIGNALS.received or 'a signal'} at step {step + 1} of the epoch; "
                f"{saved if self.writes else 'no --output_dir, so nothing was saved'}"
            )


class _Batches:
    """A loader's batches, with ``restore()`` run once its iterator has been created."""

    def __init__(self, loader, restore: Callable[[], None]):
        self.loader, self.restore = loader, restore

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        self.restore()
        yield from iterator
