"""Pretrained encoders as detection / segmentation backbones for torchvision's detection models.

``torchvision.models.detection`` (Faster / Mask R-CNN, RetinaNet, ...) takes any module that maps images to an
ordered dict of feature maps and says their width in ``out_channels``. Two such modules:

- ``SimpleFeaturePyramid`` for the plain ViT (MAE), as in ViTDet (Li et al., 2022, "Exploring Plain Vision
  Transformer Backbones for Object Detection"): only the last block's map (stride p, the patch size) is used; two
  stride-2 deconvolutions (with LayerNorm and GELU between), one deconvolution, the map itself and a 2x2 max-pool
  give strides p/4, p/2, p and 2p (4/8/16/32 for ViT-B/16); each goes through a 1x1 and a 3x3 convolution to
  ``out_channels``, each followed by a channel LayerNorm; a stride-2 subsampling of the last adds the "pool" level.
- ``StageFeaturePyramid`` for the hierarchical MixMIM: its four stage maps (strides 4/8/16/32) through torchvision's
  ``FeaturePyramidNetwork``, plus the same "pool" level. MixMIM's windows fix its input size: smaller images are
  padded to it (bottom and right, as torchvision's batching pads) and the maps cropped back.

``detection_backbone(model, checkpoint)`` builds either from a model name of the table and a checkpoint (ours or
official, pretraining or fine-tuned) loaded by the ``--finetune`` rules, for images of the checkpoint's channel count
(``in_chans``: 1 for a grey ``--in_chans 1`` checkpoint) unless told another.

Shape legend:
    B  batch size
    D  encoder width; C  out_channels
    H, W  image height and width; p  the ViT's patch size
"""

from collections import OrderedDict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from model_table import family_of, resolve_classifier_name
from util.checkpoint import (
    PATCH_EMBED_WEIGHT,
    check_stated_heads,
    checkpoint_grid,
    load_checkpoint_file,
    load_pretrained_state,
    saved_args,
    state_dict_of,
)


def _projection(dim: int, out_channels: int) -> nn.Sequential:
    """1x1 then 3x3 convolution to ``out_channels``, each followed by a channel LayerNorm (ViTDet's "norm=LN")."""
    return nn.Sequential(
        nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a timm ViT (the classifier of this project, built with
    ``dynamic_img_size=True`` so that any multiple of the patch size goes in).

    Returns ``OrderedDict`` "0".."3" (strides p/4, p/2, p, 2p) and "pool" (4p), each (B, C, H/stride, W/stride).
    """

    def __init__(self, vit: nn.Module, out_channels: int = 256):
        super().__init__()
        self.vit = vit
        self.out_channels = out_channels
        self.last = len(vit.blocks) - 1
        vit.prune_intermediate_layers([self.last], prune_norm=True)  # the final norm and the head go unused
        dim = vit.embed_dim
        patch = vit.patch_embed.patch_size[0]
        if patch < 4 or patch & (patch - 1):
            # torchvision's anchors and RoI pooling take each level's stride as a whole power of two
            raise ValueError(
                f"the simple feature pyramid needs a power-of-two patch size of at least 4, not {patch} (ViTDet "
                "resamples ViT-H/14's patch embedding to 16 first)"
            )
        self.strides = [patch // 4, patch // 2, patch, patch * 2]
        self.resample = nn.ModuleList(
            [
                nn.Sequential(  # x4: two stride-2 deconvolutions
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),  # x2
                nn.Identity(),  # x1
                nn.MaxPool2d(kernel_size=2, stride=2),  # x1/2
            ]
        )
        self.project = nn.ModuleList([_projection(d, out_channels) for d in (dim // 4, dim // 2, dim, dim)])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, in_chans, H, W) -> {"0": (B, C, 4H/p, 4W/p), "1": 2x, "2": 1x, "3": 1/2x, "pool": 1/4x}."""
        (feature,) = self.vit.forward_intermediates(x, indices=[self.last], intermediates_only=True)  # (B, D, H/p, W/p)
        maps = [project(resample(feature)) for resample, project in zip(self.resample, self.project, strict=True)]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))  # the "pool" level, as torchvision's FPN
        return OrderedDict(zip(["0", "1", "2", "3", "pool"], maps, strict=True))


class StageFeaturePyramid(nn.Module):
    """torchvision's FPN over the stage maps of a hierarchical encoder with ``forward_intermediates`` (MixMIM).

    Returns ``OrderedDict`` "0".."3" (the stages' strides) and "pool", each with ``out_channels`` channels.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256):
        super().__init__()
        self.encoder = encoder
        self.out_channels = out_channels
        self.strides = [info["reduction"] for info in encoder.feature_info]
        self.fpn = FeaturePyramidNetwork(
            [info["num_chs"] for info in encoder.feature_info], out_channels, extra_blocks=LastLevelMaxPool()
        )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, in_chans, H, W), H and W at most the encoder's input size -> the FPN's maps."""
        H, W = x.shape[-2:]
        size = self.encoder.patch_embed.img_size  # fixed by the windows
        if H > size[0] or W > size[1]:
            raise ValueError(f"images of {H}x{W} exceed the {size[0]}x{size[1]} the encoder was built for (img_size)")
        x = F.pad(x, (0, size[1] - W, 0, size[0] - H))  # (B, in_chans, *size)
        maps = self.encoder.forward_intermediates(x, norm=True, intermediates_only=True)
        maps = [m[..., : -(-H // s), : -(-W // s)] for m, s in zip(maps, self.strides, strict=True)]  # the image's part
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def detection_backbone(
    model: str,
    checkpoint: str | None = None,
    out_channels: int = 256,
    img_size: int | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """A feature pyramid for torchvision's detection models on the encoder of ``model`` (a name of the model table:
    pretraining or classifier, either family), with ``checkpoint``'s weights if given (ours or official; loaded
    by the ``--finetune`` rules, position embeddings interpolated to ``img_size``).

    ViT: ``SimpleFeaturePyramid``, any input size (the position embedding is interpolated on the fly from
    ``img_size``, default the model's). MixMIM: ``StageFeaturePyramid``, built for ``img_size`` (its largest input).
    ``in_chans``: the images' channels; by default the checkpoint's (its patch embedding's), else 3. A 3-channel
    checkpoint for other ``in_chans`` has its patch embedding adapted as with ``--finetune`` (timm's
    ``adapt_input_conv``).
    """
    name = resolve_classifier_name(model)
    state, grid = {}, None
    if checkpoint:
        loaded = load_checkpoint_file(checkpoint)
        state, grid = state_dict_of(loaded), checkpoint_grid(loaded)
        if in_chans is None and getattr(state.get(PATCH_EMBED_WEIGHT), "ndim", 0) == 4:
            in_chans = state[PATCH_EMBED_WEIGHT].shape[1]  # (D, C, p, p)
    kwargs = dict(num_classes=0, in_chans=in_chans or 3)  # a fine-tuned checkpoint's head is left out
    if img_size is not None:
        kwargs["img_size"] = img_size
    vit = family_of(name) == "mae"
    if vit:
        if checkpoint and saved_args(loaded).get("layer_norm_eps") is not None:  # weights from Hugging Face
            kwargs["layer_norm_eps"] = float(saved_args(loaded)["layer_norm_eps"])
        # global pooling: no final norm, so any checkpoint fits (pretraining, cls-token or global-pool fine-tuned);
        # the pyramid drops the norms and the pooling anyway
        kwargs.update(dynamic_img_size=True, global_pool=True)
    encoder = timm.create_model(name, **kwargs)
    if checkpoint:  # what timm's pretrained_cfg file loading does, with the checkpoint's grid and read once
        check_stated_heads(encoder, loaded, checkpoint)
        load_pretrained_state(encoder, state, checkpoint, head_init_std=None, grid=grid)
    return SimpleFeaturePyramid(encoder, out_channels) if vit else StageFeaturePyramid(encoder, out_channels)
