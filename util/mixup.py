"""Fine-tuning's mixup/CutMix and its loss, as the official main_finetune.py builds them."""

import argparse
import logging

import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from util.errors import UsageError

logger = logging.getLogger(__name__)


def build_mixup(args: argparse.Namespace) -> Mixup | None:
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets), if enabled."""
    if not (args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2 != 0:
        raise UsageError(f"mixup/cutmix needs an even --batch_size, got {args.batch_size}")
    logger.info("Mixup is activated!")
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=args.nb_classes,
    )


def build_criterion(args: argparse.Namespace, mixup_fn: Mixup | None) -> torch.nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is in the mixup targets
    if args.smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()
