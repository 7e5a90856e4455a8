"""Resume: 2 epochs straight == epoch 0, then ``--resume`` from its checkpoint and epoch 1 (weights and optimizer).

The interrupted run is simulated by starting a second run from the first run's ``checkpoint-0.pth``: exactly what
a run killed during epoch 1 leaves behind.
"""

import shutil
from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
import main_linprobe
import main_pretrain


def assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for name, value in oa["state"][i].items():
            assert torch.equal(value, ob["state"][i][name]), (i, name)


RUNS = {
    "pretrain-mae-auto": (main_pretrain, "auto", dict(model="mae_vit_tiny_patch4", warmup_epochs=1)),
    # MixMIM draws its mask ratio with Python's random (range ratios) and its masks with torch
    "pretrain-mixmim-path": (main_pretrain, "path", dict(model="mixmim_tiny", warmup_epochs=1)),
    # augmentation, mixup/cutmix (numpy) and drop path all draw random numbers
    "finetune-mixup-path": (
        main_finetune,
        "path",
        dict(model="vit_tiny_patch4", warmup_epochs=1, nb_classes=2, mixup=0.8, cutmix=1.0, drop_path=0.1),
    ),
    # LARS momentum and the probe's BatchNorm statistics must come back too
    "linprobe-auto": (main_linprobe, "auto", dict(model="vit_tiny_patch4", warmup_epochs=1, nb_classes=2)),
}


@pytest.mark.parametrize("run", RUNS)
def test_resume_equals_uninterrupted(tmp_path: Path, run: str) -> None:
    script, resume, extra = RUNS[run]
    data = make_image_folder(tmp_path / "data", per_class=4)

    straight = tmp_path / "straight"
    script.main(parse(script.get_args_parser(), **tiny_run_args(data, straight, epochs=2, **extra)))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-0.pth", resumed / "checkpoint-0.pth")
    resume_arg = "auto" if resume == "auto" else resumed / "checkpoint-0.pth"
    args = parse(script.get_args_parser(), **tiny_run_args(data, resumed, epochs=2, resume=resume_arg, **extra))
    script.main(args)
    assert args.start_epoch == 1  # it did resume

    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    assert_same_state(load(straight / "checkpoint-last.pth"), load(resumed / "checkpoint-last.pth"))


@pytest.mark.parametrize("script", [main_pretrain, main_finetune], ids=["pretrain", "finetune"])
def test_save_freq_numbers_every_nth_epoch_and_the_last(tmp_path: Path, script) -> None:
    """``epoch % save_freq == 0 or epoch + 1 == epochs`` (the official rule) with 2: epochs 0, 2 and the last, 3, of
    4; resumed to 7 epochs: 4 and 6, not 5."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    model = "mae_vit_tiny_patch4" if script is main_pretrain else "vit_tiny_patch4"
    extra = dict(model=model, warmup_epochs=0, save_freq=2)
    if script is main_finetune:
        extra["nb_classes"] = 2
    out = tmp_path / "out"
    script.main(parse(script.get_args_parser(), **tiny_run_args(data, out, epochs=4, **extra)))
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-0.pth",
        "checkpoint-2.pth",
        "checkpoint-3.pth",
        "checkpoint-last.pth",
    ]
    script.main(parse(script.get_args_parser(), **tiny_run_args(data, out, epochs=7, resume="auto", **extra)))
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-0.pth",
        "checkpoint-2.pth",
        "checkpoint-3.pth",
        "checkpoint-4.pth",
        "checkpoint-6.pth",
        "checkpoint-last.pth",
    ]
