"""Vision Transformer classifier for fine-tuning and linear probing MAE encoders; a timm backbone.

A reimplementation of facebookresearch/mae ``models_vit.py``, which subclassed the timm ViT of its time to add a
``global_pool`` switch; this one subclasses today's timm ``VisionTransformer``. State-dict names are those of the
official fine-tuned checkpoints (``mae_finetuned_vit_*.pth``), so they load with ``strict=True``; an MAE pretraining
checkpoint loads into it with only the head (and ``fc_norm`` when ``global_pool``) missing. The initialisation and
the parameter order are the official ones, so the same seed gives the same weights.

Being a timm ViT it has timm's whole model API: ``forward_features`` (all tokens, normalised) and ``forward_head``,
``forward_intermediates`` / ``prune_intermediate_layers``, ``reset_classifier``, ``set_input_size``, gradient
checkpointing, ``timm.create_model(name, features_only=True, out_indices=...)`` (stride-``patch_size`` maps of the
chosen blocks), TorchScript and FX. A checkpoint loads by timm's own mechanism (``checkpoint_filter_fn``)::

    timm.create_model("vit_base_patch16", pretrained=True,
                      pretrained_cfg_overlay=dict(file="mae_pretrain_vit_base.pth"))

Shape legend:
    N  batch size
    L  number of patches
    D  embedding width
"""

from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import vision_transformer as timm_vit

from util.checkpoint import load_pretrained_state, read_overlay_file, state_dict_of

__all__ = ["VisionTransformer", "checkpoint_filter_fn"]


class VisionTransformer(timm_vit.VisionTransformer):
    """ViT with a cls token and learned position embedding; classifies from pooled patch tokens or the cls token.

    ``global_pool=True`` (the official fine-tuning default; timm's ``"avg"``): mean of the patch tokens, then
    ``fc_norm`` (no final ``norm``). ``global_pool=False`` (timm's ``"token"``): ``norm`` over all tokens, then the
    cls token. timm's other pool names (``""``: no pooling, ...) are accepted too.
    """

    def __init__(self, global_pool: bool | str = False, **kwargs):
        if isinstance(global_pool, bool):
            global_pool = "avg" if global_pool else "token"
        # timm's own initialisation is skipped: the official one follows, with the official random draws
        super().__init__(global_pool=global_pool, weight_init="skip", **kwargs)
        # registration order of the official model: head before fc_norm (parameter and optimizer-group order)
        fc_norm = self.fc_norm
        del self.fc_norm
        self.fc_norm = fc_norm

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: an MAE checkpoint (official or ours; pretraining or fine-tuned; an overlay's
    file in any layout ``read_overlay_file`` reads) as a state dict for ``model``, with the project's ``--finetune``
    rules (util/checkpoint.py ``load_pretrained_state``): the decoder and mask token dropped, position embeddings
    interpolated, a head of another shape left out, one-line errors for anything else that does not fit. Keys the
    checkpoint lacks (the head, ``fc_norm``) keep the model's initialisation."""
    source = model.pretrained_cfg.get("file") or "the pretrained_cfg's weights"
    load_pretrained_state(model, dict(state_dict_of(state_dict)), source, head_init_std=None)
    return model.state_dict()


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,  # the official evaluation: resize 256, centre crop 224
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "cc-by-nc-4.0",
        **kwargs,
    }


# no weights are bundled; ``pretrained_cfg_overlay=dict(file=...)`` points timm at a checkpoint
default_cfgs = generate_default_cfgs(
    {
        "vit_base_patch16": _cfg(),
        "vit_large_patch16": _cfg(),
        "vit_huge_patch14": _cfg(),
        "vit_tiny_patch4": _cfg(input_size=(3, 32, 32)),
    }
)


def _vit(variant: str, pretrained: bool, overrides: dict, **arch) -> VisionTransformer:
    kwargs = {"qkv_bias": True, **arch, **(read_overlay_file(overrides) if pretrained else overrides)}
    # the official LayerNorm eps is 1e-6; weights from Hugging Face state theirs (its ViT default: 1e-12)
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=kwargs.pop("layer_norm_eps", None) or 1e-6))
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
        **kwargs,
    )


@register_model
def vit_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(
        "vit_base_patch16", pretrained, kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4
    )


@register_model
def vit_large_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(
        "vit_large_patch16", pretrained, kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4
    )


@register_model
def vit_huge_patch14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(
        "vit_huge_patch14", pretrained, kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4
    )


@register_model
def vit_tiny_patch4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The encoder of ``mae_vit_tiny_patch4`` as a classifier for 32x32 images."""
    return _vit("vit_tiny_patch4", pretrained, kwargs, img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
