"""MixMIM / MixMAE: mixed and masked image modelling with a hierarchical (Swin-like) window-attention encoder.

A reimplementation of Sense-X/MixMIM (``models_mixmim.py`` for pretraining, ``models_mixmim_ft.py`` for
fine-tuning) on today's PyTorch and timm, with the encoder written once and shared by both models. Parameter and
buffer names and shapes are those of the official models, so their checkpoints load with ``strict=True``; the
weights are initialised with the same random draws in the same order, and the masking draws the same numbers as the
official code (Python ``random`` for the mask-ratio jitter, then ``torch.rand`` for the noise), so the same seeds
give the same weights, mask, loss and gradients.

Pretraining: one random mask on the coarsest (stride ``encoder_stride``) grid is shared by the whole batch; at
masked positions each image's patch tokens are replaced by those of its partner ``x.flip(0)``. Attention inside a
window only connects tokens of the same image (an additive mask of -inf between the two images' tokens). The decoder
runs on the 2B "unmixed" sequences (image i's visible tokens plus mask tokens, and the partner's visible tokens plus
mask tokens) and the loss is computed on every patch of every image after putting each prediction back in place.

Attention: the relative-position bias and the mixing mask form one additive mask. The mixing part is built once per
stage per forward (the official code rebuilds it in every block, at batch size); each block adds its own bias
table to it at window count, not batch, size. Two attention paths compute the same thing: plain matmul-softmax, and
``F.scaled_dot_product_attention``. Each attention module picks its path when it is built, as timm's: ``fused_attn``
given to the factory, else timm's ``use_fused_attn()`` (SDPA; ``TIMM_FUSED_ATTN=0`` in the environment turns it off).
On the CPU SDPA with a float bias runs its math kernel, a few per cent slower than the plain path for MixMIM-B
(``benchmarks/bench_mixmim_attention.py``); the scripts' model builders (model_table.py) pick the plain path
there.

Shape legend:
    B  batch size
    C  image channels (3)
    H, W  image height and width
    p  patch size (4); S encoder stride, p * 2 ** (stages - 1) (32 for the official models)
    h, w  token grid of a stage; L = h * w tokens; D width of a stage
    ws  window side; N = ws * ws tokens per window; nW windows per image; nH heads; hd = D / nH
    M  windows the additive mask varies over (nW with a mixing mask, 1 without)
    Lo  tokens on the output grid, (H / S) * (W / S); Dd decoder width
"""

import random
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from models_mae import drop_timm_kwargs, init_weights_xavier
from util.checkpoint import load_pretrained_state, read_overlay_file, state_dict_of
from util.pos_embed import get_2d_sincos_pos_embed


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, h, w, D) -> (B*nW, ws, ws, D), windows in row-major order within each image."""
    B, h, w, D = x.shape
    x = x.view(B, h // ws, ws, w // ws, ws, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, D)  # (B*nW, ws, ws, D)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B*nW, ws, ws, D) -> (B, h, w, D); the inverse of ``window_partition``."""
    D = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, D)  # (B, h/ws, w/ws, ws, ws, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, D)


def relative_position_index(ws: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into the (2*ws0-1)*(2*ws1-1) bias table for every pair of tokens in a window (Swin)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij"))  # (2, ws0, ws1)
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), in [-(ws-1), ws-1]
    rel[:, :, 0] += ws[0] - 1
    rel[:, :, 1] += ws[1] - 1
    rel[:, :, 0] *= 2 * ws[1] - 1
    return rel.sum(-1)  # (N, N)


def window_mix_mask(mask: torch.Tensor, h: int, w: int, ws: int) -> torch.Tensor:
    """Additive attention mask that stops tokens of the two mixed images from attending to each other.

    mask: (1, L) or (1, L, 1), 1 where the token comes from the partner image. Returns (nW, 1, N, N) with 0 between
    tokens of the same image and -inf between tokens of different images (every token sees at least itself).
    """
    m = window_partition(mask.reshape(1, h, w, 1), ws).reshape(-1, ws * ws)  # (nW, N)
    cross = m[:, :, None] != m[:, None, :]  # (nW, N, N)
    return torch.zeros(cross.shape, dtype=mask.dtype, device=mask.device).masked_fill_(cross, float("-inf"))[:, None]


@register_notrace_function  # FX: a leaf (its branch depends on the device)
def aligned_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """(..., N, N) additive mask for SDPA: on CUDA with rows 16-aligned in memory, else the memory-efficient kernel
    pads a batch-sized copy of it."""
    N = attn_mask.shape[-1]
    if attn_mask.is_cuda and N % 16 != 0:
        return F.pad(attn_mask, (0, -N % 16))[..., :N]
    return attn_mask


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias (Swin, no shift)."""

    def __init__(
        self,
        dim: int,
        window_size: tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn() if fused_attn is None else fused_attn  # SDPA or plain, fixed here

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads, **dd)
        )  # ((2*ws0-1)*(2*ws1-1), nH)
        index = relative_position_index(window_size).to(device)  # (N, N)
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # after qkv and proj, as the official code: the same seed gives the same weights
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(nH, N, N) bias gathered from the table."""
        N = self.window_size[0] * self.window_size[1]
        # index_select, not table[index]: its backward (index_add) sums in a fixed order, while indexing's
        # (index_put with accumulate) sums in thread order on the CPU, so a run would not repeat to the bit
        bias = self.relative_position_bias_table.index_select(0, self.relative_position_index.view(-1))  # (N*N, nH)
        return bias.view(N, N, -1).permute(2, 0, 1)  # (nH, N, N)

    def forward(self, x: torch.Tensor, mix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*nW, N, D) windows; mix_mask: (nW, 1, N, N) additive mask from ``window_mix_mask``, or None."""
        Bw, N, D = x.shape
        nH = self.num_heads
        qkv = self.qkv(x).reshape(Bw, N, 3, nH, D // nH).permute(2, 0, 3, 1, 4)  # (3, B*nW, nH, N, hd)
        q, k, v = qkv.unbind(0)  # (B*nW, nH, N, hd) each

        attn_mask = self.relative_position_bias().unsqueeze(0)  # (1, nH, N, N)
        if mix_mask is not None:
            attn_mask = attn_mask + mix_mask  # (nW, nH, N, N)
        M = attn_mask.shape[0]
        # fold the M windows the mask varies over into the head dim, so the mask broadcasts over the batch
        attn_mask = attn_mask.reshape(1, M * nH, N, N)

        if self.fused_attn:
            q = q.reshape(-1, M * nH, N, D // nH)  # (B*nW/M, M*nH, N, hd)
            k = k.reshape(-1, M * nH, N, D // nH)
            v = v.reshape(-1, M * nH, N, D // nH)
            attn_mask = aligned_mask(attn_mask.to(q.dtype))
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=self.scale,
            )
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).view(-1, M * nH, N, N)  # (B*nW/M, M*nH, N, N)
            attn = (attn + attn_mask).softmax(dim=-1)
            attn = self.attn_drop(attn).view(Bw, nH, N, N)
            x = attn @ v  # (B*nW, nH, N, hd)
        x = x.reshape(Bw, nH, N, D // nH).transpose(1, 2).reshape(Bw, N, D)  # (B*nW, N, D)
        return self.proj_drop(self.proj(x))


class MixMIMBlock(nn.Module):
    """Pre-norm transformer block with window attention; a window no smaller than the grid becomes global."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        fused_attn: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = min(window_size, *input_resolution)
        h, w = input_resolution
        if h % self.window_size or w % self.window_size:
            raise ValueError(f"window size {self.window_size} must divide the {h}x{w} token grid")

        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(
            dim,
            window_size=(self.window_size, self.window_size),
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            fused_attn=fused_attn,
            **dd,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: torch.Tensor, mix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D); mix_mask: (nW, 1, N, N) or None."""
        h, w = self.input_resolution
        B, L, D = x.shape
        ws = self.window_size
        windows = window_partition(self.norm1(x).view(B, h, w, D), ws).view(-1, ws * ws, D)  # (B*nW, N, D)
        windows = self.attn(windows, mix_mask)  # (B*nW, N, D)
        y = window_reverse(windows.view(-1, ws, ws, D), ws, h, w).view(B, L, D)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 group of tokens and project 4D -> 2D (timm 0.5 / Swin layout and names)."""

    def __init__(
        self,
        input_resolution: tuple[int, int],
        dim: int,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.norm = norm_layer(4 * dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) -> (B, h/2*w/2, 2D)."""
        h, w = self.input_resolution
        B, L, D = x.shape
        x = x.view(B, h // 2, 2, w // 2, 2, D)  # (B, h/2, dh, w/2, dw, D)
        # channel order (dh, dw) = (0,0), (1,0), (0,1), (1,1), as Swin's x0, x1, x2, x3
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, (h // 2) * (w // 2), 4 * D)  # (B, L/4, 4D)
        return self.reduction(self.norm(x))


class MixMIMLayer(nn.Module):
    """One stage: ``depth`` blocks at one resolution, then an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        downsample: type[nn.Module] | None = None,
        use_checkpoint: bool = False,
        fused_attn: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            [
                MixMIMBlock(
                    dim=dim,
                    input_resolution=input_resolution,
                    num_heads=num_heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path,
                    norm_layer=norm_layer,
                    fused_attn=fused_attn,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer, **dd) if downsample else None

    def forward_blocks(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's blocks without the downsampling: x (B, L, D); mask (1, L, 1) mixing mask or None."""
        mix_mask: torch.Tensor | None = None
        if mask is not None:  # built once for all blocks of the stage
            h, w = self.input_resolution
            mix_mask = window_mix_mask(mask, h, w, self.blocks[0].window_size)  # (nW, 1, N, N)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, mix_mask, use_reentrant=False)
            else:
                x = blk(x, mix_mask)
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D); mask: (1, L, 1) mixing mask of this stage, or None -> (B, L', D')."""
        x = self.forward_blocks(x, mask)
        if self.downsample is not None:
            x = self.downsample(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"


class MixMIMEncoder(nn.Module):
    """The hierarchical encoder shared by the pretraining model and the classifier.

    Patch embedding, fixed 2-D sin-cos ``absolute_pos_embed``, ``len(depths)`` stages of window-attention blocks
    (each but the last followed by PatchMerging), final LayerNorm. With a mask per stage the input is mixed with
    its partner ``x.flip(0)`` and attention is confined to each image's tokens.

    Feature maps (timm's ``forward_intermediates`` and ``feature_info``): stage ``i`` gives its blocks' output before
    the downsampling, ``embed_dim * 2**i`` channels at stride ``patch_size * 2**i`` (4/8/16/32 for the official
    models); the final ``norm`` belongs to the last stage only.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_norm: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
        fused_attn: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.num_heads = list(num_heads)
        self.window_size = list(window_size)
        self.mlp_ratio = mlp_ratio
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        # the official code fixes this at 32 (patch 4, four stages); the general form lets tiny models use 32x32
        self.encoder_stride = patch_size * 2 ** (self.num_layers - 1)

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None,
            **dd,
        )
        self.patch_grid = self.patch_embed.grid_size
        if self.patch_grid[0] != self.patch_grid[1] or self.patch_grid[0] % 2 ** (self.num_layers - 1):
            raise ValueError(
                f"MixMIM needs a square patch grid divisible by {2 ** (self.num_layers - 1)}, got {self.patch_grid}"
            )

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]  # stochastic depth
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(self.num_layers):
            self.layers.append(
                MixMIMLayer(
                    dim=embed_dim * 2**i,
                    input_resolution=(self.patch_grid[0] // 2**i, self.patch_grid[1] // 2**i),
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    downsample=PatchMerging if i < self.num_layers - 1 else None,
                    use_checkpoint=use_checkpoint,
                    fused_attn=fused_attn,
                    **dd,
                )
            )
            # the stage's last block outputs the feature map (the downsampling follows it)
            module = f"layers.{i}.blocks.{depths[i] - 1}"
            self.feature_info.append(dict(num_chs=embed_dim * 2**i, reduction=patch_size * 2**i, module=module))
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.norm = norm_layer(self.num_features, **dd)
        # fixed sin-cos embedding: a buffer under the official state_dict name (the official code has a frozen
        # Parameter; no optimizer took it, and a buffer is what timm and DDP expect of a constant)
        self.register_buffer("absolute_pos_embed", torch.zeros(1, self.patch_embed.num_patches, embed_dim, **dd))

    def initialize_weights(self) -> None:
        """Sin-cos position embedding; xavier-uniform Linear layers, unit LayerNorms (as the official code).

        The patch-embedding convolution keeps PyTorch's default initialisation, as in the official code.
        """
        pos_embed = get_2d_sincos_pos_embed(self.embed_dim, self.patch_grid[0], cls_token=False)
        with torch.no_grad():
            self.absolute_pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        # same module order as the official code, so the same seed gives the same weights
        self.apply(init_weights_xavier)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (the official ``use_checkpoint``)."""
        for layer in self.layers:
            layer.use_checkpoint = enable

    def forward_encoder(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, Lo, D4) normalised tokens of the last stage.

        masks: None (no mixing), or one (1, L_s, 1) mask per stage from ``random_masking``: where it is 1 a token
        is taken from the partner image ``x.flip(0)`` and attends only to the partner's tokens.
        """
        x = self.patch_embed(x)  # (B, L, D)
        if masks is not None:
            x = x * (1.0 - masks[0]) + x.flip(0) * masks[0]
        x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if masks is None else masks[i])
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stages' feature maps, as timm's SwinTransformer (no mixing, nothing masked).

        indices: the last n stages if an int, all if None, else those listed; norm: apply the final norm to the
        last stage's map; stop_early: stop after the last stage asked for; output_fmt: "NCHW" or "NHWC".
        Returns the maps, or (the final features as ``forward_features`` gives them, the maps).
        """
        assert output_fmt in ("NCHW", "NHWC"), "output_fmt must be NCHW or NHWC"
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        x = self.pos_drop(self.patch_embed(x) + self.absolute_pos_embed)  # (B, L, D)
        B = x.shape[0]
        intermediates = []
        stages = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[: max_index + 1]
        i = 0
        h, w = self.patch_grid
        for i, layer in enumerate(stages):
            x = layer.forward_blocks(x)  # (B, L_i, D_i)
            h, w = layer.input_resolution
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                y = y.reshape(B, h, w, -1)  # (B, h_i, w_i, D_i)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if layer.downsample is not None and not (stop_early and i == max_index):  # stopping: end at the tap
                x = layer.downsample(x)
                h, w = h // 2, w // 2
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x.reshape(B, h, w, -1).permute(0, 3, 1, 2), intermediates  # (B, D, h, w) where the stages stopped

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Lo, D) tokens after the last stage -> (B, D, ho, wo) map."""
        h, w = self.layers[-1].input_resolution
        if self.layers[-1].downsample is not None:
            h, w = h // 2, w // 2
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # (B, D, ho, wo)


class MixMIM(MixMIMEncoder):
    """MixMIM / MixMAE pretraining model (Liu et al., 2022): mixed input, masked window attention, dual decoder.

    Defaults are the official ones (Swin-T-like encoder, norm_pix_loss=True); the factories set the sizes.
    """

    def __init__(
        self,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] = (7, 7, 14, 7),
        qkv_bias: bool = True,
        patch_norm: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
        range_mask_ratio: float = 0.0,
        fused_attn: bool | None = None,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            patch_norm=patch_norm,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            attn_drop_rate=attn_drop_rate,
            norm_layer=norm_layer,
            use_checkpoint=use_checkpoint,
            fused_attn=fused_attn,
        )
        self.decoder_dim = decoder_dim
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.norm_pix_loss = norm_pix_loss
        self.range_mask_ratio = range_mask_ratio

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.out_num_patches = (img_size // self.encoder_stride) ** 2
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.out_num_patches, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        dec_pos_embed = get_2d_sincos_pos_embed(self.decoder_dim, int(self.out_num_patches**0.5), cls_token=False)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos_embed).float().unsqueeze(0))
        super().initialize_weights()

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """One random mask for the whole batch, at every stage's resolution.

        x: (B, C, H, W) images. ``int(Lo * ratio)`` of the Lo output-grid cells are masked, with ratio = mask_ratio
        + U(0, range_mask_ratio). Draw order as the official code, so the same seeds give the same mask: first
        Python's ``random.uniform`` (always drawn, even when range_mask_ratio is 0), then ``torch.rand(1, 1, Lo)``
        unless ``noise`` (Lo values; the smallest are masked) is given. Seed both ``random`` and ``torch``.

        Returns one (1, L_s, 1) float mask per stage, 1 = token taken from the partner image; the last one is the
        (1, Lo, 1) mask on the output grid. Each is the output-grid mask upsampled by nearest neighbour.
        """
        H, W = x.shape[-2:]
        out_h, out_w = H // self.encoder_stride, W // self.encoder_stride
        Lo = out_h * out_w
        mask_ratio = mask_ratio + random.uniform(0.0, self.range_mask_ratio)
        if noise is None:
            noise = torch.rand(1, 1, Lo, device=x.device)  # noise in [0, 1)
        elif noise.numel() != Lo:
            raise ValueError(f"noise must have {Lo} elements, got shape {tuple(noise.shape)}")
        # the cells with the smallest noise are masked (the official comment says "small is keep", the code masks)
        mask_idx = torch.argsort(noise.reshape(1, 1, Lo), dim=2)[:, :, : int(Lo * mask_ratio)]
        mask = torch.zeros(1, 1, Lo, device=x.device).scatter_(2, mask_idx, 1.0)
        mask = mask.reshape(1, 1, out_h, out_w)
        masks = []
        for i in range(self.num_layers):
            f = 2 ** (self.num_layers - 1 - i)  # stage i has f x f tokens per output cell
            m = mask.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)  # (1, 1, out_h*f, out_w*f)
            masks.append(m.reshape(1, -1, 1))  # (1, L_i, 1)
        return masks

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, Lo, S*S*C), each S x S patch flattened as (S, S, C)."""
        p = self.encoder_stride
        B, C, H, W = imgs.shape
        if H != W or H % p != 0:
            raise ValueError(f"patchify needs square images with sides divisible by {p}, got {H}x{W}")
        h = w = H // p
        x = imgs.reshape(B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Lo, S*S*C) -> (B, C, H, W); the inverse of ``patchify``."""
        p = self.encoder_stride
        B, L, _ = x.shape
        h = w = int(L**0.5)
        if h * w != L:
            raise ValueError(f"unpatchify needs a square number of patches, got {L}")
        x = x.reshape(B, h, w, p, p, -1)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(B, -1, h * p, w * p)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: (B, Lo, D4) mixed latent, mask: (1, Lo, 1) -> predictions (2B, Lo, S*S*C).

        Rows [0, B): image i's own tokens (mask 0) with mask tokens elsewhere, so they predict image i where
        mask is 1. Rows [B, 2B): row i keeps the tokens of the partner image B-1-i (mask 1) and predicts it where
        mask is 0.
        """
        x = self.decoder_embed(z)  # (B, Lo, Dd)
        B, Lo, _ = x.shape
        mask_tokens = self.mask_token.expand(B, Lo, -1)
        x1 = x * (1 - mask) + mask_tokens * mask
        x2 = x * mask + mask_tokens * (1 - mask)
        x = torch.cat([x1, x2], dim=0)  # (2B, Lo, Dd)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)  # (2B, Lo, S*S*C)

    @staticmethod
    def unmix(x_rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(2B, Lo, P) decoder output, (1, Lo, 1) mask -> (B, Lo, P): image i's prediction at every position."""
        x1_rec, x2_rec = x_rec.chunk(2, dim=0)  # (B, Lo, P) each
        return x1_rec * mask + x2_rec.flip(0) * (1 - mask)

    def forward_loss(self, imgs: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over all patches of all images (each patch is masked in one of the two rows).

        imgs: (B, C, H, W); x_rec: (2B, Lo, S*S*C); mask: (1, Lo, 1).
        """
        target = self.patchify(imgs)  # (B, Lo, S*S*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((self.unmix(x_rec, mask) - target) ** 2).mean()

    def forward(
        self, x: torch.Tensor, mask_ratio: float = 0.5, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images -> (loss, x_rec (2B, Lo, S*S*C), mask (1, Lo, 1)). B must be at least 2."""
        masks = self.random_masking(x, mask_ratio, noise)
        z = self.forward_encoder(x, masks)  # (B, Lo, D4)
        x_rec = self.forward_decoder(z, masks[-1])
        loss = self.forward_loss(x, x_rec, masks[-1])
        return loss, x_rec, masks[-1]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}


class MixMIMClassifier(MixMIMEncoder):
    """The MixMIM encoder with average pooling and a linear ``head`` (official ``models_mixmim_ft.MixMIM``).

    timm's model API (as its SwinTransformer, but NCHW maps like its convnets): ``forward_features`` gives the last
    stage's normalised map (B, D4, ho, wo), ``forward_head`` pools it (``global_pool`` "avg", or "" for none) and
    classifies; ``reset_classifier``, ``forward_intermediates``, ``prune_intermediate_layers``,
    ``set_grad_checkpointing``, and ``timm.create_model(name, features_only=True)`` (the four stages).
    """

    def __init__(self, num_classes: int = 1000, global_pool: str = "avg", **kwargs):
        super().__init__(**kwargs)
        assert global_pool in ("", "avg"), f"global_pool must be 'avg' or '', not {global_pool!r}"
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head_hidden_size = self.num_features
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, ``forward`` returns the pooled features) of the encoder's
        dtype and device; ``global_pool`` "avg" or "" (None keeps the current)."""
        if global_pool is not None:
            assert global_pool in ("", "avg"), f"global_pool must be 'avg' or '', not {global_pool!r}"
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else self.patch_embed.proj.weight
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (timm's contract); returns the indices kept."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        if prune_end:  # the features now end at the last kept stage's map, before its downsampling
            self.layers[-1].downsample = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:  # the final norm is sized for the last stage
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D4, ho, wo) normalised tokens of the last stage."""
        return self._grid(self.forward_encoder(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, D4, ho, wo) -> (B, num_classes) logits; ``pre_logits``: the (B, D4) average (official avgpool)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # (B, D4)
            return x if pre_logits else self.head(x)
        # no pooling: the head classifies every position
        return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, classes, ho, wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official fine-tuning model exempts nothing by name (1-D parameters are exempt anyway)
        return set()


# --------------------------------------------------------------------------------------------------------------
# factories (official names; the classifiers carry an ``_ft`` suffix: model_table.py maps the official
# fine-tuning names, which the official code registers in a second module, to them)

_BASE = dict(embed_dim=128, num_heads=[4, 8, 16, 32])
_LARGE = dict(embed_dim=192, num_heads=[6, 12, 24, 48])
_HUGE = dict(embed_dim=352, num_heads=[11, 22, 44, 88])
_AT_224 = dict(img_size=224, patch_size=4, depths=[2, 2, 18, 2], window_size=[14, 14, 14, 7])
_AT_384 = dict(img_size=384, patch_size=4, depths=[2, 2, 18, 2], window_size=[16, 16, 24, 12])
_DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)
# tiny: patch 2 makes the encoder stride 16, so 32x32 inputs have a 2x2 output grid and 64x64 inputs 4x4; the
# windows cover several output cells at every stage (at 64x64), so the masked attention is exercised.
_TINY = dict(
    img_size=64, patch_size=2, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=[16, 8, 4, 2]
)


def _check_pretrained(pretrained: bool) -> None:
    if pretrained:
        raise ValueError("no pretrained weights are bundled; load a checkpoint with load_state_dict instead")


def _mixmim(pretrained: bool, overrides: dict, **arch) -> MixMIM:
    _check_pretrained(pretrained)
    overrides = {k: v for k, v in overrides.items() if k != "layer_norm_eps"}  # only ViT weights state one
    return MixMIM(**{**arch, **drop_timm_kwargs(overrides)})


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: a MixMIM checkpoint (official or ours; pretraining or fine-tuned) as a
    state dict for ``model``, with the project's ``--finetune`` rules (util/checkpoint.py ``load_pretrained_state``):
    the decoder and mask token dropped, position tables resized, a head of another shape left out, one-line errors
    for anything else that does not fit; keys the checkpoint lacks (the head) keep the model's initialisation."""
    source = model.pretrained_cfg.get("file") or "the pretrained_cfg's weights"
    load_pretrained_state(model, dict(state_dict_of(state_dict)), source, head_init_std=None)
    return model.state_dict()


def _classifier(variant: str, pretrained: bool, overrides: dict, **arch) -> MixMIMClassifier:
    if pretrained:  # the overlay's file read by content (util/checkpoint.py)
        overrides = {k: v for k, v in read_overlay_file(overrides).items() if k != "layer_norm_eps"}
    return build_model_with_cfg(
        MixMIMClassifier,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**arch, **overrides},
    )


def _cfg(size: int = 224, stride: int = 32, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": (size // stride, size // stride),
        "crop_pct": 0.875 if size <= 224 else 1.0,  # the official evaluation transform
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# the classifiers' configurations (no weights are bundled; ``pretrained_cfg_overlay=dict(file=...)`` points timm
# at a checkpoint); the pretraining models are built without timm's machinery
default_cfgs = generate_default_cfgs(
    {
        "mixmim_base_ft": _cfg(),
        "mixmim_base_384_ft": _cfg(384),
        "mixmim_large_ft": _cfg(),
        "mixmim_large_384_ft": _cfg(384),
        "mixmim_huge_ft": _cfg(),
        "mixmim_tiny_ft": _cfg(64, 16),
    }
)


@register_model
def mixmim_base(pretrained: bool = False, **kwargs) -> MixMIM:
    return _mixmim(pretrained, kwargs, **_AT_224, **_BASE, **_DECODER)


@register_model
def mixmim_large(pretrained: bool = False, **kwargs) -> MixMIM:
    return _mixmim(pretrained, kwargs, **_AT_224, **_LARGE, **_DECODER)


@register_model
def mixmim_huge(pretrained: bool = False, **kwargs) -> MixMIM:
    return _mixmim(pretrained, kwargs, **_AT_224, **_HUGE, **_DECODER)


@register_model
def mixmim_tiny(pretrained: bool = False, **kwargs) -> MixMIM:
    """A few-second CPU model for tests and demos (not in the official code); 64x64 or 32x32 inputs."""
    return _mixmim(pretrained, kwargs, **_TINY, decoder_dim=64, decoder_depth=2, decoder_num_heads=2)


@register_model
def mixmim_base_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    return _classifier("mixmim_base_ft", pretrained, kwargs, **_AT_224, **_BASE)


@register_model
def mixmim_base_384_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    return _classifier("mixmim_base_384_ft", pretrained, kwargs, **_AT_384, **_BASE)


@register_model
def mixmim_large_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    return _classifier("mixmim_large_ft", pretrained, kwargs, **_AT_224, **_LARGE)


@register_model
def mixmim_large_384_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    return _classifier("mixmim_large_384_ft", pretrained, kwargs, **_AT_384, **_LARGE)


@register_model
def mixmim_huge_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    return _classifier("mixmim_huge_ft", pretrained, kwargs, **_AT_224, **_HUGE)


@register_model
def mixmim_tiny_ft(pretrained: bool = False, **kwargs) -> MixMIMClassifier:
    """Classifier twin of ``mixmim_tiny``."""
    return _classifier("mixmim_tiny_ft", pretrained, kwargs, **_TINY)
