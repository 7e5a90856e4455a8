"""Vision Transformer classifier for fine-tuning and linear probing MAE encoders.

A reimplementation of facebookresearch/mae ``models_vit.py``: the timm ViT of the time with a ``global_pool``
switch. State-dict names are those of the official fine-tuned checkpoints (``mae_finetuned_vit_*.pth``), so
they load with ``strict=True``; an MAE pretraining checkpoint loads into it with only the head (and ``fc_norm``
when ``global_pool``) missing.

Shape legend:
    N  batch size
    L  number of patches
    D  embedding width
"""

from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Block, PatchEmbed

from models_mae import drop_timm_kwargs


class VisionTransformer(nn.Module):
    """ViT with a cls token and learned position embedding; classifies from pooled patch tokens or the cls token.

    ``global_pool=True`` (the official fine-tuning default): mean of the patch tokens, then ``fc_norm``.
    ``global_pool=False``: ``norm`` over all tokens, then the cls token.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        global_pool: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.global_pool = global_pool

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        # registration order as the official model (parameter and optimizer-group order follow it)
        if not global_pool:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, D) pooled features (before the head)."""
        expected = self.patch_embed.img_size
        if tuple(x.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])} but the model was built for {tuple(expected)}; "
                "build it with img_size=... to match --input_size"
            )
        x = self.patch_embed(x)  # (N, L, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1+L, D)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # mean of patch tokens, without cls: (N, D)
        return self.norm(x)[:, 0]  # cls token: (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, num_classes) logits."""
        return self.head(self.forward_features(x))


def _vit(pretrained: bool, overrides: dict, **arch) -> VisionTransformer:
    if pretrained:
        raise ValueError("no pretrained weights are bundled; use --finetune or --resume with a checkpoint")
    kwargs = {"norm_layer": partial(nn.LayerNorm, eps=1e-6), "qkv_bias": True, **arch, **drop_timm_kwargs(overrides)}
    return VisionTransformer(**kwargs)


@register_model
def vit_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(pretrained, kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4)


@register_model
def vit_large_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(pretrained, kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4)


@register_model
def vit_huge_patch14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(pretrained, kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4)


@register_model
def vit_tiny_patch4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The encoder of ``mae_vit_tiny_patch4`` as a classifier for 32x32 images."""
    return _vit(pretrained, kwargs, img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4)
