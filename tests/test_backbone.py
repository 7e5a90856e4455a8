"""Detection backbones: ViTDet's simple feature pyramid on the MAE ViT, an FPN on MixMIM's stages, and one Mask R-CNN
training step of torchvision on each, from a pretraining checkpoint."""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN

import models_backbone
import models_mae
import models_mixmim
from models_backbone import detection_backbone
from util.errors import UsageError


def _levels(out: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in out.items()}


def test_simple_feature_pyramid_resamples_the_last_blocks_map() -> None:
    torch.manual_seed(0)
    pyramid = detection_backbone("vit_tiny_patch4", out_channels=16).eval()
    vit = pyramid.vit
    x = torch.randn(2, 3, 32, 48)  # not the 32x32 the model was built for: the position embedding is resized
    seen = {}
    vit.blocks[-1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("tokens", out))
    pyramid.project[2].register_forward_hook(lambda _m, inputs, _o: seen.__setitem__("x1", inputs[0]))
    with torch.no_grad():
        out = pyramid(x)
    # patch 4: strides 1, 2, 4, 8 and the pool level at 16
    assert _levels(out) == {
        "0": (2, 16, 32, 48),
        "1": (2, 16, 16, 24),
        "2": (2, 16, 8, 12),
        "3": (2, 16, 4, 6),
        "pool": (2, 16, 2, 3),
    }
    # the stride-p level is made from the last block's patch tokens on the 8x12 grid, row-major, without a norm
    expected = seen["tokens"][:, 1:].reshape(2, 8, 12, 192).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen["x1"], expected, rtol=0, atol=0)
    torch.testing.assert_close(out["pool"], out["3"][:, :, ::2, ::2], rtol=0, atol=0)  # stride-2 subsampling
    with torch.no_grad():  # the x1/2 level is the 2x2 max-pool of the map through the same projection (to float
        # rounding: the map here is a permuted view, and the CPU's convolution may sum in another order for it)
        torch.testing.assert_close(out["3"], pyramid.project[3](F.max_pool2d(expected, 2)), rtol=1e-5, atol=1e-5)
    assert pyramid.strides == [1, 2, 4, 8]


def test_stage_feature_pyramid_pads_to_the_encoders_size() -> None:
    torch.manual_seed(0)
    pyramid = detection_backbone("mixmim_tiny", out_channels=16).eval()  # a pretraining name gives its encoder
    seen = {}
    pyramid.encoder.patch_embed.register_forward_hook(lambda _m, inputs, _o: seen.__setitem__("x", inputs[0]))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = pyramid(x)
        # zeros below the image, as torchvision batches images: the boxes' coordinates stay those of the image
        padded = torch.cat([x, torch.zeros(2, 3, 16, 64)], dim=2)
        torch.testing.assert_close(seen["x"], padded, rtol=0, atol=0)
        # and the maps are the top-left (image) part of the padded image's maps
        maps = pyramid.encoder.forward_intermediates(padded, norm=True, intermediates_only=True)
        crops = [m[..., : 48 // s, : 64 // s] for m, s in zip(maps, (2, 4, 8, 16), strict=True)]
        expected = pyramid.fpn(OrderedDict((str(i), m) for i, m in enumerate(crops)))
        for key in expected:
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)
        assert _levels(out) == {
            "0": (2, 16, 24, 32),
            "1": (2, 16, 12, 16),
            "2": (2, 16, 6, 8),
            "3": (2, 16, 3, 4),
            "pool": (2, 16, 2, 2),
        }
        with pytest.raises(ValueError, match="images of 96x64 exceed the 64x64"):
            pyramid(torch.randn(1, 3, 96, 64))


def test_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        detection_backbone("vit_tiny_patch4", str(tmp_path / "nope.pth"))


def _targets(n: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(n):
        xy = torch.randint(0, size // 2, (2, 2), generator=g).float()
        wh = torch.randint(8, size // 2, (2, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], dim=1)  # (2, 4) x1 y1 x2 y2
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist(), strict=True):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return targets


@pytest.mark.parametrize(
    "family,pretrain,size",
    [("mae", models_mae.mae_vit_tiny_patch4, 32), ("mixmim", models_mixmim.mixmim_tiny, 64)],
)
def test_one_mask_rcnn_training_step(tmp_path: Path, family: str, pretrain, size: int) -> None:
    torch.manual_seed(0)
    encoder = pretrain()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "pretrain.pth"
    torch.save({"model": encoder.state_dict()}, path)  # the official layout

    name = {"mae": "mae_vit_tiny_patch4", "mixmim": "mixmim_tiny"}[family]
    backbone = detection_backbone(name, str(path), out_channels=32)
    inner = backbone.vit if family == "mae" else backbone.encoder
    torch.testing.assert_close(inner.patch_embed.proj.weight, encoder.patch_embed.proj.weight, rtol=0, atol=0)
    detector = MaskRCNN(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_train=64,
        rpn_post_nms_top_n_train=32,
        box_batch_size_per_image=32,
    ).train()
    images = list(torch.rand(2, 3, 64, 64))
    losses = detector(images, _targets(2, 64))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    sum(losses.values()).backward()
    # every encoder weight is on the path from the image to the losses
    no_grad = [n for n, p in inner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in inner.named_parameters())


def test_a_patch_size_that_is_not_a_power_of_two_is_refused() -> None:
    with torch.device("meta"):
        base = models_backbone.timm.create_model("vit_base_patch16", num_classes=0, dynamic_img_size=True)
        assert models_backbone.SimpleFeaturePyramid(base).strides == [4, 8, 16, 32]
        huge = models_backbone.timm.create_model("vit_huge_patch14", num_classes=0, dynamic_img_size=True)
        with pytest.raises(ValueError, match="power-of-two patch size of at least 4, not 14"):
            models_backbone.SimpleFeaturePyramid(huge)


@pytest.mark.parametrize(
    "name, size, global_pool",
    [("vit_tiny_patch4", 32, True), ("vit_tiny_patch4", 32, False), ("mixmim_tiny_ft", 64, None)],
)
def test_a_fine_tuned_checkpoint_makes_a_backbone(tmp_path: Path, name: str, size: int, global_pool) -> None:
    """A classifier's checkpoint (its head left out; a ViT's global-pool or cls-token layout): the backbone's encoder
    weights are the checkpoint's."""
    from model_table import build_classifier

    torch.manual_seed(0)
    classifier = build_classifier(name, size, num_classes=7, drop_path_rate=0.0, global_pool=global_pool)
    path = tmp_path / "finetuned.pth"
    torch.save({"model": classifier.state_dict()}, path)
    backbone = detection_backbone(name, str(path), out_channels=8)
    inner = backbone.vit if name.startswith("vit") else backbone.encoder
    own = inner.state_dict()
    for key, value in classifier.state_dict().items():
        if key in own:
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert "blocks.5.mlp.fc2.weight" in own or "layers.3.blocks.0.mlp.fc2.weight" in own


@pytest.mark.parametrize("name, size", [("mae_vit_tiny_patch4", 32), ("mixmim_tiny", 64)])
def test_a_one_channel_checkpoint_makes_a_one_channel_backbone(tmp_path: Path, name: str, size: int) -> None:
    """A checkpoint pretrained on grey images (``--in_chans 1``): the backbone takes one channel without being told,
    its patch embedding is the checkpoint's, and Mask R-CNN normalises with the checkpoint's statistics."""
    torch.manual_seed(0)
    pretrain = models_mae.mae_vit_tiny_patch4 if name.startswith("mae") else models_mixmim.mixmim_tiny
    encoder = pretrain(in_chans=1)
    path = tmp_path / "grey.pth"
    torch.save({"model": encoder.state_dict(), "data_stats": {"mean": [0.29], "std": [0.35]}}, path)
    backbone = detection_backbone(name, str(path), out_channels=8).eval()
    inner = backbone.vit if name.startswith("mae") else backbone.encoder
    assert inner.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(inner.patch_embed.proj.weight, encoder.patch_embed.proj.weight, rtol=0, atol=0)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 1, size, size))
    assert all(m.shape[:2] == (2, 8) and torch.isfinite(m).all() for m in maps.values())

    stats = torch.load(path, weights_only=True)["data_stats"]
    detector = MaskRCNN(backbone, num_classes=3, min_size=size, max_size=size, image_mean=stats["mean"],
                        image_std=stats["std"]).eval()  # fmt: skip
    with torch.no_grad():
        (out,) = detector([torch.rand(1, size, size)])
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_a_three_channel_checkpoint_is_adapted_to_one_channel(tmp_path: Path) -> None:
    """An RGB checkpoint (the official ones) for grey images: timm's adapt_input_conv rule, the sum over RGB."""
    torch.manual_seed(0)
    encoder = models_mae.mae_vit_tiny_patch4()
    path = tmp_path / "rgb.pth"
    torch.save({"model": encoder.state_dict()}, path)
    backbone = detection_backbone("vit_tiny_patch4", str(path), out_channels=8, in_chans=1)
    expected = encoder.patch_embed.proj.weight.sum(dim=1, keepdim=True)  # (D, 1, p, p)
    torch.testing.assert_close(backbone.vit.patch_embed.proj.weight, expected)
