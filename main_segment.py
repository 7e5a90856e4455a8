"""Semantic segmentation: UperNet on the MAE ViT or the MixMIM encoder, on ADE20K (the recipe of MAE's Table 5, run
with BEiT's mmseg code), and ``--eval`` of trained segmentation checkpoints.

    torchrun --nproc_per_node=8 main_segment.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --rel_pos_bias --data_path ADEChallengeData2016 --output_dir out/ade_vit_b ...
    python main_segment.py --eval --resume out/ade_vit_b/checkpoint-9.pth --model vit_base_patch16 ...

Training is counted in iterations (``--iters``, mmseg's IterBasedRunner); an epoch of this script is ``--eval_freq``
iterations, each ending with a checkpoint, an evaluation (mIoU, mAcc, aAcc) and a line in ``log.txt``
(``engine_segment.py``).
"""

import argparse
import logging
import math

import torch
from torch.utils.data import Dataset

from engine_segment import SegmentationLoss, evaluate, fit, json_safe, scalar_stats, write_eval_json
from model_table import compile_model, resolve_classifier_name
from models_segment import build_segmenter, load_backbone, param_groups_segment
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.checkpoint import load_resume, saved_args_of
from util.cli import add_runtime_args, run_cli, validate_common_args
from util.data_stats import add_data_args, check_data_args, resolve_data_stats
from util.dist import is_main_process, wrap_ddp
from util.errors import UsageError
from util.files import append_log_line, check_output_dir
from util.run import open_outputs, start_run
from util.seg_datasets import (
    IGNORE_INDEX,
    EvalPipeline,
    SegmentationFolder,
    TrainPipeline,
    segmentation_train_loader,
    segmentation_val_loader,
)

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM semantic segmentation (UperNet)", add_help=False)
    parser.add_argument("--batch_size", default=2, type=int, help="crops per GPU per step (recipe: 2 x 8 GPUs = 16)")
    parser.add_argument("--iters", default=160000, type=int, help="training iterations (optimizer updates)")
    parser.add_argument(
        "--eval_freq",
        default=16000,
        type=int,
        help="evaluate, checkpoint and log every N iterations (an epoch of this script)",
    )
    parser.add_argument(
        "--accum_iter",
        default=1,
        type=int,
        help="steps per iteration (gradient accumulation: the recipe's batch of 16 on fewer GPUs)",
    )

    # Model parameters
    parser.add_argument(
        "--model",
        default="vit_base_patch16",
        type=str,
        metavar="MODEL",
        help="the encoder: a classifier or pretraining name of either family (vit_*, mixmim_*)",
    )
    parser.add_argument(
        "--input_size", default=512, type=int, help="crop side: training crops and the sliding window of the evaluation"
    )
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="Drop path rate (default: 0.1)")
    parser.add_argument(
        "--rel_pos_bias",
        action="store_true",
        help="ViT: BEiT's relative position bias in every block, zero at first (MAE's transfer)",
    )
    parser.add_argument(
        "--head_channels",
        default=None,
        type=int,
        help="UperNet's width (default: the ViT's width, as BEiT's configs; 512 for MixMIM)",
    )

    # Optimizer parameters
    parser.add_argument(
        "--clip_grad", type=float, default=None, metavar="NORM", help="Clip gradient norm (default: None, no clipping)"
    )
    parser.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        metavar="LR",
        help="AdamW learning rate for the whole batch, not scaled with it (default: 1e-4)",
    )
    parser.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay from ELECTRA/BEiT")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="the poly schedule's final lr")
    parser.add_argument("--warmup_iters", type=int, default=1500, metavar="N", help="iterations of linear warmup")
    parser.add_argument("--warmup_ratio", type=float, default=1e-6, help="the warmup's first lr, over --lr")

    # Dataset parameters
    parser.add_argument(
        "--data_path",
        default="data/ade/ADEChallengeData2016",
        type=str,
        help="images/{training,validation}/ and annotations/{training,validation}/ (the ADE20K release)",
    )
    parser.add_argument(
        "--nb_classes",
        default=150,
        type=int,
        help="classes: annotation values 1..N (0 and 255 are not scored); 150 for ADE20K",
    )
    parser.add_argument(
        "--img_scale",
        default=None,
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        help="mmseg's img_scale: training resizes to it times 0.5-2, evaluation to it (default: "
        "4 x --input_size and --input_size, 2048 512)",
    )
    parser.add_argument(
        "--slide_stride",
        default=None,
        type=int,
        help="the evaluation's window stride (default: 2/3 of --input_size, 341 for 512)",
    )
    parser.add_argument("--finetune", default="", help="the encoder's weights: a pretraining or fine-tuned checkpoint")
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
    parser.add_argument(
        "--eval",
        action="store_true",
        help="evaluate the --resume checkpoint only (mIoU, mAcc, aAcc to output_dir/segment_eval.json and log.txt)",
    )
    parser.add_argument("--num_workers", default=4, type=int)
    parser.add_argument(
        "--pin_mem",
        action="store_true",
        help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.",
    )
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True, start_epoch=0)  # start_epoch: set by --resume
    parser.add_argument(
        "--save_freq",
        default=1,
        type=int,
        help="write checkpoint-{epoch}.pth every N epochs (of --eval_freq iterations) and at the "
        "last one (checkpoint-last.pth is written every epoch)",
    )

    add_data_args(parser)
    add_runtime_args(parser, port=29533)
    return parser


def resolve_args(args: argparse.Namespace) -> None:
    """The registered classifier name, the epochs of ``--eval_freq`` iterations, and the defaults that follow the
    crop size (``--img_scale``, ``--slide_stride``)."""
    args.model_name = resolve_classifier_name(args.model)
    args.epochs = math.ceil(args.iters / args.eval_freq) if args.iters > 0 and args.eval_freq > 0 else 0
    if args.img_scale is None:
        args.img_scale = [4 * args.input_size, args.input_size]
    if args.slide_stride is None:
        args.slide_stride = max(1, args.input_size * 2 // 3)


def check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "eval_freq", "input_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    resolve_args(args)
    if args.eval and args.finetune:
        raise UsageError(f"--eval evaluates the --resume checkpoint and would not load --finetune {args.finetune}: "
                         "pass a trained segmentation checkpoint as --resume")  # fmt: skip
    if args.nb_classes >= IGNORE_INDEX:
        raise UsageError(f"--nb_classes {args.nb_classes}: at most {IGNORE_INDEX - 1}, since label {IGNORE_INDEX} is "
                         "the ignored one")  # fmt: skip
    if args.head_channels is not None and args.head_channels < 1:
        raise UsageError(f"--head_channels must be at least 1, got {args.head_channels}")
    if not args.lr > 0 or not 0 <= args.min_lr <= args.lr:
        raise UsageError(f"--lr must be positive and --min_lr in [0, --lr], got {args.lr} and {args.min_lr}")
    if not 0 < args.layer_decay <= 1 or not 0 <= args.drop_path < 1 or args.weight_decay < 0:
        raise UsageError(f"--layer_decay must be in (0, 1], --drop_path in [0, 1) and --weight_decay >= 0, got "
                         f"{args.layer_decay}, {args.drop_path} and {args.weight_decay}")  # fmt: skip
    if not args.eval and args.batch_size < 2 and not (args.distributed and args.device.startswith("cuda")):
        raise UsageError(f"--batch_size {args.batch_size}: UperNet's BatchNorm needs at least 2 crops per process "
                         "(per step on GPUs, where SyncBatchNorm pools the processes)")  # fmt: skip
    if args.warmup_iters < 0 or not 0 < args.warmup_ratio <= 1:
        raise UsageError(f"--warmup_iters must be >= 0 and --warmup_ratio in (0, 1], got {args.warmup_iters} and "
                         f"{args.warmup_ratio}")  # fmt: skip
    if not 0 < args.slide_stride <= args.input_size:
        raise UsageError(f"--slide_stride must be in [1, --input_size {args.input_size}], got {args.slide_stride}")
    if min(args.img_scale) < 1:
        raise UsageError(f"--img_scale must be positive, got {' '.join(map(str, args.img_scale))}")
    if args.in_chans != 3:
        raise UsageError(f"--in_chans {args.in_chans}: segmentation reads RGB images (PhotoMetricDistortion's hue and "
                         "saturation need them)")  # fmt: skip
    if args.skip_bad_images:
        raise UsageError("--skip_bad_images is for the image-folder scripts: an unreadable pair stops segmentation "
                         "with its name")  # fmt: skip
    validate_common_args(args)
    check_data_args(args)
    if args.eval and args.output_dir:  # the evaluation's JSON goes there
        check_output_dir(args.output_dir)
    with torch.device("meta"):  # a model or crop size that cannot be built fails before the data is read
        build_segmenter(args.model_name, 1, args.input_size, args.in_chans, 0.0, args.rel_pos_bias, args.head_channels)


def check_resume_schedule(args: argparse.Namespace) -> None:
    """A run resumes with the ``--eval_freq`` its checkpoint was written with: the checkpoint's epoch (and step
    inside it) counts iterations in epochs of that many."""
    if not args.resume or args.eval:
        return
    saved = saved_args_of(args.resume).get("eval_freq")
    if saved is not None and saved != args.eval_freq:
        raise UsageError(f"checkpoint {args.resume} was written with --eval_freq {saved}, this run has "
                         f"--eval_freq {args.eval_freq}: resume with the same")  # fmt: skip


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999) with layer-wise lr decay (``param_groups_segment``); fused on CUDA."""
    groups = param_groups_segment(model, args.weight_decay, args.layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True if device.type == "cuda" else None)


def main(args: argparse.Namespace, dataset_train: Dataset | None = None, dataset_val: Dataset | None = None) -> dict:
    """Train (or with ``--eval`` only evaluate) a segmenter; returns the last evaluation (``engine_segment.evaluate``:
    mIoU, mAcc, aAcc in percent, IoU / Acc per class).

    ``dataset_train`` / ``dataset_val``: (image, label) datasets to use instead of ``--data_path``'s (their items go
    to the model as they are: a normalised (3, S, S) crop and its (S, S) labels; an image of any size and its labels
    for evaluation).
    """
    device = start_run(args, check_args, writes=not args.eval)
    if args.eval and not args.resume:
        logger.warning("--eval without --resume evaluates a randomly initialised model")
    check_resume_schedule(args)

    if dataset_train is None and not args.eval:
        dataset_train = SegmentationFolder(args.data_path, "train", args.nb_classes)  # its pipeline after the stats
    args.mean, args.std = resolve_data_stats(args, dataset_train if hasattr(dataset_train, "raw") else None)
    if isinstance(dataset_train, SegmentationFolder):
        dataset_train.transform = TrainPipeline(args.input_size, args.img_scale, args.mean, args.std)
    if dataset_val is None:
        dataset_val = SegmentationFolder(
            args.data_path, "val", args.nb_classes, EvalPipeline(args.img_scale, args.mean, args.std)
        )
    for dataset in (dataset_train, dataset_val):  # annotations with nothing scored: stop before any training
        if isinstance(dataset, SegmentationFolder):
            dataset.check_scored()
    data_loader_val = segmentation_val_loader(dataset_val, args, device)

    model = build_segmenter(
        args.model_name, args.nb_classes, args.input_size, args.in_chans, args.drop_path, args.rel_pos_bias,
        args.head_channels, layer_norm_eps=args.layer_norm_eps,
    )  # fmt: skip
    if args.finetune:
        load_backbone(model, args.finetune)
    if args.distributed and device.type == "cuda":  # mmseg's SyncBN: batch statistics over all GPUs
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.distributed:
        logger.warning("BatchNorm statistics are per process: torch's SyncBatchNorm runs on GPUs only")
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model = %s", model_without_ddp)
    logger.info("number of params (M): %.2f", n_parameters / 1.0e6)
    logger.info("lr: %.2e for the batch of %d (not scaled with it)", args.lr,
                args.batch_size * args.accum_iter * args.world_size)  # fmt: skip

    model = wrap_ddp(model, args)
    if args.compile:
        model = compile_model(model, args.compile_mode)
    optimizer = build_optimizer(model_without_ddp, args, device)
    loss_scaler = NativeScaler(device, enabled=args.amp == "fp16")
    position = load_resume(args, model_without_ddp, optimizer, loss_scaler)  # inside an epoch, or None

    if args.eval:
        stats = evaluate(
            data_loader_val, model_without_ddp, args.nb_classes, args.input_size, args.slide_stride, device,
            args.amp, args.print_freq,
        )  # fmt: skip
        write_eval_json(args.output_dir, stats, checkpoint=args.resume)
        if args.output_dir and is_main_process():
            append_log_line(args.output_dir, {**{f"test_{k}": json_safe(v) for k, v in scalar_stats(stats).items()},
                                              "checkpoint": args.resume})  # fmt: skip
        return stats

    data_loader_train = segmentation_train_loader(dataset_train, args, device)
    log_writer = open_outputs(args)
    return fit(
        args, model, model_without_ddp, SegmentationLoss(), optimizer, loss_scaler, data_loader_train,
        data_loader_val, n_parameters, device, log_writer, position,
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM semantic segmentation", parents=[get_args_parser()]), main)
