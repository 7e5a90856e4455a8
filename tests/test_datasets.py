"""The fine-tuning and evaluation transforms: official settings, and no crash on RandAugment's extreme draws."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.datasets import eval_transform, finetune_transform, normalize_on_device, pretrain_transform


def _args(**kw) -> argparse.Namespace:
    base = dict(input_size=32, color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1)
    return argparse.Namespace(**{**base, **kw})


def _image(seed: int = 0, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def _posterize_ops(transform) -> list:
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    return [op for op in ops if op.name.startswith("Posterize")]


def test_randaugment_posterize_at_full_magnitude_gives_black_instead_of_raising():
    # The official --aa draws the magnitude from N(9, 0.5) clipped to 10; at 10, PosterizeIncreasing keeps 0 bits,
    # which Pillow 13 rejects (ValueError) and older Pillow, as used by the official code, turns into black.
    (op,) = _posterize_ops(finetune_transform(_args()))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = op(_image())
    assert out.size == (48, 48) and out.mode == "RGB"
    assert np.asarray(out).max() == 0
    op.magnitude = 5  # 2 bits kept: each channel value is a multiple of 64, not all zero
    values = np.unique(np.asarray(op(_image())))
    assert set(values.tolist()) <= {0, 64, 128, 192} and values.max() > 0


def test_finetune_transform_with_only_full_posterize_gives_normalised_black():
    transform = finetune_transform(_args(reprob=0.0))
    (op,) = _posterize_ops(transform)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    (randaugment,) = [t for t in transform.transforms if hasattr(t, "ops")]
    randaugment.ops = [op]  # every RandAugment layer draws posterize at 0 bits
    out = transform(_image())
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(out, ((0 - mean) / std).view(3, 1, 1).expand(3, 32, 32))


@pytest.mark.parametrize("input_size, resized", [(224, 256), (32, 36), (384, 384)])
def test_eval_transform_resizes_with_the_official_crop_ratio(input_size, resized):
    transform = eval_transform(input_size)
    assert transform.transforms[0].size == resized
    assert tuple(transform(_image(size=500)).shape) == (3, input_size, input_size)


def test_uint8_pretraining_images_normalised_on_the_device_equal_the_cpu_transform():
    image = _image(2, size=300)
    torch.manual_seed(0)
    on_cpu = pretrain_transform(64)(image)
    torch.manual_seed(0)  # the same crop and flip
    raw = pretrain_transform(64, normalize=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 64, 64)
    batch = normalize_on_device(raw.unsqueeze(0))
    assert batch.dtype == torch.float32
    assert torch.equal(batch[0], on_cpu)  # the same arithmetic: bit for bit
    assert normalize_on_device(batch) is batch  # float input: left alone
