"""``main_pretrain.py --decode_on_device``: the workers read bytes and draw the augmentation, the device decodes,
crops, resizes and flips. On the CPU (``decode_jpeg`` without a device) the path runs the same code but nvJPEG;
``tests/test_cuda.py`` compares the CUDA decode."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from train_utils import parse, tiny_run_args

import main_pretrain
from util.datasets import pretrain_transform
from util.device_decode import DeviceCrop, collate_encoded, read_encoded
from util.errors import BadImageError, UsageError
from util.seeding import seeded_rng


def photo(height: int = 120, width: int = 170, seed: int = 0) -> np.ndarray:
    """A smooth colour ramp with noise (what JPEG is made for), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((height, width, 3))
    x[..., 0] = np.linspace(0, 255, width)[None, :]
    x[..., 1] = np.linspace(255, 0, height)[:, None]
    x[..., 2] = 128 + 60 * np.sin(np.arange(width) / 9)[None, :]
    return (x + rng.normal(0, 12, x.shape)).clip(0, 255).astype(np.uint8)


def write(path: Path, kind: str, seed: int = 0) -> Path:
    img = Image.fromarray(photo(seed=seed))
    if kind == "grey_jpeg":
        img = img.convert("L")
    elif kind == "cmyk_jpeg":
        img = img.convert("CMYK")
    img.save(path, format="PNG" if kind == "png" else "JPEG", quality=90)
    return path


@pytest.mark.parametrize("kind, encoded", [("rgb_jpeg", True), ("grey_jpeg", True), ("cmyk_jpeg", False),
                                           ("png", False)])  # fmt: skip
def test_the_device_path_gives_the_cpu_transforms_boxes_flips_and_pixels(tmp_path: Path, kind: str, encoded: bool):
    """Seeded alike, the device path draws torchvision's RandomResizedCrop box for the real image (scale 0.2-1,
    ratio 3/4-4/3) and the flip of the CPU transform, and its pixels are within one level of the CPU transform's
    (the same libjpeg decode; torchvision's antialiased bicubic against PIL's), over 30 seeds. Baseline RGB and grey
    JPEGs travel encoded; CMYK JPEGs and PNGs are decoded by PIL in the worker."""
    path = write(tmp_path / f"img.{'png' if kind == 'png' else 'jpg'}", kind)
    cpu, device = pretrain_transform(32, normalize=False), DeviceCrop(32)
    flips, diffs = set(), []
    for seed in range(30):
        with seeded_rng(seed):
            reference_box = transforms.RandomResizedCrop.get_params(Image.open(path), [0.2, 1.0], [3 / 4, 4 / 3])
        with seeded_rng(seed):
            expected = cpu(Image.open(path).convert("RGB"))  # (3, 32, 32) uint8
        with seeded_rng(seed):
            item = device(read_encoded(str(path)))
        assert item.encoded is encoded and item.box == reference_box
        flips.add(item.flip)
        got = collate_encoded([item]).to("cpu")[0]
        assert got.dtype == torch.uint8 and got.shape == expected.shape
        diffs.append((got.int() - expected.int()).abs())
    diff = torch.stack(diffs).float()
    assert flips == {True, False}
    assert diff.max() <= 1 and diff.mean() < 0.25, (diff.max(), diff.mean())


def test_a_file_that_does_not_decode_is_named(tmp_path: Path) -> None:
    raw = write(tmp_path / "ok.jpg", "rgb_jpeg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # the header reads, the data ends early
    items = [DeviceCrop(32)(read_encoded(str(tmp_path / name))) for name in ("ok.jpg", "cut.jpg")]
    with pytest.raises(BadImageError, match=r"cannot decode image .*cut\.jpg \(Image is incomplete or truncated\)"):
        collate_encoded(items).to("cpu")


def jpeg_folder(root: Path, n: int = 8) -> Path:
    for i in range(n):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"{i}.jpg", "rgb_jpeg" if i % 3 else "grey_jpeg", seed=i)
    return root


def test_pretraining_with_decode_on_device_follows_the_cpu_path(tmp_path: Path) -> None:
    """The same run (seed, masks, boxes, flips) with the images decoded on the device: every step's images within
    one level of the CPU path's, so the losses agree to 1e-3. Two loader workers: the batches cross processes."""
    data = jpeg_folder(tmp_path / "data")
    losses = {}
    for on_device in (False, True):
        out = tmp_path / f"out_{on_device}"
        flags = tiny_run_args(
            data, out, model="mae_vit_tiny_patch4", epochs=2, warmup_epochs=1, num_workers=2, decode_on_device=on_device
        )
        main_pretrain.main(parse(main_pretrain.get_args_parser(), **flags))
        losses[on_device] = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)

    with pytest.raises(UsageError, match="--decode_on_device decodes RGB JPEGs: it needs --in_chans 3"):
        flags = tiny_run_args(data, tmp_path / "x", model="mae_vit_tiny_patch4", decode_on_device=True, in_chans=1)
        main_pretrain.main(parse(main_pretrain.get_args_parser(), **flags, mean=0.5, std=0.2))
