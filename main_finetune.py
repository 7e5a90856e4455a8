"""Fine-tuning for image classification (ViT from MAE, or MixMIM), and ``--eval`` of fine-tuned checkpoints.

    torchrun --nproc_per_node=8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --epochs 100 --blr 5e-4 --layer_decay 0.65 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --dist_eval ...
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --batch_size 16 ...
"""

import argparse
import logging

import torch
from torch.utils.data import Dataset

from engine_finetune import evaluate, fit
from model_table import build_classifier, check_buildable, compile_model, family_defaults, resolve_classifier_name
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.checkpoint import load_pretrained, load_resume
from util.cli import add_input_size_arg, add_nb_classes_arg, add_runtime_args, run_cli, validate_common_args
from util.data_stats import add_data_args, check_data_args
from util.datasets import (
    build_dataset,
    finetune_transform,
    resolve_num_classes,
    train_folder_and_stats,
    train_loader,
    val_loader,
)
from util.dist import wrap_ddp
from util.errors import UsageError
from util.freeze import freeze_all_but_last_blocks
from util.mixup import build_criterion, build_mixup
from util.optim import finetune_optimizer, scaled_lr
from util.robustness import EVAL_SETS, eval_set_parts, evaluate_eval_set
from util.run import open_outputs, start_run

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM fine-tuning for image classification", add_help=False)
    parser.add_argument(
        "--batch_size",
        default=64,
        type=int,
        help="Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus",
    )
    parser.add_argument("--epochs", default=50, type=int)
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
    add_input_size_arg(parser)
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="Drop path rate (default: 0.1)")

    # Optimizer parameters
    parser.add_argument(
        "--clip_grad", type=float, default=None, metavar="NORM", help="Clip gradient norm (default: None, no clipping)"
    )
    parser.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    parser.add_argument(
        "--blr",
        type=float,
        default=1e-3,
        metavar="LR",
        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256",
    )
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    parser.add_argument(
        "--min_lr", type=float, default=1e-6, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0"
    )
    parser.add_argument("--warmup_epochs", type=int, default=5, metavar="N", help="epochs to warmup LR")

    # Augmentation parameters
    parser.add_argument(
        "--color_jitter",
        type=float,
        default=None,
        metavar="PCT",
        help="Color jitter factor (enabled only when not using Auto/RandAug)",
    )
    parser.add_argument(
        "--aa",
        type=str,
        default="rand-m9-mstd0.5-inc1",
        metavar="NAME",
        help='Use AutoAugment policy. "v0" or "original". (default: rand-m9-mstd0.5-inc1)',
    )
    parser.add_argument("--smoothing", type=float, default=0.1, help="Label smoothing (default: 0.1)")

    # * Random Erase params
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob (default: 0.25)")
    parser.add_argument("--remode", type=str, default="pixel", help='Random erase mode (default: "pixel")')
    parser.add_argument("--recount", type=int, default=1, help="Random erase count (default: 1)")
    parser.add_argument(
        "--resplit", action="store_true", default=False, help="Do not random erase first (clean) augmentation split"
    )

    # * Mixup params
    parser.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0.")
    parser.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0.")
    parser.add_argument(
        "--cutmix_minmax",
        type=float,
        nargs="+",
        default=None,
        help="cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)",
    )
    parser.add_argument(
        "--mixup_prob",
        type=float,
        default=1.0,
        help="Probability of performing mixup or cutmix when either/both is enabled",
    )
    parser.add_argument(
        "--mixup_switch_prob",
        type=float,
        default=0.5,
        help="Probability of switching to cutmix when both mixup and cutmix enabled",
    )
    parser.add_argument(
        "--mixup_mode",
        type=str,
        default="batch",
        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"',
    )

    # * Finetuning params
    parser.add_argument("--finetune", default="", help="finetune from checkpoint")
    parser.add_argument("--global_pool", action="store_true")
    parser.set_defaults(global_pool=True)
    parser.add_argument(
        "--cls_token",
        action="store_false",
        dest="global_pool",
        help="Use class token instead of global pool for classification (ViT)",
    )
    parser.add_argument(
        "--trainable_blocks",
        default=None,
        type=int,
        metavar="K",
        help="partial fine-tuning (MAE paper, Figure 9): train the last K transformer blocks, the final norm and "
        "the head, freeze the rest (0: norm and head only; default: everything trains)",
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
        "--eval_set",
        default=None,
        choices=EVAL_SETS,
        help="with --eval: the set to evaluate, --data_path its root (imagenet: data_path/val, as without the flag; "
        "ImageNet-A/R are scored on their 200 classes, ImageNet-C per corruption and severity, with mCE); the "
        "results also go to output_dir/eval_{set}.json and log.txt",
    )
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
        default=None,
        type=int,
        help="write checkpoint-{epoch}.pth every N epochs and at the last one; default: as the "
        "family's official script, every epoch for MAE, every 5 for MixMIM "
        "(checkpoint-last.pth is written every epoch)",
    )

    add_data_args(parser)
    add_runtime_args(parser, port=29530)
    return parser


def resolve_args(args: argparse.Namespace) -> None:
    """The registered classifier name, and the model family's official defaults for the flags left unset."""
    args.model_name = resolve_classifier_name(args.model)
    if args.save_freq is None:
        args.save_freq = family_defaults(args.model_name).finetune_save_freq


def check_augmentation_args(args: argparse.Namespace) -> None:
    """One-line errors for the augmentation flags timm would refuse with a bare assertion (or none) later."""
    if args.remode not in ("pixel", "rand", "const"):  # timm's RandomErasing modes
        raise UsageError(f"--remode must be pixel, rand or const, got {args.remode}")
    if args.recount < 1:
        raise UsageError(f"--recount must be at least 1, got {args.recount}")
    if args.cutmix_minmax is not None:
        values = args.cutmix_minmax
        if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
            raise UsageError(
                f"--cutmix_minmax takes MIN MAX with 0 < MIN <= MAX <= 1, got {' '.join(map(str, values))}"
            )
    if not args.eval:  # --aa: timm parses the policy string when the transform is built
        try:
            finetune_transform(args, (0.5,) * args.in_chans, (0.5,) * args.in_chans)
        except (AssertionError, ValueError, KeyError) as e:
            reason = str(e) or type(e).__name__
            raise UsageError(f"--aa {args.aa}: timm cannot build this augmentation ({reason})") from e


def check_args(args: argparse.Namespace) -> None:
    resolve_args(args)
    if args.eval and args.finetune:  # the official script ignores --finetune with --eval
        raise UsageError(
            f"--eval evaluates the --resume checkpoint and would not load --finetune {args.finetune}: for a "
            f"fine-tuned checkpoint pass --eval --resume {args.finetune}; a pretraining one has no trained head "
            f"(main_knn.py or main_linprobe.py evaluate its features)"
        )
    if args.eval and args.trainable_blocks is not None:
        raise UsageError("--trainable_blocks chooses what fine-tuning trains; --eval trains nothing")
    if args.eval_set is not None and not args.eval:
        raise UsageError(f"--eval_set {args.eval_set} chooses the set --eval evaluates: add --eval")
    validate_common_args(args)
    check_augmentation_args(args)
    check_data_args(args)
    check_buildable(args.model_name, args.input_size, args.in_chans)
    if args.trainable_blocks is not None:  # a K the model does not have fails before the data is read
        with torch.device("meta"):
            model = build_classifier(args.model_name, args.input_size, 1, 0.0)
        freeze_all_but_last_blocks(model, args.trainable_blocks)


def main(
    args: argparse.Namespace, dataset_train: Dataset | None = None, dataset_val: Dataset | None = None
) -> dict[str, float]:
    """Fine-tune (or with ``--eval`` only evaluate); returns the last test stats (acc1, acc5, loss); with
    ``--eval_set``, the results of ``util.robustness.evaluate_eval_set``.

    ``dataset_train`` / ``dataset_val``: (image, label) datasets to use instead of the ImageFolders under
    ``--data_path`` (their images go to the model as they are: normalised float tensors).
    """
    device = start_run(args, check_args, writes=not args.eval)
    if args.eval and not args.resume:
        logger.warning("--eval without --resume evaluates a randomly initialised model")

    dataset_train, args.mean, args.std = train_folder_and_stats(
        args, dataset_train, lambda m, s: finetune_transform(args, m, s), build=not args.eval
    )
    if args.eval_set and dataset_val is not None:
        raise UsageError(f"--eval_set {args.eval_set} reads its set from --data_path: pass no validation set to main")
    eval_parts = eval_set_parts(args) if args.eval_set else None  # {name: dataset} (util/robustness.py)
    if dataset_val is None:
        dataset_val = next(iter(eval_parts.values())) if eval_parts else build_dataset(is_train=False, args=args)
    args.nb_classes = resolve_num_classes(args, dataset_train, dataset_val)
    data_loader_val = val_loader(dataset_val, args, device)
    if not args.eval:
        data_loader_train = train_loader(dataset_train, args, device)
    mixup_fn = build_mixup(args)

    model = build_classifier(
        args.model_name,
        args.input_size,
        args.nb_classes,
        args.drop_path,
        args.global_pool,
        device,
        args.in_chans,
        args.layer_norm_eps,
    )
    if args.finetune:
        load_pretrained(model, args.finetune, head_init_std=2e-5)
    if args.trainable_blocks is not None:  # before the optimizer and DDP, which then see the trainable ones only
        freeze_all_but_last_blocks(model, args.trainable_blocks)
    model.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model = %s", model_without_ddp)
    logger.info("number of params (M): %.2f", n_parameters / 1.0e6)
    args.lr = scaled_lr(args)

    model = wrap_ddp(model, args)
    if args.compile:
        model = compile_model(model, args.compile_mode)
    optimizer = finetune_optimizer(model_without_ddp, args.lr, args.weight_decay, args.layer_decay, device)
    loss_scaler = NativeScaler(device, enabled=args.amp == "fp16")
    criterion = build_criterion(args, mixup_fn)
    logger.info("criterion = %s", criterion)
    position = load_resume(args, model_without_ddp, optimizer, loss_scaler)  # inside an epoch, or None

    if args.eval and eval_parts:
        return evaluate_eval_set(
            args,
            eval_parts,
            lambda dataset, subset: evaluate(
                val_loader(dataset, args, device), model, device, args.amp, args.print_freq, subset
            ),
        )
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
        mixup_fn,
        data_loader_train,
        data_loader_val,
        n_parameters,
        device,
        max_norm=args.clip_grad,
        log_writer=log_writer,
        position=position,
    )


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM fine-tuning", parents=[get_args_parser()]), main)
