"""Partial fine-tuning (``main_finetune.py --trainable_blocks K``, MAE paper Figure 9), for both families.

The expected trainable parameters are written here from the architectures (vit_tiny_patch4: 6 blocks;
mixmim_tiny_ft: stages of 1, 1, 2, 1 blocks with a patch merging layer after each of the first three), and the
expected lr scales from the layer-decay formula ``layer_decay ** (num_layers - layer_id)``, by hand.
"""

from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
from model_table import build_classifier, build_pretrain_model
from util.errors import UsageError
from util.freeze import freeze_all_but_last_blocks
from util.optim import finetune_optimizer

LAYER_DECAY = 0.65
# family: (pretraining model, classifier, K, prefixes of the parameters that train, {parameter: lr scale})
RUNS = {
    "mae": (
        "mae_vit_tiny_patch4",
        "vit_tiny_patch4",
        2,
        ("blocks.4.", "blocks.5.", "fc_norm.", "head."),  # global pooling: fc_norm is the final norm
        {  # 7 layers: embeddings 0, block i -> i + 1, norm and head 7
            "blocks.4.mlp.fc1.weight": LAYER_DECAY**2,
            "blocks.5.attn.qkv.weight": LAYER_DECAY**1,
            "fc_norm.weight": 1.0,
            "head.weight": 1.0,
        },
    ),
    "mixmim": (
        "mixmim_tiny",
        "mixmim_tiny_ft",
        3,  # the two blocks of stage 2 and the block of stage 3, each with the patch merging layer in front of it
        ("layers.1.downsample.", "layers.2.blocks.", "layers.2.downsample.", "layers.3.blocks.", "norm.", "head."),
        {  # 6 layers: block i (across stages) -> i + 1, a patch merging layer -> the next block's; norm, head -> 5
            "layers.1.downsample.reduction.weight": LAYER_DECAY**3,
            "layers.2.blocks.0.attn.qkv.weight": LAYER_DECAY**3,
            "layers.2.blocks.1.mlp.fc2.weight": LAYER_DECAY**2,
            "layers.3.blocks.0.norm1.weight": LAYER_DECAY**1,
            "head.weight": LAYER_DECAY**1,  # the official MixMIM rule: one decay step below 1.0
        },
    ),
}


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def optimizer_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("family", RUNS)
def test_only_the_last_blocks_train(tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-epoch run from a pretrained checkpoint: the frozen weights are the checkpoint's, bit for bit, every
    trainable one moved, and the optimizer holds exactly the trainable parameters with full fine-tuning's lr
    scales."""
    pre_model, ft_model, k, prefixes, lr_scales = RUNS[family]
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=1)
    torch.manual_seed(1)
    pretrained = build_pretrain_model(pre_model, 32).state_dict()
    torch.save({"model": pretrained}, tmp_path / "pre.pth")

    built = {}

    def spy(model, *args, **kwargs):  # the model and optimizer of the run, and the weights it starts from
        built["initial"] = {n: v.clone() for n, v in model.state_dict().items()}
        built["model"], built["optimizer"] = model, finetune_optimizer(model, *args, **kwargs)
        return built["optimizer"]

    monkeypatch.setattr(main_finetune, "finetune_optimizer", spy)
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(data, tmp_path / "ft", model=ft_model, epochs=1, warmup_epochs=0, nb_classes=2),
        finetune=tmp_path / "pre.pth",
        trainable_blocks=k,
        layer_decay=LAYER_DECAY,
        drop_path=0.0,
        reprob=0.0,
    )
    main_finetune.main(args)

    model, optimizer = built["model"], built["optimizer"]
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(prefixes)}
    assert all(any(n.startswith(prefix) for n in names) for prefix in prefixes)  # no prefix names nothing
    assert trainable(model) == expected
    assert sorted(optimizer_names(model, optimizer)) == sorted(expected)  # each trainable one once, no frozen one

    final = torch.load(tmp_path / "ft" / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
    for n in names:
        if n in expected:
            assert not torch.equal(final[n], built["initial"][n]), f"{n} did not train"
        else:
            assert torch.equal(final[n], pretrained[n]), f"{n} is not the pretrained weight"

    by_id = {id(p): n for n, p in model.named_parameters()}
    scale_of = {by_id[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for n, scale in lr_scales.items():
        assert scale_of[n] == pytest.approx(scale, rel=1e-12), n


@pytest.mark.parametrize(
    "name, global_pool, final_norm",
    [("vit_tiny_patch4", True, "fc_norm."), ("vit_tiny_patch4", False, "norm."), ("mixmim_tiny_ft", None, "norm.")],
)
def test_zero_blocks_trains_the_final_norm_and_the_head(name: str, global_pool: bool | None, final_norm: str) -> None:
    model = build_classifier(name, 32, 2, 0.0, global_pool)
    freeze_all_but_last_blocks(model, 0)
    expected = {n for n, _ in model.named_parameters() if n.startswith((final_norm, "head."))}
    assert trainable(model) == expected and len(expected) == 4
    optimizer = finetune_optimizer(model, 1e-3, 0.05, LAYER_DECAY, "cpu")
    assert sorted(optimizer_names(model, optimizer)) == sorted(expected)


@pytest.mark.parametrize("name, depth", [("vit_tiny_patch4", 6), ("mixmim_tiny_ft", 5)])
def test_all_blocks_is_full_fine_tuning(name: str, depth: int) -> None:
    """K = depth: the patch embedding goes with the first block, so everything trains (the paper's 24 of ViT-L)."""
    model = build_classifier(name, 32, 2, 0.0, True)
    freeze_all_but_last_blocks(model, depth)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "model, k, depth", [("vit_tiny_patch4", 7, 6), ("mixmim_tiny", 6, 5), ("vit_tiny_patch4", -1, 6)]
)
def test_more_blocks_than_the_model_has_is_a_one_line_error(tmp_path: Path, model: str, k: int, depth: int) -> None:
    """Refused before the data is read: the (empty) data folder would fail later with another message."""
    (tmp_path / "empty").mkdir()
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(tmp_path / "empty", tmp_path / "ft", model=model),
        trainable_blocks=k,
    )
    with pytest.raises(UsageError) as e:
        main_finetune.main(args)
    assert str(e.value) == f"--trainable_blocks {k}: the model has {depth} transformer blocks, choose 0 to {depth}"


def test_eval_refuses_trainable_blocks(tmp_path: Path) -> None:
    args = parse(
        main_finetune.get_args_parser(),
        **tiny_run_args(tmp_path, tmp_path / "ft", model="vit_tiny_patch4"),
        trainable_blocks=1,
        eval=True,
    )
    with pytest.raises(UsageError, match="--trainable_blocks chooses what fine-tuning trains; --eval trains nothing"):
        main_finetune.main(args)
