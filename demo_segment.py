"""The demo's pretrained encoder for semantic segmentation on Fashion-MNIST scenes, against random initialisation.

Scenes: 32x32 black canvases (the pretraining's image size) holding 1 or 2 garments of 14 to 28 pixels at random
places (train scenes from the train split, validation scenes from the test split); every pixel is labelled
background or the class of the garment it belongs to (where garments overlap, the brighter one). They are written in
the ADE20K layout (``output_dir/data``: grey PNGs, annotations 1 = background, 2..11 = the 10 classes) and
``main_segment.py`` trains UperNet on ``vit_tiny_patch4`` with its own pipeline (mmseg's resize, crop, flip and
photometric distortion), twice with the same seed, data and budget: from ``demo.py``'s pretraining checkpoint and
from the classifier's random initialisation ("scratch"). mIoU, mAcc and aAcc over the 11 classes on the validation
scenes are printed and written to ``output_dir/results.json`` and ``results.md``.

    python demo.py && python demo_segment.py
"""

import argparse
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import FashionMNIST

import main_segment
from util.checkpoint import load_checkpoint_file
from util.cli import run_cli
from util.dist import setup_logging
from util.errors import UsageError
from util.fashion_mnist import CLASSES, DEFAULT_DATA_PATH, prepare_root
from util.files import check_output_dir, write_text_atomic

logger = logging.getLogger(__name__)

BACKGROUND = 1  # annotation value of the canvas; garment class c is c + 2 (0 would be ADE20K's unscored "other")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("The demo's encoder for semantic segmentation", add_help=False)
    parser.add_argument("--checkpoint", default="./output_demo/pretrain/checkpoint-last.pth",
                        help="the pretraining checkpoint (demo.py writes this one), or any file or Hugging Face / "
                        "timm model folder that main_segment.py's --finetune reads")  # fmt: skip
    parser.add_argument("--model", default="vit_tiny_patch4", help="the encoder the checkpoint loads into")
    parser.add_argument("--output_dir", default="./output_demo/segment")
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH, help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--cache_dir", default=None, help="where the unpacked Fashion-MNIST files go")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--train_scenes", default=2000, type=int)
    parser.add_argument("--val_scenes", default=200, type=int)
    parser.add_argument("--canvas", default=32, type=int, help="scene side in pixels, and the crop side")
    parser.add_argument("--garment_sides", default=[14, 28], type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="a garment's side in pixels, drawn from MIN..MAX")  # fmt: skip
    parser.add_argument("--max_garments", default=2, type=int, help="garments per scene: 1 to this many")
    parser.add_argument("--iters", default=400, type=int, help="segmentation training iterations")
    parser.add_argument("--batch_size", default=8, type=int)
    parser.add_argument("--lr", default=1e-3, type=float, help="AdamW lr of main_segment.py")
    parser.add_argument("--head_channels", default=64, type=int, help="UperNet's width")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--segment_args", default="", help="more flags for main_segment.py, appended last (they win)")
    return parser


def scene(
    images: torch.Tensor, labels: torch.Tensor, g: torch.Generator, S: int, sides: Sequence[int], max_garments: int
) -> tuple[np.ndarray, np.ndarray]:
    """One canvas (S, S) uint8 and its annotation (S, S) uint8 from 1..``max_garments`` garments drawn with ``g``:
    each a random image of ``images`` (N, 28, 28), resized (bilinear) to a side in ``sides`` (min, max), its faint
    halo cut, pasted at a random place; a pixel takes the brighter garment's value and class."""
    canvas = torch.zeros(S, S)
    annotation = torch.full((S, S), BACKGROUND, dtype=torch.uint8)
    for _ in range(int(torch.randint(1, max_garments + 1, (), generator=g))):
        j = int(torch.randint(len(images), (), generator=g))
        side = int(torch.randint(sides[0], sides[1] + 1, (), generator=g))
        item = F.interpolate(images[j][None, None].float() / 255, size=side, mode="bilinear")[0, 0]
        item = item * (item > 0.05)  # (side, side)
        y, x = (int(torch.randint(S - side + 1, (), generator=g)) for _ in range(2))
        region = canvas[y : y + side, x : x + side]
        wins = item > region  # (side, side): where this garment is the brighter one
        region[wins] = item[wins]
        annotation[y : y + side, x : x + side][wins] = int(labels[j]) + 2
    return (canvas * 255).round().to(torch.uint8).numpy(), annotation.numpy()


def fashion_root(args: argparse.Namespace) -> str:
    """``prepare_root``'s folder for ``--data_path``; a folder without the Fashion-MNIST files (or a ``--cache_dir``
    that cannot be written) is a one-line ``UsageError``."""
    try:
        return prepare_root(args.data_path, args.cache_dir)
    except OSError as e:
        if e.strerror is None:  # prepare_root's own message: which files it looked for, and where
            raise UsageError(f"--data_path {args.data_path}: {(str(e).splitlines() or [''])[0]}") from e
        raise UsageError(f"cannot prepare Fashion-MNIST from --data_path {args.data_path} in --cache_dir "
                         f"{args.cache_dir}: {e.filename}: {e.strerror}") from e  # fmt: skip


def write_scenes(args: argparse.Namespace, root: str) -> Path:
    """The train and validation scenes in the ADE20K layout under ``output_dir/data`` (grey images as RGB PNGs), from
    the Fashion-MNIST folder ``root`` (``fashion_root``); scene i of a split is a function of (seed, split, i)."""
    data = Path(args.output_dir) / "data"
    for split, train, n in (("training", True, args.train_scenes), ("validation", False, args.val_scenes)):
        base = FashionMNIST(root, train=train, download=False)
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            g = torch.Generator().manual_seed((args.seed * 2 + (0 if train else 1)) * 1_000_003 + i)
            image, annotation = scene(base.data, base.targets, g, args.canvas, args.garment_sides, args.max_garments)
            Image.fromarray(np.repeat(image[:, :, None], 3, axis=2)).save(data / "images" / split / f"{i:05d}.png")
            Image.fromarray(annotation).save(data / "annotations" / split / f"{i:05d}.png")
    logger.info("wrote %d train and %d validation scenes to %s", args.train_scenes, args.val_scenes, data)
    return data


def segment_cli(args: argparse.Namespace, data: Path, checkpoint: str | None, tag: str) -> list[str]:
    """``main_segment.py``'s command line for one arm, ``--segment_args`` last; a ``--segment_args`` that does not
    split as a shell line is a one-line ``UsageError``."""
    cli = ["--model", args.model, "--data_path", str(data), "--nb_classes", str(len(CLASSES) + 1),
           "--output_dir", str(Path(args.output_dir) / tag), "--log_dir", "", "--input_size", str(args.canvas),
           "--batch_size", str(args.batch_size), "--iters", str(args.iters), "--eval_freq", str(args.iters),
           "--warmup_iters", str(args.iters // 10), "--lr", str(args.lr), "--head_channels", str(args.head_channels),
           "--num_workers", "0", "--seed", str(args.seed), "--print_freq", "50"]  # fmt: skip
    if args.device:
        cli += ["--device", args.device]
    if checkpoint:
        cli += ["--finetune", checkpoint]
    try:
        return cli + shlex.split(args.segment_args)
    except ValueError as e:  # shlex's "No closing quotation", "No escaped character"
        raise UsageError(f"--segment_args {args.segment_args!r} does not split as a shell line: {e}") from None


def parse_segment_cli(cli: list[str], segment_args: str) -> argparse.Namespace:
    """``main_segment.py``'s parser on ``cli``; what it refuses (a flag it does not know, a bad value: from
    ``segment_args``, the rest is the demo's) is a one-line ``UsageError``, not its usage text and exit status 2."""
    parser = main_segment.get_args_parser()

    def error(message: str):
        raise UsageError(f"--segment_args {segment_args!r}: main_segment.py refuses it: {message}")

    parser.error = error
    return parser.parse_args(cli)


def segment(args: argparse.Namespace, data: Path, checkpoint: str | None, tag: str) -> dict:
    """``main_segment.py`` on the scenes (its parser, so every flag not set here has its default); the evaluation."""
    cli = segment_cli(args, data, checkpoint, tag)
    logger.info("=== main_segment.py %s", shlex.join(cli))
    return main_segment.main(parse_segment_cli(cli, args.segment_args))


def main(args: argparse.Namespace) -> dict:
    """Both runs; returns (and writes) {"pretrained": metrics, "scratch": metrics, "seconds": ...}."""
    setup_logging(True)
    if min(args.train_scenes, args.val_scenes, args.iters, args.batch_size, args.max_garments) < 1:
        raise UsageError("--train_scenes, --val_scenes, --iters, --batch_size and --max_garments must be positive")
    if not 1 <= args.garment_sides[0] <= args.garment_sides[1] <= args.canvas:
        raise UsageError(f"--garment_sides must be 1 <= MIN <= MAX <= --canvas {args.canvas}, got {args.garment_sides}")
    if not args.output_dir:
        raise UsageError("--output_dir is empty: the scenes and results need a folder")
    out = Path(args.output_dir)
    parse_segment_cli(segment_cli(args, out / "data", args.checkpoint, "pretrained"), args.segment_args)
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist (run python demo.py first)")
    load_checkpoint_file(args.checkpoint)  # not a checkpoint (or a folder of none): one line before the scenes
    check_output_dir(args.output_dir)
    data = write_scenes(args, fashion_root(args))
    results: dict = {}
    for tag, checkpoint in (("pretrained", args.checkpoint), ("scratch", None)):
        start = time.time()
        stats = segment(args, data, checkpoint, tag)
        results[tag] = {k: stats[k] for k in ("mIoU", "mAcc", "aAcc")}
        iou = [None if math.isnan(v) else v for v in stats["IoU"]]  # None: a class absent from the scenes
        results[tag]["IoU"] = dict(zip(("background", *CLASSES), iou, strict=True))
        results[tag]["seconds"] = time.time() - start
        logger.info("%s: mIoU %.2f (%.0f s)", tag, stats["mIoU"], results[tag]["seconds"])
    rows = [
        f"Fashion-MNIST scenes, {args.val_scenes} validation scenes, {args.iters} iterations of {args.batch_size}",
        "",
        "| metric (%) | pretrained | scratch |",
        "| --- | ---: | ---: |",
    ]
    rows += [
        f"| {k} | {results['pretrained'][k]:.2f} | {results['scratch'][k]:.2f} |" for k in ("mIoU", "mAcc", "aAcc")
    ]
    table = "\n".join(rows)
    print(table, flush=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", table + "\n")
    return results


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("The demo's encoder for semantic segmentation", parents=[get_args_parser()]), main)
