"""Semantic segmentation: the loss, the poly schedule, one epoch of training, sliding-window evaluation, and fit.

An epoch here is ``--eval_freq`` iterations (mmseg's evaluation and checkpoint interval, 16,000 in the recipe), not
a pass over the data: each ends with a checkpoint, an evaluation and a line in ``log.txt``, as an epoch of the other
scripts, and the run is ``--iters`` iterations (``util/seg_datasets.py``'s ``IterationSampler`` reads the passes over
the data one after the other). An iteration is one optimizer update of ``--accum_iter`` steps.
"""

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from models_segment import slide_inference
from util import faults
from util.amp import autocast
from util.dist import get_world_size, is_dist_avail_and_initialized, is_main_process, maybe_no_sync
from util.files import write_text_atomic
from util.lr_sched import adjust_learning_rate_poly
from util.metrics import MetricLogger, SmoothedValue, StepMetrics
from util.preemption import EpochControl
from util.run import finish_training, log_epoch, save_epoch_checkpoint, start_epoch, stop_if_preempted
from util.seg_datasets import IGNORE_INDEX, no_scored_pixel
from util.seg_metrics import confusion_matrix, segmentation_metrics

logger = logging.getLogger(__name__)

AUX_WEIGHT = 0.4  # the auxiliary FCN head's loss weight in both recipes
EVAL_JSON = "segment_eval.json"


class SegmentationLoss(nn.Module):
    """mmseg's decode-head losses: each head's logits (B, K, h, w) upsampled bilinearly to the labels' (B, H, W),
    cross-entropy averaged over all pixels (ignored ones count as 0, as mmseg's ``avg_non_ignore=False``); the
    auxiliary head's weighted by ``aux_weight``."""

    def __init__(self, aux_weight: float = AUX_WEIGHT, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.aux_weight, self.ignore_index = aux_weight, ignore_index

    def head_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # in fp32, as mmseg's losses (force_fp32): a bf16 upsampling would round the logits first
        logits = F.interpolate(
            logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
        )  # (B, K, H, W)
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none").mean()

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor | None], target: torch.Tensor) -> torch.Tensor:
        logits, aux = outputs
        loss = self.head_loss(logits, target)
        if aux is not None:
            loss = loss + self.aux_weight * self.head_loss(aux, target)
        return loss


def epoch_iters(args: argparse.Namespace, epoch: int) -> tuple[int, int]:
    """The iterations [first, end) of ``epoch``: ``--eval_freq`` of them, the last epoch ending at ``--iters``."""
    first = epoch * args.eval_freq
    return first, min(first + args.eval_freq, args.iters)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler,
    max_norm: float | None = None,
    log_writer: SummaryWriter | None = None,
    args: argparse.Namespace | None = None,
    control: EpochControl | None = None,
) -> dict[str, float]:
    """Train the iterations of ``epoch`` (``epoch_iters``), ``--accum_iter`` steps each; returns the averages (loss,
    lr (the largest group's), grad_norm)."""
    model.train(True)
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    first_iter, end_iter = epoch_iters(args, epoch)
    header = f"Iterations [{first_iter}, {end_iter}):"
    accum_iter = args.accum_iter
    start = control.start_step if control is not None else 0  # an epoch resumed inside starts there
    steps = start + len(data_loader)
    batches = control.batches(data_loader) if control is not None else data_loader
    params = [p for p in model.parameters() if p.requires_grad]

    metrics = StepMetrics(
        metric_logger, device, epoch, steps, args.print_freq, args.amp, log_writer, "loss", control,
        x_axis=lambda step: first_iter + (step + 1) // accum_iter,  # iterations done, as the evaluation's scalars
    )  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    kill_at = faults.step_killer()
    images_per_step = args.batch_size * get_world_size()
    for step, (samples, targets) in enumerate(
        metric_logger.log_every(batches, args.print_freq, header, images_per_step, first_step=start), start=start
    ):
        if kill_at is not None:  # tests only (MAE_FAULT_INJECT): the global step, as the epochs were all full
            kill_at(epoch * args.eval_freq * accum_iter + step)
        if step % accum_iter == 0:
            adjust_learning_rate_poly(optimizer, first_iter + step // accum_iter, args)
        max_lr = max(group["lr"] for group in optimizer.param_groups)
        samples = samples.to(device, non_blocking=True)  # (B, 3, S, S)
        targets = targets.to(device, non_blocking=True)  # (B, S, S)
        update = (step + 1) % accum_iter == 0

        with maybe_no_sync(model, sync=update):
            with autocast(device, args.amp):
                loss = criterion(model(samples), targets)
            norm = loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=params, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
        metrics.push(step, loss, norm, max_lr, update)  # reads back to the host only at the steps that log
        if control is not None:
            control.after_step(step, update, steps)  # a checkpoint inside the epoch, if one is due

    metrics.flush()
    metric_logger.synchronize_between_processes(device)
    logger.info("Averaged stats: %s", metric_logger)
    return metric_logger.global_averages()


@torch.no_grad()
def evaluate(
    data_loader: Iterable,
    model: nn.Module,
    nb_classes: int,
    crop: int,
    stride: int,
    device: torch.device,
    amp: str = "none",
    print_freq: int = 20,
) -> dict:
    """mmseg's single-scale evaluation: sliding windows of ``crop`` every ``stride`` over each (resized) image, the
    logits resized bilinearly to the label's original size, their argmax scored against it. The (K, K) confusion
    matrices are summed over the images and the processes (each holds a shard); returns ``segmentation_metrics``
    (percent): mIoU, mAcc, aAcc, and IoU / Acc per class (nan for a class absent from the labels, and for IoU from
    the predictions too: left out of the means, as mmseg's). Labels without a single scored pixel are a one-line
    ``UsageError`` naming their folder: every metric would be 0 / 0."""
    model.eval()
    conf = torch.zeros(nb_classes, nb_classes, dtype=torch.int64, device=device)
    metric_logger = MetricLogger()
    for images, labels in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)  # (1, 3, h, w): the resized image
        labels = labels.to(device, non_blocking=True)  # (1, H, W): the original size
        with autocast(device, amp):
            logits = slide_inference(model, images, nb_classes, crop, stride)  # (1, K, h, w)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1), labels, nb_classes, IGNORE_INDEX)
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(conf)
    conf = conf.cpu()
    if conf.sum() == 0:  # the same sum on every rank: all stop
        folder = getattr(getattr(data_loader, "dataset", None), "annotation_dir", None)
        raise no_scored_pixel(f"the annotations in {folder}" if folder else "the validation labels", nb_classes)
    stats = segmentation_metrics(conf)
    logger.info("* mIoU %.2f mAcc %.2f aAcc %.2f (%d classes)", stats["mIoU"], stats["mAcc"], stats["aAcc"], nb_classes)
    return stats


def scalar_stats(stats: dict) -> dict[str, float]:
    """mIoU, mAcc and aAcc of ``evaluate``'s result (for log.txt and TensorBoard)."""
    return {k: stats[k] for k in ("mIoU", "mAcc", "aAcc")}


def json_safe(value):
    """``value`` with every nan or infinite float (in a list too) as None: ``json.dumps`` would write a bare ``NaN``,
    which is not JSON."""
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_eval_json(output_dir: str, stats: dict, **extra) -> None:
    """``output_dir/segment_eval.json`` (main process): ``evaluate``'s metrics and ``extra`` (the checkpoint, the
    iteration), as valid JSON: the IoU / Acc of a class absent from the validation labels (nan, left out of mIoU /
    mAcc as mmseg's nan-mean) is null."""
    if not output_dir or not is_main_process():
        return
    record = {**extra, **{k: json_safe(v) for k, v in stats.items()}}
    write_text_atomic(Path(output_dir) / EVAL_JSON, json.dumps(record, indent=2) + "\n")


def fit(
    args: argparse.Namespace,
    model: nn.Module,
    model_without_ddp: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_scaler,
    data_loader_train: Iterable,
    data_loader_val: Iterable,
    n_parameters: int,
    device: torch.device,
    log_writer: SummaryWriter | None = None,
    position: dict | None = None,
) -> dict:
    """The epochs from ``--start_epoch`` (at ``position``'s step when resumed inside it): train ``--eval_freq``
    iterations, checkpoint, evaluate (on ``model_without_ddp``), log; returns the last evaluation."""
    logger.info("Start training for %d iterations (%d epochs of %d)", args.iters, args.epochs, args.eval_freq)
    start_time = time.time()
    test_stats: dict = {}
    best = 0.0
    for epoch in range(args.start_epoch, args.epochs):
        control = start_epoch(args, data_loader_train, epoch, model, optimizer, loss_scaler, position)
        train_stats = train_one_epoch(
            model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler, args.clip_grad, log_writer,
            args, control,
        )  # fmt: skip
        save_epoch_checkpoint(args, epoch, model, optimizer, loss_scaler)
        iteration = epoch_iters(args, epoch)[1]
        test_stats = evaluate(
            data_loader_val, model_without_ddp, args.nb_classes, args.input_size, args.slide_stride, device,
            args.amp, args.print_freq,
        )  # fmt: skip
        best = max(best, test_stats["mIoU"])
        logger.info("mIoU after %d iterations: %.2f (best %.2f)", iteration, test_stats["mIoU"], best)
        write_eval_json(args.output_dir, test_stats, iteration=iteration)
        if log_writer is not None:
            for k, v in scalar_stats(test_stats).items():
                log_writer.add_scalar(f"perf/test_{k}", v, iteration)
        log_stats = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in scalar_stats(test_stats).items()},
            "epoch": epoch,
            "iteration": iteration,
            "n_parameters": n_parameters,
        }
        log_stats = {k: json_safe(v) for k, v in log_stats.items()}  # log.txt's lines stay JSON
        log_epoch(args, log_writer, log_stats, {}, device)
        stop_if_preempted(args, epoch, control)
    finish_training(log_writer, start_time)
    return test_stats
