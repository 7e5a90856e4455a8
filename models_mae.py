"""Masked Autoencoder (MAE) with a Vision Transformer backbone.

A reimplementation of facebookresearch/mae ``models_mae.py`` on today's PyTorch and timm. Parameter names and
shapes are those of the official model, so the official ``mae_visualize_vit_*.pth`` checkpoints load with
``strict=True``, and the random draws are the same, so the same seed gives the same mask and loss.

Shape legend:
    N  batch size
    C  image channels (``in_chans``; 3 in the official code, which hard-codes it in patchify / unpatchify)
    H, W  image height and width (square in the official code; here any multiple of p, e.g. --input_size 64 128)
    p  patch size
    L  number of patches, (H / p) * (W / p)
    K  number of visible (kept) patches, int(L * (1 - mask_ratio))
    D  encoder width; Dd decoder width
"""

from functools import partial

import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import Block, PatchEmbed

from util.masking import check_mask_type, mask_noise
from util.pos_embed import get_2d_sincos_pos_embed

# timm.create_model passes these to every factory; our models have no pretrained configs to apply.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def drop_timm_kwargs(kwargs: dict) -> dict:
    """Remove the keyword arguments timm.create_model adds for its own pretrained-weight handling."""
    return {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KWARGS}


def init_weights_xavier(m: nn.Module) -> None:
    """The official MAE/MixMIM init of one module: xavier-uniform Linear (following the official JAX ViT), zero
    biases, unit LayerNorms. Applied with ``model.apply``, whose module order fixes the random draws."""
    if isinstance(m, nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone (He et al., 2021).

    ``mask_type``: how the masks are sampled (the paper's Table 1f; ``util/masking.py``): ``random`` (the official
    default), ``block`` (BEiT's block-wise) or ``grid`` (keep one patch of every 2x2; mask ratio 0.75). Checked at
    forward, where the mask ratio is known.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        mask_type: str = "random",
    ):
        super().__init__()
        self.in_chans = in_chans
        self.mask_type = mask_type

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embedding, a parameter (not a buffer) so the official state_dict names hold
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid_size = tuple(self.patch_embed.grid_size)  # (H / p, W / p)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        dec_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos_embed).float().unsqueeze(0))

        # initialise patch_embed like nn.Linear (instead of nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02) as the cutoff (2.) is 100 std away
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)

        # same module order as the official code, so the same seed gives the same weights
        self.apply(init_weights_xavier)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, L, p*p*C) patches, each patch flattened as (p, p, C)."""
        p = self.patch_embed.patch_size[0]
        N, C, H, W = imgs.shape
        if H % p != 0 or W % p != 0:
            raise ValueError(f"patchify needs images with sides divisible by {p}, got {H}x{W}")
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) patches -> (N, C, H, W) images; the inverse of ``patchify``. The model's grid when L is
        its number of patches, else a square one; C from the width (a mask, (N, L, p*p), gives one channel)."""
        p = self.patch_embed.patch_size[0]
        N, L, _ = x.shape
        h, w = self.patch_embed.grid_size
        if h * w != L:
            h = w = int(L**0.5)
            if h * w != L:
                raise ValueError(
                    f"unpatchify needs the model's {self.patch_embed.grid_size} grid or a square one, got {L} patches"
                )
        C = x.shape[-1] // (p * p)
        x = x.reshape(N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, w * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of uniform noise.

        x: (N, L, D) tokens; noise: optional (N, L), small values are kept (the default draws it with
        ``torch.rand`` exactly as the official code does). Returns the kept tokens (N, K, D), the binary
        mask (N, L) with 0 for kept and 1 for removed, and ids_restore (N, L), the inverse permutation.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1)
        elif noise.shape != (N, L):
            raise ValueError(f"noise must have shape {(N, L)}, got {tuple(noise.shape)}")

        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, K, D)

        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle: (N, L)
        return x_masked, mask, ids_restore

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images -> latent (N, 1+K, D), mask (N, L), ids_restore (N, L). Without ``noise``, the
        noise of ``self.mask_type`` (random: ``torch.rand``, drawn where the official code draws it)."""
        expected = self.patch_embed.img_size
        if tuple(x.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])} but the model was built for {tuple(expected)}; "
                "build it with img_size=... to match --input_size"
            )
        grid_size = tuple(self.patch_embed.grid_size)  # (H / p, W / p)
        check_mask_type(self.mask_type, mask_ratio, grid_size)
        x = self.patch_embed(x)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        if noise is None:
            noise = mask_noise(self.mask_type, x.shape[0], grid_size, mask_ratio, x.device)  # (N, L)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, K, D)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1+K, D), ids_restore (N, L) -> predicted patches (N, L, p*p*C)."""
        x = self.decoder_embed(x)  # (N, 1+K, Dd)
        N, _, Dd = x.shape
        L = ids_restore.shape[1]

        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)  # (N, L-K, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token: (N, L, Dd) in shuffled order
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1+L, Dd)

        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (N, 1+L, p*p*C)
        return x[:, 1:, :]  # drop cls token

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches only.

        imgs: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 0 is keep, 1 is remove.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5

        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L), mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (N, L, p*p*C), mask (N, L))."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _mae(pretrained: bool, overrides: dict, **arch) -> MaskedAutoencoderViT:
    """Build an MAE from its architecture, with the caller's keyword overrides (img_size, norm_pix_loss, ...)."""
    if pretrained:
        raise ValueError("no pretrained weights are bundled; load a checkpoint with --resume or load_state_dict")
    kwargs = {**arch, **drop_timm_kwargs(overrides)}
    # the official LayerNorm eps is 1e-6; weights from Hugging Face state theirs (its ViT default: 1e-12)
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=kwargs.pop("layer_norm_eps", None) or 1e-6))
    return MaskedAutoencoderViT(**kwargs)


_DEC512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)


@register_model
def mae_vit_base_patch16_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _mae(pretrained, kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC512D8B)


@register_model
def mae_vit_large_patch16_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _mae(pretrained, kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC512D8B)


@register_model
def mae_vit_huge_patch14_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _mae(pretrained, kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC512D8B)


@register_model
def mae_vit_tiny_patch4(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    """A small MAE for 32x32 images (64 patches of 4x4) that trains on a CPU: for tests and the demo."""
    return _mae(
        pretrained,
        kwargs,
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        mlp_ratio=4,
    )


# the recommended architectures (decoder: 512 dim, 8 blocks), under the official names
@register_model
def mae_vit_base_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return mae_vit_base_patch16_dec512d8b(pretrained, **kwargs)


@register_model
def mae_vit_large_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return mae_vit_large_patch16_dec512d8b(pretrained, **kwargs)


@register_model
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return mae_vit_huge_patch14_dec512d8b(pretrained, **kwargs)
