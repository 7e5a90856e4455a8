"""One epoch of masked-image-modeling pretraining (MAE or MixMIM)."""

import argparse
import datetime
import logging
import time
from collections.abc import Iterable

import torch
from torch.utils.tensorboard import SummaryWriter

import util.lr_sched as lr_sched
from util import faults
from util.amp import autocast
from util.datasets import normalize_on_device
from util.dist import get_world_size, maybe_no_sync
from util.metrics import MetricLogger, SmoothedValue, StepMetrics
from util.run import begin_epoch, log_epoch, save_epoch_checkpoint

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

    metrics = StepMetrics(metric_logger, device, epoch, steps, args.print_freq, args.amp, log_writer, "train_loss")
    optimizer.zero_grad(set_to_none=True)
    kill_at = faults.step_killer()
    images_per_step = args.batch_size * get_world_size()
    for step, (samples, _) in enumerate(metric_logger.log_every(data_loader, args.print_freq, header, images_per_step)):
        if kill_at is not None:  # tests only (MAE_FAULT_INJECT)
            kill_at(epoch * steps + step)
        if step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        lr = optimizer.param_groups[0]["lr"]
        samples = normalize_on_device(samples.to(device, non_blocking=True))  # uint8 from main_pretrain's loader
        update = (step + 1) % accum_iter == 0

        with maybe_no_sync(model, sync=update):
            with autocast(device, args.amp):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            norm = loss_scaler(
                loss / accum_iter, optimizer, clip_grad=args.clip_grad, parameters=params, update_grad=update
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
        metrics.push(step, loss, norm, lr, update)  # reads back to the host only at the steps that log

    metrics.flush()  # no-op after the last step; covers a loader that ended early
    metric_logger.synchronize_between_processes(device)
    logger.info("Averaged stats: %s", metric_logger)
    return metric_logger.global_averages()


def fit(
    args: argparse.Namespace,
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_scaler,
    device: torch.device,
    log_writer: SummaryWriter | None = None,
) -> dict[str, float]:
    """The pretraining epochs from ``--start_epoch``: train, checkpoint, log; returns the last epoch's averages."""
    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    train_stats: dict[str, float] = {}
    for epoch in range(args.start_epoch, args.epochs):
        begin_epoch(data_loader, args, epoch)
        train_stats = train_one_epoch(
            model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=log_writer, args=args
        )
        save_epoch_checkpoint(args, epoch, model, optimizer, loss_scaler)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        log_epoch(args, log_writer, log_stats, {"train": (data_loader, True)}, device)
    if log_writer is not None:
        log_writer.close()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    return train_stats
