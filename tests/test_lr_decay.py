"""Layer-wise lr decay groups equal the official ones."""

import json
from pathlib import Path

import pytest
import torch

import models_vit
from util.lr_decay import get_layer_id_for_vit, param_groups_lrd

OFFICIAL = json.loads((Path(__file__).parent / "assets" / "mae_official_lrd_vit_base.json").read_text())


def test_vit_base_groups_equal_official():
    with torch.device("meta"):
        model = models_vit.vit_base_patch16(num_classes=1000, global_pool=True, drop_path_rate=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    ours = [
        {"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"], "params": [names[id(p)] for p in g["params"]]}
        for g in groups
    ]
    assert len(ours) == len(OFFICIAL)
    for a, b in zip(ours, OFFICIAL, strict=True):
        assert a["params"] == b["params"]
        assert a["lr_scale"] == pytest.approx(b["lr_scale"], rel=1e-12)
        assert a["weight_decay"] == b["weight_decay"]


def test_vit_layer_ids():
    assert get_layer_id_for_vit("cls_token", 13) == 0
    assert get_layer_id_for_vit("patch_embed.proj.weight", 13) == 0
    assert get_layer_id_for_vit("blocks.0.attn.qkv.weight", 13) == 1
    assert get_layer_id_for_vit("blocks.11.mlp.fc2.bias", 13) == 12
    assert get_layer_id_for_vit("head.weight", 13) == 13


def test_frozen_parameters_are_left_out():
    model = models_vit.vit_tiny_patch4(num_classes=10)
    model.pos_embed.requires_grad_(False)
    groups = param_groups_lrd(model, 0.05, [], 0.75)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(p is not model.pos_embed for g in groups for p in g["params"])
