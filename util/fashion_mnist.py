"""Fashion-MNIST (70k 28x28 grey images of clothes, 10 classes) as 3x32x32 tensors, for the demo and its tests.

The files are read with torchvision's ``FashionMNIST`` class, which wants the four uncompressed idx files under
``root/FashionMNIST/raw/``. Debian's ``dataset-fashion-mnist`` package installs the gzipped files under
``/usr/share/datasets/fashion-mnist/`` (read-only), so ``prepare_root`` builds that layout in a cache folder:
gzipped files are decompressed there, uncompressed ones are symlinked. Any folder holding the same files works.

Images are padded 28 -> 32 (2 black pixels each side, the background colour), optionally resized (bicubic) to
another size (64 for ``mixmim_tiny``), repeated over 3 channels and normalised with the ImageNet mean and std, as
the models expect. ``write_image_folders`` writes the same images as one-channel PNG folders, as a user's own data
would come (``scripts/fashion_mnist_folders.py``).
"""

import gzip
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST

logger = logging.getLogger(__name__)

DEFAULT_DATA_PATH = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = tuple(FashionMNIST.classes)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # the constants util/datasets.py uses
PAD = 2  # 28 + 2 * 2 = 32


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mae-mixmim`` (``~/.cache/mae-mixmim`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mae-mixmim"


def _find_files(folder: Path) -> dict[str, Path] | None:
    """The four idx files (each uncompressed or gzipped) in ``folder``, or None if any is missing."""
    found = {}
    for name in FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def prepare_root(data_path: str | os.PathLike = DEFAULT_DATA_PATH, cache_dir: str | os.PathLike | None = None) -> str:
    """A root folder that ``torchvision.datasets.FashionMNIST(root)`` reads, built from the files in ``data_path``.

    ``data_path`` may hold the four idx files (gzipped or not) directly, or in ``FashionMNIST/raw/`` or ``raw/``.
    If they are uncompressed under ``data_path/FashionMNIST/raw`` it is returned as is; otherwise the layout is
    made under ``cache_dir`` (see ``default_cache_dir``), in a subfolder named after ``data_path``, once.
    """
    data_path = Path(data_path).expanduser().resolve()
    raw = data_path / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FILES):
        return str(data_path)
    for folder in (data_path, raw, data_path / "raw"):
        files = _find_files(folder)
        if files is not None:
            break
    else:
        raise FileNotFoundError(
            f"no Fashion-MNIST files in {data_path}: expected {', '.join(FILES)} (or the same names with .gz) there "
            "or in its FashionMNIST/raw/ subfolder. On Debian/Ubuntu: apt-get install dataset-fashion-mnist "
            f"(installs them under {DEFAULT_DATA_PATH})"
        )
    key = hashlib.sha1(str(data_path).encode()).hexdigest()[:10]
    root = Path(cache_dir or default_cache_dir()) / f"fashion-mnist-{key}"
    out = root / "FashionMNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = out / name
        if dst.is_file():
            continue
        if src.suffix == ".gz":
            tmp = dst.with_suffix(f".tmp{os.getpid()}")  # write, then rename: a killed run leaves no half file
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)
        else:
            if dst.is_symlink():  # dangling link: the source moved
                dst.unlink()
            dst.symlink_to(src)
    logger.info("Fashion-MNIST from %s, readable under %s", data_path, root)
    return str(root)


class FashionMNISTImages(Dataset):
    """A split of Fashion-MNIST as ``(image (3, S, S) float, label int)`` pairs (S = ``img_size``), optionally a
    fixed random subset of ``num_samples`` images.

    The images are kept as one uint8 tensor (N, 32, 32) and normalised per item, which is much faster than PIL
    transforms on 28x28 images. ``hflip`` flips each item with probability 0.5 (training augmentation).
    """

    def __init__(
        self,
        root: str,
        train: bool,
        num_samples: int | None = None,
        seed: int = 0,
        hflip: bool = False,
        img_size: int = 32,
    ) -> None:
        base = FashionMNIST(root, train=train, download=False)
        images, targets = base.data, base.targets  # (N, 28, 28) uint8, (N,) int64
        if num_samples is not None and num_samples < len(images):
            # a fixed random subset: every class in proportion, the same for every run with this seed
            idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
            images, targets = images[idx], targets[idx]
        self.images = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))  # (N, 32, 32)
        self.targets = targets
        self.hflip = hflip
        self.img_size = img_size
        self.classes = CLASSES
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index].float().div_(255)  # (32, 32) in [0, 1]
        if self.img_size != img.shape[-1]:
            img = F.interpolate(img[None, None], size=self.img_size, mode="bicubic", align_corners=False)
            img = img[0, 0].clamp_(0, 1)  # (S, S)
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = (img.expand(3, -1, -1) - self.mean) / self.std  # (3, S, S)
        return img, int(self.targets[index])


def denormalize(imgs: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised images -> the same in [0, 1] (clipped)."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


def write_image_folders(
    root: str,
    out: str | os.PathLike,
    pretrain_images: int,
    labelled_images: int,
    test_images: int,
    seed: int = 0,
) -> dict[str, int]:
    """Write Fashion-MNIST as one-channel 32x32 PNGs (28x28 padded by 2 black pixels per side) into ``out``:

    - ``unlabelled/``: the first ``pretrain_images`` of a seeded permutation of the train split, in nested folders
      without classes (``unlabelled/012/3/12345.png``), for pretraining on unlabelled images;
    - ``labelled/train/<class>/``: the first ``labelled_images`` of the same permutation, ``labelled/val/<class>/``:
      ``test_images`` of the test split (a seeded subset; 10000: all), an ImageFolder for k-NN, probing and
      fine-tuning.

    These are the images the demo picks with the same counts and seed. Returns the number of files written per set.
    """
    out = Path(out)
    sets = {
        "unlabelled": FashionMNISTImages(root, True, pretrain_images, seed),
        "labelled/train": FashionMNISTImages(root, True, labelled_images, seed),
        "labelled/val": FashionMNISTImages(root, False, test_images, seed),
    }
    folders = [f"{i}_{name.replace('/', '-').replace(' ', '-')}" for i, name in enumerate(CLASSES)]  # "0_T-shirt-top"
    for name, data in sets.items():
        for i, (image, label) in enumerate(zip(data.images.numpy(), data.targets.tolist(), strict=True)):
            inner = f"{i // 1000:03d}/{i // 100 % 10}" if name == "unlabelled" else folders[label]
            path = out / name / inner / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(path)
        logger.info("wrote %d images to %s", len(data), out / name)
    return {name: len(data) for name, data in sets.items()}
