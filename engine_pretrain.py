"""One epoch of masked-image-modeling pretraining (MAE or MixMIM)."""

import argparse
import logging
import math
from collections.abc import Iterable

import torch
from torch.utils.tensorboard import SummaryWriter

import util.lr_sched as lr_sched
from util import faults
from util.amp import autocast
from util.datasets import normalize_on_device
from util.dist import all_reduce_mean, get_world_size, maybe_no_sync
from util.misc import MetricLogger, SmoothedValue, check_finite_loss

logger = logging.getLogger(__name__)


def train_one_epoch(
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler,
    log_writer: SummaryWriter | None = None,
    args: argparse.Namespace | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader`` and return the epoch averages (loss, lr, grad_norm).

    The lr follows the per-iteration schedule; with ``accum_iter`` > 1 the weights are updated every
    ``accum_iter`` batches, and DDP all-reduces the gradients only then.
    """
    model.train(True)
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter = args.accum_iter
    steps = len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer.zero_grad(set_to_none=True)
    images_per_step = args.batch_size * get_world_size()
    for step, (samples, _) in enumerate(metric_logger.log_every(data_loader, args.print_freq, header, images_per_step)):
        faults.kill_point("step", epoch * steps + step)  # tests only (MAE_FAULT_INJECT)
        if step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        lr = optimizer.param_groups[0]["lr"]
        samples = normalize_on_device(samples.to(device, non_blocking=True))  # uint8 from main_pretrain's loader
        update = (step + 1) % accum_iter == 0

        with maybe_no_sync(model, sync=update):
            with autocast(device, args.amp):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_value = loss.item()
            # reduced before backward, so that every rank stops at the same step on a non-finite loss
            loss_value_reduce = all_reduce_mean(loss_value, device)
            check_finite_loss(loss_value_reduce, epoch, step, steps, lr, args.amp)
            norm = loss_scaler(
                loss / accum_iter, optimizer, clip_grad=args.clip_grad, parameters=params, update_grad=update
            )
        if update:
            optimizer.zero_grad(set_to_none=True)

        metric_logger.update(loss=loss_value, lr=lr)
        norm_value = norm.item() if norm is not None else None  # one host sync for the log line and TensorBoard
        if norm_value is not None and math.isfinite(norm_value):
            metric_logger.update(grad_norm=norm_value)

        if log_writer is not None and update:
            # x axis: epoch * 1000, which lines up curves of runs with different batch sizes
            epoch_1000x = int((step / steps + epoch) * 1000)
            log_writer.add_scalar("train_loss", loss_value_reduce, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)
            if norm_value is not None:
                log_writer.add_scalar("grad_norm", norm_value, epoch_1000x)

    metric_logger.synchronize_between_processes(device)
    logger.info("Averaged stats: %s", metric_logger)
    return metric_logger.global_averages()
