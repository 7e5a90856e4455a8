"""Semantic-segmentation data: the ADE20K release layout, mmseg's ADE20K pipelines, and iteration-based loaders.

The layout of ADEChallengeData2016, which any folder may follow (``--nb_classes`` classes):

    data_path/images/training/NAME.jpg       data_path/annotations/training/NAME.png
    data_path/images/validation/NAME.jpg     data_path/annotations/validation/NAME.png

An annotation is a one-channel image of the image's size holding a class index per pixel: 0 is "other" (not
scored), 1..K the classes (K = ``--nb_classes``, 150 for ADE20K), 255 not scored either. mmseg's
``reduce_zero_label`` turns them into training labels: 0 -> 255 (ignored), c -> c - 1, 255 stays 255. A missing
folder, an image without its annotation, an annotation of another size or with a value above K is a one-line
``UsageError`` naming the file (the last two when the pair is read: reading every annotation up front would take
minutes on ADE20K; a DataLoader worker hands the message to the main process, which raises it). So is a split
whose annotations hold no scored pixel (all 0, or a 0 / 255 binary mask): nothing to learn or score
(``SegmentationFolder.check_scored``, which stops at the first annotation with one).

Training follows ``train_pipeline`` of mmseg's ``configs/_base_/datasets/ade20k.py`` (the BEiT / MAE UperNet runs):
resize keeping the aspect ratio to ``img_scale`` (2048, 512) times a ratio in [0.5, 2], a random crop of
``crop_size`` whose most frequent class covers less than 75% of its labelled pixels (up to 10 redraws), a horizontal
flip with probability 0.5, mmseg's PhotoMetricDistortion, normalisation, and padding to the crop size (image 0
after normalisation, label 255). Each image's draws come from its own generator seeded by (seed, pass, index): the
same on whichever rank or worker reads it, so a resumed run repeats the uninterrupted one. Evaluation resizes the
image keeping its aspect ratio to fit ``img_scale`` and keeps the label at the original size (mmseg scores at the
original resolution).
"""

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.datasets import LoaderWrapper
from util.dist import get_rank, get_world_size
from util.errors import UsageError
from util.seeding import image_seed, seed_worker

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # label of the pixels that are not scored: "other" (0 in the files) and padding
SPLITS = {"train": "training", "val": "validation"}
RATIO_RANGE = (0.5, 2.0)  # mmseg's Resize(ratio_range)
CAT_MAX_RATIO = 0.75  # mmseg's RandomCrop(cat_max_ratio): the largest share one class may hold of a crop
CROP_TRIES = 10
FLIP_PROB = 0.5
BRIGHTNESS_DELTA = 32  # PhotoMetricDistortion's defaults, in 8-bit units
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV's 8-bit hue units: 180 per turn, so +-36 degrees


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: file values (H, W) -> training labels int64: 0 -> 255, c -> c - 1, 255 -> 255."""
    label = label.astype(np.int64)
    return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: the (h, w) of an image resized, keeping its aspect ratio, to the largest size whose
    long side is at most ``max(scale)`` and short side at most ``min(scale)`` (rounded half up)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float in [0, 255] -> (3, h, w), bilinear without antialiasing (OpenCV's INTER_LINEAR, as mmcv),
    rounded to 8-bit values."""
    out = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def _resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) int64 -> (h, w), nearest neighbour (source index floor(i * H / h), as OpenCV's INTER_NEAREST)."""
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _normalize(img: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 255] -> (img / 255 - mean) / std; ``mean``, ``std``: (3, 1, 1) in [0, 1] units."""
    return (img / 255 - mean) / std


# ----------------------------------------------------------------------------- photometric distortion


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> (3, H, W) HSV: hue in [0, 1) turns, saturation in [0, 1], value in [0, 255]."""
    r, g, b = img
    v, _ = img.max(0)
    c = v - img.min(0).values  # chroma
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = c.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rgb_to_hsv``."""
    h, s, v = hsv
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6])  # (3, H, W) for R, G, B
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on (3, H, W) RGB in [0, 255], each step with probability 0.5, in its order:
    brightness (+ U(-32, 32)); contrast (x U(0.5, 1.5)) first or last (a coin); saturation (x U(0.5, 1.5)); hue
    (+ an integer in [-18, 18) of 180 per turn). Brightness and contrast clip to [0, 255] and truncate to integers
    as mmseg's 8-bit steps do; saturation and hue are computed in floating point (OpenCV's 8-bit HSV rounds them)."""

    def convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (x * alpha + beta).clamp_(0, 255).floor_()

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return convert(x, alpha=rng.uniform(*CONTRAST_RANGE)) if rng.integers(2) else x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[1] = (hsv[1] * rng.uniform(*SATURATION_RANGE)).clamp_(0, 1)
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[0] = (hsv[0] + int(rng.integers(-HUE_DELTA, HUE_DELTA)) / 180) % 1.0
        img = hsv_to_rgb(hsv)
    if not contrast_first:
        img = contrast(img)
    return img


# ----------------------------------------------------------------------------- the two pipelines


def crop_box(label: torch.Tensor, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """mmseg's RandomCrop with ``cat_max_ratio`` 0.75: the top-left corner (y, x) of a ``crop`` x ``crop`` window
    (clipped to the image), redrawn up to 10 times while one class covers 75% or more of the window's labelled
    pixels (or fewer than two classes are in it); after 10 redraws the last draw stands. ``label``: (H, W)."""
    H, W = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(H - crop, 0) + 1)), int(rng.integers(0, max(W - crop, 0) + 1))

    y, x = draw()
    for _ in range(CROP_TRIES):
        counts = torch.bincount(label[y : y + crop, x : x + crop].flatten(), minlength=IGNORE_INDEX + 1)
        counts = counts[:IGNORE_INDEX]  # the labelled pixels only
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        y, x = draw()
    return y, x


class TrainPipeline:
    """mmseg's ADE20K training pipeline (module docstring): (image (H, W, 3) uint8, label (H, W) int64, rng) ->
    (image (3, S, S) float32 normalised, label (S, S) int64), S = ``crop_size``."""

    def __init__(self, crop_size: int, img_scale: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.crop_size, self.img_scale = int(crop_size), (int(img_scale[0]), int(img_scale[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        img = torch.from_numpy(image).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
        seg = torch.from_numpy(label)  # (H, W)
        ratio = rng.random() * (RATIO_RANGE[1] - RATIO_RANGE[0]) + RATIO_RANGE[0]
        scale = int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)
        size = rescale_size(*seg.shape, scale)
        img, seg = _resize(img, size), _resize_label(seg, size)
        S = self.crop_size
        y, x = crop_box(seg, S, rng)
        img, seg = img[:, y : y + S, x : x + S], seg[y : y + S, x : x + S]
        if rng.random() < FLIP_PROB:
            img, seg = img.flip(-1), seg.flip(-1)
        img = _normalize(photometric_distortion(img, rng), self.mean, self.std)
        pad = (0, S - img.shape[2], 0, S - img.shape[1])  # right, bottom
        return F.pad(img, pad, value=0.0), F.pad(seg, pad, value=IGNORE_INDEX)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, img_scale={self.img_scale}, ratio_range="
                f"{RATIO_RANGE}, cat_max_ratio={CAT_MAX_RATIO}, flip={FLIP_PROB}, PhotoMetricDistortion)")  # fmt: skip


class EvalPipeline:
    """mmseg's ADE20K test pipeline: (image (H, W, 3) uint8, label (H, W) int64) -> (image (3, h, w) float32, resized
    keeping its aspect ratio to fit ``img_scale``, normalised; label (H, W) int64 as it is)."""

    def __init__(self, img_scale: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.img_scale = (int(img_scale[0]), int(img_scale[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None):
        """``rng``: unused (no random step), for the same call as ``TrainPipeline``."""
        img = torch.from_numpy(image).permute(2, 0, 1).float()  # (3, H, W)
        img = _resize(img, rescale_size(*label.shape, self.img_scale))
        return _normalize(img, self.mean, self.std), torch.from_numpy(label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_scale={self.img_scale})"


# ----------------------------------------------------------------------------- the dataset


class SampleProblem(NamedTuple):
    """Stands in for a pair that cannot be used; the loader raises its message as a ``UsageError``."""

    message: str


def segmentation_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """(image, annotation) paths of ``root``'s ``split`` ("train" or "val"), sorted by name; one-line errors for a
    missing folder, a folder without images and an image without its annotation."""
    folder = SPLITS[split]
    images, annotations = os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)
    for path in (images, annotations):
        if not os.path.isdir(path):
            raise UsageError(f"{path} does not exist: --data_path holds images/{{training,validation}}/ and "
                             "annotations/{training,validation}/ (the ADE20K layout)")  # fmt: skip
    names = sorted(n for n in os.listdir(images) if n.lower().endswith(IMG_EXTENSIONS))
    if not names:
        raise UsageError(f"{images} holds no images")
    pairs = []
    for name in names:
        annotation = os.path.join(annotations, os.path.splitext(name)[0] + ".png")
        if not os.path.isfile(annotation):
            raise UsageError(f"image {os.path.join(images, name)} has no annotation {annotation}")
        pairs.append((os.path.join(images, name), annotation))
    return pairs


def no_scored_pixel(where: str, nb_classes: int) -> UsageError:
    """The one-line error for labels without a scored pixel; ``where`` names them ("the annotations in FOLDER")."""
    return UsageError(
        f'{where} hold no scored pixel: annotation values 1..{nb_classes} are the classes, 0 ("other") and '
        f"{IGNORE_INDEX} are not scored (ADE20K's reduce_zero_label); a 0/{IGNORE_INDEX} binary mask scores nothing: "
        "write background 1 and foreground 2, with --nb_classes 2"
    )


class SegmentationFolder(Dataset):
    """The pairs of ``root``'s ``split`` with labels as ``reduce_zero_label`` makes them, through ``transform``
    (``TrainPipeline`` or ``EvalPipeline``).

    An item's key is an index, or (pass, index) from ``IterationSampler``: the pair's random draws come from a
    generator seeded by (``seed``, pass, index). A pair that cannot be used (unreadable,
    another size, a value above ``nb_classes``) gives a ``SampleProblem`` instead of raising inside a worker.
    """

    def __init__(self, root: str, split: str, nb_classes: int, transform=None):
        self.root, self.split, self.nb_classes, self.transform = root, split, nb_classes, transform
        self.samples = segmentation_pairs(root, split)
        self.seed = 0  # the training loader sets --seed
        logger.info("%s (%s): %d images", root, SPLITS[split], len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def annotation_dir(self) -> str:
        return os.path.join(self.root, "annotations", SPLITS[self.split])

    def check_scored(self) -> None:
        """A ``UsageError`` naming the folder unless some annotation holds a scored pixel (a value in
        1..``nb_classes``): without one the loss is 0 and every metric 0 / 0. Reads the pairs in order up to the
        first that has one: a single pair for a usable split (all of them, with ``pair``'s checks, when none has)."""
        for index in range(len(self)):
            if (self.pair(index)[1] != IGNORE_INDEX).any():
                return
        raise no_scored_pixel(f"the annotations in {self.annotation_dir}", self.nb_classes)

    def raw(self, index: int) -> torch.Tensor:
        """Image ``index`` as float (3, H, W) in [0, 1], for ``--data_stats auto``."""
        with Image.open(self.samples[index][0]) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8 RGB, label (H, W) int64 after ``reduce_zero_label``); ``UsageError`` for a pair
        that cannot be used."""
        image_path, annotation_path = self.samples[index]
        try:
            with Image.open(image_path) as img:
                image = np.array(img.convert("RGB"))
            with Image.open(annotation_path) as ann:
                mode = ann.mode
                label = np.array(ann)
        except Exception as e:  # OSError, DecompressionBombError, ...: the reason in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"cannot read {image_path} or {annotation_path} ({first})") from e
        if label.ndim != 2:
            raise UsageError(f"annotation {annotation_path} has {label.shape[-1]} channels (mode {mode}), not one: a "
                             "label map holds a class index per pixel")  # fmt: skip
        if label.shape != image.shape[:2]:
            raise UsageError(f"annotation {annotation_path} is {label.shape[1]}x{label.shape[0]}, its image "
                             f"{image_path} {image.shape[1]}x{image.shape[0]}")  # fmt: skip
        high = int(label.max())
        if high > self.nb_classes and high != IGNORE_INDEX:
            bad = int(label[(label > self.nb_classes) & (label != IGNORE_INDEX)].max())
            raise UsageError(
                f"annotation {annotation_path} holds class {bad}, above --nb_classes {self.nb_classes} "
                f"(1..{self.nb_classes} are the classes; 0 and {IGNORE_INDEX} are not scored)"
            )
        return image, reduce_zero_label(label)

    def __getitem__(self, key: int | tuple[int, int]):
        pass_, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, label = self.pair(index)
        except UsageError as e:
            return SampleProblem(str(e))
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label)
        return self.transform(image, label, np.random.default_rng(image_seed(self.seed, pass_, index)))


# ----------------------------------------------------------------------------- samplers and loaders


class IterationSampler(torch.utils.data.Sampler):
    """This rank's keys (pass, index) of one epoch of an iteration-based run.

    The run reads an endless stream: pass p is a permutation of the dataset seeded by seed + p, shared out as
    ``DistributedSampler`` does (rank r takes positions r, r + R, ...; the tail that does not divide is dropped), the
    passes one after the other. Epoch e is the rank's samples [e * epoch_samples, e * epoch_samples + its length),
    the length ``epoch_samples`` but for the last epoch, which ends at ``total_samples``. ``set_start(i)`` skips the
    epoch's first i samples (an epoch resumed inside). The pass goes with each key, for the augmentation seed.
    """

    def __init__(self, size: int, epoch_samples: int, total_samples: int, num_replicas: int, rank: int, seed: int):
        self.size, self.epoch_samples, self.total_samples = size, epoch_samples, total_samples
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.per_rank = size // num_replicas
        self.epoch, self.start = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_start(self, start: int) -> None:
        self.start = start

    def epoch_length(self, epoch: int) -> int:
        return max(0, min(self.epoch_samples, self.total_samples - epoch * self.epoch_samples))

    def __len__(self) -> int:
        return self.epoch_length(self.epoch) - self.start

    def _permutation(self, pass_: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != pass_:
            self._perm = pass_, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + pass_))
        return self._perm[1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        begin = self.epoch * self.epoch_samples + self.start
        for position in range(begin, begin + len(self)):
            pass_, i = divmod(position, self.per_rank)
            yield pass_, int(self._permutation(pass_)[i * self.num_replicas + self.rank])


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + R, ... of ``size``: every item on exactly one rank (no padding, so the confusion matrices
    summed over ranks count each image once)."""

    def __init__(self, size: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, size, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def collate_or_problem(items: list):
    """``default_collate``, or the first ``SampleProblem`` of the batch."""
    for item in items:
        if isinstance(item, SampleProblem):
            return item
    return default_collate(items)


class SegmentationLoader(LoaderWrapper):
    """A DataLoader over a ``SegmentationFolder`` that raises a ``SampleProblem``'s message as a ``UsageError`` in
    the main process; ``sampler``, ``dataset`` and ``len()`` are the DataLoader's."""

    @staticmethod
    def _batches(batches: Iterator) -> Iterator:
        for batch in batches:
            if isinstance(batch, SampleProblem):
                raise UsageError(batch.message)
            yield batch


def _loader(dataset, sampler, batch_size: int, args: argparse.Namespace, device: torch.device, drop_last: bool):
    return SegmentationLoader(
        torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=batch_size,
            num_workers=args.num_workers,
            pin_memory=args.pin_mem and device.type == "cuda",
            drop_last=drop_last,
            worker_init_fn=seed_worker,
            collate_fn=collate_or_problem,
        )
    )


class IndexOnly(Dataset):
    """A dataset of (image, label) items passed to ``main`` (already transformed), read by the (pass, index) keys of
    ``IterationSampler``: the pass is dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.dataset[key[1]]


def segmentation_train_loader(dataset: Dataset, args: argparse.Namespace, device: torch.device):
    """``--batch_size`` crops per step from an ``IterationSampler``: an epoch is ``--eval_freq`` iterations of
    ``--accum_iter`` steps each, the run ``--iters`` iterations (the last epoch may be shorter). ``dataset``: a
    ``SegmentationFolder`` (seeded here with ``--seed``) or any dataset of (image, label) pairs."""
    world = get_world_size()
    if len(dataset) < world:
        raise UsageError(f"{getattr(dataset, 'root', 'the training set')} has {len(dataset)} images, fewer than the "
                         f"{world} processes")  # fmt: skip
    if isinstance(dataset, SegmentationFolder):
        dataset.seed = args.seed
    else:
        dataset = IndexOnly(dataset)
    per_iter = args.batch_size * args.accum_iter
    sampler = IterationSampler(
        len(dataset), args.eval_freq * per_iter, args.iters * per_iter, world, get_rank(), args.seed
    )
    return _loader(dataset, sampler, args.batch_size, args, device, drop_last=True)


def segmentation_val_loader(dataset: SegmentationFolder, args: argparse.Namespace, device: torch.device):
    """One image per step (their sizes differ), each rank its shard (``ShardSampler``)."""
    return _loader(dataset, ShardSampler(len(dataset), get_world_size(), get_rank()), 1, args, device, False)
