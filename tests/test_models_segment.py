"""UperNet segmenters on both encoders: BEiT's ViT pyramid taps the named blocks, the relative position bias starts
as a no-op, sliding-window inference averages its windows, checkpoints of both families load into the backbone,
and the optimizer groups follow BEiT's layer-wise decay."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_table
import models_segment as ms
from util.errors import UsageError

ASSETS = Path(__file__).parent / "assets"


def _vit_segmenter(**kwargs) -> ms.Segmenter:
    torch.manual_seed(0)
    return ms.build_segmenter("vit_tiny_patch4", 5, 32, **kwargs).eval()


def test_vit_pyramid_levels_come_from_the_named_blocks() -> None:
    model = _vit_segmenter()
    pyramid = model.backbone
    assert pyramid.out_indices == (1, 2, 4, 5)  # 6 blocks: the last of each quarter (1.5, 3, 4.5, 6)
    assert ms.default_out_indices(12) == (3, 5, 7, 11) and ms.default_out_indices(24) == (7, 11, 15, 23)
    seen = {}
    for i, block in enumerate(pyramid.encoder.blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = pyramid(x)

        def grid(i: int) -> torch.Tensor:  # block i's patch tokens as a (B, D, 8, 8) map, row-major
            return seen[i][:, 1:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2)

        assert [tuple(v.shape) for v in levels] == [(2, 192, 32, 32), (2, 192, 16, 16), (2, 192, 8, 8), (2, 192, 4, 4)]
        torch.testing.assert_close(levels[0], pyramid.fpn1(grid(1)), rtol=0, atol=0)
        torch.testing.assert_close(levels[1], pyramid.fpn2(grid(2)), rtol=0, atol=0)
        torch.testing.assert_close(levels[2], grid(4), rtol=0, atol=0)  # fpn3: the map itself
        torch.testing.assert_close(levels[3], F.max_pool2d(grid(5), 2), rtol=0, atol=0)
        # another block's map is a different level: the test tells the taps apart
        assert not torch.allclose(levels[2], grid(3)) and not torch.allclose(levels[3], F.max_pool2d(grid(4), 2))
    assert len(pyramid.encoder.blocks) == 6 and isinstance(pyramid.encoder.norm, nn.Identity)


@pytest.mark.parametrize("name,size", [("mae_vit_tiny_patch4", 32), ("mixmim_tiny", 64)])
def test_segmenter_trains_and_pads(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = ms.build_segmenter(name, 5, size, channels=32)
    x = torch.randn(2, 3, size, size)
    logits, aux = model(x)
    stride = {32: 1, 64: 2}[size]  # tiny models: patch 4 (ViT, level 0 at p/4) and 2 (MixMIM, 2 * 1)
    assert logits.shape == (2, 5, size // stride, size // stride)
    assert aux.shape == (2, 5, size // (4 * stride), size // (4 * stride))  # level 2
    (logits.logsumexp(1).mean() + aux.logsumexp(1).mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        small = x[:, :, : size - 5, : size - 7]
        logits, aux = model(small)
        assert aux is None
        # a smaller image is zero-padded to the crop and its logits cropped back
        whole = model(F.pad(small, (0, 7, 0, 5)))[0]
        h, w = -(-(size - 5) // stride), -(-(size - 7) // stride)
        torch.testing.assert_close(logits, whole[..., :h, :w], rtol=0, atol=0)
        with pytest.raises(UsageError, match="exceed"):
            model(torch.randn(1, 3, size + stride, size))


def test_rel_pos_bias_starts_as_a_no_op() -> None:
    plain, biased = _vit_segmenter(), _vit_segmenter(rel_pos_bias=True)
    missing = biased.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == [f"backbone.rel_pos_bias.{i}.relative_position_bias_table" for i in range(6)]
    table = biased.backbone.rel_pos_bias[0].relative_position_bias_table
    assert table.shape == (15 * 15 + 3, 3) and not table.any()  # (2*8-1)^2 + 3 rows for the 8x8 grid, 3 heads
    x = torch.randn(2, 3, 32, 32)
    for fused in (True, False):  # SDPA and the plain path both take the bias as attn_mask
        for model in (plain, biased):
            for block in model.backbone.encoder.blocks:
                block.attn.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(biased(x)[0], plain(x)[0], rtol=0, atol=0)
            table = biased.backbone.rel_pos_bias[3].relative_position_bias_table
            table.normal_()
            assert not torch.allclose(biased(x)[0], plain(x)[0])
            table.zero_()


def test_relative_position_index_is_beits() -> None:
    # a 2x3 grid: 3 * 5 = 15 patch offsets, then cls-to-patch 15, patch-to-cls 16, cls-to-cls 17
    index = ms.beit_relative_position_index((2, 3))
    assert index.shape == (7, 7)
    assert index[0, 0] == 17 and (index[0, 1:] == 15).all() and (index[1:, 0] == 16).all()
    # patch (r, c) to (r', c'): ((r - r') + 1) * 5 + (c - c') + 2
    coords = [(r, c) for r in range(2) for c in range(3)]
    expected = [[(a[0] - b[0] + 1) * 5 + a[1] - b[1] + 2 for b in coords] for a in coords]
    assert index[1:, 1:].tolist() == expected


class _WindowMean(nn.Module):
    """A model whose logits depend on its window: per-pixel input plus the window's mean (for slide tests)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + x.mean(dim=(2, 3), keepdim=True), None


def test_slide_inference_averages_the_windows() -> None:
    img = torch.randn(1, 3, 10, 7)
    # crop 6, stride 4: rows [0, 6) and [4, 10); columns [0, 6) and the last moved back to [1, 7)
    windows = [(r, c) for r in ((0, 6), (4, 10)) for c in ((0, 6), (1, 7))]
    total, count = torch.zeros_like(img), torch.zeros(10, 7)
    for (y1, y2), (x1, x2) in windows:
        part = img[:, :, y1:y2, x1:x2]
        total[:, :, y1:y2, x1:x2] += part + part.mean(dim=(2, 3), keepdim=True)
        count[y1:y2, x1:x2] += 1
    got = ms.slide_inference(_WindowMean(), img, 3, crop=6, stride=4)
    torch.testing.assert_close(got, total / count, rtol=1e-6, atol=1e-6)
    # crop larger than the image: one window, the whole image
    torch.testing.assert_close(ms.slide_inference(_WindowMean(), img, 3, (12, 8), 4), _WindowMean()(img)[0])


def test_slide_equals_whole_when_one_window_covers_the_image() -> None:
    model = _vit_segmenter()
    for shape in ((32, 32), (24, 30)):
        img = torch.randn(2, 3, *shape)
        whole = ms.whole_inference(model, img)
        assert whole.shape == (2, 5, *shape)
        torch.testing.assert_close(ms.slide_inference(model, img, 5, 32, 21), whole, rtol=0, atol=0)


def _save(tmp_path: Path, model: nn.Module, name: str, **extra) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict(), **extra}, path)
    return path


def test_mae_pretraining_checkpoint_loads_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    mae = model_table.build_pretrain_model("mae_vit_tiny_patch4", 32)
    path = _save(tmp_path, mae, "mae", args={"input_size": 32})
    model = ms.build_segmenter("vit_tiny_patch4", 5, 48, rel_pos_bias=True)  # 12x12 grid: pos_embed resized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms.load_backbone(model, str(path))
    ck, after = mae.state_dict(), model.state_dict()
    new = ("backbone.fpn", "backbone.rel_pos_bias.", "decode_head.", "auxiliary_head.")  # not in any checkpoint
    encoder = {k for k in after if k.startswith("backbone.encoder.")}
    assert {k for k in after if not k.startswith(new)} == encoder
    assert {k for k in after if not torch.equal(after[k], before[k])} <= encoder
    for k in encoder - {"backbone.encoder.pos_embed"}:
        torch.testing.assert_close(after[k], ck[k.removeprefix("backbone.encoder.")], rtol=0, atol=0)
    # the position embedding: the cls row kept, the 8x8 grid resized bicubically to 12x12
    pos = ck["pos_embed"]
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(after["backbone.encoder.pos_embed"], torch.cat([pos[:, :1], resized.flatten(1, 2)], 1))


def test_mixmim_pretraining_checkpoint_loads_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    mixmim = model_table.build_pretrain_model("mixmim_tiny", 64)
    path = _save(tmp_path, mixmim, "mixmim")
    torch.manual_seed(0)
    model = ms.build_segmenter("mixmim_tiny", 5, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms.load_backbone(model, str(path))
    ck, after = mixmim.state_dict(), model.state_dict()
    encoder = {k for k in after if k.startswith("backbone.encoder.")}
    for k in encoder:
        torch.testing.assert_close(after[k], ck[k.removeprefix("backbone.encoder.")], rtol=0, atol=0)
    assert {k for k in after if not torch.equal(after[k], before[k])} <= encoder  # necks and heads untouched
    assert {k for k in after if not k.startswith(("backbone.norms.", "decode_head.", "auxiliary_head."))} == encoder


def test_fine_tuned_and_foreign_checkpoints(tmp_path: Path) -> None:
    model = _vit_segmenter()
    for pool in (True, False):  # fc_norm + head, or norm + head: both classifiers load
        clf = model_table.build_classifier("vit_tiny_patch4", 32, 10, 0.0, global_pool=pool)
        ms.load_backbone(model, str(_save(tmp_path, clf, f"clf{pool}")))
        torch.testing.assert_close(model.backbone.encoder.blocks[0].attn.qkv.weight, clf.blocks[0].attn.qkv.weight)
    mixmim = model_table.build_pretrain_model("mixmim_tiny", 64)
    with pytest.raises(UsageError, match="MixMIM checkpoint but the model is ViT"):
        ms.load_backbone(model, str(_save(tmp_path, mixmim, "mixmim")))
    state = {**clf.state_dict(), "blocks.0.attn.extra": torch.zeros(3)}
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(UsageError, match="unexpected: blocks.0.attn.extra"):
        ms.load_backbone(model, str(tmp_path / "extra.pth"))


@pytest.mark.parametrize(
    "asset,name,model,size",
    [
        ("mae_official_state_dict_keys.json", "mae_vit_base_patch16", "vit_base_patch16", 512),
        ("mae_official_state_dict_keys.json", "vit_large_patch16", "vit_large_patch16", 512),
        ("mae_official_state_dict_keys.json", "vit_huge_patch14_cls", "vit_huge_patch14", 532),
        ("mixmim_official_state_dict_keys.json", "mixmim_base", "mixmim_base", 512),
        ("mixmim_official_state_dict_keys.json", "mixmim_base_ft", "mixmim_base", 512),
    ],
)
def test_official_checkpoint_keys_fit(asset: str, name: str, model: str, size: int) -> None:
    """The official checkpoints' keys and shapes (tests/assets), as meta tensors, into a full-size segmenter."""
    shapes = json.loads((ASSETS / asset).read_text())[name]
    with torch.device("meta"):
        segmenter = ms.build_segmenter(model, 150, size, rel_pos_bias=model.startswith("vit"))
        state = {k: torch.empty(v) for k, v in shapes.items()}
    unused = ms.load_backbone_state(segmenter, state, name)
    assert all(k.startswith(("decoder", "mask_token", "norm.", "fc_norm.", "head.")) for k in unused), unused


def test_param_groups_follow_beit_layer_decay() -> None:
    model = _vit_segmenter(rel_pos_bias=True)
    groups = ms.param_groups_segment(model, weight_decay=0.05, layer_decay=0.5)
    of = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    L = 6
    named = dict(model.named_parameters())

    def scale(name: str) -> float:
        return of[id(named[name])]["lr_scale"]

    def decay(name: str) -> float:
        return of[id(named[name])]["weight_decay"]

    for i in range(L):  # block i has layer id i + 1
        assert scale(f"backbone.encoder.blocks.{i}.attn.qkv.weight") == 0.5 ** (L + 1 - (i + 1))
        assert scale(f"backbone.rel_pos_bias.{i}.relative_position_bias_table") == 0.5 ** (L - i)
    for name in (
        "backbone.encoder.pos_embed",
        "backbone.encoder.cls_token",
        "backbone.encoder.patch_embed.proj.weight",
    ):
        assert scale(name) == 0.5 ** (L + 1)
    for name in ("backbone.fpn1.0.weight", "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight"):
        assert scale(name) == 1.0 and decay(name) == 0.05
    no_decay = [
        "backbone.encoder.pos_embed",
        "backbone.encoder.cls_token",
        "backbone.rel_pos_bias.0.relative_position_bias_table",
        "backbone.encoder.blocks.0.norm1.weight",
        "backbone.encoder.blocks.0.attn.qkv.bias",
        "backbone.fpn1.1.weight",  # BatchNorm
        "decode_head.conv_seg.bias",
    ]
    assert all(decay(n) == 0.0 for n in no_decay)
    assert decay("backbone.encoder.blocks.0.attn.qkv.weight") == 0.05
    assert decay("backbone.encoder.patch_embed.proj.weight") == 0.05


def test_mixmim_param_groups_count_blocks_across_stages() -> None:
    torch.manual_seed(0)
    model = ms.build_segmenter("mixmim_tiny", 5, 64)  # depths 1, 1, 2, 1: 5 blocks
    groups = ms.param_groups_segment(model, weight_decay=0.05, layer_decay=0.5)
    of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert of[id(named["backbone.encoder.layers.2.blocks.1.mlp.fc1.weight"])] == 0.5 ** (6 - 4)  # 4th block
    assert of[id(named["backbone.encoder.layers.0.downsample.reduction.weight"])] == 0.5 ** (6 - 2)  # with block 2
    assert of[id(named["backbone.norms.3.weight"])] == 1.0


def test_usage_errors() -> None:
    with pytest.raises(UsageError, match="square"):
        ms.build_segmenter("mixmim_tiny", 5, (64, 32))
    with pytest.raises(UsageError, match="relative position"):
        ms.build_segmenter("mixmim_tiny", 5, 64, rel_pos_bias=True)
    with pytest.raises(UsageError, match="multiple of 4"):
        ms.build_segmenter("vit_tiny_patch4", 5, 30)
    with pytest.raises(UsageError, match="unknown"):
        ms.build_segmenter("resnet50", 5, 64)


def test_upernet_matches_beits_config() -> None:
    """ViT-B at 512 as upernet_beit_base_12_512 configures it: the heads' parameters under mmseg's names and shapes
    (UPerHead channels 768, pool scales 1, 2, 3, 6; FCNHead on level 2 with 256 channels), BEiT's neck."""
    with torch.device("meta"):
        model = ms.build_segmenter("mae_vit_base_patch16", 150, 512, rel_pos_bias=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.encoder.")}
    expected = {}
    for i in range(4):  # PPM: pool, then 1x1 conv-BN-ReLU
        expected[f"decode_head.psp_modules.{i}.1.conv.weight"] = (768, 768, 1, 1)
    expected["decode_head.bottleneck.conv.weight"] = (768, 768 + 4 * 768, 3, 3)
    for i in range(3):
        expected[f"decode_head.lateral_convs.{i}.conv.weight"] = (768, 768, 1, 1)
        expected[f"decode_head.fpn_convs.{i}.conv.weight"] = (768, 768, 3, 3)
    expected["decode_head.fpn_bottleneck.conv.weight"] = (768, 4 * 768, 3, 3)
    expected["decode_head.conv_seg.weight"] = (150, 768, 1, 1)
    expected["auxiliary_head.convs.0.conv.weight"] = (256, 768, 3, 3)
    expected["auxiliary_head.conv_seg.weight"] = (150, 256, 1, 1)
    expected["backbone.fpn1.0.weight"] = expected["backbone.fpn1.3.weight"] = (768, 768, 2, 2)
    expected["backbone.fpn2.0.weight"] = (768, 768, 2, 2)
    for i in range(12):
        expected[f"backbone.rel_pos_bias.{i}.relative_position_bias_table"] = (63 * 63 + 3, 12)
    convs = {k: v for k, v in shapes.items() if len(v) == 4 or "relative_position" in k}
    assert convs == expected
    assert model.backbone.out_indices == (3, 5, 7, 11) and model.backbone.encoder.pos_embed.shape == (1, 1025, 768)
