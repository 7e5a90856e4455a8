"""Masked-image-modeling pretraining: MAE (``mae_vit_*``) and MixMIM (``mixmim_*``) on an ImageFolder.

Single process:   python main_pretrain.py --model mae_vit_base_patch16 --data_path /imagenet ...
One node:         torchrun --nproc_per_node=8 main_pretrain.py ...
SLURM:            srun ... python main_pretrain.py ...   (ranks from SLURM_PROCID / SLURM_NTASKS)
CPU:              python main_pretrain.py --device cpu ...  (gloo under torchrun)
"""

import argparse
import datetime
import logging
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from engine_pretrain import train_one_epoch
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.amp import resolve_amp
from util.checkpoint import load_pretrained, load_resume, resolve_resume, save_checkpoint
from util.cli import add_runtime_args, log_args, run_cli, save_args_json, validate_common_args
from util.datasets import image_folder, pretrain_transform, skipped_images, train_loader
from util.dist import get_rank, init_distributed_mode, is_main_process, wrap_ddp
from util.errors import UsageError
from util.files import append_log_line, check_output_dir
from util.models import (
    build_pretrain_model,
    check_buildable,
    compile_model,
    family_defaults,
    family_of,
    resolve_pretrain_name,
)
from util.optim import absolute_lr, pretrain_optimizer
from util.seeding import epoch_seed, seed_everything

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM pre-training", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int,
                        help="Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="Accumulate gradient iterations (for increasing the effective batch size under memory "
                             "constraints)")

    # Model parameters
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                        help="Name of model to train (mae_vit_* or mixmim_*)")
    parser.add_argument("--input_size", default=224, type=int, help="images input size")
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="Masking ratio (percentage of removed patches); default: the family's official one, "
                             "0.75 for MAE, 0.5 for MixMIM")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="Use (per-patch) normalized pixels as targets for computing loss")
    parser.set_defaults(norm_pix_loss=False)

    # Optimizer parameters
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                        help="Clip gradient norm (default: None, no clipping)")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR",
                        help="lower lr bound for cyclic schedulers that hit 0")
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N", help="epochs to warmup LR")

    # Dataset parameters
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="dataset path (an ImageFolder with train/)")
    parser.add_argument("--output_dir", default="./output_dir", help="path where to save, empty for no saving")
    parser.add_argument("--log_dir", default="./output_dir", help="path where to tensorboard log")
    parser.add_argument("--device", default=None,
                        help="device to use for training / testing (default: cuda if available, else cpu)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="",
                        help="resume from checkpoint: a path, or 'auto' for the newest one in output_dir")
    parser.add_argument("--finetune", default="", help="initialise from (part of) a checkpoint (MixMIM)")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true",
                        help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--save_freq", default=None, type=int,
                        help="write checkpoint-{epoch}.pth every N epochs and at the last one; default: as the "
                             "family's official script, 20 for MAE, 10 for MixMIM (checkpoint-last.pth is written "
                             "every epoch)")

    add_runtime_args(parser, port=29529)
    return parser


def resolve_args(args: argparse.Namespace) -> None:
    """The registered model name, and the model family's official defaults for the flags left unset."""
    args.model_name = resolve_pretrain_name(args.model)
    defaults = family_defaults(args.model_name)
    if args.mask_ratio is None:
        args.mask_ratio = defaults.mask_ratio
    if args.save_freq is None:
        args.save_freq = defaults.pretrain_save_freq


def validate_args(args: argparse.Namespace) -> None:
    """One-line errors for arguments that cannot work, before any work is done."""
    validate_common_args(args)
    if not 0.0 < args.mask_ratio < 1.0:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if family_of(args.model_name) == "mixmim" and args.batch_size < 2:
        raise UsageError("MixMIM mixes pairs of images within a batch: --batch_size must be at least 2")
    check_buildable(args.model_name, args.input_size)


def main(args: argparse.Namespace) -> dict[str, float]:
    """Pretrain as the arguments say; returns the last epoch's training averages."""
    init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    resolve_args(args)
    validate_args(args)
    check_output_dir(args.output_dir)
    check_output_dir(args.log_dir, "--log_dir")
    resolve_resume(args)
    log_args(args)

    seed_everything(args.seed + get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # uint8 images, normalised on the device by the engine
    dataset_train = image_folder(
        f"{args.data_path.rstrip('/')}/train", pretrain_transform(args.input_size, normalize=False)
    )
    data_loader_train = train_loader(dataset_train, args, device)

    model = build_pretrain_model(args.model_name, args.input_size, norm_pix_loss=args.norm_pix_loss)
    if args.finetune:
        load_pretrained(model, args.finetune, classifier=False)
    model.to(device)
    model_without_ddp = model
    logger.info("Model = %s", model_without_ddp)

    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    args.lr = absolute_lr(args.lr, args.blr, args.batch_size, args.accum_iter, args.world_size)
    logger.info("base lr: %.2e, actual lr: %.2e", args.lr * 256 / eff_batch_size, args.lr)
    logger.info("accumulate grad iterations: %d, effective batch size: %d", args.accum_iter, eff_batch_size)

    model = wrap_ddp(model, args)
    if args.compile:
        model = compile_model(model)

    optimizer = pretrain_optimizer(model_without_ddp, args.lr, args.weight_decay, device)
    logger.info("optimizer: %s", optimizer)
    loss_scaler = NativeScaler(device, enabled=args.amp == "fp16")
    load_resume(args, model_without_ddp, optimizer, loss_scaler)

    log_writer = None
    if is_main_process():
        if args.output_dir:
            save_args_json(args, args.output_dir)
        if args.log_dir:
            log_writer = SummaryWriter(log_dir=args.log_dir)

    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    train_stats: dict[str, float] = {}
    for epoch in range(args.start_epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch)
        seed_everything(epoch_seed(args.seed, get_rank(), epoch))
        train_stats = train_one_epoch(
            model, data_loader_train, optimizer, device, epoch, loss_scaler, log_writer=log_writer, args=args
        )
        numbered = epoch % args.save_freq == 0 or epoch + 1 == args.epochs
        save_checkpoint(args, epoch, model, optimizer, loss_scaler, numbered=numbered)

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if args.skip_bad_images:
            log_stats["train_skipped_images"] = skipped_images(data_loader_train, device)
        if args.output_dir and is_main_process():
            if log_writer is not None:
                log_writer.flush()
            append_log_line(args.output_dir, log_stats)

    if log_writer is not None:
        log_writer.close()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    return train_stats


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM pre-training", parents=[get_args_parser()]), main)
