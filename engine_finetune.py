"""One epoch of supervised training (fine-tuning or linear probing) and evaluation with top-1/top-5."""

import argparse
import logging
import time
from collections.abc import Callable, Iterable

import torch
from timm.utils import accuracy
from torch.utils.tensorboard import SummaryWriter

import util.lr_sched as lr_sched
from util import faults
from util.amp import autocast
from util.dist import get_world_size, maybe_no_sync
from util.metrics import MetricLogger, SmoothedValue, StepMetrics
from util.preemption import EpochControl
from util.run import finish_training, log_epoch, save_epoch_checkpoint, start_epoch, stop_if_preempted

logger = logging.getLogger(__name__)


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler,
    max_norm: float | None = None,
    mixup_fn: Callable | None = None,
    log_writer: SummaryWriter | None = None,
    args: argparse.Namespace | None = None,
    control: EpochControl | None = None,
) -> dict[str, float]:
    """Train for one pass over ``data_loader``; returns the epoch averages (loss, lr (the largest), grad_norm)."""
    model.train(True)
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter = args.accum_iter
    start = control.start_step if control is not None else 0  # an epoch resumed inside starts there
    steps = start + len(data_loader)
    batches = control.batches(data_loader) if control is not None else data_loader
    params = [p for p in model.parameters() if p.requires_grad]

    metrics = StepMetrics(metric_logger, device, epoch, steps, args.print_freq, args.amp, log_writer, "loss", control)
    optimizer.zero_grad(set_to_none=True)
    kill_at = faults.step_killer()
    images_per_step = args.batch_size * get_world_size()
    for step, (samples, targets) in enumerate(
        metric_logger.log_every(batches, args.print_freq, header, images_per_step, first_step=start), start=start
    ):
        if kill_at is not None:  # tests only (MAE_FAULT_INJECT)
            kill_at(epoch * steps + step)
        if step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        max_lr = max(group["lr"] for group in optimizer.param_groups)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (step + 1) % accum_iter == 0

        with maybe_no_sync(model, sync=update):
            with autocast(device, args.amp):
                outputs = model(samples)
                loss = criterion(outputs, targets)
            norm = loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=params, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
        metrics.push(step, loss, norm, max_lr, update)  # reads back to the host only at the steps that log
        if control is not None:
            control.after_step(step, update, steps)  # a checkpoint inside the epoch, if one is due

    metrics.flush()  # no-op after the last step; covers a loader that ended early
    metric_logger.synchronize_between_processes(device)
    logger.info("Averaged stats: %s", metric_logger)
    return metric_logger.global_averages()


@torch.no_grad()
def evaluate(
    data_loader: Iterable,
    model: torch.nn.Module,
    device: torch.device,
    amp: str = "none",
    print_freq: int = 10,
    class_subset: torch.Tensor | None = None,
) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) over ``data_loader``, averaged over all processes.

    ``class_subset``: sorted output indices (K,) to score on alone (ImageNet-A/R: their 200 classes); every target
    must be one of them. The loss and the top-k are then those of the K logits.
    """
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = MetricLogger()
    model.eval()
    if class_subset is not None:
        class_subset = class_subset.to(device)
    for images, target in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
            if class_subset is not None:  # a target's position in the sorted subset is its label among the K
                output, target = output[:, class_subset], torch.searchsorted(class_subset, target)  # (B, K), (B,)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
        n = images.shape[0]
        metric_logger.meters["loss"].update(loss.item(), n=n)
        metric_logger.meters["acc1"].update(acc1.item(), n=n)
        metric_logger.meters["acc5"].update(acc5.item(), n=n)
    metric_logger.synchronize_between_processes(device)
    stats = metric_logger.global_averages()
    logger.info("* Acc@1 %.3f Acc@5 %.3f loss %.3f", stats["acc1"], stats["acc5"], stats["loss"])
    return stats


def fit(
    args: argparse.Namespace,
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_scaler,
    mixup_fn: Callable | None,
    data_loader_train: Iterable,
    data_loader_val: Iterable,
    n_parameters: int,
    device: torch.device,
    max_norm: float | None,
    log_writer: SummaryWriter | None = None,
    position: dict | None = None,
) -> dict[str, float]:
    """The epochs of fine-tuning or linear probing from ``--start_epoch`` (at ``position``'s step when resumed
    inside it): train, checkpoint, evaluate, log; returns the last evaluation (acc1, acc5, loss)."""
    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    max_accuracy = 0.0
    test_stats: dict[str, float] = {}
    for epoch in range(args.start_epoch, args.epochs):
        control = start_epoch(args, data_loader_train, epoch, model, optimizer, loss_scaler, position)
        train_stats = train_one_epoch(
            model,
            criterion,
            data_loader_train,
            optimizer,
            device,
            epoch,
            loss_scaler,
            max_norm,
            mixup_fn,
            log_writer=log_writer,
            args=args,
            control=control,
        )
        save_epoch_checkpoint(args, epoch, model, optimizer, loss_scaler)

        test_stats = evaluate(data_loader_val, model, device, args.amp, args.print_freq)
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        logger.info(
            "Accuracy of the network on the %d test images: %.1f%% (max %.2f%%)",
            len(data_loader_val.dataset),
            test_stats["acc1"],
            max_accuracy,
        )
        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)

        log_stats = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch,
            "n_parameters": n_parameters,
        }
        loaders = {"train": (data_loader_train, True), "test": (data_loader_val, args.dist_eval)}
        log_epoch(args, log_writer, log_stats, loaders, device)
        stop_if_preempted(args, epoch, control)
    finish_training(log_writer, start_time)
    return test_stats
