"""Weighted k-NN evaluation of frozen features (the DINO protocol) for any checkpoint of either family.

Pretraining or fine-tuned, ours or official: the encoder is built as the classifier of ``--model`` and loaded as
``--finetune`` would load it; its features (ViT: the cls token after the final norm, or ``--global_pool``; MixMIM:
the pooled last stage) of ``data_path/train`` and ``data_path/val`` (the evaluation transform) are L2-normalised,
and each validation image takes the label the ``k`` most similar training images vote for, weighted by
exp(cosine / ``--temperature``).

    python main_knn.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data_path /imagenet
    torchrun --nproc_per_node=8 main_knn.py --model mixmim_base --finetune checkpoint-599.pth --nb_knn 10 20 100
"""

import argparse
import json
import logging
import os
import time

import torch
from torch.utils.data import Dataset

from model_table import build_classifier, check_buildable, resolve_classifier_name
from util.amp import resolve_amp
from util.checkpoint import (
    check_stated_heads,
    checkpoint_grid,
    load_checkpoint_file,
    load_pretrained_state,
    saved_args,
    state_dict_of,
)
from util.cli import add_input_size_arg, add_runtime_args, check_input_paths, log_args, resolve_input_size, run_cli
from util.data_stats import add_data_args, check_data_args
from util.datasets import eval_transform, image_folder, train_folder_and_stats
from util.dist import get_rank, init_distributed_mode, is_main_process
from util.errors import UsageError
from util.files import check_output_dir, write_atomic, write_text_atomic
from util.knn import extract_features, knn_accuracy
from util.seeding import seed_everything

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM k-NN evaluation", add_help=False)
    parser.add_argument("--batch_size", default=128, type=int, help="images per process per forward")
    parser.add_argument("--model", default="vit_base_patch16", type=str, help="the classifier (or its pretraining "
                        "model's) name: vit_* / mae_vit_* / mixmim_*")  # fmt: skip
    add_input_size_arg(parser)
    parser.add_argument("--finetune", default="", help="checkpoint to evaluate (empty: random initialisation)")
    parser.add_argument(
        "--global_pool",
        action="store_true",
        default=None,
        help="ViT: mean of the patch tokens + fc_norm (default: as the checkpoint has it, else the cls token)",
    )
    parser.add_argument("--cls_token", action="store_false", dest="global_pool", help="ViT: the cls token")
    parser.add_argument("--layer", default=None, type=int, help="k-NN on the mean of this block's (ViT, 0-based) or "
                        "stage's (MixMIM) map instead of the classifier's features")  # fmt: skip
    parser.add_argument("--nb_knn", default=[20], nargs="+", type=int, help="number of neighbours, one or more")
    parser.add_argument("--temperature", default=0.07, type=float, help="weights exp(cosine / T)")
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="an ImageFolder with train/ and val/")  # fmt: skip
    parser.add_argument("--output_dir", default="", help="where to write knn.json (empty: nowhere)")
    parser.add_argument("--save_features", default="", help="write the features and labels here (features.pt)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num_workers", default=10, type=int)
    add_data_args(parser)
    add_runtime_args(parser, port=29532, training=False)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if any(k < 1 for k in args.nb_knn):
        raise UsageError(f"--nb_knn must be positive, got {args.nb_knn}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    if args.print_freq < 1:
        raise UsageError(f"--print_freq must be at least 1, got {args.print_freq}")
    check_input_paths(args)
    args.model_name = resolve_classifier_name(args.model)
    resolve_input_size(args)
    check_data_args(args)
    check_buildable(args.model_name, args.input_size, args.in_chans)
    for path, flag in ((args.output_dir, "--output_dir"), (args.save_features, "--save_features")):
        check_output_dir(path, flag)


def build_encoder(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The classifier of ``--model`` with ``--finetune``'s weights; its head is not used."""
    checkpoint = load_checkpoint_file(args.finetune) if args.finetune else {}
    state = state_dict_of(checkpoint) if args.finetune else {}
    global_pool = args.global_pool
    if global_pool is None:  # a global-pool fine-tuned checkpoint has fc_norm instead of the final norm
        global_pool = "fc_norm.weight" in state and "norm.weight" not in state
    eps = saved_args(checkpoint).get("layer_norm_eps")  # weights from Hugging Face state theirs
    model = build_classifier(args.model_name, args.input_size, 1, 0.0, global_pool, device, args.in_chans, eps)
    if args.finetune:
        check_stated_heads(model, checkpoint, args.finetune)
        load_pretrained_state(model, state, args.finetune, head_init_std=None, grid=checkpoint_grid(checkpoint))
    layers = len(model.feature_info)  # ViT: its blocks, MixMIM: its stages
    if args.layer is not None and not 0 <= args.layer < layers:
        raise UsageError(
            f"--layer {args.layer} is not one of the {layers} layers of --model {args.model_name} (0-based)"
        )
    return model.to(device).eval()


def main(args: argparse.Namespace, dataset_train: Dataset | None = None, dataset_val: Dataset | None = None) -> dict:
    """k-NN top-1 / top-5 (percent) for each ``--nb_knn``, as a dict (also written to ``output_dir/knn.json``); with
    ``--skip_bad_images`` also the number of unreadable images left out of each set."""
    init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    check_args(args)
    log_args(args)
    seed_everything(args.seed + get_rank())  # the random initialisation, when there is no checkpoint

    dataset_train, args.mean, args.std = train_folder_and_stats(
        args, dataset_train, lambda m, s: eval_transform(args.input_size, args.in_chans, m, s)
    )
    transform = eval_transform(args.input_size, args.in_chans, args.mean, args.std)
    if dataset_val is None:
        dataset_val = image_folder(os.path.join(args.data_path, "val"), transform, args.in_chans)
    model = build_encoder(args, device)

    start = time.time()
    knobs = (args.batch_size, device, args.amp, args.num_workers, args.layer, args.skip_bad_images, args.print_freq)
    train_f, train_l, train_skipped = extract_features(model, dataset_train, *knobs)
    val_f, val_l, val_skipped = extract_features(model, dataset_val, *knobs)
    extracted = time.time() - start
    num_classes = len(getattr(dataset_train, "classes", [])) or None
    stats = knn_accuracy(train_f, train_l, val_f, val_l, args.nb_knn, args.temperature, num_classes)
    for k in args.nb_knn:
        logger.info("%d-NN: top-1 %.2f, top-5 %.2f", k, stats[f"knn_k{k}_acc1"], stats[f"knn_k{k}_acc5"])
    logger.info("features of %d + %d images in %.1f s", len(train_l), len(val_l), extracted)
    if args.skip_bad_images:
        stats.update(train_skipped_images=train_skipped, val_skipped_images=val_skipped)
        logger.info("unreadable images left out: %d of the training set, %d of the validation set", train_skipped,
                    val_skipped)  # fmt: skip

    if is_main_process():
        if args.save_features:
            features = {"train_features": train_f, "train_labels": train_l, "val_features": val_f,
                        "val_labels": val_l}  # fmt: skip
            write_atomic(os.path.join(args.save_features, "features.pt"), lambda f: torch.save(features, f))
        if args.output_dir:
            write_text_atomic(os.path.join(args.output_dir, "knn.json"), json.dumps(stats, indent=2) + "\n")
    return stats


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM k-NN evaluation", parents=[get_args_parser()]), main)
