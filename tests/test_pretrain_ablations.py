"""main_pretrain.py's MAE ablations (the MAE paper's Table 1): --decoder_depth / --decoder_embed_dim /
--decoder_num_heads, --pretrain_aug and --mask_type take effect where they should, the defaults are untouched, and
what cannot work is refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from train_utils import make_image_folder, parse, tiny_run_args

import main_pretrain
import visualize
from model_table import build_pretrain_model, pretrain_overrides
from util.checkpoint import load_model_strict, saved_args
from util.datasets import pretrain_transform
from util.errors import UsageError
from util.families import unwrap

SMALL_DECODER = dict(decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2)  # the tiny MAE's own: 2, 128, 4


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run(data: Path, out: Path, **flags) -> None:
    extra = dict(model="mae_vit_tiny_patch4", epochs=1, warmup_epochs=0)
    main_pretrain.main(parse(main_pretrain.get_args_parser(), **tiny_run_args(data, out, **{**extra, **flags})))


# ----------------------------------------------------------------------------- the decoder


def test_decoder_flags_build_resume_and_rebuild(tmp_path: Path) -> None:
    """A run with a 1-block, 64-wide, 2-head decoder saves that decoder; --resume with the same flags continues it,
    without them stops with one line; ``pretrain_overrides`` of the saved arguments rebuilds it (heads included)."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    run(data, tmp_path / "a", **SMALL_DECODER)
    ckpt = load(tmp_path / "a" / "checkpoint-0.pth")
    state = ckpt["model"]
    assert {k.split(".")[1] for k in state if k.startswith("decoder_blocks.")} == {"0"}  # one block
    assert state["decoder_embed.weight"].shape == (64, 192)  # encoder 192 -> decoder 64
    assert state["mask_token"].shape == (1, 1, 64) and state["decoder_pred.weight"].shape == (4 * 4 * 3, 64)
    assert state["decoder_blocks.0.mlp.fc1.weight"].shape == (256, 64)  # mlp_ratio 4 of the new width
    assert json.loads((tmp_path / "a" / "args.json").read_text())["decoder_num_heads"] == 2

    # the heads leave no trace in the shapes: the model rebuilt from the saved arguments has 2 of 32 channels
    overrides = pretrain_overrides(saved_args(ckpt))
    assert overrides == SMALL_DECODER
    rebuilt = build_pretrain_model(ckpt["model_name"], 32, **overrides)
    load_model_strict(rebuilt, state, "checkpoint-0.pth")
    assert rebuilt.decoder_blocks[0].attn.num_heads == 2 and rebuilt.decoder_blocks[0].attn.head_dim == 32
    shown = visualize.load_pretrain_checkpoint(str(tmp_path / "a" / "checkpoint-0.pth"), device="cpu")  # strict
    assert len(shown.decoder_blocks) == 1 and shown.decoder_blocks[0].attn.num_heads == 2

    # the same command resumes
    args = parse(
        main_pretrain.get_args_parser(),
        **tiny_run_args(
            data,
            tmp_path / "b",
            model="mae_vit_tiny_patch4",
            epochs=2,
            warmup_epochs=0,
            resume=tmp_path / "a" / "checkpoint-0.pth",
            **SMALL_DECODER,
        ),  # fmt: skip
    )
    main_pretrain.main(args)
    assert args.start_epoch == 1
    assert load(tmp_path / "b" / "checkpoint-last.pth")["model"]["decoder_embed.weight"].shape == (64, 192)

    # into the tiny MAE's own decoder (2 blocks of 128): one line naming what does not fit
    with pytest.raises(UsageError, match="does not fit the model") as e:
        run(data, tmp_path / "c", epochs=2, resume=tmp_path / "a" / "checkpoint-0.pth")
    message = str(e.value)
    assert "\n" not in message
    assert (
        "missing: decoder_blocks.1." in message and "shape mismatch (ckpt vs model): mask_token (1, 1, 64)" in message
    )


def test_pretrain_overrides_only_for_what_is_asked() -> None:
    """The defaults pass nothing to the factory (the default model is built exactly as before); a checkpoint that
    does not record the flags (older ones, the official ones) rebuilds the named model."""
    defaults = vars(parse(main_pretrain.get_args_parser()))
    assert pretrain_overrides(defaults) == {}
    assert pretrain_overrides({}) == {}
    assert pretrain_overrides({**defaults, "mask_type": "grid", "decoder_depth": 4}) == dict(
        decoder_depth=4, mask_type="grid"
    )


# ----------------------------------------------------------------------------- the augmentations


def image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def apply(aug: str, img: Image.Image, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return pretrain_transform(32, normalize=False, aug=aug)(img).permute(1, 2, 0).numpy()  # (H, W, C) uint8


def test_none_is_the_resized_center_crop_without_flip() -> None:
    """64 x 48 -> the shorter side to 32 (42 x 32, bicubic, PIL) -> its central 32 columns (5 to 37), whatever the
    seed: no random crop, no flip."""
    img = image()
    expected = np.asarray(img.resize((42, 32), Image.BICUBIC))[:, 5:37]
    for seed in range(8):
        np.testing.assert_array_equal(apply("none", img, seed), expected)


def windows(resized: np.ndarray, out: np.ndarray) -> set:
    """The (top, left, flipped) windows of ``resized`` that equal ``out``."""
    h, w = out.shape[:2]
    found = set()
    for top in range(resized.shape[0] - h + 1):
        for left in range(resized.shape[1] - w + 1):
            window = resized[top : top + h, left : left + w]
            for flipped, candidate in ((False, window), (True, window[:, ::-1])):
                if np.array_equal(candidate, out):
                    found.add((top, left, flipped))
    return found


def test_crop_fixed_is_a_fixed_size_window_of_the_resized_image() -> None:
    """64 x 48 -> the shorter side to 32 / 0.875 = 36 (48 x 36) -> a 32 x 32 window of it (no resize of the crop:
    always the same area) at a random place, flipped half the time."""
    img = image()
    resized = np.asarray(img.resize((48, 36), Image.BICUBIC))
    seen = set()
    for seed in range(12):
        found = windows(resized, apply("crop_fixed", img, seed))
        assert len(found) == 1, seed
        seen |= found
    assert len({(top, left) for top, left, _ in seen}) > 6 and {flip for *_, flip in seen} == {False, True}


def test_crop_color_changes_colours_crop_does_not() -> None:
    """A single-colour image stays that colour under crop (and none, crop_fixed), and changes under crop_color, with
    the same seeds; with a textured image crop_color is crop's crop, jittered (same geometry, other values)."""
    colour = (200, 100, 50)
    solid = Image.new("RGB", (48, 40), colour)
    for seed in range(6):
        for aug in ("none", "crop_fixed", "crop"):
            assert (apply(aug, solid, seed) == colour).all(), (aug, seed)
        jittered = apply("crop_color", solid, seed)
        assert not (jittered == colour).all(-1).any(), seed  # every pixel changed
        assert (jittered == jittered[0, 0]).all(), seed  # and still one colour: a colour change, not a spatial one
    img = image()
    for seed in range(4):
        plain, jittered = apply("crop", img, seed).astype(float), apply("crop_color", img, seed).astype(float)
        assert not np.array_equal(plain, jittered)
        assert np.corrcoef(plain.mean(-1).ravel(), jittered.mean(-1).ravel())[0, 1] > 0.9, seed  # the same crop


def test_other_channel_counts_take_none_crop_fixed_crop() -> None:
    """Float (C, H, W) images of 4 channels: none and crop_fixed as on RGB images (torchvision's tensor resize),
    crop as before; colour jittering needs 3 channels."""
    t = torch.rand(4, 48, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(in_chans=4, mean=[0.0] * 4, std=[1.0] * 4)
    resize = lambda size: TF.resize(t, size, InterpolationMode.BICUBIC, antialias=True)  # noqa: E731
    torch.manual_seed(0)
    torch.testing.assert_close(pretrain_transform(32, aug="none", **kw)(t), resize([32, 42])[:, :, 5:37])
    resized = resize([36, 48])
    for seed in range(4):
        torch.manual_seed(seed)
        out = pretrain_transform(32, aug="crop_fixed", **kw)(t)
        assert windows(resized.permute(1, 2, 0).numpy(), out.permute(1, 2, 0).numpy()), seed
    assert pretrain_transform([32, 40], aug="crop", **kw)(t).shape == (4, 32, 40)
    with pytest.raises(ValueError, match="needs 3 channels"):
        pretrain_transform(32, aug="crop_color", **kw)


def test_pretrain_aug_reaches_the_run_and_the_defaults_are_untouched(tmp_path: Path) -> None:
    """One epoch with every ablation flag at the tiny MAE's default, given explicitly, ends with the weights of the
    run without them, bit for bit; --pretrain_aug none ends elsewhere (main_pretrain applies it)."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    run(data, tmp_path / "plain")
    explicit = dict(
        pretrain_aug="crop", mask_type="random", decoder_depth=2, decoder_embed_dim=128, decoder_num_heads=4
    )
    run(data, tmp_path / "explicit", **explicit)
    run(data, tmp_path / "none", pretrain_aug="none")
    plain, same, other = (load(tmp_path / d / "checkpoint-last.pth")["model"] for d in ("plain", "explicit", "none"))
    assert plain.keys() == same.keys()
    for k in plain:
        assert torch.equal(plain[k], same[k]), k
    assert not torch.equal(plain["decoder_pred.weight"], other["decoder_pred.weight"])


# ----------------------------------------------------------------------------- the masks


@pytest.mark.parametrize("mask_type", ["random", "block", "grid"])
def test_mask_type_reaches_the_model(tmp_path: Path, monkeypatch, mask_type: str) -> None:
    built = {}
    monkeypatch.setattr(main_pretrain, "fit", lambda args, model, *rest: built.setdefault("model", model) and {})
    run(make_image_folder(tmp_path / "data", per_class=2), tmp_path / "out", mask_type=mask_type)
    assert unwrap(built["model"]).mask_type == mask_type


# ----------------------------------------------------------------------------- refusals

REFUSED = {
    "mixmim decoder": (
        dict(model="mixmim_tiny", decoder_depth=1),
        "--decoder_depth 1: MAE ablations, for mae_vit_\\* models; --model mixmim_tiny is MixMIM",
    ),
    "mixmim mask": (dict(model="mixmim_tiny", mask_type="block"), "--mask_type block: MAE ablations"),
    "depth 0": (dict(decoder_depth=0), "--decoder_depth 0: the decoder's depth, width and heads must be at least 1"),
    "heads": (dict(decoder_num_heads=3), "--decoder_embed_dim 128 is not divisible by --decoder_num_heads 3"),
    "width": (dict(decoder_embed_dim=130), "--decoder_embed_dim 130 is not divisible by --decoder_num_heads 4"),
    "grid ratio": (dict(mask_type="grid", mask_ratio=0.5), "--mask_type grid: .*0.75.* 0.5"),
    "grid sides": (dict(mask_type="grid", input_size=36), "--mask_type grid: .*9x9"),
    "colour channels": (dict(pretrain_aug="crop_color", in_chans=1), "crop_color .* needs --in_chans 3, got 1"),
    "device decode": (
        dict(pretrain_aug="crop_fixed", decode_on_device=True),
        "--decode_on_device draws the official crop only .* got --pretrain_aug crop_fixed",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_in_one_line(tmp_path: Path, case: str) -> None:
    flags, message = REFUSED[case]
    data = make_image_folder(tmp_path / "data", classes=1, per_class=1, val_per_class=0)
    args = parse(main_pretrain.get_args_parser(), **tiny_run_args(data, tmp_path / "out", **{
        "model": "mae_vit_tiny_patch4", **flags}))  # fmt: skip
    with pytest.raises(UsageError, match=message) as e:
        main_pretrain.check_args(args)
    assert "\n" not in str(e.value)


def test_pretrain_aug_refused_for_a_dataset_passed_in(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=1, per_class=1, val_per_class=0)
    args = parse(main_pretrain.get_args_parser(), **tiny_run_args(data, tmp_path / "out", model="mae_vit_tiny_patch4",
                 pretrain_aug="none"))  # fmt: skip
    with pytest.raises(UsageError, match="--pretrain_aug none augments --data_path's files"):
        main_pretrain.main(args, [(torch.zeros(3, 32, 32, dtype=torch.uint8), 0)])


def test_resume_with_another_mask_type_is_refused(tmp_path: Path) -> None:
    """The weights of a grid run fit a random-mask model: --resume must say so instead of training on silently."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    run(data, tmp_path / "a", mask_type="grid")
    ckpt = tmp_path / "a" / "checkpoint-0.pth"
    with pytest.raises(UsageError, match="pretrained with --mask_type grid, this run has --mask_type random"):
        run(data, tmp_path / "b", epochs=2, resume=ckpt)
    run(data, tmp_path / "c", epochs=2, resume=ckpt, mask_type="grid")  # the same flags continue
    assert load(tmp_path / "c" / "checkpoint-last.pth")["epoch"] == 1
