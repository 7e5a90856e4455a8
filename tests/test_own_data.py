"""Pretraining on one's own data: unlabelled folders and file lists, any channel count (grey-scale, 16-bit,
``.npy``), per-channel statistics (flags, ``--data_stats auto``, the checkpoint's), and the patch embedding of a
3-channel checkpoint adapted to N channels."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from model_table import build_classifier, build_pretrain_model
from util import reconstruction
from util.checkpoint import load_pretrained
from util.data_stats import estimate_data_stats
from util.datasets import (
    CheckedLoader,
    ResizeToCover,
    eval_transform,
    load_tensor,
    pretrain_dataset,
    pretrain_transform,
    train_loader,
)
from util.errors import BadImageError, UsageError

# ------------------------------------------------------------------------------------------------ generated data


def grey_images(root: Path, n: int, size: int = 36, seed: int = 0) -> list[Path]:
    """``n`` random 8-bit grey-scale PNGs spread over nested folders (no class structure); their paths, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / f"site{i % 3}" / ("a" if i % 2 else "b" / Path("deep"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        Image.fromarray((rng.random((size, size)) * 200 + 20).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return sorted(paths)


def npy_images(root: Path, n: int, chans: int = 5, size: int = 36, seed: int = 0) -> list[Path]:
    """``n`` float32 (H, W, chans) arrays, channel c around c / chans."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = rng.random((size, size, chans), dtype=np.float32) * 0.2 + np.arange(chans, dtype=np.float32) / chans
        np.save(root / f"{i}.npy", a)
        paths.append(root / f"{i}.npy")
    return paths


# ------------------------------------------------------------------------------------------------ datasets


def test_a_folder_at_any_depth_and_a_list_file(tmp_path: Path) -> None:
    written = grey_images(tmp_path / "data", 7)
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / ".hidden.png").write_bytes(b"")
    folder = pretrain_dataset(str(tmp_path / "data"), None, in_chans=1)
    assert [Path(p) for p, _ in folder.samples] == written
    assert {t for _, t in folder.samples} == {0}

    listed = [written[4], written[0], written[2]]
    lines = ["# my subset", "", *(str(p.relative_to(tmp_path)) for p in listed), "   "]
    (tmp_path / "subset.txt").write_text("\n".join(lines) + "\n")
    subset = pretrain_dataset(str(tmp_path / "subset.txt"), None, in_chans=1)
    assert [Path(p) for p, _ in subset.samples] == listed  # in the file's order, relative to its folder

    # main_pretrain.py takes the list file as --data_path (4 listed images: one step of 4)
    (tmp_path / "four.txt").write_text("\n".join(str(p.relative_to(tmp_path)) for p in written[:4]) + "\n")
    out = tmp_path / "out"
    stats = main_pretrain.main(parse(main_pretrain.get_args_parser(), **pretrain_flags(tmp_path / "four.txt", out),
                                     in_chans=1, mean=0.5, std=0.25))  # fmt: skip
    assert np.isfinite(stats["loss"]) and json.loads((out / "args.json").read_text())["data_path"].endswith("four.txt")


def test_one_line_errors_for_empty_folders_missing_listed_files_and_paths(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(UsageError, match=r"empty holds no image files"):
        pretrain_dataset(str(tmp_path / "empty"), None)
    (tmp_path / "list.txt").write_text("\n".join(f"gone{i}.png" for i in range(5)) + "\n")
    with pytest.raises(UsageError, match=r"do not exist: .*gone0.png, .*gone1.png, .*gone2.png, \.\.\. \(5 in all\)"):
        pretrain_dataset(str(tmp_path / "list.txt"), None)
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    with pytest.raises(UsageError, match="names no files"):
        pretrain_dataset(str(tmp_path / "comments.txt"), None)
    with pytest.raises(UsageError, match="nowhere does not exist"):
        pretrain_dataset(str(tmp_path / "nowhere"), None)


def test_a_list_file_is_utf8_text_and_anything_else_is_a_one_line_error(tmp_path: Path) -> None:
    paths = grey_images(tmp_path / "data", 2)
    listing = "\n".join(str(p.relative_to(tmp_path)) for p in paths) + "\n"
    (tmp_path / "bom.txt").write_bytes(listing.encode("utf-8-sig"))  # what Windows' Notepad writes as UTF-8
    assert [p for p, _ in pretrain_dataset(str(tmp_path / "bom.txt"), None, 1).samples] == list(map(str, paths))
    tiff, npy = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tiff, "TIFF")
    np.save(npy, np.zeros((8, 8), np.float32))
    cases = {
        "utf16.txt": (listing.encode("utf-16"), r"utf16.txt is UTF-16 text; save it as UTF-8"),
        "latin1.txt": ((listing + "# caf\xe9\n").encode("latin-1"), r"line 3 is not UTF-8 text \(byte 0xe9\)"),
        "blob.bin": (bytes(range(256)) * 8, "blob.bin is a binary file, not a folder or a list file of image paths"),
        "scan": (tiff.getvalue(), "scan is an image, not a folder or a list file of image paths"),  # no extension
        "bands.npy": (npy.getvalue(), "bands.npy is an image, not a folder or a list file of image paths"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UsageError, match=message) as e:
            pretrain_dataset(str(tmp_path / name), None, 1)
        assert "\n" not in str(e.value)


def test_a_folder_where_no_image_can_be_read_is_a_one_line_error_also_when_skipping(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.png").write_bytes(b"not a png")
    args = parse(main_pretrain.get_args_parser(), batch_size=2, num_workers=0, seed=0, skip_bad_images=True)
    loader = train_loader(pretrain_dataset(str(tmp_path / "data"), pretrain_transform(32)), args, torch.device("cpu"))
    with pytest.raises(BadImageError, match=r"data: no readable image \(4 unreadable files in this pass\)"):
        list(loader)


def test_grey_16bit_and_npy_files_are_read_as_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    x = load_tensor(str(tmp_path / "g.png"), 1)
    assert x.shape == (1, 5, 7)
    assert torch.equal(x[0], torch.from_numpy(grey).float() / 255)  # one channel, not repeated to three

    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")  # a 16-bit grey PNG
    torch.testing.assert_close(
        load_tensor(str(tmp_path / "d.png"), 1)[0], torch.from_numpy(deep.astype(np.float32)) / 65535
    )

    bands = rng.random((5, 7, 5)).astype(np.float32)
    np.save(tmp_path / "b.npy", bands)
    assert torch.equal(load_tensor(str(tmp_path / "b.npy"), 5), torch.from_numpy(bands).permute(2, 0, 1))
    with pytest.raises(ValueError, match="5 channels, but --in_chans is 4"):
        load_tensor(str(tmp_path / "b.npy"), 4)


def test_an_image_with_another_channel_count_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    grey_images(tmp_path / "data", 4)
    rgb = tmp_path / "data" / "colour.png"
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(rgb)
    dataset = pretrain_dataset(str(tmp_path / "data"), pretrain_transform(32, in_chans=1, mean=[0.5], std=[0.5]), 1)
    args = parse(main_pretrain.get_args_parser(), batch_size=5, num_workers=0, seed=0)
    loader = train_loader(dataset, args, torch.device("cpu"))
    assert isinstance(loader, CheckedLoader)
    with pytest.raises(
        BadImageError, match=rf"cannot read image {rgb} \(ValueError: 3 channels, but --in_chans is 1\)"
    ):
        list(loader)
    args.skip_bad_images, args.batch_size = True, 4
    batches = list(train_loader(dataset, args, torch.device("cpu")))
    assert [tuple(b.shape) for b, _ in batches] == [(4, 1, 32, 32)]  # the batch refilled with a grey image


def test_tensor_transforms_keep_each_channel_and_normalise_it() -> None:
    """A constant image stays constant under any crop, flip and bicubic resize: each output channel is
    (value - mean) / std of its own channel."""
    values = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    image = values.view(5, 1, 1).expand(5, 40, 50).clone()
    mean, std = [0.2, 0.2, 0.4, 0.4, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5]
    torch.manual_seed(0)
    out = pretrain_transform([24, 32], in_chans=5, mean=mean, std=std)(image)
    assert out.shape == (5, 24, 32)
    expected = (values - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out, expected.view(5, 1, 1).expand(5, 24, 32), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ statistics


def test_estimated_statistics_equal_numpy_on_the_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.random((h, w, 2)).astype(np.float32) * [1, 3] for h, w in ((6, 9), (11, 4), (8, 8))]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i}.npy", a)
    dataset = pretrain_dataset(str(tmp_path), None, in_chans=2)
    pixels = np.concatenate([a.reshape(-1, 2) for a in arrays]).astype(np.float64)  # every pixel once
    stats = estimate_data_stats(dataset, num_images=1000, seed=0)
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-6)
    one = estimate_data_stats(dataset, num_images=1, seed=3)  # a sample of one image: that image's statistics
    assert any(np.allclose(one["mean"], a.reshape(-1, 2).mean(0), rtol=1e-6) for a in arrays)


def test_a_constant_band_is_named_and_the_statistics_asked_for(tmp_path: Path) -> None:
    """A band that is the same everywhere has std 0, which cannot normalise: one line naming it and its value."""
    for path in npy_images(tmp_path / "bands", 3, chans=4):
        bands = np.load(path)
        bands[:, :, 1] = 0.25
        np.save(path, bands)
    dataset = pretrain_dataset(str(tmp_path / "bands"), None, in_chans=4)
    message = r"1 of 4 channels are constant over the 3 sampled images \(channel 1: 0.25\).* give --mean and --std"
    with pytest.raises(UsageError, match=message):
        estimate_data_stats(dataset)


def pretrain_flags(data: Path, out: Path, **kw) -> dict:
    return tiny_run_args(data, out, model="mae_vit_tiny_patch4", epochs=1, warmup_epochs=0, **kw)


def test_data_stats_auto_is_stored_and_reused_by_the_probes(tmp_path: Path, caplog) -> None:
    """1-channel pretraining with --data_stats auto: the checkpoint (weights_only) and args.json hold numpy's
    statistics of the images; linear probing and k-NN of the checkpoint normalise with them without a flag, and an
    explicit other --mean wins with a warning."""
    paths = grey_images(tmp_path / "data", 8)
    out = tmp_path / "pre"
    main_pretrain.main(parse(main_pretrain.get_args_parser(), **pretrain_flags(tmp_path / "data", out),
                             in_chans=1, data_stats="auto"))  # fmt: skip
    pixels = np.concatenate([np.asarray(Image.open(p), np.float64).ravel() / 255 for p in paths])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    np.testing.assert_allclose(ckpt["data_stats"]["mean"], [pixels.mean()], rtol=1e-6)
    np.testing.assert_allclose(ckpt["data_stats"]["std"], [pixels.std()], rtol=1e-6)
    saved = json.loads((out / "args.json").read_text())
    assert saved["mean"] == ckpt["data_stats"]["mean"] and saved["in_chans"] == 1
    assert ckpt["model"]["patch_embed.proj.weight"].shape[1] == 1

    # a labelled grey ImageFolder for the probes
    for split in ("train", "val"):
        for c in range(2):
            grey_images(tmp_path / "lab" / split / f"class{c}", 2, seed=c)
    flags = tiny_run_args(tmp_path / "lab", tmp_path / "lp", model="vit_tiny_patch4", epochs=1, warmup_epochs=0,
                          nb_classes=2, finetune=out / "checkpoint-last.pth", in_chans=1)  # fmt: skip
    args = parse(main_linprobe.get_args_parser(), **flags)
    main_linprobe.main(args)
    assert args.mean == ckpt["data_stats"]["mean"] and args.std == ckpt["data_stats"]["std"]
    knn_args = parse(main_knn.get_args_parser(), model="vit_tiny_patch4", finetune=out / "checkpoint-last.pth",
                     data_path=tmp_path / "lab", input_size=32, batch_size=4, device="cpu", num_workers=0,
                     in_chans=1, mean=0.5, std=0.25)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        main_knn.main(knn_args)
    assert knn_args.mean == [0.5]
    assert any("not those of --finetune" in r.getMessage() for r in caplog.records)


def test_statistics_flags_errors(tmp_path: Path) -> None:
    grey_images(tmp_path / "data", 4)
    parser = main_pretrain.get_args_parser()
    cases = [
        (dict(in_chans=1), "--in_chans 1: give the images' --mean and --std"),
        (dict(in_chans=2, mean="0.5 0.5", std=0.2), "need 2 values each"),
        (dict(mean=0.5), "give both --mean and --std"),
        (dict(in_chans=1, mean=0.5, std=0.2, data_stats="auto"), "not both"),
        (dict(in_chans=1, mean=0.5, std=0.0), "must be positive"),
    ]
    for flags, message in cases:
        argv = []
        for k, v in {**pretrain_flags(tmp_path / "data", tmp_path / "out"), **flags}.items():
            argv += [f"--{k}", *str(v).split()]
        with pytest.raises(UsageError, match=message):
            main_pretrain.main(parser.parse_args(argv))


def test_five_band_npy_pretraining_runs_and_stores_its_statistics(tmp_path: Path) -> None:
    npy_images(tmp_path / "bands", 8)
    mean, std = "0.1 0.3 0.5 0.7 0.9", "0.1 0.1 0.1 0.1 0.1"
    argv = []
    for k, v in {
        **pretrain_flags(tmp_path / "bands", tmp_path / "out"),
        "in_chans": 5,
        "mean": mean,
        "std": std,
    }.items():
        argv += [f"--{k}", *str(v).split()]
    stats = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    assert np.isfinite(stats["loss"])
    ckpt = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["data_stats"] == {"mean": [0.1, 0.3, 0.5, 0.7, 0.9], "std": [0.1] * 5}
    assert ckpt["model"]["decoder_pred.weight"].shape[0] == 4 * 4 * 5  # predicts p*p*C values per patch


# ------------------------------------------------------------------------------------ channels of a checkpoint


@pytest.mark.parametrize("in_chans", [1, 5, 6])
def test_a_3_channel_patch_embedding_is_adapted_by_timms_rule(tmp_path: Path, in_chans: int, caplog) -> None:
    torch.manual_seed(0)
    source = build_pretrain_model("mae_vit_tiny_patch4", 32)
    torch.save({"model": source.state_dict()}, tmp_path / "rgb.pth")
    w = source.state_dict()["patch_embed.proj.weight"]  # (D, 3, p, p)
    model = build_classifier("vit_tiny_patch4", 32, 10, 0.0, True, in_chans=in_chans)
    with caplog.at_level(logging.INFO):
        load_pretrained(model, str(tmp_path / "rgb.pth"))
    assert any("adapted from 3 to" in r.getMessage() for r in caplog.records)
    got = model.patch_embed.proj.weight.detach()
    if in_chans == 1:
        expected = w[:, 0:1] + w[:, 1:2] + w[:, 2:3]
    else:  # channel c takes RGB channel c mod 3, scaled by 3 / N
        expected = torch.stack([w[:, c % 3] for c in range(in_chans)], dim=1) * (3 / in_chans)
    torch.testing.assert_close(got, expected)
    if in_chans % 3 == 0 or in_chans == 1:  # a grey image repeated over the channels: the RGB model's embedding
        g = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(
            model.patch_embed(g.expand(-1, in_chans, -1, -1)), source.patch_embed(g.expand(-1, 3, -1, -1)),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ image shape


def test_non_square_mae_pretraining_uses_a_rectangular_sincos_grid(tmp_path: Path) -> None:
    from util.pos_embed import get_2d_sincos_pos_embed

    grey_images(tmp_path / "data", 8, size=52)
    argv = []
    for k, v in {**pretrain_flags(tmp_path / "data", tmp_path / "out"), "input_size": "32 48", "in_chans": 1,
                 "mean": 0.5, "std": 0.25}.items():  # fmt: skip
        argv += [f"--{k}", *str(v).split()]
    stats = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    assert np.isfinite(stats["loss"])
    assert json.loads((tmp_path / "out" / "args.json").read_text())["input_size"] == [32, 48]
    ckpt = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    expected = torch.from_numpy(get_2d_sincos_pos_embed(192, (8, 12), cls_token=True)).float()[None]
    assert torch.equal(ckpt["model"]["pos_embed"], expected)


@pytest.mark.parametrize(
    "size, message", [("64 96", "takes square images only"), ("48", "cannot be built for --input_size 48")]
)
def test_mixmim_says_which_sizes_it_takes(tmp_path: Path, size: str, message: str) -> None:
    grey_images(tmp_path / "data", 4)
    argv = []
    for k, v in {
        **pretrain_flags(tmp_path / "data", tmp_path / "out"),
        "model": "mixmim_tiny",
        "input_size": size,
    }.items():
        argv += [f"--{k}", *str(v).split()]
    with pytest.raises(UsageError, match=message):
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("width, height, resized", [(100, 60, (73, 43)), (200, 50, (144, 36)), (60, 100, (73, 121))])
def test_the_rectangular_eval_transform_covers_then_crops_the_center(width: int, height: int, resized) -> None:
    """--input_size 32 64 (longer side <= 224: crop_pct 224/256): the image is resized, keeping its ratio, to the
    smallest size covering floor(32 / 0.875) x floor(64 / 0.875) = 36 x 73 (H x W), the other side truncated as
    torchvision's Resize truncates the longer one (100 x 60: 73 / 100 > 36 / 60, so 73 wide, int(60 * 0.73) = 43
    high), then its center 32 x 64 is cut (torchvision's rounding of the offsets)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    transform = eval_transform((32, 64))
    resize, crop, to_tensor, normalize = transform.transforms
    assert resize(img).size == resized  # PIL: (W, H)
    top, left = int(round((resized[1] - 32) / 2)), int(round((resized[0] - 64) / 2))
    expected = np.asarray(img.resize(resized, Image.BICUBIC))[top : top + 32, left : left + 64]
    np.testing.assert_array_equal(np.asarray(crop(resize(img))), expected)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    reference = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(transform(img), reference, rtol=0, atol=1e-5)

    # the same geometry on the tensors of other channel counts
    x = torch.rand(5, height, width)
    got = eval_transform((32, 64), 5, [0.0] * 5, [1.0] * 5)(x)
    scaled = TF.resize(x, [resized[1], resized[0]], InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(got, scaled[:, top : top + 32, left : left + 64], rtol=0, atol=1e-6)


def test_the_eval_resize_to_a_square_is_the_official_one_and_crop_pct_follows_the_longer_side() -> None:
    rng = np.random.default_rng(1)
    for w, h in ((100, 60), (60, 100)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(
            np.asarray(ResizeToCover((36, 36))(img)), np.asarray(transforms.Resize(36, InterpolationMode.BICUBIC)(img))
        )
        torch.testing.assert_close(eval_transform([32, 32])(img), eval_transform(32)(img), rtol=0, atol=0)
    assert eval_transform((224, 448)).transforms[0].size == (224, 448)  # 448 > 224: no margin, as 384 officially
    assert eval_transform((112, 224)).transforms[0].size == (128, 256)  # 224 / (224 / 256) = 256


def test_non_square_training_crops_are_not_stretched() -> None:
    """For 32 x 64 images every training transform draws crops whose width / height lies in (3/4 * 2, 4/3 * 2) (the
    official range times W / H), covering it, so the crop resized to 32 x 64 is distorted no more than a square
    crop resized to a square; a square size keeps the official (3/4, 4/3)."""
    from types import SimpleNamespace

    from util.datasets import finetune_transform, linprobe_transform
    from util.device_decode import DeviceCrop

    img = Image.new("RGB", (2000, 2000))  # large: no draw hits the border or the fallback
    ft = SimpleNamespace(input_size=[32, 64], aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25,
                         remode="pixel", recount=1)  # fmt: skip
    crops = {
        "pretrain": pretrain_transform((32, 64)).transforms[0],
        "pretrain 1 channel": pretrain_transform((32, 64), in_chans=1).transforms[0],
        "finetune": finetune_transform(ft).transforms[0],
        "finetune 1 channel": finetune_transform(SimpleNamespace(**vars(ft), in_chans=1), [0.5], [0.2]).transforms[0],
        "linprobe": linprobe_transform((32, 64)).transforms[0],
        "device decode": DeviceCrop((32, 64)),
    }
    for name, crop in crops.items():
        torch.manual_seed(0)
        get_params = getattr(type(crop), "get_params", transforms.RandomResizedCrop.get_params)  # DeviceCrop's
        aspects = []
        for _ in range(300):
            _, _, h, w = get_params(img, list(crop.scale), list(crop.ratio))
            if h < 2000 and w < 2000:  # the linear probe's TF-style crop clips a box larger than the image
                aspects.append(w / h)
        assert 1.5 - 0.02 < min(aspects) < 1.7 and 2.4 < max(aspects) < 8 / 3 + 0.02, name
    assert pretrain_transform(32).transforms[0].ratio == (3 / 4, 4 / 3) == DeviceCrop(32).ratio


def resized_grid(embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Reference: the grid tokens of (1, 1 + Gh*Gw, D), row-major, as a D-channel Gh x Gw image resized by torch's
    bicubic (the official rule), the cls row kept."""
    image = embed[0, 1:].T.reshape(embed.shape[-1], *old)
    out = torch.nn.functional.interpolate(image[None], size=new, mode="bicubic", align_corners=False)[0]
    return torch.cat([embed[:, :1], out.reshape(embed.shape[-1], -1).T[None]], dim=1)


def test_non_square_vit_fine_tuning_and_linear_probing_from_a_square_checkpoint(tmp_path: Path, caplog) -> None:
    """A square 32 px MAE checkpoint (no recorded size, as the official ones) into ViTs for 32 x 48 images: the
    8 x 8 position grid is resized to 8 x 12 (the linear probe keeps it frozen, so its checkpoint holds exactly
    that); fine-tuning trains, records [32, 48], and --eval of its checkpoint gives its accuracy. That checkpoint
    records its grid, so loading it for 48 x 32 images (as many positions, 12 x 8) resizes 8 x 12 -> 12 x 8."""
    torch.manual_seed(0)
    source = build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict()
    source["pos_embed"] = torch.randn_like(source["pos_embed"])  # not the sin-cos table: any layout error shows
    torch.save({"model": source}, tmp_path / "square.pth")
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, val_per_class=2, size=52)
    common = dict(model="vit_tiny_patch4", epochs=1, warmup_epochs=0, nb_classes=2, finetune=tmp_path / "square.pth")

    lp = parse(main_linprobe.get_args_parser(), **tiny_run_args(data, tmp_path / "lp", **common))
    lp.input_size = [32, 48]
    main_linprobe.main(lp)
    probed = torch.load(tmp_path / "lp" / "checkpoint-last.pth", weights_only=False)["model"]["pos_embed"]
    torch.testing.assert_close(probed, resized_grid(source["pos_embed"], (8, 8), (8, 12)), rtol=0, atol=1e-5)

    ft = parse(main_finetune.get_args_parser(), **tiny_run_args(data, tmp_path / "ft", **common))
    ft.input_size = [32, 48]
    trained = main_finetune.main(ft)
    assert json.loads((tmp_path / "ft" / "args.json").read_text())["input_size"] == [32, 48]
    ckpt = tmp_path / "ft" / "checkpoint-last.pth"
    ev = parse(main_finetune.get_args_parser(), **tiny_run_args(data, tmp_path / "ev", model="vit_tiny_patch4",
               nb_classes=2, eval=True, resume=ckpt))  # fmt: skip
    ev.input_size = [32, 48]
    evaluated = main_finetune.main(ev)
    assert evaluated["acc1"] == trained["acc1"] and evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)

    tuned = torch.load(ckpt, weights_only=False)["model"]["pos_embed"]  # (1, 1 + 8 * 12, D), trained
    turned = build_classifier("vit_tiny_patch4", (48, 32), 2, 0.0, True)
    load_pretrained(turned, str(ckpt))
    torch.testing.assert_close(turned.pos_embed.detach(), resized_grid(tuned, (8, 12), (12, 8)), rtol=0, atol=1e-5)

    # 64 positions and no recorded size, as the official checkpoints: taken as square (8 x 8) and resized to the
    # model's 4 x 16 grid, though that has 64 positions too (with a warning naming both readings)
    wide = build_classifier("vit_tiny_patch4", (16, 64), 2, 0.0, False)
    with caplog.at_level(logging.WARNING):
        load_pretrained(wide, str(tmp_path / "square.pth"))
    assert any("taken as a square 8x8 one" in r.getMessage() for r in caplog.records)
    expected = resized_grid(source["pos_embed"], (8, 8), (4, 16))
    torch.testing.assert_close(wide.pos_embed.detach(), expected, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="takes square images only"):
        build_classifier("mixmim_tiny", (64, 96), 2, 0.0)


# ------------------------------------------------------------------------------------------------ continued pretraining


def constant_field(embed: torch.Tensor) -> torch.Tensor:
    """(1, 1+L, D): the cls row kept, every grid position the same vector (bicubic resizing keeps it)."""
    field = embed.clone()
    field[:, 1:] = torch.linspace(-1, 1, embed.shape[-1])
    return field


def test_mae_continued_pretraining_from_a_3_channel_checkpoint_with_its_decoder(tmp_path: Path, caplog) -> None:
    """An official-style checkpoint (encoder + decoder, 3 channels, 32 px) into a 1-channel MAE at 48 px: the
    blocks and decoder load, the patch embedding is summed over RGB, both position embeddings are resized, the
    decoder's output layer (p*p*3 values) starts fresh."""
    torch.manual_seed(0)
    source = build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict()
    source["pos_embed"], source["decoder_pos_embed"] = map(
        constant_field, (source["pos_embed"], source["decoder_pos_embed"])
    )
    torch.save({"model": source}, tmp_path / "mae_visualize.pth")
    model = build_pretrain_model("mae_vit_tiny_patch4", 48, in_chans=1)
    fresh_pred = model.decoder_pred.weight.detach().clone()
    with caplog.at_level(logging.INFO):
        load_pretrained(model, str(tmp_path / "mae_visualize.pth"), classifier=False)
    own = model.state_dict()
    for key in ("blocks.5.mlp.fc2.weight", "decoder_blocks.1.attn.qkv.weight", "decoder_embed.weight", "mask_token"):
        assert torch.equal(own[key], source[key]), key
    w = source["patch_embed.proj.weight"]
    torch.testing.assert_close(own["patch_embed.proj.weight"], w[:, 0:1] + w[:, 1:2] + w[:, 2:3])
    for key in ("pos_embed", "decoder_pos_embed"):
        assert own[key].shape[1] == 1 + 12 * 12
        torch.testing.assert_close(own[key][:, 1:], source[key][:, 1:2].expand(-1, 144, -1), rtol=0, atol=1e-5)
        assert torch.equal(own[key][:, :1], source[key][:, :1])
    assert torch.equal(own["decoder_pred.weight"], fresh_pred)  # (p*p*1, Dd) vs the checkpoint's (p*p*3, Dd)
    assert not any("holds no decoder" in r.getMessage() for r in caplog.records)


def test_mae_continued_pretraining_from_an_encoder_only_checkpoint(tmp_path: Path, caplog) -> None:
    """``mae_pretrain_vit_*.pth``-style (no decoder, no mask token): the encoder loads, the decoder keeps its
    initialisation, and a log line says so; main_pretrain.py takes it with --finetune."""
    torch.manual_seed(0)
    source = {k: v for k, v in build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict().items()
              if not k.startswith(("decoder", "mask_token"))}  # fmt: skip
    torch.save({"model": source}, tmp_path / "mae_pretrain.pth")
    torch.manual_seed(1)
    model = build_pretrain_model("mae_vit_tiny_patch4", 32)
    decoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder")}
    with caplog.at_level(logging.INFO):
        load_pretrained(model, str(tmp_path / "mae_pretrain.pth"), classifier=False)
    assert any("holds no decoder" in r.getMessage() for r in caplog.records)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in decoder.items())
    assert all(torch.equal(own[k], v) for k, v in source.items())

    grey_images(tmp_path / "data", 8)
    flags = {**pretrain_flags(tmp_path / "data", tmp_path / "out"), "finetune": tmp_path / "mae_pretrain.pth"}
    stats = main_pretrain.main(parse(main_pretrain.get_args_parser(), **flags))  # grey PNGs read as RGB (3 channels)
    assert np.isfinite(stats["loss"])


# ------------------------------------------------------------------------------------------------ visualize.py


def test_visualize_a_one_channel_checkpoint_with_its_statistics(tmp_path: Path) -> None:
    """The panels of a grey-scale model show the original as its pixels: normalised with the checkpoint's
    statistics and back."""
    import visualize

    torch.manual_seed(0)
    model = build_pretrain_model("mae_vit_tiny_patch4", 32, in_chans=1)
    saved = {"in_chans": 1, "input_size": 32}
    torch.save({"model": model.state_dict(), "model_name": "mae_vit_tiny_patch4", "args": saved,
                "data_stats": {"mean": [0.4], "std": [0.2]}}, tmp_path / "grey.pth")  # fmt: skip
    (path,) = grey_images(tmp_path / "imgs", 1, size=32)
    args = visualize.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(tmp_path / "grey.pth"),
            "--images",
            str(path),
            str(path),
            "--output_dir",
            str(tmp_path / "vis"),
            "--scale",
            "1",
        ]
    )
    (first, _) = visualize.main(args)
    panel = np.asarray(Image.open(first).convert("L"))
    top = reconstruction.TITLE_HEIGHT + reconstruction.GAP
    original = panel[top : top + 32, reconstruction.GAP : reconstruction.GAP + 32]
    assert np.abs(original.astype(int) - np.asarray(Image.open(path)).astype(int)).max() <= 1


def test_mixmim_with_n_channels_patchifies_and_adapts_a_3_channel_checkpoint(tmp_path: Path) -> None:
    """MixMIM's targets are the (S, S, C) pixels of each stride-S cell, C the model's channels; a 3-channel
    MixMIM checkpoint fine-tunes on 1 channel with the RGB patch-embedding weights summed."""
    torch.manual_seed(0)
    model = build_pretrain_model("mixmim_tiny", 64, in_chans=5)
    S = model.encoder_stride
    imgs = torch.randn(2, 5, 64, 64)
    patches = model.patchify(imgs)
    g = 64 // S
    assert patches.shape == (2, g * g, S * S * 5)
    i, j = 1, 2
    expected = imgs[:, :, i * S : (i + 1) * S, j * S : (j + 1) * S].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(patches[:, i * g + j], expected)
    assert torch.equal(model.unpatchify(patches), imgs)
    assert torch.isfinite(model(imgs, mask_ratio=0.5)[0])

    rgb = build_pretrain_model("mixmim_tiny", 64).state_dict()
    torch.save({"model": rgb}, tmp_path / "mixmim.pth")
    classifier = build_classifier("mixmim_tiny_ft", 64, 10, 0.0, in_chans=1)
    load_pretrained(classifier, str(tmp_path / "mixmim.pth"))
    w = rgb["patch_embed.proj.weight"]
    torch.testing.assert_close(classifier.patch_embed.proj.weight.detach(), w.sum(1, keepdim=True))
