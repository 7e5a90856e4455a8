"""Per-channel image statistics (``--mean`` / ``--std`` / ``--data_stats auto``) and the flags for channels.

The statistics a run normalises with are resolved once per script, in this order: explicit ``--mean`` / ``--std``;
``--data_stats auto`` (estimated from a seeded sample of the training images); those stored in the ``--resume`` or
``--finetune`` checkpoint (``data_stats``, written by every run of this project); ImageNet's for 3 channels. Other
channel counts without any of these are a ``UsageError``: no guess is safe for 16-bit or multi-band images.
Explicit values that differ from the checkpoint's are used, with a one-line warning.
"""

import argparse
import logging
import os

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util import formats
from util.datasets import unreadable_reason
from util.errors import BadImageError, UsageError

logger = logging.getLogger(__name__)

AUTO_SAMPLE = 1000  # images read by --data_stats auto


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--in_chans``, ``--mean``, ``--std`` and ``--data_stats`` (not in the official scripts)."""
    group = parser.add_argument_group("image channels and statistics (not in the official scripts)")
    group.add_argument(
        "--in_chans",
        default=3,
        type=int,
        help="image channels: 3 (RGB, read by PIL as official), 1 (grey-scale), or N (.npy (H, W, N) arrays, "
        "16-bit or multi-band files PIL reads)",
    )
    group.add_argument("--mean", default=None, type=float, nargs="+", help="per-channel mean of the images in [0, 1] "
                       "(default: the checkpoint's, else ImageNet's for 3 channels)")  # fmt: skip
    group.add_argument("--std", default=None, type=float, nargs="+", help="per-channel std (as --mean)")
    group.add_argument("--data_stats", default=None, choices=["auto"], help="auto: estimate --mean / --std from "
                       f"{AUTO_SAMPLE} training images (seeded by --seed) and print them")  # fmt: skip


def check_data_args(args: argparse.Namespace) -> None:
    """One-line errors for ``add_data_args``' flags, before any work is done."""
    if args.in_chans < 1:
        raise UsageError(f"--in_chans must be at least 1, got {args.in_chans}")
    if (args.mean is None) != (args.std is None):
        raise UsageError("give both --mean and --std, or neither")
    if args.mean is not None:
        if args.data_stats == "auto":
            raise UsageError("give --mean / --std or --data_stats auto, not both")
        if len(args.mean) != args.in_chans or len(args.std) != args.in_chans:
            raise UsageError(
                f"--mean and --std need {args.in_chans} values each (--in_chans), got {len(args.mean)} and "
                f"{len(args.std)}"
            )
        if any(s <= 0 for s in args.std):
            raise UsageError(f"--std must be positive, got {args.std}")


def saved_data_stats(path: str) -> dict | None:
    """The ``data_stats`` ({"mean": [...], "std": [...]}) of a checkpoint, or None (official checkpoints have none).

    The file is memory-mapped: the weights are not read."""
    if not path or not os.path.exists(path):
        return None
    stats = formats.read_data_stats(path)  # a safetensors file's metadata, a Hugging Face / timm folder's config
    if stats is not None or os.path.isdir(path):
        return stats
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # official or foreign files that cannot be mapped: the weight loading reports them
        return None
    stats = checkpoint.get("data_stats") if isinstance(checkpoint, dict) else None
    return stats if isinstance(stats, dict) and "mean" in stats and "std" in stats else None


def estimate_data_stats(dataset, num_images: int = AUTO_SAMPLE, seed: int = 0, skip_bad: bool = False) -> dict:
    """Per-channel mean and std of the pixels of ``num_images`` images drawn without replacement (seeded), as
    ``ToTensor`` scales them, before any augmentation or normalisation: every pixel counts once (larger images
    weigh more). ``dataset``: ``util.datasets.CheckedImages`` (its ``raw(i)``, (C, H, W) in [0, 1]).

    An unreadable image is a one-line ``BadImageError`` naming it, or with ``skip_bad`` (``--skip_bad_images``)
    left out of the sample with a warning; a channel that is constant over the sample (std 0, which cannot
    normalise) is a one-line ``UsageError``."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    total = total_sq = None
    pixels = skipped = 0
    for i in order:
        path = dataset.samples[i][0]
        try:
            x = dataset.raw(i).double().flatten(1)  # (C, H*W)
        except Exception as e:
            if not skip_bad:
                raise BadImageError(
                    f"cannot read image {path} ({unreadable_reason(e)}) for --data_stats auto; remove or replace the "
                    f"file, or pass --skip_bad_images to skip unreadable images"
                ) from e
            logger.warning("--data_stats auto: skipping unreadable image %s (%s)", path, unreadable_reason(e))
            skipped += 1
            continue
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
        pixels += x.shape[1]
    if total is None:
        raise BadImageError(f"--data_stats auto: none of the {len(order)} sampled images could be read; give --mean "
                            "and --std")  # fmt: skip
    if skipped:
        logger.warning("--data_stats auto: %d of the %d sampled images were unreadable and left out", skipped,
                       len(order))  # fmt: skip
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
    constant = [c for c in range(len(std)) if std[c] < 1e-6]  # 0 up to rounding
    if constant:
        values = ", ".join(f"channel {c}: {mean[c].item():.4g}" for c in constant)
        raise UsageError(
            f"--data_stats auto: {len(constant)} of {len(std)} channels are constant over the "
            f"{len(order) - skipped} sampled images ({values}), and a std of 0 cannot normalise; give --mean and "
            f"--std explicitly ({len(std)} values each, every std > 0)"
        )
    return {"mean": mean.tolist(), "std": std.tolist()}


def resolve_data_stats(args: argparse.Namespace, dataset=None) -> tuple[list[float], list[float]]:
    """The (mean, std) to normalise with (see the module docstring); ``dataset``: the training images, for
    ``--data_stats auto``. Logs where they come from."""
    saved, source = None, ""
    for flag in ("resume", "finetune"):
        path = getattr(args, flag, "")
        saved = saved_data_stats(path)
        if saved is not None:
            source = f"--{flag} {path}"
            break
    if saved is not None and len(saved["mean"]) != args.in_chans:
        logger.info("%s holds statistics of %d channels: not used for --in_chans %d", source, len(saved["mean"]),
                    args.in_chans)  # fmt: skip
        saved = None

    if args.mean is not None:
        stats, how = {"mean": list(args.mean), "std": list(args.std)}, "--mean / --std"
    elif args.data_stats == "auto":
        if dataset is None:
            raise UsageError("--data_stats auto needs training images (not with --eval)")
        stats = estimate_data_stats(dataset, seed=args.seed, skip_bad=bool(getattr(args, "skip_bad_images", False)))
        how = f"--data_stats auto ({min(AUTO_SAMPLE, len(dataset))} images)"
    elif saved is not None:
        stats, how = saved, source
    elif args.in_chans == 3:
        stats, how = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}, "ImageNet's"
    else:
        raise UsageError(
            f"--in_chans {args.in_chans}: give the images' --mean and --std ({args.in_chans} values each) or "
            f"--data_stats auto (no checkpoint statistics to use)"
        )
    if saved is not None and how != source and not _close(stats, saved):
        logger.warning("normalising with %s %s, not those of %s %s", how, _fmt(stats), source, _fmt(saved))
    logger.info("data statistics (%s): %s", how, _fmt(stats))
    return [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]


def _close(a: dict, b: dict) -> bool:
    return all(abs(x - y) <= 1e-6 for k in ("mean", "std") for x, y in zip(a[k], b[k], strict=True))


def _fmt(stats: dict) -> str:
    return f"mean {[round(v, 4) for v in stats['mean']]} std {[round(v, 4) for v in stats['std']]}"
