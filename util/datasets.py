"""ImageFolder and unlabelled datasets, and the official transforms for pretraining, fine-tuning and linear probing.

``data_path/train`` and ``data_path/val`` hold one subfolder per class. Pretraining also takes unlabelled images
(``image_files``): a folder of images at any depth, or a text file listing image paths. A missing or empty folder
is a ``UsageError`` naming it.

Channels (``in_chans``): with 3, images are read by PIL as RGB and transformed as the official code does. With any
other count, each file is read as a float tensor (C, H, W) in [0, 1] (8-bit / 255, 16-bit / 65535; ``.npy`` arrays
(H, W, C) or (H, W) of float as they are), and the crop, flip and resize act on tensors. An image with another
channel count is an unreadable image naming the file.

Unreadable files (corrupt, truncated, not images) do not raise inside DataLoader workers, where the error would
reach the main process as a worker traceback: the dataset returns a ``BadImage`` marker, the collate function sets
it aside, and the loader raises ``BadImageError`` naming the file in the main process, at the first batch that holds
one. With ``--skip_bad_images`` the loader logs each such file once, counts them per pass, and goes on: a training
batch gets the next readable image in its place (the batch size and the number of steps stay the same on every
rank, which DDP needs); an evaluation batch just leaves it out.
"""

import argparse
import codecs
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch.utils.data import default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from util.checkpoint import head_size
from util.cli import input_size_value
from util.crop import RandomResizedCrop, crop_ratio
from util.device_decode import EncodedImage, collate_encoded
from util.dist import all_reduce_mean, get_rank, get_world_size
from util.errors import BadImageError, UsageError
from util.files import NPY_MAGIC, decodes_as_utf8, image_format
from util.seeding import image_seed, seed_worker, seeded_rng

logger = logging.getLogger(__name__)


class BadImage(NamedTuple):
    """Stands in for the image of a file that could not be read."""

    index: int
    path: str
    reason: str


IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".npy")  # the files an unlabelled folder is scanned for


def load_tensor(path: str, in_chans: int) -> torch.Tensor:
    """An image file (PIL) or ``.npy`` array -> float32 (C, H, W) in [0, 1]; ValueError for another channel count.

    8-bit values are divided by 255, 16-bit (and PIL's 32-bit integer mode, which it uses for 16-bit PNGs) by
    65535; float arrays are kept as they are.
    """
    if path.lower().endswith(".npy"):
        a = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as img:
            if img.mode in ("P", "PA", "1"):  # palette and bilevel images: their colours, not their indices
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            a = np.array(img)  # a copy: torch wants a writable array
    if a.ndim == 2:
        a = a[:, :, None]  # (H, W, 1)
    if a.ndim != 3:
        raise ValueError(f"an array of shape {a.shape}, not (H, W) or (H, W, C)")
    if a.shape[2] != in_chans:
        raise ValueError(f"{a.shape[2]} channels, but --in_chans is {in_chans}")
    if a.dtype == np.uint8:
        scale = 255.0
    elif np.issubdtype(a.dtype, np.integer):
        scale = 65535.0
    else:
        scale = 1.0
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()  # (C, H, W)
    return x.div_(scale) if scale != 1.0 else x


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def unreadable_reason(e: Exception) -> str:
    """Why a file could not be read, in one line and without its path (which PIL's and the OS's messages repeat)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image in a format PIL reads, or a corrupt header"
    if isinstance(e, OSError) and e.strerror and e.filename:  # [Errno 2] No such file or directory: 'PATH'
        return f"{type(e).__name__}: {e.strerror}"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _tensor_loader(in_chans: int):
    return functools.partial(load_tensor, in_chans=in_chans)


class CheckedImages(torch.utils.data.Dataset):
    """The item logic of this module's datasets (``samples``: (path, target) pairs, ``loader``, ``transform``):
    ``(BadImage, target)`` for a file that cannot be read instead of raising.

    With ``augment_seed`` set (training loaders), each image's random augmentation is seeded from (seed, epoch,
    index): the same whichever rank or DataLoader worker loads it, so an epoch resumed at a step repeats the
    augmentation of the uninterrupted run.
    """

    augment_seed: int | None = None
    epoch = 0
    in_chans = 3

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, index: int) -> torch.Tensor:
        """Image ``index`` before any transform, as float (C, H, W) in [0, 1] (``ToTensor``'s scaling)."""
        path = self.samples[index][0]
        if self.in_chans == 3:
            return transforms.functional.to_tensor(self.loader(path))
        return load_tensor(path, self.in_chans)

    def __getitem__(self, index: int) -> tuple:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as e:  # OSError (truncated, unreadable), SyntaxError, DecompressionBombError, ...
            return BadImage(index, path, unreadable_reason(e)), target
        if self.transform is not None:
            if self.augment_seed is None:
                sample = self.transform(sample)
            else:
                with seeded_rng(image_seed(self.augment_seed, self.epoch, index)):
                    sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class CheckedImageFolder(CheckedImages, datasets.ImageFolder):
    """``ImageFolder`` with ``CheckedImages``' items; ``in_chans`` other than 3 reads files with ``load_tensor``."""

    def __init__(self, root: str, transform=None, in_chans: int = 3):
        if in_chans == 3:  # torchvision's loader and extensions, as official
            super().__init__(root, transform=transform)
        else:
            super().__init__(root, transform=transform, loader=_tensor_loader(in_chans), is_valid_file=is_image_file)
        self.in_chans = in_chans


class ImageFiles(CheckedImages):
    """Unlabelled images (target 0) at the given paths, read as ``CheckedImageFolder`` reads them."""

    target_transform = None
    classes: list[str] = []

    def __init__(self, root: str, paths: Sequence[str], transform=None, in_chans: int = 3):
        self.root, self.transform, self.in_chans = root, transform, in_chans
        self.samples = [(p, 0) for p in paths]
        self.loader = datasets.folder.default_loader if in_chans == 3 else _tensor_loader(in_chans)

    def __len__(self) -> int:
        return len(self.samples)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` (this rank's shard of the epoch's seeded permutation) that can start at a position
    inside the epoch: ``set_start(i)`` skips the first ``i`` indices of the shard, for an epoch resumed at a step."""

    start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


class CollateSkippingBad:
    """Collate function for ``CheckedImages``: returns ``(images, targets, bad)``, ``bad`` a list of
    ``(path, reason)``; ``images`` is None when no image of the batch could be read.

    With ``substitute``, each unreadable image is replaced by the next readable one in the dataset (searching at
    most ``max_tries`` files), so the batch keeps its size.
    """

    def __init__(self, dataset: CheckedImages, substitute: bool, max_tries: int = 64):
        self.dataset, self.substitute, self.max_tries = dataset, substitute, max_tries

    def __call__(self, items: list[tuple]) -> tuple:
        good, bad = [], []
        for sample, target in items:
            tries = 0
            while isinstance(sample, BadImage):
                bad.append((sample.path, sample.reason))
                tries += 1
                if not self.substitute or tries > self.max_tries:
                    break
                sample, target = self.dataset[(sample.index + 1) % len(self.dataset)]
            if not isinstance(sample, BadImage):
                good.append((sample, target))
        if not good:
            return None, None, bad
        if isinstance(good[0][0], EncodedImage):  # --decode_on_device: bytes, decoded on the device
            return collate_encoded([s for s, _ in good]), default_collate([t for _, t in good]), bad
        images, targets = default_collate(good)
        return images, targets, bad


class LoaderWrapper:
    """A DataLoader whose batches pass through ``_batches``; ``sampler``, ``dataset`` and ``len()`` are the
    DataLoader's."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        # the DataLoader's iterator now, not at the first batch: creating it draws a seed from torch's RNG, and
        # an epoch resumed inside restores the RNG states right after that (util/preemption.py)
        return self._batches(iter(self.loader))

    def _batches(self, batches: Iterator) -> Iterator:
        return batches


class CheckedLoader(LoaderWrapper):
    """Iterates a DataLoader over ``CheckedImages`` and yields ``(images, targets)``.

    Unreadable files: ``BadImageError`` at the first one, or with ``skip`` a warning the first time each file is
    met, a count per pass (``skipped``: distinct files met in the last full pass) and a summary line per pass. A pass
    without a readable image is a ``BadImageError`` too, unless ``allow_empty`` (the caller agrees with the other
    ranks first: one rank's shard may hold only unreadable files). ``sampler``, ``dataset`` and ``len()`` are the
    DataLoader's.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, skip: bool, what: str, allow_empty: bool = False):
        super().__init__(loader)
        self.skip, self.what, self.allow_empty = skip, what, allow_empty
        self.skipped = 0
        self._ever_skipped: set[str] = set()

    def _batches(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        this_pass: set[str] = set()
        yielded = False
        for images, targets, bad in batches:
            for path, reason in bad:
                if not self.skip:
                    raise BadImageError(
                        f"cannot read image {path} ({reason}); remove or replace the file, "
                        f"or pass --skip_bad_images to skip unreadable images"
                    )
                if path not in self._ever_skipped:
                    logger.warning("skipping unreadable image %s (%s)", path, reason)
                    self._ever_skipped.add(path)
                this_pass.add(path)
            if images is None:  # every image of the batch unreadable (and, in training, no readable one near)
                continue
            yielded = True
            yield images, targets
        if this_pass and not yielded and not self.allow_empty:
            raise BadImageError(f"{self.what}: no readable image ({len(this_pass)} unreadable files in this pass)")
        self.skipped = len(this_pass)
        if this_pass:
            logger.warning(
                "%s: skipped %d unreadable images in this pass (%d distinct so far, rank %d)",
                self.what,
                len(this_pass),
                len(self._ever_skipped),
                get_rank(),
            )


def skipped_images(loader, device: torch.device | str = "cpu", sharded: bool = True) -> int:
    """Unreadable files skipped in the last pass over ``loader`` (call on every rank): summed over processes when
    each has its own shard, else (every process reads the whole set) the count of one."""
    mean = all_reduce_mean(float(getattr(loader, "skipped", 0)), device)
    return round(mean * get_world_size() if sharded else mean)


def image_folder(root: str, transform, in_chans: int = 3) -> CheckedImageFolder:
    """``ImageFolder(root)``, with a one-line error for a missing folder or one without images."""
    if not os.path.isdir(root):
        raise UsageError(f"data folder {root} does not exist (expected an ImageFolder: one subfolder per class)")
    try:
        dataset = CheckedImageFolder(root, transform=transform, in_chans=in_chans)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"data folder {root} holds no images in class subfolders: {e}") from e
    logger.info("%s: %d images, %d classes", root, len(dataset), len(dataset.classes))
    return dataset


def train_folder_and_stats(
    args: argparse.Namespace, dataset_train, make_transform, build: bool = True
) -> tuple[object, list[float], list[float]]:
    """(the training set, mean, std): ``dataset_train`` if given, else (with ``build``) the ImageFolder
    ``data_path/train``; and the run's statistics (``util.data_stats.resolve_data_stats``). The folder is read
    without a transform first, as ``--data_stats auto`` reads its raw images; it then gets ``make_transform(mean,
    std)``."""
    from util.data_stats import resolve_data_stats

    built = dataset_train is None and build
    if built:
        dataset_train = image_folder(os.path.join(args.data_path, "train"), None, args.in_chans)
    mean, std = resolve_data_stats(args, dataset_train if hasattr(dataset_train, "raw") else None)
    if built:
        dataset_train.transform = make_transform(mean, std)
    return dataset_train, mean, std


def _list_file_lines(list_file: str) -> list[str]:
    """The lines of a list file (UTF-8); one-line errors for an image or another binary file, and for other text
    encodings."""
    with open(list_file, "rb") as f:
        head = f.read(4096)
        if not _is_text(head):  # an image, another binary file, or text in another encoding (reported below)
            if is_image_file(list_file) or head.startswith(NPY_MAGIC) or image_format(head):
                raise UsageError(f"--data_path {list_file} is an image, not a folder or a list file of image paths")
            if b"\0" in head:
                raise UsageError(f"--data_path {list_file} is a binary file, not a folder or a list file of image "
                                 "paths")  # fmt: skip
        data = head + f.read()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UsageError(f"image list {list_file} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(
            f"image list {list_file}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the list as "
            f"UTF-8"
        ) from None


def _is_text(head: bytes) -> bool:
    """Whether a file starting with ``head`` is UTF-8 text (a character may be cut at the end), or UTF-16."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    return decodes_as_utf8(head) and b"\0" not in head


def _listed_paths(list_file: str, skip_missing: bool = False) -> list[str]:
    """The paths a list file names, one per line, relative to its folder; blank lines and ``#`` comments skipped.
    Listed files that do not exist are a one-line error naming the first three, or with ``skip_missing`` left out
    with one warning (an error when none is left)."""
    folder = os.path.dirname(os.path.abspath(list_file))
    lines = [line.strip() for line in _list_file_lines(list_file)]
    paths = [os.path.join(folder, line) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UsageError(f"image list {list_file} names no files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        return paths
    named = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
    if not skip_missing:
        raise UsageError(f"image list {list_file} names files that do not exist: {named}; correct the list, or pass "
                         "--skip_bad_images to skip them")  # fmt: skip
    if len(missing) == len(paths):
        raise UsageError(f"image list {list_file}: none of its {len(paths)} files exist ({named})")
    logger.warning("image list %s: skipping %d of its %d files, which do not exist (--skip_bad_images): %s",
                   list_file, len(missing), len(paths), named)  # fmt: skip
    missing_set = set(missing)
    return [p for p in paths if p not in missing_set]


def _scanned_paths(folder: str) -> list[str]:
    """The image files under ``folder`` at any depth (symlinks followed, hidden entries skipped), sorted."""
    paths = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(parent, f) for f in sorted(files) if not f.startswith(".") and is_image_file(f)]
    if not paths:
        raise UsageError(f"data folder {folder} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def pretrain_dataset(data_path: str, transform, in_chans: int = 3, skip_bad: bool = False) -> CheckedImages:
    """The pretraining images of ``--data_path``: the ImageFolder ``data_path/train`` when there is one (labels
    unused), else every image file under ``data_path`` at any depth, or, for a text file, the files it lists
    (``skip_bad``: ``--skip_bad_images``, which also leaves out listed files that do not exist)."""
    if os.path.isfile(data_path):
        dataset = ImageFiles(data_path, _listed_paths(data_path, skip_bad), transform, in_chans)
    elif os.path.isdir(os.path.join(data_path, "train")):
        return image_folder(os.path.join(data_path, "train"), transform, in_chans)
    elif os.path.isdir(data_path):
        dataset = ImageFiles(data_path, _scanned_paths(data_path), transform, in_chans)
    else:
        raise UsageError(f"--data_path {data_path} does not exist (a folder of images, an ImageFolder, or a list file)")
    logger.info("%s: %d unlabelled images", data_path, len(dataset))
    return dataset


PRETRAIN_AUGS = ("none", "crop_fixed", "crop", "crop_color")  # --pretrain_aug: the MAE paper's Table 1e, in order
FIXED_CROP_PCT = 224 / 256  # crop_fixed: the crop's side over the resized image's, the evaluation's center crop


def pretrain_transform(
    input_size: int | Sequence[int],
    normalize: bool = True,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    aug: str = "crop",
) -> transforms.Compose:
    """MAE/MixMIM pretraining: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, normalisation by
    ``mean`` / ``std``. ``input_size``: a side, or (H, W).

    ``aug`` picks the augmentation of the MAE paper's Table 1e (before the normalisation): ``"crop"`` the above
    ("crop, rand size", the official one); ``"none"`` the image resized (bicubic) so that it covers the input size and
    its center crop, no flip ("none": "only center-crop, no flipping"); ``"crop_fixed"`` the image resized to cover
    the input size / 0.875 (256 for 224, the official evaluation's resize) and a random crop of the input size (77% of
    its area) at a random place, and the flip ("crop, fixed size"); ``"crop_color"`` the crop and flip, then
    ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4) ("crop + color jit"; the paper gives no values: these
    are the usual ones of MoCo v2 / SimCLR, without hue), 3 channels only.

    With ``normalize=False`` (3 channels) the images stay uint8 (C, H, W): a quarter of the bytes to collate, pin
    and copy, and ``normalize_on_device`` finishes the job on the device with the same arithmetic. Other channel
    counts: the same steps on the float tensors of ``load_tensor``, normalised here.
    """
    if aug not in PRETRAIN_AUGS:
        raise ValueError(f"unknown pretraining augmentation {aug!r}; choose one of {', '.join(PRETRAIN_AUGS)}")
    if aug == "crop_color" and in_chans != 3:
        raise ValueError(f"colour jittering needs 3 channels, got {in_chans}")
    size = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    if aug == "none":
        steps = [ResizeToCover(size, InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
    elif aug == "crop_fixed":
        cover = (int(size[0] / FIXED_CROP_PCT), int(size[1] / FIXED_CROP_PCT))
        steps = [
            ResizeToCover(cover, InterpolationMode.BICUBIC),
            transforms.RandomCrop(size),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            transforms.RandomResizedCrop(
                input_size, scale=(0.2, 1.0), ratio=crop_ratio(input_size), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
        ]
        if aug == "crop_color":
            steps.append(transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    if in_chans != 3:
        return transforms.Compose([*steps, transforms.Normalize(mean=mean, std=std)])
    if not normalize:
        return transforms.Compose([*steps, transforms.PILToTensor()])
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])


def normalize_on_device(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32 scaled to [0, 1] and normalised by ``mean`` / ``std`` (C values each),
    as ``ToTensor`` + ``Normalize`` do on the CPU (the same operations, so the same numbers). Float images are
    returned as they are."""
    if images.dtype != torch.uint8:
        return images
    mean_t, std_t = _mean_std(images.device, tuple(mean), tuple(std))
    return images.float().div_(255).sub_(mean_t).div_(std_t)


@functools.cache
def _mean_std(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, C, 1, 1) tensors on ``device``, copied there once rather than every step."""
    return (
        torch.tensor(mean, device=device).view(1, -1, 1, 1),
        torch.tensor(std, device=device).view(1, -1, 1, 1),
    )


class ResizeToCover:
    """Resize, keeping the aspect ratio, to the smallest image that covers ``size`` (H, W): the longer-relative side
    is truncated as ``transforms.Resize(int)`` truncates the longer side (timm's ``ResizeKeepRatio`` for center
    crops). PIL images and (C, H, W) tensors."""

    def __init__(self, size: Sequence[int], interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.size, self.interpolation = (int(size[0]), int(size[1])), interpolation

    def __call__(self, img):
        _, h, w = TF.get_dimensions(img)
        th, tw = self.size
        if th * w >= tw * h:  # the height binds: th / h >= tw / w
            new = (th, max(tw, int(w * th / h)))
        else:
            new = (max(th, int(h * tw / w)), tw)
        return TF.resize(img, list(new), self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


def eval_transform(
    input_size: int | Sequence[int],
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Resize to keep the 224/256 ratio (no crop margin above 224), center crop, normalise: the official eval.

    ``input_size``: a side S (the official transform: shorter side to S / crop_pct, center S x S crop), or (H, W):
    the image resized, keeping its aspect ratio, to cover (H / crop_pct, W / crop_pct), then the center H x W crop;
    crop_pct is 224/256 when the longer side H or W is at most 224, else 1.
    """
    input_size = input_size_value(input_size)
    if isinstance(input_size, int):
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
        resize = transforms.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC)
        crop = transforms.CenterCrop(input_size)
    else:
        h, w = input_size
        crop_pct = 224 / 256 if max(h, w) <= 224 else 1.0
        resize = ResizeToCover((int(h / crop_pct), int(w / crop_pct)), InterpolationMode.BICUBIC)
        crop = transforms.CenterCrop((h, w))
    to_tensor = [transforms.ToTensor()] if in_chans == 3 else []  # other counts are tensors already
    return transforms.Compose([resize, crop, *to_tensor, transforms.Normalize(mean, std)])


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize; 0 bits give a black image, as with the Pillow of the official code (Pillow 13 raises)."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _posterize_safe(transform):
    """Make the transform's RandAugment / AutoAugment / AugMix posterize ops accept 0 bits, which the official
    ``rand-m9-mstd0.5-inc1`` asks for whenever the magnitude noise reaches 10 (about 1 image in 600)."""
    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", [])) + [op for policy in getattr(t, "policy", []) for op in policy]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def data_stats_of(args: argparse.Namespace) -> tuple[Sequence[float], Sequence[float]]:
    """The per-channel (mean, std) the scripts resolved into ``args``; ImageNet's for a Namespace without them."""
    return getattr(args, "mean", None) or IMAGENET_DEFAULT_MEAN, getattr(args, "std", None) or IMAGENET_DEFAULT_STD


def finetune_transform(
    args: argparse.Namespace, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
):
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment (``--aa``), random erasing.

    Posterize with 0 bits (RandAugment at magnitude 10) gives a black image, as it did with the Pillow of the
    official code; Pillow 13 would raise instead. For ``in_chans`` other than 3: RandomResizedCrop (timm's scale
    and ratio), flip and random erasing on tensors; RandAugment and colour jitter are PIL RGB operations, left out.
    ``mean`` / ``std``: the statistics (default: the run's, ``data_stats_of(args)``).
    """
    if mean is None or std is None:
        mean, std = data_stats_of(args)
    in_chans = getattr(args, "in_chans", 3)
    if in_chans != 3:
        if args.aa or args.color_jitter:
            logger.warning("--in_chans %d: no RandAugment (--aa) or colour jitter, which need RGB images", in_chans)
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    args.input_size, ratio=crop_ratio(args.input_size), interpolation=InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(),
                transforms.Normalize(mean=mean, std=std),
                RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device="cpu"),
            ]
        )
    return _posterize_safe(
        create_transform(
            input_size=args.input_size,
            is_training=True,
            ratio=crop_ratio(args.input_size),
            color_jitter=args.color_jitter,
            auto_augment=args.aa,
            interpolation="bicubic",
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            mean=mean,
            std=std,
        )
    )


def linprobe_transform(
    input_size: int | Sequence[int],
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Linear probe: the TF-style RandomResizedCrop (bicubic) and a flip only."""
    to_tensor = [transforms.ToTensor()] if in_chans == 3 else []  # other counts are tensors already
    return transforms.Compose(
        [
            RandomResizedCrop(input_size, ratio=crop_ratio(input_size), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            *to_tensor,
            transforms.Normalize(mean=mean, std=std),
        ]
    )


def build_dataset(is_train: bool, args: argparse.Namespace) -> datasets.ImageFolder:
    """The fine-tuning dataset: ``train`` with the timm augmentation, ``val`` with the eval transform."""
    in_chans = getattr(args, "in_chans", 3)
    if is_train:
        transform = finetune_transform(args)
    else:
        transform = eval_transform(args.input_size, in_chans, *data_stats_of(args))
    return image_folder(os.path.join(args.data_path, "train" if is_train else "val"), transform, in_chans)


def resolve_num_classes(args: argparse.Namespace, dataset_train, dataset_val) -> int:
    """The classifier head's size: ``--nb_classes``; when it is not given, the head of the ``--resume`` checkpoint
    (a run resumed or evaluated keeps its head), else the class count of the training set (with ``--eval``, of the
    validation set), logged. The labels of the sets the run reads must fit the head (a one-line error); a head
    larger than their class counts is allowed, as official (e.g. an ImageNet-1k head on a subset), with a warning."""
    sets = [dataset_val] if args.eval else [dataset_train, dataset_val]
    counts = [
        (getattr(d, "root", None) or f"the {name} set", len(d.classes))
        for d, name in zip(sets, ["validation"] if args.eval else ["training", "validation"], strict=True)
        if getattr(d, "classes", None)
    ]
    nb_classes, source = args.nb_classes, f"--nb_classes is {args.nb_classes}"
    if nb_classes is None and args.resume:
        nb_classes = head_size(args.resume)
        source = f"the head of --resume {args.resume} has {nb_classes} outputs"
        if nb_classes is not None:
            logger.info("--nb_classes %d: the head of --resume %s", nb_classes, args.resume)
    if nb_classes is None:
        if not getattr(sets[0], "classes", None):
            raise UsageError("the labelled images have no class list to count: pass --nb_classes")
        root, nb_classes = counts[0]
        source = f"{root} has {nb_classes} (the default --nb_classes)"
        logger.info("--nb_classes %d: the class count of %s", nb_classes, root)
    for root, count in counts:
        if count > nb_classes:
            raise UsageError(f"{root} has {count} classes but {source}; set --nb_classes {count}")
    largest = max((count for _, count in counts), default=nb_classes)
    if largest < nb_classes:
        logger.warning(
            "--nb_classes %d is more than the %d classes of %s: %d outputs of the head have no images",
            nb_classes,
            largest,
            " and ".join(root for root, _ in counts),
            nb_classes - largest,
        )
    return nb_classes


def train_loader(dataset, args: argparse.Namespace, device: torch.device):
    """Shuffled, rank-sharded loader of full batches; ``set_epoch`` on its sampler reshuffles.

    Every process gets ``len(dataset) // world_size // batch_size`` steps per epoch.
    """
    sampler = ResumableSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed)
    if isinstance(dataset, CheckedImages):
        dataset.augment_seed = args.seed
    if len(sampler) < args.batch_size:
        raise UsageError(
            f"{getattr(dataset, 'root', 'the dataset')} has {len(dataset)} images: fewer than one batch of "
            f"{args.batch_size} per process ({get_world_size()} processes); lower --batch_size"
        )
    return _loader(dataset, sampler, args, device, drop_last=True)


def val_loader(dataset, args: argparse.Namespace, device: torch.device):
    """Evaluation loader: the whole set on every process, or a shard each with ``--dist_eval``."""
    if args.dist_eval and get_world_size() > 1:
        if len(dataset) % get_world_size() != 0:
            logger.warning(
                "distributed evaluation with %d images on %d processes: some images are counted twice",
                len(dataset),
                get_world_size(),
            )
        # shuffle=True as official, to reduce monitoring bias
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed
        )
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return _loader(dataset, sampler, args, device, drop_last=False)


def _loader(dataset, sampler, args, device: torch.device, drop_last: bool):
    """A DataLoader; for ``CheckedImages`` one wrapped in ``CheckedLoader`` (training: ``drop_last``)."""
    checked = isinstance(dataset, CheckedImages)
    skip = bool(getattr(args, "skip_bad_images", False))
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        collate_fn=CollateSkippingBad(dataset, substitute=skip and drop_last) if checked else None,
    )
    if not checked:
        return loader
    return CheckedLoader(loader, skip, what=dataset.root)
