"""ImageFolder datasets and the official transforms for pretraining, fine-tuning and linear probing.

``data_path/train`` and ``data_path/val`` hold one subfolder per class. A missing or empty folder is a
``UsageError`` naming it.
"""

import argparse
import logging
import os

import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.crop import RandomResizedCrop
from util.dist import get_rank, get_world_size
from util.misc import UsageError, seed_worker

logger = logging.getLogger(__name__)


def image_folder(root: str, transform) -> datasets.ImageFolder:
    """``ImageFolder(root)``, with a one-line error for a missing folder or one without images."""
    if not os.path.isdir(root):
        raise UsageError(f"data folder {root} does not exist (expected an ImageFolder: one subfolder per class)")
    try:
        dataset = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"data folder {root} holds no images in class subfolders: {e}") from e
    logger.info("%s: %d images, %d classes", root, len(dataset), len(dataset.classes))
    return dataset


def pretrain_transform(input_size: int) -> transforms.Compose:
    """MAE/MixMIM pretraining: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, ImageNet normalisation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ]
    )


def eval_transform(input_size: int) -> transforms.Compose:
    """Resize to keep the 224/256 ratio (no crop margin above 224), center crop, normalise: the official eval."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def finetune_transform(args: argparse.Namespace):
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment (``--aa``), random erasing."""
    return create_transform(
        input_size=args.input_size,
        is_training=True,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation="bicubic",
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def linprobe_transform(input_size: int) -> transforms.Compose:
    """Linear probe: the TF-style RandomResizedCrop (bicubic) and a flip only."""
    return transforms.Compose(
        [
            RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ]
    )


def build_dataset(is_train: bool, args: argparse.Namespace) -> datasets.ImageFolder:
    """The fine-tuning dataset: ``train`` with the timm augmentation, ``val`` with the eval transform."""
    transform = finetune_transform(args) if is_train else eval_transform(args.input_size)
    return image_folder(os.path.join(args.data_path, "train" if is_train else "val"), transform)


def check_num_classes(dataset: datasets.ImageFolder, nb_classes: int) -> None:
    """Labels must fit the classifier head."""
    if len(dataset.classes) > nb_classes:
        raise UsageError(
            f"{dataset.root} has {len(dataset.classes)} classes but --nb_classes is {nb_classes}; "
            f"set --nb_classes {len(dataset.classes)}"
        )


def train_loader(dataset, args: argparse.Namespace, device: torch.device) -> torch.utils.data.DataLoader:
    """Shuffled, rank-sharded loader of full batches; ``set_epoch`` on its sampler reshuffles.

    Every process gets ``len(dataset) // world_size // batch_size`` steps per epoch.
    """
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed
    )
    if len(sampler) < args.batch_size:
        raise UsageError(
            f"{getattr(dataset, 'root', 'the dataset')} has {len(dataset)} images: fewer than one batch of "
            f"{args.batch_size} per process ({get_world_size()} processes); lower --batch_size"
        )
    return _loader(dataset, sampler, args, device, drop_last=True)


def val_loader(dataset, args: argparse.Namespace, device: torch.device) -> torch.utils.data.DataLoader:
    """Evaluation loader: the whole set on every process, or a shard each with ``--dist_eval``."""
    if args.dist_eval and get_world_size() > 1:
        if len(dataset) % get_world_size() != 0:
            logger.warning(
                "distributed evaluation with %d images on %d processes: some images are counted twice",
                len(dataset), get_world_size(),
            )
        # shuffle=True as official, to reduce monitoring bias
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=args.seed
        )
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return _loader(dataset, sampler, args, device, drop_last=False)


def _loader(dataset, sampler, args, device: torch.device, drop_last: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=seed_worker,
    )
