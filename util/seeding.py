"""Seeds: the run's, each epoch's (so a resumed run repeats the uninterrupted one), and DataLoader workers'."""

import logging
import random

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


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (set per epoch)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
