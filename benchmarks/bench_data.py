"""Data-loader throughput: images/s of the pretraining and fine-tuning transforms, per worker and in total.

Decoding a JPEG and augmenting it runs on the CPU; a GPU that steps at G images/s needs about G / r workers, where
r is the per-worker rate measured here (bench_train.py gives G). The images are JPEGs that the script writes
(ImageNet-like: 500x375 and 375x500, quality 90, textured so they compress like photos) or the ImageFolder the user
points to with ``--data-path``. Each configuration runs a DataLoader with the training scripts' settings (batch,
pinned memory when a GPU is present) and times whole batches after a warmup, once the workers have started. It
also reports the CPU time per image (the workers' user + system time over the images they made), which stays
meaningful on a busy machine: 1000 / (CPU ms per image) is what one free core delivers.

Examples:
    python benchmarks/bench_data.py --workers 1 2                       # generated JPEGs
    python benchmarks/bench_data.py --data-path /datasets/imagenet/train --workers 1 4 8 16 --batches 50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.datasets import eval_transform, finetune_transform, pretrain_transform  # noqa: E402
from util.device_decode import DeviceCrop, collate_encoded, read_encoded  # noqa: E402

logger = logging.getLogger("bench_data")

# the official MAE fine-tuning recipe (main_finetune.py defaults)
FINETUNE_ARGS = dict(color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-path", default=None, help="an ImageFolder (class subfolders); default: generated JPEGs")
    p.add_argument("--num-images", type=int, default=512, help="JPEGs to generate")
    p.add_argument(
        "--transforms",
        nargs="+",
        default=["pretrain", "finetune"],
        choices=["pretrain", "finetune", "eval", "pretrain_device"],
        help="pretrain_device: the workers' share of --decode_on_device (bytes, header, the crop's draws; decoding "
        "and resizing happen on the device, not timed here)",
    )
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="DataLoader num_workers (0: in-process)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches first (workers start, caches fill)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def write_jpegs(root: str, n: int, seed: int = 0) -> None:
    """``n`` ImageNet-sized JPEGs in ``root/0/``: smooth colour fields plus noise, so they compress like photos."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "0"), exist_ok=True)
    for i in range(n):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(root, "0", f"{i:05d}.jpg"), quality=90)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_transform(name: str, input_size: int):
    if name == "pretrain":
        return pretrain_transform(input_size, normalize=False)  # as main_pretrain.py: uint8, normalised on the device
    if name == "finetune":
        return finetune_transform(SimpleNamespace(input_size=input_size, **FINETUNE_ARGS))
    return eval_transform(input_size)


def collate_device_items(items: list) -> tuple:
    return collate_encoded([image for image, _ in items]), torch.tensor([t for _, t in items])


def bench_loader(root: str, transform_name: str, workers: int, args: argparse.Namespace) -> dict:
    """images/s of a DataLoader over ``root`` with one transform and ``workers`` processes (0: in this process)."""
    on_device = transform_name == "pretrain_device"
    dataset = datasets.ImageFolder(
        root,
        transform=DeviceCrop(args.input_size) if on_device else make_transform(transform_name, args.input_size),
        loader=read_encoded if on_device else datasets.folder.default_loader,
    )
    needed = (args.warmup_batches + args.batches) * args.batch_size
    # sample with replacement when the folder is small: the same files, decoded and augmented again each time
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=needed)
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
        collate_fn=collate_device_items if on_device else None,
    )
    children0, self0 = _children_cpu_s(), time.process_time()
    it = iter(loader)
    for _ in range(args.warmup_batches):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        images, _ = next(it)
    elapsed = time.perf_counter() - t0
    del it  # shuts the workers down, so their CPU time is counted in RUSAGE_CHILDREN
    # CPU time per image of the decoding and augmentation: steadier than images/s on a busy host
    cpu_s = _children_cpu_s() - children0 if workers > 0 else time.process_time() - self0
    ips = args.batches * args.batch_size / elapsed
    return {
        "transform": transform_name,
        "workers": workers,
        "images_per_s": ips,
        "images_per_s_per_worker": ips / max(workers, 1),
        "cpu_ms_per_image": 1000 * cpu_s / needed,
        "batch": args.batch_size,
        "input_size": args.input_size,
        "image_shape": list(images.shape[1:]) if torch.is_tensor(images) else None,  # pretrain_device: still encoded
    }


def main(args: argparse.Namespace) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_path
        if root is None:
            root = tmp
            t0 = time.perf_counter()
            write_jpegs(root, args.num_images)
            logger.info("wrote %d JPEGs to %s in %.1f s", args.num_images, root, time.perf_counter() - t0)
        info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "data": args.data_path or "generated"}
        rows = []
        for name in args.transforms:
            for workers in args.workers:
                row = bench_loader(root, name, workers, args)
                logger.info("%s, %d workers: %.1f images/s", name, workers, row["images_per_s"])
                rows.append(row)
    print(f"{'transform':<10} {'workers':>7} {'img/s':>9} {'img/s/worker':>13} {'CPU ms/img':>11}")
    for r in rows:
        print(
            f"{r['transform']:<10} {r['workers']:>7} {r['images_per_s']:9.1f} {r['images_per_s_per_worker']:13.1f} "
            f"{r['cpu_ms_per_image']:11.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
