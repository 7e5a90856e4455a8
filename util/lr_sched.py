"""Per-iteration learning-rate schedules: linear warmup, then a half-cycle cosine down to ``min_lr`` (the official
recipes, in epochs); mmcv's poly with linear warmup (segmentation, in iterations)."""

import argparse
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


def poly_lr(it: int, lr: float, min_lr: float, warmup_iters: int, warmup_ratio: float, iters: int) -> float:
    """mmcv's ``poly`` policy (power 1) with linear warmup at iteration ``it`` (0-based): ``(lr - min_lr) * (1 -
    it / iters) + min_lr``, times ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)`` during the warmup."""
    regular = (lr - min_lr) * (1 - it / iters) + min_lr
    if it < warmup_iters:
        return regular * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))
    return regular


def adjust_learning_rate_poly(optimizer: torch.optim.Optimizer, it: int, args: argparse.Namespace) -> float:
    """Each group's lr at iteration ``it``: ``poly_lr`` from its own base lr, ``--lr`` times its ``lr_scale`` (layer
    decay), as mmcv schedules each group from its initial lr. Returns the unscaled lr."""
    for group in optimizer.param_groups:
        base = args.lr * group.get("lr_scale", 1.0)
        group["lr"] = poly_lr(it, base, args.min_lr, args.warmup_iters, args.warmup_ratio, args.iters)
    return poly_lr(it, args.lr, args.min_lr, args.warmup_iters, args.warmup_ratio, args.iters)
