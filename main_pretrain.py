"""Masked-image-modeling pretraining: MAE (``mae_vit_*``) and MixMIM (``mixmim_*``) on an ImageFolder, a folder of
unlabelled images, or a list of image files (``--data_path``), of any channel count (``--in_chans``).

Single process:   python main_pretrain.py --model mae_vit_base_patch16 --data_path /imagenet ...
One node:         torchrun --nproc_per_node=8 main_pretrain.py ...
SLURM:            srun ... python main_pretrain.py ...   (ranks from SLURM_PROCID / SLURM_NTASKS)
CPU:              python main_pretrain.py --device cpu ...  (gloo under torchrun)
"""

import argparse
import logging
import os

from torch.utils.data import Dataset

from engine_pretrain import fit
from model_table import (
    DECODER_ARGS,
    build_classifier,
    build_pretrain_model,
    check_buildable,
    compile_model,
    family_defaults,
    family_of,
    mae_decoder,
    pretrain_overrides,
    resolve_pretrain_name,
)
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.checkpoint import load_pretrained, load_resume
from util.cli import add_input_size_arg, add_runtime_args, resolve_input_size, run_cli, validate_common_args
from util.data_stats import add_data_args, check_data_args, resolve_data_stats
from util.datasets import (
    PRETRAIN_AUGS,
    eval_transform,
    image_folder,
    pretrain_dataset,
    pretrain_transform,
    train_loader,
)
from util.device_decode import DeviceCrop, read_encoded
from util.dist import is_main_process, wrap_ddp
from util.errors import UsageError
from util.knn import PretrainingKNN
from util.masking import MASK_TYPES, check_mask_type
from util.optim import pretrain_optimizer, scaled_lr
from util.reconstruction import FIXED_IMAGES, ReconstructionLog, fixed_images
from util.run import open_outputs, start_run

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM pre-training", add_help=False)
    parser.add_argument(
        "--batch_size",
        default=64,
        type=int,
        help="Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus",
    )
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument(
        "--accum_iter",
        default=1,
        type=int,
        help="Accumulate gradient iterations (for increasing the effective batch size under memory constraints)",
    )

    # Model parameters
    parser.add_argument(
        "--model",
        default="mae_vit_large_patch16",
        type=str,
        metavar="MODEL",
        help="Name of model to train (mae_vit_* or mixmim_*)",
    )
    add_input_size_arg(parser)
    parser.add_argument(
        "--mask_ratio",
        default=None,
        type=float,
        help="Masking ratio (percentage of removed patches); default: the family's official one, "
        "0.75 for MAE, 0.5 for MixMIM",
    )
    parser.add_argument(
        "--norm_pix_loss", action="store_true", help="Use (per-patch) normalized pixels as targets for computing loss"
    )
    parser.set_defaults(norm_pix_loss=False)

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
    parser.add_argument(
        "--min_lr", type=float, default=0.0, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0"
    )
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N", help="epochs to warmup LR")

    # Dataset parameters
    parser.add_argument(
        "--data_path",
        default="/datasets01/imagenet_full_size/061417/",
        type=str,
        help="dataset path: an ImageFolder with train/, a folder of images at any depth, or a text file listing "
        "image paths (one per line, relative to the file's folder)",
    )
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
    parser.add_argument("--finetune", default="", help="initialise from (part of) a pretraining checkpoint: continued "
                        "pretraining (an encoder-only one leaves the decoder as initialised)")  # fmt: skip
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
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
        "family's official script, 20 for MAE, 10 for MixMIM (checkpoint-last.pth is written "
        "every epoch)",
    )

    knn = parser.add_argument_group("k-NN during pretraining (not in the official scripts)")
    knn.add_argument("--knn_freq", default=0, type=int,
                     help="every N epochs (and at the last), k-NN top-1/top-5 of the encoder's frozen features, in "
                     "log.txt and TensorBoard (knn/*); 0: off")  # fmt: skip
    knn.add_argument("--knn_data_path", default="", help="a labelled ImageFolder with train/ and val/ (default: "
                     "--data_path)")  # fmt: skip
    knn.add_argument("--nb_knn", default=[20], nargs="+", type=int, help="number of neighbours, one or more")
    parser.add_argument_group("reconstructions during pretraining (not in the official scripts)").add_argument(
        "--vis_freq", default=0, type=int, help=f"every N epochs (epoch %% N == 0, as --save_freq) and at the last, "
        f"the reconstructions of the first {FIXED_IMAGES} training images (evaluation transform, the same masks each "
        "time) in TensorBoard (reconstructions) and output_dir/reconstructions/epoch_{epoch}.png; 0: off")  # fmt: skip

    ablation = parser.add_argument_group("MAE ablations (the MAE paper's Table 1; not in the official scripts)")
    ablation.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (Table 1a; default: the "
                          "model's own, 8 for B / L / H)")  # fmt: skip
    ablation.add_argument("--decoder_embed_dim", default=None, type=int, help="decoder width (Table 1b; default: the "
                          "model's own, 512 for B / L / H)")  # fmt: skip
    ablation.add_argument("--decoder_num_heads", default=None, type=int, help="decoder attention heads, dividing its "
                          "width (default: the model's own, 16 for B / L / H)")  # fmt: skip
    ablation.add_argument("--mask_type", default="random", choices=MASK_TYPES, help="mask "
                          "sampling (Table 1f): random patches (official), blocks, or a regular grid (--mask_ratio "
                          "0.75)")  # fmt: skip
    ablation.add_argument("--pretrain_aug", default="crop", choices=PRETRAIN_AUGS, help="augmentation (Table 1e): "
                          "none (center crop, no flip), crop_fixed (fixed-size random crop, flip), crop (random-size "
                          "crop, flip: official), crop_color (crop, flip and colour jittering)")  # fmt: skip

    parser.add_argument_group("data loading (not in the official scripts)").add_argument(
        "--decode_on_device", action="store_true", help="decode the JPEGs, crop, resize and flip on the device "
        "(nvJPEG on CUDA): the loader workers only read the files and draw the augmentation (3 channels)")  # fmt: skip
    add_data_args(parser)
    add_runtime_args(parser, port=29529)
    return parser


def resolve_args(args: argparse.Namespace) -> None:
    """The registered model name, the input size (an int for a square, else [H, W]), and the model family's
    official defaults for the flags left unset."""
    args.model_name = resolve_pretrain_name(args.model)
    resolve_input_size(args)
    defaults = family_defaults(args.model_name)
    if args.mask_ratio is None:
        args.mask_ratio = defaults.mask_ratio
    if args.save_freq is None:
        args.save_freq = defaults.pretrain_save_freq


def validate_args(args: argparse.Namespace) -> None:
    """One-line errors for arguments that cannot work, before any work is done."""
    validate_common_args(args, data_list_file=True)
    if args.knn_freq < 0 or any(k < 1 for k in args.nb_knn):
        raise UsageError(f"--knn_freq must be >= 0 and --nb_knn positive, got {args.knn_freq} and {args.nb_knn}")
    if args.knn_data_path and not os.path.isdir(args.knn_data_path):
        raise UsageError(f"--knn_data_path {args.knn_data_path} does not exist")
    if args.knn_freq and not args.knn_data_path and os.path.isfile(args.data_path):
        raise UsageError("--knn_freq needs labelled train/ and val/ folders: --data_path is a list file, pass "
                         "--knn_data_path")  # fmt: skip
    if args.vis_freq < 0:
        raise UsageError(f"--vis_freq must be >= 0, got {args.vis_freq}")
    if args.vis_freq and not (args.output_dir or args.log_dir):
        raise UsageError("--vis_freq writes to --output_dir and TensorBoard's --log_dir: give at least one")
    if not 0.0 < args.mask_ratio < 1.0:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if family_of(args.model_name) == "mixmim" and args.batch_size < 2:
        raise UsageError("MixMIM mixes pairs of images within a batch: --batch_size must be at least 2")
    check_data_args(args)
    if args.decode_on_device and args.in_chans != 3:
        raise UsageError(f"--decode_on_device decodes RGB JPEGs: it needs --in_chans 3, got {args.in_chans}")
    check_ablation_args(args)
    model = check_buildable(args.model_name, args.input_size, args.in_chans, **pretrain_overrides(vars(args)))
    if args.mask_type != "random":  # MAE (MixMIM refused above): the mask ratio and patch grid it needs
        try:
            check_mask_type(args.mask_type, args.mask_ratio, tuple(model.patch_embed.grid_size))
        except ValueError as e:
            raise UsageError(f"--mask_type {args.mask_type}: {e}") from e


def check_ablation_args(args: argparse.Namespace) -> None:
    """One-line errors for the MAE ablation flags (--decoder_*, --mask_type, --pretrain_aug) before the model is
    built (the masks' needs are checked on it, in ``validate_args``)."""
    overrides = {k: v for k, v in pretrain_overrides(vars(args)).items() if k != "layer_norm_eps"}
    if overrides and family_of(args.model_name) == "mixmim":
        flags = " ".join(f"--{k} {v}" for k, v in overrides.items())
        raise UsageError(f"{flags}: MAE ablations, for mae_vit_* models; --model {args.model_name} is MixMIM")
    decoder = {k: overrides[k] for k in DECODER_ARGS if k in overrides}
    too_small = [f"--{k} {v}" for k, v in decoder.items() if v < 1]
    if too_small:
        raise UsageError(f"{', '.join(too_small)}: the decoder's depth, width and heads must be at least 1")
    if decoder:
        d = {**mae_decoder(args.model_name), **decoder}
        if d["decoder_embed_dim"] % d["decoder_num_heads"]:
            raise UsageError(f"--decoder_embed_dim {d['decoder_embed_dim']} is not divisible by --decoder_num_heads "
                             f"{d['decoder_num_heads']} (unset ones: {args.model_name}'s own)")  # fmt: skip
    if args.pretrain_aug == "crop_color" and args.in_chans != 3:
        raise UsageError(f"--pretrain_aug crop_color jitters RGB colours: it needs --in_chans 3, got {args.in_chans}")
    if args.decode_on_device and args.pretrain_aug != "crop":
        raise UsageError(f"--decode_on_device draws the official crop only (--pretrain_aug crop), got --pretrain_aug "
                         f"{args.pretrain_aug}")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    resolve_args(args)
    validate_args(args)


def main(args: argparse.Namespace, dataset_train: Dataset | None = None) -> dict[str, float]:
    """Pretrain as the arguments say; returns the last epoch's training averages.

    ``dataset_train``: images (and ignored labels) to pretrain on instead of those of ``--data_path``; uint8
    (C, H, W) images are normalised on the device, float ones are taken as they are.
    """
    device = start_run(args, check_args)
    from_files = dataset_train is None
    if from_files:
        dataset_train = pretrain_dataset(args.data_path.rstrip("/"), None, args.in_chans, args.skip_bad_images)
        args.mean, args.std = resolve_data_stats(args, dataset_train)  # --data_stats auto reads the raw images
        # 3 channels: uint8 images, normalised on the device by the engine; others: float, normalised here
        if args.decode_on_device:  # the same draws; decoding and resizing move to the engine's samples.to(device)
            dataset_train.loader, dataset_train.transform = read_encoded, DeviceCrop(args.input_size)
        else:
            dataset_train.transform = pretrain_transform(
                args.input_size, False, args.in_chans, args.mean, args.std, aug=args.pretrain_aug
            )
    elif args.decode_on_device:
        raise UsageError("--decode_on_device reads --data_path's files: it does not apply to a dataset passed in")
    elif args.pretrain_aug != "crop":
        raise UsageError(f"--pretrain_aug {args.pretrain_aug} augments --data_path's files: it does not apply to a "
                         "dataset passed in (which brings its own transform)")  # fmt: skip
    else:
        args.mean, args.std = resolve_data_stats(args, dataset_train if hasattr(dataset_train, "raw") else None)
    data_loader_train = train_loader(dataset_train, args, device)

    model = build_pretrain_model(
        args.model_name,
        args.input_size,
        device,
        norm_pix_loss=args.norm_pix_loss,
        in_chans=args.in_chans,
        **pretrain_overrides(vars(args)),  # the MAE ablations, when asked for
    )
    if args.finetune:
        load_pretrained(model, args.finetune, classifier=False)
    model.to(device)
    model_without_ddp = model
    logger.info("Model = %s", model_without_ddp)
    args.lr = scaled_lr(args)

    model = wrap_ddp(model, args)
    if args.compile:
        model = compile_model(model, args.compile_mode)
    optimizer = pretrain_optimizer(model_without_ddp, args.lr, args.weight_decay, device)
    logger.info("optimizer: %s", optimizer)
    loss_scaler = NativeScaler(device, enabled=args.amp == "fp16")
    position = load_resume(args, model_without_ddp, optimizer, loss_scaler)  # inside an epoch, or None

    knn = None
    if args.knn_freq:  # labelled images with the evaluation transform; the weights are copied at each evaluation
        root = args.knn_data_path or args.data_path
        transform = eval_transform(args.input_size, args.in_chans, args.mean, args.std)
        knn_sets = [image_folder(os.path.join(root, split), transform, args.in_chans) for split in ("train", "val")]
        encoder = build_classifier(args.model_name, args.input_size, 1, 0.0, False, device, args.in_chans)
        knn = PretrainingKNN(
            encoder, *knn_sets, args.nb_knn, args.batch_size, device, args.amp, args.num_workers, args.skip_bad_images
        )

    vis = None
    if args.vis_freq and is_main_process():  # the files anew with the evaluation transform, or the items passed in
        transform = eval_transform(args.input_size, args.in_chans, args.mean, args.std) if from_files else None
        pairs = family_of(args.model_name) == "mixmim"
        images = fixed_images(dataset_train, FIXED_IMAGES, args.mean, args.std, transform, pairs)
        vis = ReconstructionLog(images, args.mask_ratio, args.seed, (args.mean, args.std), args.output_dir)

    log_writer = open_outputs(args)
    return fit(args, model, data_loader_train, optimizer, loss_scaler, device, log_writer, position, knn, vis)


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM pre-training", parents=[get_args_parser()]), main)
