"""Linear probing: a BatchNorm (no affine) + linear head on frozen pretrained features, trained with LARS.

ViT: the cls token (``--cls_token``, default) or pooled patch tokens (``--global_pool``); MixMIM: its pooled
last-stage features. Example (official recipe, 4 nodes x 8 GPUs):

    torchrun ... main_linprobe.py --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth \
        --batch_size 512 --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval --data_path /imagenet
"""

import argparse
import logging
import os

import torch
from torch.utils.data import Dataset

from engine_finetune import evaluate, fit
from model_table import (
    add_probe_head,
    build_classifier,
    check_buildable,
    compile_model,
    family_of,
    resolve_classifier_name,
)
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.checkpoint import load_pretrained, load_resume
from util.cli import add_input_size_arg, add_nb_classes_arg, add_runtime_args, run_cli, validate_common_args
from util.data_stats import add_data_args, check_data_args
from util.datasets import (
    eval_transform,
    image_folder,
    linprobe_transform,
    resolve_num_classes,
    train_folder_and_stats,
    train_loader,
    val_loader,
)
from util.dist import wrap_ddp
from util.errors import UsageError
from util.optim import linprobe_optimizer, scaled_lr
from util.run import open_outputs, start_run

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM linear probing for image classification", add_help=False)
    parser.add_argument(
        "--batch_size",
        default=512,
        type=int,
        help="Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus",
    )
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument(
        "--accum_iter",
        default=1,
        type=int,
        help="Accumulate gradient iterations (for increasing the effective batch size under memory constraints)",
    )

    # Model parameters
    parser.add_argument(
        "--model",
        default="vit_large_patch16",
        type=str,
        metavar="MODEL",
        help="Name of model to train (vit_* or mixmim_*)",
    )
    add_input_size_arg(parser, help="images input size (official: fixed 224)")

    # Optimizer parameters
    parser.add_argument(
        "--weight_decay", type=float, default=0, help="weight decay (default: 0 for linear probe following MoCo v1)"
    )
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    parser.add_argument(
        "--blr",
        type=float,
        default=0.1,
        metavar="LR",
        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256",
    )
    parser.add_argument(
        "--min_lr", type=float, default=0.0, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0"
    )
    parser.add_argument("--warmup_epochs", type=int, default=10, metavar="N", help="epochs to warmup LR")

    # * Finetuning params
    parser.add_argument("--finetune", default="", help="finetune from checkpoint")
    parser.add_argument("--global_pool", action="store_true")
    parser.set_defaults(global_pool=False)
    parser.add_argument(
        "--cls_token",
        action="store_false",
        dest="global_pool",
        help="Use class token instead of global pool for classification (ViT)",
    )

    # Dataset parameters
    parser.add_argument(
        "--data_path",
        default="/datasets01/imagenet_full_size/061417/",
        type=str,
        help="dataset path (an ImageFolder with train/ and val/)",
    )
    add_nb_classes_arg(parser)
    parser.add_argument("--output_dir", default="./output_dir", help="path where to save, empty for no saving")
    parser.add_argument(
        "--log_dir", default=None, help="path where to tensorboard log (default: --output_dir; '': none)"
    )
    parser.add_argument(
        "--device", default=None, help="device to use for training / testing (default: cuda if available, else cpu)"
    )
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument(
        "--resume", default="", help="resume from checkpoint: a path, or 'auto' for the newest one in output_dir"
    )
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true", help="Perform evaluation only")
    parser.add_argument(
        "--dist_eval",
        action="store_true",
        default=False,
        help="Enabling distributed evaluation (recommended during training for faster monitor",
    )
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument(
        "--pin_mem",
        action="store_true",
        help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.",
    )
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument(
        "--save_freq",
        default=1,
        type=int,
        help="write checkpoint-{epoch}.pth every N epochs and at the last one (official: every "
        "epoch); checkpoint-last.pth is written every epoch",
    )

    add_data_args(parser)
    add_runtime_args(parser, port=29531)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.eval and args.finetune:  # the official script ignores --finetune with --eval
        raise UsageError(
            f"--eval evaluates the --resume checkpoint (a trained probe) and would not load --finetune "
            f"{args.finetune}: pass --eval --resume with the linear probe's checkpoint"
        )
    validate_common_args(args)
    args.model_name = resolve_classifier_name(args.model)
    check_data_args(args)
    check_buildable(args.model_name, args.input_size, args.in_chans)


def main(
    args: argparse.Namespace, dataset_train: Dataset | None = None, dataset_val: Dataset | None = None
) -> dict[str, float]:
    """Train a linear probe (or with ``--eval`` only evaluate one); returns the last test stats.

    ``dataset_train`` / ``dataset_val``: (image, label) datasets to use instead of the ImageFolders under
    ``--data_path`` (their images go to the model as they are: normalised float tensors).
    """
    device = start_run(args, check_args, writes=not args.eval)
    dataset_train, args.mean, args.std = train_folder_and_stats(
        args, dataset_train, lambda m, s: linprobe_transform(args.input_size, args.in_chans, m, s), build=not args.eval
    )
    if dataset_val is None:
        transform = eval_transform(args.input_size, args.in_chans, args.mean, args.std)
        dataset_val = image_folder(os.path.join(args.data_path, "val"), transform, args.in_chans)
    args.nb_classes = resolve_num_classes(args, dataset_train, dataset_val)
    data_loader_val = val_loader(dataset_val, args, device)
    data_loader_train = None
    if not args.eval:
        data_loader_train = train_loader(dataset_train, args, device)

    mixmim = family_of(args.model_name) == "mixmim"
    if mixmim:  # --cls_token is the probe's default, not a choice made for MixMIM
        logger.info("features: the pooled last stage (MixMIM; --cls_token and --global_pool choose for ViTs only)")
    global_pool = None if mixmim else args.global_pool
    model = build_classifier(
        args.model_name, args.input_size, args.nb_classes, 0.0, global_pool, device, args.in_chans, args.layer_norm_eps
    )
    if args.finetune:
        load_pretrained(model, args.finetune, head_init_std=0.01)  # head init following MoCo v3
    add_probe_head(model)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model = %s", model_without_ddp)
    logger.info("number of params (M): %.2f", n_parameters / 1.0e6)
    args.lr = scaled_lr(args)

    model = wrap_ddp(model, args)
    if args.compile:
        model = compile_model(model, args.compile_mode)
    optimizer = linprobe_optimizer(model_without_ddp.head, args.lr, args.weight_decay)
    logger.info("optimizer: %s", optimizer)
    loss_scaler = NativeScaler(device, enabled=args.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss()
    position = load_resume(args, model_without_ddp, optimizer, loss_scaler)  # inside an epoch, or None

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, args.amp, args.print_freq)
        logger.info("Accuracy of the network on the %d test images: %.1f%%", len(dataset_val), test_stats["acc1"])
        return test_stats

    log_writer = open_outputs(args)
    return fit(
        args,
        model,
        criterion,
        optimizer,
        loss_scaler,
        None,
        data_loader_train,
        data_loader_val,
        n_parameters,
        device,
        max_norm=None,
        log_writer=log_writer,
        position=position,
    )


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM linear probing", parents=[get_args_parser()]), main)
