"""The optimizers of the three tasks against the official recipes.

Official pretraining (MAE and MixMIM ``main_pretrain.py``): ``optim_factory.add_weight_decay(model, wd)`` of timm
0.3.2 / 0.5.4 with an empty skip list, i.e. a parameter gets no weight decay when it is 1-D or its name ends in
``.bias``; frozen parameters are left out; then ``AdamW(betas=(0.9, 0.95))``. Fine-tuning: AdamW with the default
betas over the layer-decay groups (checked against the official groups in test_lr_decay.py). The absolute lr is
``blr * batch_size * accum_iter * world_size / 256`` unless ``--lr`` is given.
"""

import pytest
import torch

import models_mae
import models_mixmim
import models_vit
from model_table import add_probe_head
from util.lars import LARS
from util.optim import absolute_lr, finetune_optimizer, linprobe_optimizer, pretrain_optimizer


def official_no_decay(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}


@pytest.mark.parametrize(
    "build, decayed, undecayed, frozen",
    [
        (
            models_mae.mae_vit_tiny_patch4,
            {"cls_token", "mask_token", "patch_embed.proj.weight"},
            {"norm.weight", "blocks.0.attn.qkv.bias", "decoder_embed.bias"},
            {"pos_embed", "decoder_pos_embed"},
        ),
        (
            models_mixmim.mixmim_tiny,
            {"mask_token", "patch_embed.proj.weight"},
            {"layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.attn.proj.bias"},
            {"absolute_pos_embed"},
        ),
    ],
    ids=["mae", "mixmim"],
)
def test_pretraining_weight_decay_groups(build, decayed: set[str], undecayed: set[str], frozen: set[str]) -> None:
    model = build()
    opt = pretrain_optimizer(model, lr=1e-3, weight_decay=0.05, device="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(by_wd) == {0.0, 0.05}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_wd[0.0] == official_no_decay(model)
    assert by_wd[0.05] == trainable - official_no_decay(model)
    assert decayed <= by_wd[0.05]  # 3-D tokens are decayed: the official skip list is empty
    assert frozen and not frozen & (by_wd[0.0] | by_wd[0.05])  # the fixed sin-cos tables are not optimised
    assert undecayed <= by_wd[0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 for g in opt.param_groups)


def test_finetuning_adamw_takes_the_default_betas_and_layer_decay() -> None:
    model = models_vit.vit_tiny_patch4(num_classes=3)
    opt = finetune_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75, device="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    depth = len(model.blocks)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx(sorted(0.75 ** (depth + 1 - i) for i in range(depth + 2)))  # embeddings .. head


def test_linear_probe_optimises_the_head_only() -> None:
    model = models_vit.vit_tiny_patch4(num_classes=3)
    add_probe_head(model)
    opt = linprobe_optimizer(model.head, lr=0.1, weight_decay=0.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert isinstance(opt, LARS)
    assert opt.defaults == {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "trust_coefficient": 0.001}
    assert {id(p) for p in params} == {id(model.head[1].weight), id(model.head[1].bias)}


@pytest.mark.parametrize(
    "lr, blr, batch, accum, world, expected",
    [(None, 1.5e-4, 64, 2, 8, 1.5e-4 * 1024 / 256), (None, 1e-3, 256, 1, 1, 1e-3), (2e-3, 1e-3, 64, 1, 8, 2e-3)],
)
def test_absolute_lr_is_blr_times_effective_batch_over_256(lr, blr, batch, accum, world, expected) -> None:
    assert absolute_lr(lr, blr, batch, accum, world) == pytest.approx(expected, rel=1e-15)
