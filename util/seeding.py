"""Seeds: the run's, each epoch's (so a resumed run repeats the uninterrupted one), and DataLoader workers'."""

import contextlib
import logging
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python ``random``."""
    seed = int(seed) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for (run seed, rank, epoch), distinct for every pair of rank and epoch.

    Reseeding at every epoch start makes an epoch's random draws (augmentation, masks, drop path, mixup)
    independent of what ran before, so a resumed run repeats the uninterrupted one exactly.
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: the same on whichever rank or worker loads it."""
    return int(np.random.SeedSequence([seed, epoch, index, 1]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU, numpy's and Python's global RNGs seeded with ``seed``, and give them back
    their states afterwards (so the block draws nothing from the streams around it). CUDA's RNG is not touched."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (set per epoch)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the main process's preemption handlers are not the worker's
        signal.signal(sig, signal.SIG_DFL)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
