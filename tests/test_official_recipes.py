"""The official recipes' settings: every default of the official parsers, and the transforms of pretraining,
fine-tuning, linear probing and evaluation.

The parser defaults come from the official scripts themselves (``tests/assets/official_parser_defaults.json``,
written by ``tests/assets/official_parser_defaults.py`` from the official checkouts); the transform settings are
the values written in the official code (MAE ``main_pretrain.py``, ``main_linprobe.py``, ``util/datasets.py``,
``util/crop.py``; MixMIM the same) and the defaults of timm 0.3.2's ``create_transform`` that it relies on.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode

import main_finetune
import main_linprobe
import main_pretrain
from util.crop import RandomResizedCrop
from util.datasets import eval_transform, finetune_transform, linprobe_transform, pretrain_transform

OFFICIAL = json.loads((Path(__file__).parent / "assets" / "official_parser_defaults.json").read_text())

# Where our parsers deliberately differ from an official default (docs/differences.md): {flag: (official, ours)}.
DELIBERATE = {
    "device": ("cuda", None),  # cuda when available, else cpu (official: cuda, which fails on a CPU machine)
    "log_dir": ("./output_dir", None),  # --output_dir (official: ./output_dir whatever --output_dir says)
    "nb_classes": (1000, None),  # the training folder's class count (official: 1000 whatever the folder holds)
}
# One parser serves both families, so a MixMIM run takes MAE's values for the defaults that do not decide a recipe.
DELIBERATE_MIXMIM = {
    "model": None,  # the shared parser's default model is MAE's (the test passes --model mixmim_base)
    "data_path": None,  # a placeholder path in both repositories; ours is MAE's
    "num_workers": 10,  # MixMIM pretraining: 8; MAE and MixMIM fine-tuning: 10
}
SCRIPTS = {"main_pretrain.py": main_pretrain, "main_finetune.py": main_finetune, "main_linprobe.py": main_linprobe}


def our_defaults(key: str) -> dict:
    family, script = key.split("/")
    module = SCRIPTS[script]
    args = module.get_args_parser().parse_args(["--model", "mixmim_base"] if family == "mixmim" else [])
    if hasattr(module, "resolve_args"):  # the family's defaults for flags left unset (mask ratio, save_freq)
        module.resolve_args(args)
    return vars(args)


@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_parser_defaults_equal_the_official_ones(key: str) -> None:
    ours = our_defaults(key)
    mixmim = DELIBERATE_MIXMIM if key.startswith("mixmim/") else {}
    missing = sorted(set(OFFICIAL[key]) - set(ours))
    assert not missing, f"{key}: official flags missing: {missing}"
    differ = {
        dest: (official, ours[dest])
        for dest, official in OFFICIAL[key].items()
        if ours[dest] != official and dest not in {**DELIBERATE, **mixmim}
    }
    assert not differ, f"{key}: (official, ours) differ: {differ}"
    for dest, (official, value) in DELIBERATE.items():
        if dest in OFFICIAL[key]:
            assert (OFFICIAL[key][dest], ours[dest]) == (official, value), dest
    for dest, value in mixmim.items():
        if dest in OFFICIAL[key] and value is not None:
            assert ours[dest] == value, dest


@pytest.mark.parametrize(
    "family, script, save_freq, official_rule",
    [
        ("mae", main_pretrain, 20, "epoch % 20 == 0 or epoch + 1 == args.epochs"),
        ("mixmim", main_pretrain, 10, "epoch % 10 == 0 or epoch + 1 == args.epochs"),
        ("mae", main_finetune, 1, "every epoch"),
        ("mixmim", main_finetune, 5, "epoch % 5 == 0 or epoch + 1 == args.epochs"),
        ("mae", main_linprobe, 1, "every epoch"),
    ],
)
def test_checkpoint_cadence_is_the_official_one(family: str, script, save_freq: int, official_rule: str) -> None:
    """The official scripts write numbered checkpoints on their own cadence (the rule quoted from each)."""
    model = {"mae": "mae_vit_base_patch16", "mixmim": "mixmim_base"}[family]
    args = script.get_args_parser().parse_args(["--model", model])
    if hasattr(script, "resolve_args"):
        script.resolve_args(args)
    assert args.save_freq == save_freq, official_rule


# ------------------------------------------------------------------------------------------------- transforms


def test_pretraining_transform() -> None:
    """Official: RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3), RandomHorizontalFlip(),
    ToTensor(), Normalize(ImageNet). The uint8 variant (normalised on the device) has the same crop and flip."""
    for t in (pretrain_transform(224), pretrain_transform(224, normalize=False)):
        crop, flip = t.transforms[:2]
        assert type(crop).__name__ == "RandomResizedCrop" and not isinstance(crop, RandomResizedCrop)
        assert crop.size == (224, 224) and crop.scale == (0.2, 1.0)
        assert crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.interpolation == InterpolationMode.BICUBIC
        assert type(flip).__name__ == "RandomHorizontalFlip" and flip.p == 0.5
    normalize = pretrain_transform(224).transforms[-1]
    assert list(normalize.mean) == list(IMAGENET_DEFAULT_MEAN) == [0.485, 0.456, 0.406]
    assert list(normalize.std) == list(IMAGENET_DEFAULT_STD) == [0.229, 0.224, 0.225]
    assert [type(x).__name__ for x in pretrain_transform(224, normalize=False).transforms][2:] == ["PILToTensor"]


def test_finetuning_transform() -> None:
    """Official: timm's create_transform(is_training=True, color_jitter=None, auto_augment='rand-m9-mstd0.5-inc1',
    interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1, ImageNet mean/std), which in timm 0.3.2 is
    RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3), bicubic), flip 0.5, RandAugment (2 ops of the 15
    'increasing' ones, each with p 0.5, magnitude 9, std 0.5; translate 45% of 224, fill the ImageNet mean, bicubic),
    ToTensor, Normalize, RandomErasing(0.25, pixel, 1 box)."""
    args = main_finetune.get_args_parser().parse_args([])
    names = [type(t).__name__ for t in finetune_transform(args).transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]  # no ColorJitter: the official color_jitter=None with RandAugment on
    crop, flip, ra, _, normalize, erase = finetune_transform(args).transforms
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert flip.p == 0.5
    assert ra.num_layers == 2 and ra.choice_weights is None
    assert sorted(op.name for op in ra.ops) == sorted(
        [
            "AutoContrast",
            "Equalize",
            "Invert",
            "Rotate",
            "PosterizeIncreasing",
            "SolarizeIncreasing",
            "SolarizeAdd",
            "ColorIncreasing",
            "ContrastIncreasing",
            "BrightnessIncreasing",
            "SharpnessIncreasing",
            "ShearX",
            "ShearY",
            "TranslateXRel",
            "TranslateYRel",
        ]
    )
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5), op.name
        assert op.hparams["translate_const"] == int(224 * 0.45)
        assert op.hparams["img_mean"] == tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
        assert op.hparams["interpolation"] == Image.BICUBIC
    assert normalize.mean.tolist() == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert normalize.std.tolist() == pytest.approx(IMAGENET_DEFAULT_STD)
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)
    assert (erase.min_area, erase.max_area) == pytest.approx((0.02, 1 / 3))
    assert erase.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_linear_probe_and_evaluation_transforms() -> None:
    """Official linear probe: util.crop.RandomResizedCrop(224, interpolation=3) (TF style, default scale and ratio),
    RandomHorizontalFlip(), ToTensor, Normalize; evaluation: Resize(256, bicubic), CenterCrop(224), ToTensor,
    Normalize (fine-tuning: size int(input_size / crop_pct), crop_pct 224/256 up to 224 px, else 1)."""
    crop, flip, _, normalize = linprobe_transform(224).transforms
    assert isinstance(crop, RandomResizedCrop) and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC and flip.p == 0.5
    assert list(normalize.mean) == list(IMAGENET_DEFAULT_MEAN)
    resize, center, _, normalize = eval_transform(224).transforms
    assert resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC and center.size == (224, 224)
    assert list(normalize.std) == list(IMAGENET_DEFAULT_STD)
    assert eval_transform(384).transforms[0].size == 384


def tf_style_params(height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """The official util/crop.py draw, written out: one area and one log-uniform aspect ratio, the box clipped to
    the image, then a uniform position; torch's RNG in the official order."""
    area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
    w = min(int(round(math.sqrt(area * aspect))), width)
    h = min(int(round(math.sqrt(area / aspect))), height)
    return torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w


@pytest.mark.parametrize("height, width", [(40, 40), (30, 90), (90, 30)])
def test_tf_style_crop_draws_the_official_boxes(height: int, width: int) -> None:
    image = Image.new("RGB", (width, height))
    for seed in range(100):
        torch.manual_seed(seed)
        ours = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert ours == tf_style_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3)), seed
