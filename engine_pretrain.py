"""One epoch of masked-image-modeling pretraining (MAE or MixMIM)."""

import argparse
import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.tensorboard import SummaryWriter

import util.lr_sched as lr_sched
from util import faults
from util.amp import autocast
from util.datasets import data_stats_of, normalize_on_device
from util.dist import get_world_size, maybe_no_sync
from util.metrics import MetricLogger, SmoothedValue, StepMetrics
from util.preemption import EpochControl
from util.run import finish_training, log_epoch, save_epoch_checkpoint, start_epoch, stop_if_preempted

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
    control: EpochControl | None = None,
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
    start = control.start_step if control is not None else 0  # an epoch resumed inside starts there
    steps = start + len(data_loader)
    batches = control.batches(data_loader) if control is not None else data_loader
    params = [p for p in model.parameters() if p.requires_grad]

    metrics = StepMetrics(
        metric_logger, device, epoch, steps, args.print_freq, args.amp, log_writer, "train_loss", control
    )
    optimizer.zero_grad(set_to_none=True)
    kill_at = faults.step_killer()
    images_per_step = args.batch_size * get_world_size()
    for step, (samples, _) in enumerate(
        metric_logger.log_every(batches, args.print_freq, header, images_per_step, first_step=start), start=start
    ):
        if kill_at is not None:  # tests only (MAE_FAULT_INJECT)
            kill_at(epoch * steps + step)
        if step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        lr = optimizer.param_groups[0]["lr"]
        # uint8 from main_pretrain's loader (3 channels), normalised with the run's statistics
        samples = normalize_on_device(samples.to(device, non_blocking=True), *data_stats_of(args))
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
        if control is not None:
            control.after_step(step, update, steps)  # a checkpoint inside the epoch, if one is due

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
    position: dict | None = None,
    knn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    vis: Callable[[torch.nn.Module, int, SummaryWriter | None], object] | None = None,
) -> dict[str, float]:
    """The pretraining epochs from ``--start_epoch`` (at ``position``'s step when resumed inside it): train,
    checkpoint, ``knn(model)`` every ``--knn_freq`` epochs and at the last, ``vis(model, epoch, log_writer)`` (the
    main process's reconstructions) every ``--vis_freq`` epochs (``epoch % vis_freq == 0``, as ``--save_freq``)
    and at the last, log; returns the last epoch's averages."""
    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    train_stats: dict[str, float] = {}
    for epoch in range(args.start_epoch, args.epochs):
        control = start_epoch(args, data_loader, epoch, model, optimizer, loss_scaler, position)
        train_stats = train_one_epoch(
            model,
            data_loader,
            optimizer,
            device,
            epoch,
            loss_scaler,
            log_writer=log_writer,
            args=args,
            control=control,
        )
        save_epoch_checkpoint(args, epoch, model, optimizer, loss_scaler)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
            knn_stats = knn(model)
            logger.info("k-NN after epoch %d: %s", epoch, ", ".join(f"{k} {v:.2f}" for k, v in knn_stats.items()))
            log_stats.update(knn_stats)
            if log_writer is not None:
                for key, value in knn_stats.items():
                    log_writer.add_scalar(f"knn/{key}", value, epoch)
        if vis is not None and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            vis(model, epoch, log_writer)
        log_epoch(args, log_writer, log_stats, {"train": (data_loader, True)}, device)
        stop_if_preempted(args, epoch, control)
    finish_training(log_writer, start_time)
    return train_stats
