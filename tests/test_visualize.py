"""visualize.py and util/reconstruction.py: reconstruction panels for both families, from our and the official
checkpoint formats."""

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
import models_mixmim
import visualize
from util import masking, reconstruction


def _write_images(folder, n: int, size: int = 40) -> list[str]:
    """Random RGB images on disk (any size: visualize.py resizes them to the model's input size)."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels.numpy(), mode="RGB").save(path)
        paths.append(str(path))
    return paths


def _run(tmp_path, checkpoint: dict, images: list[str], *flags: str) -> list:
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    parser = visualize.get_args_parser()
    args = parser.parse_args(
        ["--checkpoint", str(path), "--output_dir", str(tmp_path / "out"), "--images", *images, *flags]
    )
    return visualize.main(args)


@pytest.mark.parametrize("official", [False, True])
def test_mae_panels(tmp_path, official):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True)
    if official:  # mae_visualize_vit_*.pth: only the weights, the model is named on the command line
        checkpoint, flags = {"model": model.state_dict()}, ["--model", "mae_vit_tiny_patch4"]
    else:  # ours: the checkpoint names the model and records norm_pix_loss and the input size
        checkpoint = {
            "model": model.state_dict(),
            "model_name": "mae_vit_tiny_patch4",
            "args": {"input_size": 32, "norm_pix_loss": True},
        }
        flags = []
    images = _write_images(tmp_path, 3)
    paths = _run(tmp_path, checkpoint, images, *flags)
    assert [p.name for p in paths] == [f"reconstruction_{i}.png" for i in range(3)]
    scale = reconstruction.default_scale(32)
    assert scale == 4
    for p in paths:
        assert Image.open(p).size == reconstruction.panel_size(32, 32, scale) == (4 * 128 + 5 * 4, 14 + 128 + 8)
    grid = Image.open(tmp_path / "out" / "reconstructions.png")
    assert grid.size == (reconstruction.panel_size(32, 32, scale)[0], 3 * reconstruction.panel_size(32, 32, scale)[1])
    # the first tile is the input image, as loaded (resized to 32x32) and upscaled
    tile = Image.open(paths[0]).crop(
        (
            reconstruction.GAP,
            reconstruction.TITLE_HEIGHT + reconstruction.GAP,
            reconstruction.GAP + 128,
            reconstruction.TITLE_HEIGHT + reconstruction.GAP + 128,
        )
    )
    expected = Image.open(images[0]).convert("RGB").resize((32, 32), Image.BICUBIC).resize((128, 128), Image.NEAREST)
    diff = np.abs(np.asarray(tile, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1  # normalised and back: at most a rounding step


def test_a_non_square_official_style_checkpoint_with_input_size_h_w(tmp_path):
    """--input_size 32 48 builds the MAE for 32 x 48 (the checkpoint's 8 x 12 position grid loads strictly); the first
    tile is the image resized straight to 48 x 32 (W x H), as the notebook resizes to 224 x 224."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(img_size=(32, 48))
    images = _write_images(tmp_path, 2)
    paths = _run(tmp_path, {"model": model.state_dict()}, images, "--model", "mae_vit_tiny_patch4",
                 "--input_size", "32", "48", "--scale", "2")  # fmt: skip
    for p in paths:
        assert Image.open(p).size == reconstruction.panel_size(32, 48, 2) == (4 * 96 + 5 * 4, 14 + 64 + 8)
    top = reconstruction.TITLE_HEIGHT + reconstruction.GAP
    tile = Image.open(paths[1]).crop((reconstruction.GAP, top, reconstruction.GAP + 96, top + 64))
    expected = Image.open(images[1]).convert("RGB").resize((48, 32), Image.BICUBIC).resize((96, 64), Image.NEAREST)
    diff = np.abs(np.asarray(tile, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1
    with pytest.raises(visualize.UsageError, match="one side or H W, got 3 values"):
        _run(tmp_path, {"model": model.state_dict()}, images, "--model", "mae_vit_tiny_patch4",
             "--input_size", "32", "48", "64")  # fmt: skip


def test_mae_reconstruct_invariants():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    imgs = torch.randn(2, 3, 32, 32)
    out = reconstruction.reconstruct(model, imgs, 0.75, seed=0)
    mask = out["mask"]  # (2, 1, 32, 32), 1 = hidden
    assert mask.shape == (2, 1, 32, 32)
    assert mask.mean(dim=(1, 2, 3)).tolist() == [0.75, 0.75]  # 48 of the 64 patches hidden, per image
    visible = mask == 0
    assert torch.equal(out["masked"][visible.expand_as(imgs)], imgs[visible.expand_as(imgs)])
    assert (out["masked"][(~visible).expand_as(imgs)] == 0).all()
    assert torch.equal(out["pasted"][visible.expand_as(imgs)], imgs[visible.expand_as(imgs)])
    hidden = (~visible).expand_as(imgs)
    assert torch.equal(out["pasted"][hidden], out["reconstruction"][hidden])


def test_norm_pix_loss_predictions_are_shown_in_pixel_space():
    """A model that predicts the normalised target exactly is shown reconstructing the image exactly."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    target = model.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(reconstruction.denorm_patches(model, imgs, normed), target, atol=1e-4, rtol=0)


def test_mixmim_panels(tmp_path):
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny()  # 64x64, norm_pix_loss on (official default)
    images = _write_images(tmp_path, 4)
    paths = _run(tmp_path, {"model": model.state_dict()}, images, "--model", "mixmim_tiny")
    assert len(paths) == 4
    scale = reconstruction.default_scale(64)
    assert scale == 2
    for p in paths:
        assert Image.open(p).size == reconstruction.panel_size(64, 64, scale) == (4 * 128 + 5 * 4, 14 + 128 + 8)


def test_mixmim_reconstruct_invariants():
    torch.manual_seed(0)
    model = models_mixmim.mixmim_tiny()
    imgs = torch.randn(4, 3, 64, 64)
    out = reconstruction.reconstruct(model, imgs, 0.5, seed=0)
    mask = out["mask"]  # (4, 1, 64, 64): one mask for the batch, on 16x16 cells
    assert torch.equal(mask, mask[:1].expand_as(mask))
    assert mask.mean().item() == 0.5
    hidden = mask.expand_as(imgs).bool()
    # the mixed input: own pixels where visible, the partner's (batch reversed) where hidden
    assert torch.equal(out["masked"][~hidden], imgs[~hidden])
    assert torch.equal(out["masked"][hidden], imgs.flip(0)[hidden])
    assert torch.equal(out["pasted"][~hidden], imgs[~hidden])
    assert torch.equal(out["pasted"][hidden], out["reconstruction"][hidden])
    with pytest.raises(ValueError, match="at least 2"):
        reconstruction.reconstruct(model, imgs[:1], 0.5, seed=0)


def test_same_seed_same_picture(tmp_path):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    imgs = torch.randn(2, 3, 32, 32)
    a = visualize.save_reconstructions(model, imgs, tmp_path / "a", seed=3)
    state = torch.random.get_rng_state()
    b = visualize.save_reconstructions(model, imgs, tmp_path / "b", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left as it was
    c = visualize.save_reconstructions(model, imgs, tmp_path / "c", seed=4)
    assert Image.open(a[0]).tobytes() == Image.open(b[0]).tobytes()
    assert Image.open(a[0]).tobytes() != Image.open(c[0]).tobytes()


def _masked_tile_hidden(path, side: int = 32, scale: int = 4) -> np.ndarray:
    """The (side / 4, side / 4) patches of the masked panel (the second tile) that show the mean colour (zero after
    normalisation: hidden), checking that the others show the original (the first tile)."""
    picture = np.asarray(Image.open(path)).astype(int)
    top, n = reconstruction.TITLE_HEIGHT + reconstruction.GAP, side * scale
    original, masked = (
        picture[top : top + n, reconstruction.GAP + i * (n + reconstruction.GAP) :][:, :n] for i in (0, 1)
    )
    grey = np.all(masked == np.round(np.array([0.485, 0.456, 0.406]) * 255), axis=-1)  # (n, n)
    cell = 4 * scale  # a 4x4 patch, upscaled
    hidden = grey.reshape(side // 4, cell, side // 4, cell).all(axis=(1, 3))
    visible = ~hidden.repeat(cell, 0).repeat(cell, 1)
    assert np.array_equal(masked[visible], original[visible])
    return hidden


@pytest.mark.parametrize("how", ["flag", "checkpoint"])
def test_mask_type_grid_shows_the_grid(tmp_path, how):
    """--mask_type grid (or a checkpoint whose run recorded it) hides all but the top-left patch of every 2x2; the
    flag overrides the checkpoint's choice."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    recorded = {"input_size": 32, "mask_type": "grid"} if how == "checkpoint" else {"input_size": 32}
    checkpoint = {"model": model.state_dict(), "model_name": "mae_vit_tiny_patch4", "args": recorded}
    images = _write_images(tmp_path, 2)
    paths = _run(tmp_path, checkpoint, images, *(["--mask_type", "grid"] if how == "flag" else []))
    expected = np.ones((8, 8), dtype=bool)
    expected[::2, ::2] = False
    for p in paths:
        assert np.array_equal(_masked_tile_hidden(p), expected)
    paths = _run(tmp_path, checkpoint, images, "--mask_type", "random")
    hidden = _masked_tile_hidden(paths[0])
    assert hidden.sum() == 48 and not np.array_equal(hidden, expected)
    with pytest.raises(visualize.UsageError, match="--mask_type grid: grid masking keeps one patch of every 2x2"):
        _run(tmp_path, checkpoint, images, "--mask_type", "grid", "--mask_ratio", "0.5")  # one line, no traceback


def test_mask_type_block_shows_the_seeded_block_masks_and_mixmim_refuses_other_types(tmp_path):
    """A checkpoint whose run recorded --mask_type block shows block masks: those util/masking.py draws from a
    generator seeded with --seed (2)."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    checkpoint = {"model": model.state_dict(), "model_name": "mae_vit_tiny_patch4", "args": {"mask_type": "block"}}
    paths = _run(tmp_path, checkpoint, _write_images(tmp_path, 2))
    noise = masking.mask_noise("block", 2, (8, 8), 0.75, generator=torch.Generator().manual_seed(2))
    expected = torch.ones(2, 64, dtype=torch.bool).scatter_(1, noise.argsort(1)[:, :16], False).view(2, 8, 8)
    for p, hidden in zip(paths, expected, strict=True):
        assert np.array_equal(_masked_tile_hidden(p), hidden.numpy())
    mixmim = models_mixmim.mixmim_tiny()
    with pytest.raises(visualize.UsageError, match="--mask_type grid is for MAE models; MixMIM masks at random"):
        _run(tmp_path, {"model": mixmim.state_dict()}, _write_images(tmp_path, 2), "--model", "mixmim_tiny",
             "--mask_type", "grid")  # fmt: skip


def _one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_flags_are_refused_up_front_in_one_line(tmp_path, monkeypatch):
    """An --output_dir that is a file, --num_images below 1 and an unknown --device end in one line before any
    checkpoint is read."""
    checkpoint = {"model": {}, "model_name": "mae_vit_tiny_patch4"}  # never read: the flags are checked first
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    (tmp_path / "file").write_text("")

    def read(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the flags were checked")

    monkeypatch.setattr(visualize, "load_pretrain_checkpoint", read)
    parser = visualize.get_args_parser()
    cases = [
        (["--output_dir", str(tmp_path / "file")], r"--output_dir .*file is not writable"),
        (["--num_images", "0", "--data_path", str(tmp_path / "none")], r"--num_images 0: give 1 or more"),
        (["--device", "gpu"], r"--device gpu is not a device: use cpu, cuda or cuda:N"),
    ]
    for flags, message in cases:
        args = parser.parse_args(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out"), *flags])
        with pytest.raises(visualize.UsageError, match=message) as e:
            visualize.main(args)
        _one_line(e)
