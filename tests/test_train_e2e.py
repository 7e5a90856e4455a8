"""End to end for both families: pretrain -> fine-tune from that checkpoint -> --eval -> linear probe.

Each step runs the script's ``main(args)`` in this process on a tiny generated ImageFolder (CPU, 32x32 images) and
the test checks what the run leaves behind: checkpoints, log.txt, args.json and TensorBoard scalars.
"""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
import main_linprobe
import main_pretrain

FAMILIES = {
    # pretraining model, fine-tuning --model (the official scripts' names), mask ratio
    "mae": ("mae_vit_tiny_patch4", "vit_tiny_patch4", 0.75),
    "mixmim": ("mixmim_tiny", "mixmim_tiny", 0.5),
}


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrain_finetune_eval_linprobe(tmp_path: Path, family: str) -> None:
    pre_model, ft_model, mask_ratio = FAMILIES[family]
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)

    # --- pretraining: 2 epochs of 2 steps
    pre = tmp_path / "pre"
    args = parse(
        main_pretrain.get_args_parser(),
        **tiny_run_args(data, pre, model=pre_model, epochs=2, warmup_epochs=1, mask_ratio=mask_ratio, blr=1.5e-4),
        norm_pix_loss=True,
    )
    main_pretrain.main(args)
    assert sorted(p.name for p in pre.glob("checkpoint-*.pth")) == [
        "checkpoint-0.pth",
        "checkpoint-1.pth",
        "checkpoint-last.pth",
    ]
    assert not list(pre.glob(".*tmp*"))
    ckpt = torch.load(pre / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == pre_model
    assert ckpt["args"]["lr"] == pytest.approx(1.5e-4 * 4 / 256)  # blr * batch * accum * world / 256
    assert ckpt["args"]["amp"] == "none" and ckpt["args"]["device"] == "cpu"
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # no weight decay for biases and norms
    saved_args = json.loads((pre / "args.json").read_text())
    assert saved_args["model"] == pre_model and saved_args["mask_ratio"] == mask_ratio
    lines = log_lines(pre)
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "train_grad_norm"} <= set(lines[0])
    tb = scalars(pre)
    assert {"train_loss", "lr", "grad_norm"} <= set(tb)
    assert len(tb["train_loss"]) == 4  # one per update step
    assert tb["lr"][0] == 0.0 and max(tb["lr"]) == pytest.approx(args.lr, rel=1e-6)  # warmup from 0 to the peak

    # --- fine-tuning from the pretraining checkpoint (official --model name)
    ft = tmp_path / "ft"
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(
            data,
            ft,
            model=ft_model,
            epochs=1,
            warmup_epochs=0,
            nb_classes=2,
            blr=1e-3,
            mixup=0.8,
            cutmix=1.0,
            drop_path=0.0,
            finetune=pre / "checkpoint-1.pth",
        ),
    )
    ft_stats = main_finetune.main(args)
    assert (ft / "checkpoint-0.pth").is_file() and (ft / "checkpoint-last.pth").is_file()
    line = log_lines(ft)[0]
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "n_parameters"} <= set(line)
    assert line["test_acc1"] == ft_stats["acc1"] and line["test_acc5"] == 100.0  # 2 classes: top-5 is certain
    assert {"loss", "lr", "perf/test_acc1", "perf/test_acc5", "perf/test_loss"} <= set(scalars(ft))
    ft_ckpt = torch.load(ft / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    assert ft_ckpt["model"]["head.weight"].shape[0] == 2
    lr_scales = sorted({g["lr_scale"] for g in ft_ckpt["optimizer"]["param_groups"]})
    assert len(lr_scales) > 3 and lr_scales[-1] == pytest.approx(1.0 if family == "mae" else 0.75)  # layer decay

    # --- --eval of the fine-tuned checkpoint gives the accuracy measured at the end of training
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(data, tmp_path / "eval", model=ft_model, nb_classes=2, resume=ft / "checkpoint-0.pth"),
        eval=True,
    )
    eval_stats = main_finetune.main(args)
    assert eval_stats["acc1"] == pytest.approx(ft_stats["acc1"])
    assert eval_stats["loss"] == pytest.approx(ft_stats["loss"], rel=1e-5)

    # --- linear probe on the frozen pretrained encoder
    lp = tmp_path / "lp"
    args = parse(
        main_linprobe.get_args_parser(),
        **tiny_run_args(
            data, lp, model=pre_model, epochs=1, warmup_epochs=0, nb_classes=2, finetune=pre / "checkpoint-1.pth"
        ),
    )
    lp_stats = main_linprobe.main(args)
    lp_ckpt = torch.load(lp / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    encoder = {k: v for k, v in lp_ckpt["model"].items() if not k.startswith("head.")}
    for k, v in encoder.items():  # frozen: every encoder tensor is the pretrained one
        torch.testing.assert_close(v, ckpt["model"][k], rtol=0, atol=0, msg=k)
    assert lp_ckpt["model"]["head.0.running_mean"].abs().sum() > 0  # the BatchNorm saw the features
    assert "head.0.weight" not in lp_ckpt["model"]  # BatchNorm without affine
    assert log_lines(lp)[0]["test_acc1"] == lp_stats["acc1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_gives_the_run_of_eager_mode(tmp_path: Path, family: str) -> None:
    """``--compile`` changes the speed, not the run: the same masks (eager random draws; MixMIM's Python
    ``random.uniform`` too, which the compiler replays), losses and weights."""
    pre_model, _, mask_ratio = FAMILIES[family]
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        args = parse(
            main_pretrain.get_args_parser(),
            **tiny_run_args(data, out, model=pre_model, mask_ratio=mask_ratio, epochs=2, warmup_epochs=0, blr=0.05),
            compile=compiled,
        )
        main_pretrain.main(args)
        ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
        runs[compiled] = ([line["train_loss"] for line in log_lines(out)], ckpt["model"])
    (eager_loss, eager_w), (comp_loss, comp_w) = runs[False], runs[True]
    # inductor's own random numbers would give other masks: losses about 2% apart instead of 1e-7
    assert comp_loss == pytest.approx(eager_loss, rel=1e-5)
    assert comp_w.keys() == eager_w.keys()  # saved without the compiler's wrapper prefix
    # Adam moves every weight by about lr per step whatever the gradient's size, so float rounding in tiny
    # gradients can show up at that scale (4 steps here); other masks would move weights by several lr
    for k in eager_w:
        torch.testing.assert_close(comp_w[k], eager_w[k], rtol=0, atol=args.lr, msg=k)
