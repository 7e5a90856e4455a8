"""main_pretrain.py --vis_freq: the reconstructions of fixed training images after the epochs, in TensorBoard and
in output_dir/reconstructions/, leaving the run as it is; and visualize.py's one-line error without images."""

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import make_image_folder, parse, tiny_run_args

import main_pretrain
import models_mae
import models_mixmim
import visualize
from util.errors import UsageError
from util.reconstruction import FIXED_IMAGES, GAP, TITLE_HEIGHT, ReconstructionLog, default_scale, panel_size

FAMILIES = {"mae": ("mae_vit_tiny_patch4", 0.75, False), "mixmim": ("mixmim_tiny", 0.5, True)}  # name, ratio, npl
SIDE, SCALE = 32, 4  # the runs' input size and the panels' upscaling (default_scale(32))


def pretrain(data: Path, out: Path, family: str, **flags) -> tuple[list[float], dict]:
    """Two epochs of one step of 8 images; returns the losses of log.txt and the last weights."""
    model, mask_ratio, norm_pix_loss = FAMILIES[family]
    run = tiny_run_args(data, out, model=model, mask_ratio=mask_ratio, epochs=2, warmup_epochs=0, blr=0.05)
    run["batch_size"] = 8
    main_pretrain.main(parse(main_pretrain.get_args_parser(), **run, norm_pix_loss=norm_pix_loss, **flags))
    losses = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    return losses, torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]


def tiles(picture: np.ndarray, row: int, side: int = SIDE, scale: int = SCALE) -> list[np.ndarray]:
    """The four (side * scale, side * scale, 3) tiles of panel ``row`` of a stacked picture."""
    top = row * panel_size(side, side, scale)[1] + TITLE_HEIGHT + GAP
    n = side * scale
    return [picture[top : top + n, GAP + i * (n + GAP) : GAP + i * (n + GAP) + n].astype(int) for i in range(4)]


def cells(hidden: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """A (h, w) grid of hidden cells -> the (side * scale, side * scale) pixel mask of a tile."""
    cell = SIDE // hidden.shape[0] * scale
    return hidden.repeat(cell, 0).repeat(cell, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_vis_freq_draws_every_epoch_and_leaves_the_run_as_it_is(tmp_path: Path, family: str) -> None:
    """--vis_freq 1 over 2 epochs: epoch_0.png and epoch_1.png (8 panels each) and the same pictures in TensorBoard;
    the losses and the weights are those of the run without it, to the bit.

    Checked against what the panels must show, computed here: the original is the file's center 32 x 32 (36-pixel
    images: the evaluation transform's resize to 36 changes nothing); the masks are those of the models' rules on
    uniform noise from a generator seeded with --seed (MAE: the 16 smallest of 64 per image are kept; MixMIM: the 2
    smallest of the 4 cells of 16 x 16 are hidden, for the batch); visible patches of the masked and pasted panels
    are the original's; MixMIM's hidden cells of the mixed input are its partner's (the 8 images in reverse order)."""
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=1, size=36)
    losses, weights = pretrain(data, tmp_path / "plain", family)
    out = tmp_path / "vis"
    vis_losses, vis_weights = pretrain(data, out, family, vis_freq=1)
    assert vis_losses == losses
    assert vis_weights.keys() == weights.keys() and all(torch.equal(vis_weights[k], weights[k]) for k in weights)

    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["epoch_0.png", "epoch_1.png"]
    pictures = [np.asarray(Image.open(out / "reconstructions" / f"epoch_{e}.png")) for e in (0, 1)]
    width, height = panel_size(SIDE, SIDE, SCALE)
    assert pictures[0].shape == (FIXED_IMAGES * height, width, 3) == (8 * 150, 532, 3)
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("reconstructions")
    assert [e.step for e in images] == [0, 1]
    for event, picture in zip(images, pictures, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string))), picture)

    files = sorted(data.glob("train/*/*.png"))  # ImageFolder's order: class, then name
    noise = torch.rand(
        8 if family == "mae" else 1, 64 if family == "mae" else 4, generator=torch.Generator().manual_seed(0)
    )
    if family == "mae":
        hidden = torch.ones_like(noise, dtype=torch.bool).scatter_(1, noise.argsort(1)[:, :16], False).view(8, 8, 8)
    else:
        hidden = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, noise.argsort(1)[:, :2], True).view(1, 2, 2)
    originals = [np.asarray(Image.open(f))[2:34, 2:34].repeat(SCALE, 0).repeat(SCALE, 1).astype(int) for f in files]
    for i in range(FIXED_IMAGES):
        original, masked, _, pasted = tiles(pictures[0], i)
        assert np.abs(original - originals[i]).max() <= 1  # normalised and back: at most a rounding step
        visible = ~cells(hidden[i % len(hidden)].numpy())
        assert np.array_equal(masked[visible], original[visible]) and np.array_equal(pasted[visible], original[visible])
        if family == "mixmim":
            partner = tiles(pictures[0], FIXED_IMAGES - 1 - i)[0]
            assert np.array_equal(masked[~visible], partner[~visible])
        else:  # zero after normalisation: the mean colour
            assert (masked[~visible] == np.round(np.array([0.485, 0.456, 0.406]) * 255)).all()
        assert np.array_equal(tiles(pictures[1], i)[1], masked)  # the same masks after every epoch
        assert not np.array_equal(tiles(pictures[1], i)[2], tiles(pictures[0], i)[2])  # the model moved


@pytest.mark.parametrize("family", FAMILIES)
def test_a_picture_leaves_the_random_streams_and_the_mode_as_they_were(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4() if family == "mae" else models_mixmim.mixmim_tiny(img_size=32)
    vis = ReconstructionLog(torch.randn(4, 3, 32, 32), FAMILIES[family][1], 0, None, tmp_path)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = vis(model, 0)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert model.training
    torch.rand(10), random.random()  # other draws in between do not change the masks
    assert np.array_equal(np.asarray(vis(model.eval(), 1)), np.asarray(first)) and not model.training


def test_grey_non_square_images_from_a_decoded_on_device_run(tmp_path: Path) -> None:
    """--in_chans 1 with --input_size 32 48 shows grey panels of 32 x 48 (upscaled 2 times, default_scale(48)),
    with --vis_freq 2 over 3 epochs after epochs 0 and 2 (epoch % 2 == 0, as --save_freq; 2 is the last too);
    --decode_on_device (bytes in the training loader) still reads the files for the pictures."""
    grey = tmp_path / "grey"
    grey.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((32, 48)) * 255).astype(np.uint8), mode="L").save(grey / f"{i}.png")
    flags = tiny_run_args(grey, tmp_path / "g", model="mae_vit_tiny_patch4", epochs=3, warmup_epochs=0, vis_freq=2)
    args = parse(main_pretrain.get_args_parser(), **flags, in_chans=1, mean=0.5, std=0.25)
    args.input_size = [32, 48]  # --input_size 32 48
    main_pretrain.main(args)
    folder = tmp_path / "g" / "reconstructions"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0.png", "epoch_2.png"]
    picture = np.asarray(Image.open(folder / "epoch_2.png")).astype(int)
    width, height = panel_size(32, 48, default_scale(48))
    assert picture.shape == (4 * height, width, 3)
    assert np.array_equal(picture[..., 0], picture[..., 2])  # grey

    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for i in range(4):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(jpegs / f"{i}.jpg", quality=95)
    out = tmp_path / "j"
    flags = tiny_run_args(jpegs, out, model="mae_vit_tiny_patch4", epochs=1, warmup_epochs=0, vis_freq=1)
    main_pretrain.main(parse(main_pretrain.get_args_parser(), **flags, decode_on_device=True))
    original = tiles(np.asarray(Image.open(out / "reconstructions" / "epoch_0.png")), 0)[0]
    expected = np.asarray(Image.open(jpegs / "0.jpg"))[2:34, 2:34].repeat(SCALE, 0).repeat(SCALE, 1)
    assert np.abs(original - expected).max() <= 1


def test_a_negative_vis_freq_is_refused_in_one_line(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    flags = tiny_run_args(data, tmp_path / "o", model="mae_vit_tiny_patch4", epochs=1)  # short if it is not refused
    args = parse(main_pretrain.get_args_parser(), **flags, vis_freq=-1)
    with pytest.raises(UsageError, match=r"^--vis_freq must be >= 0, got -1$"):
        main_pretrain.main(args)


def test_visualize_without_images_or_fashion_mnist_says_both_ways_out(tmp_path: Path) -> None:
    torch.save({"model": models_mae.mae_vit_tiny_patch4().state_dict(), "model_name": "mae_vit_tiny_patch4"},
               tmp_path / "ckpt.pth")  # fmt: skip
    (tmp_path / "empty").mkdir()
    args = visualize.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(tmp_path / "ckpt.pth"),
            "--data_path",
            str(tmp_path / "empty"),
            "--output_dir",
            str(tmp_path / "out"),
        ]  # fmt: skip
    )
    with pytest.raises(UsageError) as e:
        visualize.main(args)
    message = str(e.value)
    assert "\n" not in message and f"no Fashion-MNIST (the default images) in {tmp_path / 'empty'}" in message
    assert "--images FILE" in message and "dataset-fashion-mnist" in message and "--data_path" in message
