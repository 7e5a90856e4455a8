"""Datasets and loaders: official transform details, RandAugment's extreme draws, uint8 normalisation, the
per-epoch reshuffle and the seeding of DataLoader workers."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

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


# ------------------------------------------------------------------------------------ sampling and worker seeds


class Draws(torch.utils.data.Dataset):
    """Item i: (i, a torch, a numpy and a Python random number drawn in the worker that loads it)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple:
        import random

        return torch.tensor([float(i), torch.rand(1).item(), np.random.rand(), random.random()])


def loader_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"batch_size": 2, "num_workers": 0, "pin_mem": False, "seed": 7, **kw})


def test_train_loader_reshuffles_every_epoch_with_the_seeded_permutation() -> None:
    """DistributedSampler's order for epoch e is torch.randperm(n) under the seed ``seed + e`` (one process)."""
    from util.datasets import train_loader

    loader = train_loader(Draws(), loader_args(), torch.device("cpu"))
    orders = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        order = [int(i) for batch in loader for i in batch[:, 0]]
        expected = torch.randperm(16, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert order == expected, epoch
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_every_script_reshuffles_at_every_epoch(tmp_path, monkeypatch) -> None:
    """The epoch loops call ``set_epoch(epoch)`` on the training sampler each epoch (also in one process, which
    the official code skips)."""
    from train_utils import make_image_folder, parse, tiny_run_args

    import main_finetune
    import main_linprobe
    import main_pretrain

    calls: list[int] = []
    original = torch.utils.data.DistributedSampler.set_epoch
    monkeypatch.setattr(
        torch.utils.data.DistributedSampler, "set_epoch", lambda self, e: (calls.append(e), original(self, e))[1]
    )
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    for script, model in (
        (main_pretrain, "mae_vit_tiny_patch4"),
        (main_finetune, "vit_tiny_patch4"),
        (main_linprobe, "vit_tiny_patch4"),
    ):
        calls.clear()
        extra = {} if script is main_pretrain else {"nb_classes": 2}
        out = tmp_path / script.__name__
        script.main(
            parse(script.get_args_parser(), **tiny_run_args(data, out, model=model, epochs=3, warmup_epochs=0, **extra))
        )
        assert calls == [0, 1, 2], script.__name__


def draws_per_worker(seed: int) -> dict[int, list[list[float]]]:
    """With two workers, the draws of each worker (worker w loads the batches w, w + 2, ...), after seeding torch
    in the main process as the epoch loop does."""
    from util.datasets import train_loader

    loader = train_loader(Draws(), loader_args(num_workers=2), torch.device("cpu"))
    loader.sampler.set_epoch(0)
    torch.manual_seed(seed)
    batches = [b[:, 1:].tolist() for b in loader]
    return {w: [row for b in batches[w::2] for row in b] for w in (0, 1)}


def test_worker_random_streams_are_seeded_per_epoch_and_distinct_per_worker() -> None:
    """torch, numpy and Python ``random`` in the DataLoader workers: the same main-process seed (the epoch seed)
    gives the same draws; another seed other draws; the two workers never repeat each other's draws."""
    a, b, c = draws_per_worker(1), draws_per_worker(1), draws_per_worker(2)
    assert a == b
    for source in range(3):  # torch, numpy, random
        for w in (0, 1):
            assert [r[source] for r in a[w]] != [r[source] for r in c[w]], (source, w)
        assert not {r[source] for r in a[0]} & {r[source] for r in a[1]}, source


def test_the_training_folder_gets_the_runs_statistics(tmp_path) -> None:
    """train_folder_and_stats: --data_stats auto reads the folder's raw pixels, and the folder's transform then
    normalises with what was estimated: a pixel comes out as (value / 255 - mean) / std of that channel."""
    from train_utils import make_image_folder

    from util.datasets import train_folder_and_stats

    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=1, size=32)
    args = argparse.Namespace(data_path=str(data), in_chans=3, mean=None, std=None, data_stats="auto", seed=0,
                              resume="", finetune="")  # fmt: skip
    to_tensor_then_normalize = lambda m, s: transforms.Compose([transforms.ToTensor(), transforms.Normalize(m, s)])  # noqa: E731
    dataset, mean, std = train_folder_and_stats(args, None, to_tensor_then_normalize)
    pixels = np.stack(
        [np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path, _ in dataset.samples]
    )
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)  # (N, H, W, 3): per channel
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-5)
    image, _ = dataset[0]
    expected = (pixels[0] - np.array(mean)) / np.array(std)  # (H, W, 3)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)

    given = object()  # a dataset the caller built keeps its own transform
    assert train_folder_and_stats(argparse.Namespace(**{**vars(args), "data_stats": None}), given, None)[0] is given
