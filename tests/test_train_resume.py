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


@pytest.mark.parametrize(
    "script, resume",
    [(main_pretrain, "auto"), (main_finetune, "path")],
    ids=["pretrain-auto", "finetune-mixup-path"],
)
def test_resume_equals_uninterrupted(tmp_path: Path, script, resume: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    if script is main_pretrain:
        extra = dict(model="mae_vit_tiny_patch4", warmup_epochs=1)
    else:  # augmentation, mixup/cutmix (numpy) and drop path all draw random numbers
        extra = dict(model="vit_tiny_patch4", warmup_epochs=1, nb_classes=2, mixup=0.8, cutmix=1.0, drop_path=0.1)

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
