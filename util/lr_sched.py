"""Per-iteration learning-rate schedule: linear warmup, then a half-cycle cosine down to ``min_lr``."""

import math

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The learning rate at a fractional epoch (``step / steps_per_epoch + epoch``), as the official formula."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every parameter group's lr for this fractional epoch, times its ``lr_scale`` (layer decay) if any.

    Returns the unscaled lr.
    """
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
