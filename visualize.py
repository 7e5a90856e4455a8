"""Reconstructions of a pretraining checkpoint, as the official MAE demo notebook (``demo/mae_visualize.ipynb``).

For each image, one PNG with four panels: original | masked input (MixMIM: the mixed input) | reconstruction |
reconstruction with the visible patches pasted in. Works with our pretraining checkpoints (both families) and the
official ones that hold the decoder (``mae_visualize_vit_*.pth``; MixMIM pretraining checkpoints)::

    python visualize.py --checkpoint output_demo/pretrain/checkpoint-last.pth          # Fashion-MNIST test images
    python visualize.py --checkpoint mae_visualize_vit_large.pth --model mae_vit_large_patch16 --images fox.jpg

``--mask_type`` (random, block, grid; default: the checkpoint's, else random) picks how an MAE's masks are sampled,
so each strategy of the paper's Table 1f can be shown; MixMIM masks at random.

Images of another channel count than 3 (``--in_chans`` of the checkpoint's run) are normalised with the checkpoint's
``data_stats`` (or ``--mean`` / ``--std``) and shown as grey-scale, their first channel.

How the panels are drawn (masks, MixMIM's mixed input, ``norm_pix_loss`` predictions): ``util/reconstruction.py``,
which ``main_pretrain.py --vis_freq`` shares.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from model_table import build_pretrain_model, family_defaults, family_of, pretrain_overrides, resolve_pretrain_name
from util.checkpoint import check_stated_heads, load_checkpoint_file, load_model_strict, saved_args, state_dict_of
from util.cli import input_size_value
from util.datasets import load_tensor
from util.dist import resolve_device
from util.errors import UsageError
from util.fashion_mnist import (
    DEFAULT_DATA_PATH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNISTImages,
    denormalize,
    prepare_root,
)
from util.files import check_output_dir
from util.masking import MASK_TYPES, check_mask_type
from util.reconstruction import reconstruction_panels, stack

logger = logging.getLogger(__name__)


def is_mixmim(model: nn.Module) -> bool:
    return family_of(model) == "mixmim"


def save_reconstructions(
    model: nn.Module,
    imgs: torch.Tensor,
    output_dir: str | Path,
    mask_ratio: float | None = None,
    seed: int = 2,
    scale: int | None = None,
    prefix: str = "reconstruction",
    stats: tuple | None = None,
) -> list[Path]:
    """One PNG per image (``{prefix}_{i}.png``) and all of them stacked (``{prefix}s.png``); returns the paths.

    imgs: (N, C, H, W) images normalised with ``stats`` ((mean, std); default ImageNet's), on the model's device.
    The masks come from ``seed`` (the notebook uses ``torch.manual_seed(2)``; on the CPU the masks are the same);
    ``mask_ratio`` defaults to the family's (0.75 for MAE, 0.5 for MixMIM).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if mask_ratio is None:
        mask_ratio = family_defaults(model).mask_ratio
    panels = reconstruction_panels(model, imgs, mask_ratio, seed, scale, stats)
    paths = []
    for i, panel in enumerate(panels):
        paths.append(output_dir / f"{prefix}_{i}.png")
        panel.save(paths[-1])
    grid_path = output_dir / f"{prefix}s.png"
    stack(panels).save(grid_path)
    logger.info("wrote %d reconstructions to %s (all in %s)", len(paths), output_dir, grid_path.name)
    return paths


def load_pretrain_checkpoint(
    path: str,
    model_name: str | None = None,
    input_size: int | Sequence[int] | None = None,
    norm_pix_loss: bool | None = None,
    device: torch.device | str = "cpu",
    mask_type: str | None = None,
) -> nn.Module:
    """A pretraining model with the weights of ``path`` (ours, or official: a dict with ``model``), loaded strictly,
    built for ``device`` (which picks MixMIM's attention path; the model stays on the CPU).

    The model name, input size, norm_pix_loss and MAE's mask_type come from the arguments, else from the checkpoint
    (ours record them), else the model's defaults; official checkpoints need ``model_name``.
    """
    checkpoint = load_checkpoint_file(path)
    saved = saved_args(checkpoint)
    model_name = model_name or checkpoint.get("model_name") or saved.get("model")
    if not model_name:
        raise UsageError(f"{path} does not say which model it holds: pass --model (e.g. mae_vit_large_patch16)")
    model_name = resolve_pretrain_name(model_name)
    kwargs = {}
    npl = norm_pix_loss if norm_pix_loss is not None else saved.get("norm_pix_loss")
    if npl is not None:
        kwargs["norm_pix_loss"] = bool(npl)
    kwargs["in_chans"] = int(saved.get("in_chans") or 3)
    kwargs.update(pretrain_overrides(saved))  # the MAE ablations it was trained with (decoder, mask type)
    mask_type = mask_type or saved.get("mask_type") or "random"
    if family_of(model_name) == "mae":
        kwargs["mask_type"] = mask_type
    elif mask_type != "random":
        raise UsageError(f"--mask_type {mask_type} is for MAE models; MixMIM masks at random")
    size = input_size or saved.get("input_size")
    if size is None:  # the model's own default size
        import timm

        size = model_input_size(timm.create_model(model_name, **kwargs))
    size = input_size_value(size)  # a side, or [H, W]
    model = build_pretrain_model(model_name, size, torch.device(device), **kwargs)
    check_stated_heads(model, checkpoint, path)
    load_model_strict(model, state_dict_of(checkpoint), path)
    model.data_stats = checkpoint.get("data_stats")  # the statistics it was trained with (ours), or None
    logger.info("loaded %s (%s, %s, %d channels, norm_pix_loss=%s, mask_type=%s)", path, model_name, size,
                kwargs["in_chans"], model.norm_pix_loss, mask_type)  # fmt: skip
    return model


def model_stats(model: nn.Module, mean: list[float] | None, std: list[float] | None) -> tuple[list, list]:
    """(mean, std) to normalise the images with: the flags, else the checkpoint's, else ImageNet's (3 channels)."""
    chans = model.patch_embed.proj.weight.shape[1]
    if mean is not None and std is not None:
        stats = (list(mean), list(std))
    elif getattr(model, "data_stats", None):
        stats = (model.data_stats["mean"], model.data_stats["std"])
    elif chans == 3:
        stats = (list(IMAGENET_MEAN), list(IMAGENET_STD))
    else:
        raise UsageError(f"the checkpoint holds no data statistics for its {chans} channels: pass --mean and --std")
    if len(stats[0]) != chans or len(stats[1]) != chans:
        raise UsageError(f"--mean and --std need {chans} values each (the model's channels)")
    return stats


def model_input_size(model: nn.Module) -> int:
    """The image side a pretraining model was built for (the height of a non-square MAE)."""
    size = getattr(model, "img_size", None) or model.patch_embed.img_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def load_images(
    paths: list[str], size: int | tuple[int, int], in_chans: int = 3, stats: tuple | None = None
) -> torch.Tensor:
    """Image files -> (N, C, H, W) normalised (``stats``: (mean, std), default ImageNet's), resized as the notebook
    (straight to H x W, bicubic). 3 channels: PIL RGB; others: ``util.datasets.load_tensor`` (``.npy`` too)."""
    h, w = (size, size) if isinstance(size, int) else size
    mean, std = stats or (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    imgs = []
    for p in paths:
        try:
            if in_chans == 3:
                img = Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)
                x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
                x = x.permute(2, 0, 1).float() / 255  # (3, H, W)
            else:
                x = load_tensor(p, in_chans)
                x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False)[0]
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image {p}: {e}") from e
        imgs.append((x - mean) / std)  # (C, H, W)
    return torch.stack(imgs)


def fashion_mnist_images(data_path: str, num: int, size: int, cache_dir: str | None = None) -> torch.Tensor:
    """The first ``num`` Fashion-MNIST test images as (num, 3, size, size) normalised tensors; a ``UsageError``
    naming the two ways out when ``data_path`` holds no Fashion-MNIST files."""
    try:
        root = prepare_root(data_path, cache_dir)
    except FileNotFoundError as e:
        raise UsageError(
            f"no --images given, and no Fashion-MNIST (the default images) in {data_path}: pass --images FILE..., or "
            f"install Fashion-MNIST (apt-get install dataset-fashion-mnist) or give --data_path a folder with its files"
        ) from e
    dataset = FashionMNISTImages(root, train=False, img_size=size)
    return torch.stack([dataset[i][0] for i in range(min(num, len(dataset)))])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM reconstructions", add_help=False)
    parser.add_argument("--checkpoint", required=True, help="pretraining checkpoint (ours or official, with decoder)")
    parser.add_argument("--model", default=None, help="pretraining model name (default: from the checkpoint)")
    parser.add_argument("--input_size", default=None, type=int, nargs="+", metavar="SIZE",
                        help="a side, or H W (default: from the checkpoint or the model)")  # fmt: skip
    parser.add_argument(
        "--norm_pix_loss",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="whether the model predicts normalised patches (default: from the checkpoint, else the "
        "model's default: off for MAE, on for MixMIM)",
    )
    parser.add_argument("--images", nargs="*", default=None, help="image files (default: Fashion-MNIST test images)")
    parser.add_argument("--num_images", default=4, type=int, help="Fashion-MNIST images to show without --images")
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH, help="folder with the Fashion-MNIST files")
    parser.add_argument("--mask_ratio", default=None, type=float, help="default: 0.75 (MAE), 0.5 (MixMIM)")
    parser.add_argument("--seed", default=2, type=int, help="seed for the masks (the notebook's: 2)")
    parser.add_argument("--mask_type", default=None, choices=MASK_TYPES, help="how MAE's masks are sampled (grid: "
                        "mask ratio 0.75); default: the checkpoint's, else random")  # fmt: skip
    parser.add_argument("--scale", default=None, type=int, help="upscaling of the panels (default: to ~128 px)")
    parser.add_argument("--output_dir", default="./output_dir/visualize")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mean", default=None, type=float, nargs="+", help="per-channel mean (default: the "
                        "checkpoint's data_stats, else ImageNet's)")  # fmt: skip
    parser.add_argument("--std", default=None, type=float, nargs="+", help="per-channel std (as --mean)")
    return parser


def check_flags(args: argparse.Namespace) -> torch.device:
    """The flags that would fail only after the work (the device, the image count, the output folder), checked
    before it; returns the device. Creates ``--output_dir``."""
    device = resolve_device(args.device)  # an unknown device, or CUDA where there is none: one line
    if args.num_images < 1:
        raise UsageError(f"--num_images {args.num_images}: give 1 or more (the Fashion-MNIST images shown without "
                         "--images)")  # fmt: skip
    check_output_dir(args.output_dir)
    return device


def main(args: argparse.Namespace) -> list[Path]:
    device = check_flags(args)
    model = load_pretrain_checkpoint(args.checkpoint, args.model, args.input_size, args.norm_pix_loss, device,
                                     args.mask_type)  # fmt: skip
    size = tuple(model.patch_embed.img_size)  # (H, W)
    in_chans = model.patch_embed.proj.weight.shape[1]
    stats = model_stats(model, args.mean, args.std)
    if args.images:
        imgs = load_images(args.images, size, in_chans, stats)
    elif in_chans in (1, 3):  # Fashion-MNIST is grey: one channel, or repeated to three as in the demo
        imgs = fashion_mnist_images(args.data_path, args.num_images, size[0])  # ImageNet-normalised (N, 3, S, S)
        if in_chans != 3 or stats != (list(IMAGENET_MEAN), list(IMAGENET_STD)) or size[0] != size[1]:
            mean, std = (torch.tensor(v).view(-1, 1, 1) for v in stats)
            pixels = torch.nn.functional.interpolate(denormalize(imgs)[:, :in_chans], size=size, mode="bicubic")
            imgs = (pixels - mean) / std
    else:
        raise UsageError(f"the model takes {in_chans} channels: pass --images (files with {in_chans} channels)")
    if getattr(model, "mask_type", "random") != "random":  # grid's ratio and grid sides: one line, not a traceback
        try:
            check_mask_type(model.mask_type, args.mask_ratio or 0.75, tuple(model.patch_embed.grid_size))
        except ValueError as e:
            raise UsageError(f"--mask_type {model.mask_type}: {e}") from None
    model.to(device)
    return save_reconstructions(model, imgs.to(device), args.output_dir, args.mask_ratio, args.seed, args.scale,
                                stats=stats)  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    cli_args = argparse.ArgumentParser("MAE / MixMIM reconstructions", parents=[get_args_parser()]).parse_args()
    try:
        main(cli_args)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
