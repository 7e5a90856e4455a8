"""The learning rate and the optimizer of each task, as the official scripts build them.

- ``absolute_lr``: ``--lr``, or ``--blr`` scaled by the effective batch size over 256 (the linear scaling rule).
- pretraining: AdamW(betas 0.9, 0.95); biases and 1-D parameters get no weight decay (timm's
  ``add_weight_decay`` with an empty skip list, so ``cls_token`` and ``mask_token`` are decayed).
- fine-tuning: AdamW with layer-wise lr decay; biases, norms and the model's ``no_weight_decay()`` names
  get no weight decay.
- linear probe: LARS on the head only.

AdamW is fused on CUDA (one kernel for all parameters).
"""

import argparse
import logging

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from util.lars import LARS
from util.lr_decay import param_groups_lrd

logger = logging.getLogger(__name__)


def absolute_lr(lr: float | None, blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """``lr`` when given, else ``blr * effective batch / 256`` (effective batch = batch * accum_iter * ranks)."""
    if lr is not None:
        return lr
    return blr * batch_size * accum_iter * world_size / 256


def scaled_lr(args: argparse.Namespace) -> float:
    """``absolute_lr`` of the run's flags (``world_size`` set by the distributed init), with the official log lines."""
    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    lr = absolute_lr(args.lr, args.blr, args.batch_size, args.accum_iter, args.world_size)
    logger.info("base lr: %.2e, actual lr: %.2e", lr * 256 / eff_batch_size, lr)
    logger.info("accumulate grad iterations: %d, effective batch size: %d", args.accum_iter, eff_batch_size)
    return lr


def _fused(device: torch.device | str, fused: bool) -> bool | None:
    return True if fused and torch.device(device).type == "cuda" else None


def pretrain_optimizer(
    model: nn.Module, lr: float, weight_decay: float, device, fused: bool = True
) -> torch.optim.AdamW:
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=_fused(device, fused))


def finetune_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, device, fused: bool = True
) -> torch.optim.AdamW:
    groups = param_groups_lrd(
        model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay
    )
    return torch.optim.AdamW(groups, lr=lr, fused=_fused(device, fused))


def linprobe_optimizer(head: nn.Module, lr: float, weight_decay: float) -> LARS:
    return LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
