"""Semantic segmentation: UperNet on the MAE ViT or the MixMIM encoder, the recipe of MAE's ADE20K results.

MAE (He et al., 2021, Sec. 5) fine-tunes UperNet (Xiao et al., 2018) on ADE20K with BEiT's segmentation code
(microsoft/unilm ``beit/semantic_segmentation``, on mmsegmentation); this module rebuilds that model without mmseg:

- ``ViTPyramid``: the plain ViT's patch tokens after four blocks (``out_indices``: 3, 5, 7, 11 of ViT-B, as BEiT),
  each resampled by BEiT's neck to one level of a pyramid: two stride-2 deconvolutions (BatchNorm and GELU between:
  x4), one deconvolution (x2), the map itself (x1), a 2x2 max-pool (x1/2); strides 4/8/16/32 for patch 16. Optional
  BEiT relative position bias per block (``rel_pos_bias``), initialised to zero as in MAE's transfer.
- ``MixMIMPyramid``: the hierarchical MixMIM encoder's four stage maps (strides 4/8/16/32), each through a new
  LayerNorm, as Swin's segmentation backbone (the classifier's final norm is dropped).
- ``UPerHead`` (pyramid pooling on the last level, FPN fusion of all four) and the auxiliary ``FCNHead`` on level 2,
  as mmseg's heads of the same names (conv-BN-ReLU modules under mmcv's names: ``conv``, ``bn``).
- ``slide_inference`` / ``whole_inference``: mmseg's test modes.

MixMIM's windows and the relative position bias fix the input size: a segmenter is built for the crop size
(``input_size``); smaller images are padded (bottom and right, with zeros, as mmseg pads training crops) and the
logits cropped back; larger ones are refused (use ``slide_inference``). BatchNorm layers are plain ``BatchNorm2d``
(mmseg's configs use SyncBN): multi-GPU training converts them with ``nn.SyncBatchNorm.convert_sync_batchnorm``.

Shape legend:
    B  batch size
    C  image channels; K  classes
    H, W  image height and width; p  the ViT's patch size; Gh, Gw  its patch grid
    D  encoder width (a ViT's embedding, a MixMIM stage's channels); E  head channels
    N  tokens of a ViT (1 + Gh * Gw); nH  attention heads
"""

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_table
from util.checkpoint import (
    check_stated_heads,
    checkpoint_grid,
    load_checkpoint_file,
    load_pretrained_state,
    state_dict_of,
)
from util.errors import UsageError
from util.lr_decay import layer_id_fn

logger = logging.getLogger(__name__)

# BEiT's out_indices for ViT-B (12 blocks) and ViT-L (24); ViT-H (32): every eighth block, ending at the last
BEIT_OUT_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23), 32: (7, 15, 23, 31)}


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks whose outputs make the four levels: BEiT's for 12 and 24 blocks, else the last of each quarter."""
    if depth in BEIT_OUT_INDICES:
        return BEIT_OUT_INDICES[depth]
    return tuple(math.ceil(depth * (k + 1) / 4) - 1 for k in range(4))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------- backbones


def beit_relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into a BEiT relative-position table of (2Gh-1)(2Gw-1)+3 rows for N = 1 + Gh*Gw tokens (cls first):
    patch pairs by their offset, then the three cls entries (cls to patch, patch to cls, cls to cls)."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)  # (2, Gh*Gw)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (Gh*Gw, Gh*Gw, 2): row and column offsets
    patch_index = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)  # (Gh*Gw, Gh*Gw)
    num_distances = (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)  # (N, N)
    index[1:, 1:] = patch_index
    index[0, :] = num_distances  # cls to patch
    index[:, 0] = num_distances + 1  # patch to cls
    index[0, 0] = num_distances + 2  # cls to cls
    return index


class RelativePositionBias(nn.Module):
    """One block's learned bias of the attention logits by relative position (BEiT's ``use_rel_pos_bias``), zero at
    first so that a pretrained model starts unchanged (MAE's transfer)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        num_relative_distance = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance, num_heads))
        # rebuilt from the grid, so not saved
        self.register_buffer("relative_position_index", beit_relative_position_index(self.grid), persistent=False)

    def forward(self) -> torch.Tensor:
        """The additive attention mask, (1, nH, N, N)."""
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)  # (N, N, nH)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nH, N, N)


class ViTPyramid(nn.Module):
    """BEiT's segmentation backbone over this project's timm ViT: four blocks' patch-token maps, resampled x4, x2,
    x1 and x1/2 (strides p/4, p/2, p, 2p), all with the ViT's width D.

    ``vit``: a classifier of model_table (any head; the final norm, ``fc_norm``, the head and the blocks after the
    last of ``out_indices`` are dropped). ``rel_pos_bias``: a zero-initialised BEiT relative position bias per
    block, given to timm's attention as its additive ``attn_mask`` (fused SDPA and the plain path alike), so timm's
    blocks stay as they are; the tables sit in ``rel_pos_bias.{i}`` here, not in ``blocks.{i}.attn`` as in BEiT.
    Input: the size the ViT was built for (its position embedding, and the bias tables, are for that grid). The
    neck is BEiT's for patch 16 whatever the patch (BEiT has another for patch 8): ViT-H/14 gives strides 3.5 to 28.
    """

    def __init__(self, vit: nn.Module, out_indices: Sequence[int] | None = None, rel_pos_bias: bool = False):
        super().__init__()
        out_indices = tuple(out_indices or default_out_indices(len(vit.blocks)))
        if len(out_indices) != 4 or sorted(set(out_indices)) != list(out_indices) or out_indices[-1] >= len(vit.blocks):
            raise UsageError(f"out_indices must be 4 increasing block numbers below {len(vit.blocks)}: {out_indices}")
        self.out_indices = out_indices
        vit.prune_intermediate_layers(list(out_indices), prune_norm=True)  # blocks after the last, norms, head
        self.encoder = vit
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_prefix_tokens = vit.num_prefix_tokens  # the cls token
        heads = vit.blocks[0].attn.num_heads
        self.rel_pos_bias = (
            nn.ModuleList([RelativePositionBias(self.grid, heads) for _ in vit.blocks]) if rel_pos_bias else None
        )
        D = vit.embed_dim
        patch = vit.patch_embed.patch_size[0]
        self.strides = [patch / 4, patch / 2, patch, patch * 2]
        self.channels = [D] * 4
        # BEiT's neck for patch 16 (names fpn1..fpn4), SyncBN there; PyTorch's default initialisation, as BEiT's
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(D, D, kernel_size=2, stride=2),
            nn.BatchNorm2d(D),
            nn.GELU(),
            nn.ConvTranspose2d(D, D, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.img_size)

    def block_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) at the built size -> the patch-token maps of the ``out_indices`` blocks, (B, D, Gh, Gw)."""
        vit = self.encoder
        B = x.shape[0]
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D)
        maps = []
        for i, block in enumerate(vit.blocks):
            x = block(x) if self.rel_pos_bias is None else block(x, attn_mask=self.rel_pos_bias[i]())
            if i in self.out_indices:
                tokens = x[:, self.num_prefix_tokens :]  # (B, Gh*Gw, D)
                maps.append(tokens.transpose(1, 2).reshape(B, -1, *self.grid))  # (B, D, Gh, Gw)
        return maps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) at the built size -> [(B, D, 4H/p, 4W/p), (.., 2H/p, ..), (.., H/p, ..), (.., H/2p, ..)]."""
        maps = self.block_maps(x)
        return [fpn(m) for fpn, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


class MixMIMPyramid(nn.Module):
    """The MixMIM encoder's four stage maps (strides 4/8/16/32 for patch 4), each with a new LayerNorm over its
    channels, as Swin's segmentation backbone (norm0..norm3; the classifier's final norm and head are dropped).

    ``encoder``: a MixMIM classifier built for the segmentation crop (``build_segmenter`` picks windows that tile
    it); input: that size.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        encoder.prune_intermediate_layers([0, 1, 2, 3], prune_norm=True)  # final norm and head
        self.encoder = encoder
        self.channels = [info["num_chs"] for info in encoder.feature_info]
        self.strides = [info["reduction"] for info in encoder.feature_info]
        self.norms = nn.ModuleList([nn.LayerNorm(d) for d in self.channels])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) at the built size -> the four (B, D_i, H/s_i, W/s_i) stage maps."""
        maps = self.encoder.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)  # (B, h, w, D_i)
        return [norm(m).permute(0, 3, 1, 2).contiguous() for norm, m in zip(self.norms, maps, strict=True)]


# ----------------------------------------------------------------------------- heads


class ConvModule(nn.Sequential):
    """mmcv's ConvModule with BN and ReLU: a bias-free convolution, BatchNorm, ReLU; mmcv's initialisation (Kaiming
    normal, fan-out, for ReLU; BN weight 1, bias 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels), activate=nn.ReLU(inplace=True)))


class DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead`` classifier: Dropout2d, then a 1x1 convolution to the classes (normal, std 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) -> (B, K, h, w)."""
        return self.conv_seg(self.dropout(x))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(DecodeHead):
    """UperNet's head as mmseg's ``UPerHead``: a pyramid pooling module (PPM) on the last level, lateral 1x1
    convolutions on the others, top-down FPN fusion, 3x3 FPN convolutions, all levels upsampled to the first and
    fused by ``fpn_bottleneck``; logits at the first level's stride."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in pool_scales]
        )
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) last level -> (B, E, h, w): the level and its pooled summaries, fused."""
        pooled = [_resize(ppm(x), x.shape[-2:]) for ppm in self.psp_modules]  # each (B, E, h, w)
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Four maps (B, D_i, h_i, w_i) -> (B, K, h_0, w_0)."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1], strict=True)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [_resize(x, outs[0].shape[-2:]) for x in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))  # (B, K, h_0, w_0)


class FCNHead(DecodeHead):
    """mmseg's ``FCNHead`` as the auxiliary head of the recipe: ``num_convs`` 3x3 conv-BN-ReLU on one level
    (``in_index``), no concatenation of the input, the classifier; logits at that level's stride."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        in_index: int = 2,
        num_convs: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(
            *[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)]
        )

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Four maps -> (B, K, h, w) at level ``in_index``."""
        return self.cls_seg(self.convs(inputs[self.in_index]))


# ----------------------------------------------------------------------------- the segmenter


class Segmenter(nn.Module):
    """mmseg's ``EncoderDecoder``: backbone pyramid, ``decode_head`` and, in training, ``auxiliary_head``.

    Images up to the backbone's built size (the crop) go in; smaller ones are padded bottom and right with zeros to
    it and the logits cropped back.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.conv_seg.out_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.backbone.input_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> (logits (B, K, H/4, W/4), auxiliary logits (B, K, H/16, W/16) in training, else None).

        The strides are those of the pyramid's levels 0 and 2 (p/4 and p for a ViT of patch p); the losses, as
        mmseg's, upsample each to the labels' size. H/4 rounds up where the image is not a multiple of 4.
        """
        H, W = x.shape[-2:]
        size = self.input_size
        if H > size[0] or W > size[1]:
            raise UsageError(
                f"images of {H}x{W} exceed the {size[0]}x{size[1]} crop the segmenter was built for: use slide "
                "inference, or build it for a larger --input_size"
            )
        if (H, W) != size:
            x = F.pad(x, (0, size[1] - W, 0, size[0] - H))  # (B, C, *size)
        maps = self.backbone(x)
        logits = self.decode_head(maps)
        logits = _crop(logits, size, H, W)
        aux = None
        if self.training and self.auxiliary_head is not None:
            aux = _crop(self.auxiliary_head(maps), size, H, W)
        return logits, aux


def _crop(logits: torch.Tensor, padded: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """The part of (B, K, h, w) logits of a ``padded`` image that covers its top-left H x W."""
    h, w = logits.shape[-2:]
    return logits[..., : math.ceil(H * h / padded[0]), : math.ceil(W * w / padded[1])]


def _mixmim_windows(name: str, size: int) -> list[int]:
    """Window sides for a MixMIM encoder at ``size``: per stage, the smallest divisor of the stage's grid that is no
    smaller than the classifier's own window (the whole grid when that is smaller): 512 -> 16, 16, 16, 8 for the
    official models' 14, 14, 14, 7 (the relative-position tables are resized bicubically on loading)."""
    ref = model_table.check_buildable(name, model_table.default_input_size(name))
    grid = size // ref.patch_embed.patch_size[0]
    windows = []
    for i, ws in enumerate(ref.window_size):
        g = grid // 2**i
        windows.append(next((d for d in range(min(ws, g), g + 1) if g % d == 0), g))
    return windows


def build_segmenter(
    model: str,
    nb_classes: int,
    input_size: int | tuple[int, int],
    in_chans: int = 3,
    drop_path: float = 0.1,
    rel_pos_bias: bool = False,
    channels: int | None = None,
    out_indices: Sequence[int] | None = None,
    layer_norm_eps: float | None = None,
) -> Segmenter:
    """UperNet with an auxiliary FCN head on the encoder of ``model`` (a classifier or pretraining name of
    model_table, either family), for crops of ``input_size`` (MixMIM: square) and ``nb_classes`` classes.

    ``channels``: the UPerHead's width; by default BEiT's, the ViT's width (768 for B, 1024 for L), and for MixMIM
    Swin's 512 (the stage-2 width when smaller: tiny test models). ``rel_pos_bias``: BEiT's relative position bias
    (ViT only). ``out_indices``: the ViT blocks (``default_out_indices``). The auxiliary head: 256 channels on
    level 2, as in BEiT's and Swin's configs. ``layer_norm_eps``: the ViT's, when its weights state one (weights
    from Hugging Face; ``util.checkpoint.saved_norm_eps``).
    """
    name = model_table.resolve_classifier_name(model)
    family = model_table.family_of(name)
    if family == "mae":
        vit = model_table.build_classifier(
            name, input_size, 0, drop_path, global_pool=True, in_chans=in_chans, layer_norm_eps=layer_norm_eps
        )
        patch = vit.patch_embed.patch_size[0]
        sides = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
        if any(side % (2 * patch) for side in sides):  # the grid halves for the stride-32 level
            raise UsageError(f"crop {'x'.join(map(str, sides))}: the ViT pyramid needs a multiple of twice the patch "
                             f"size, {2 * patch}")  # fmt: skip
        backbone = ViTPyramid(vit, out_indices, rel_pos_bias)
        channels = channels or vit.embed_dim
    else:
        if rel_pos_bias:
            raise UsageError(f"--rel_pos_bias is for ViTs; {name} has relative position tables in its windows")
        if out_indices is not None:
            raise UsageError(f"out_indices are ViT blocks; {name} gives its four stages")
        if not isinstance(input_size, int):
            h, w = input_size
            if h != w:
                raise UsageError(f"--model {name} takes square crops only, not {h}x{w}")
            input_size = h
        kwargs = dict(num_classes=0, drop_path_rate=drop_path, in_chans=in_chans)
        kwargs["window_size"] = _mixmim_windows(name, input_size)
        model_table.check_buildable(name, input_size, **kwargs)  # one-line errors for a size it cannot take
        backbone = MixMIMPyramid(timm.create_model(name, img_size=input_size, **kwargs))
        channels = channels or min(512, backbone.channels[2])
    decode_head = UPerHead(backbone.channels, channels, nb_classes)
    auxiliary_head = FCNHead(backbone.channels[2], 256, nb_classes, in_index=2)
    return Segmenter(backbone, decode_head, auxiliary_head)


# ----------------------------------------------------------------------------- weights and optimizer


def _drop_unused(state: dict, encoder: nn.Module) -> list[str]:
    """Remove, in place, the classifier parts that the pyramid drops (head, ``fc_norm``, ViT blocks after the last
    tapped one) so that any checkpoint of the family fits; returns the keys removed. (The final ``norm`` and
    the pretraining parts are left to ``load_pretrained_state``.)"""
    own = encoder.state_dict()
    tops = {k.split(".")[0] for k in own}
    depth = len(encoder.blocks) if hasattr(encoder, "blocks") else None  # a ViT's kept blocks
    dropped = []
    for k in list(state):
        parts = k.split(".")
        if (parts[0] in ("head", "fc_norm") and parts[0] not in tops) or (
            depth and parts[0] == "blocks" and k not in own and parts[1].isdigit() and int(parts[1]) >= depth
        ):
            dropped.append(k)
            del state[k]
    return dropped


def load_backbone(model: Segmenter, path: str) -> None:
    """Load a checkpoint of either family (ours or official; pretraining or fine-tuned) into the segmenter's
    encoder by the ``--finetune`` rules (util/checkpoint.py): position embeddings (ViT) and window tables (MixMIM)
    resized to the crop, a 3-channel patch embedding adapted to ``in_chans``; the decoder, mask token, final norms
    and head are left out. The necks, heads and relative position bias tables keep their initialisation; anything
    else that does not fit is a one-line ``UsageError``."""
    checkpoint = load_checkpoint_file(path)
    check_stated_heads(model.backbone.encoder, checkpoint, path)
    unused = load_backbone_state(model, state_dict_of(checkpoint), path, checkpoint_grid(checkpoint))
    logger.info("loaded %s into the backbone; not used: %s", path, ", ".join(unused) or "nothing")


def load_backbone_state(model: Segmenter, state: dict, source: str, grid: tuple[int, int] | None = None) -> list[str]:
    """``load_backbone`` of a state dict in memory (``source`` names it in messages; ``grid``: its ViT patch grid
    when known); returns the checkpoint's keys left out (decoder, mask token, head, final norms)."""
    state = dict(state)
    encoder = model.backbone.encoder
    dropped = _drop_unused(state, encoder)
    _, unexpected = load_pretrained_state(encoder, state, source, head_init_std=None, grid=grid)
    return dropped + unexpected


def param_groups_segment(model: Segmenter, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with BEiT's layer-wise lr decay over the encoder (util/lr_decay.py's layer ids: block
    i at ``layer_decay ** (L + 1 - (i + 1))`` for L blocks, the embeddings one step lower), its relative position
    bias with its block; the necks and heads at scale 1.

    No weight decay for 1-D parameters, biases, ``pos_embed``, ``cls_token`` and relative-position tables. BEiT's
    constructor tests ``name in ('pos_embed', 'cls_token')`` on names that start with ``backbone.``, so there the
    position embedding, cls token and tables do get weight decay; its config's comment ("no weight decay for
    position embedding & layer norm") and Swin's settings (``relative_position_bias_table``: decay 0) exempt them,
    as here.
    """
    encoder = model.backbone.encoder
    num_layers, layer_id_of = layer_id_fn(encoder)
    skip = set(getattr(encoder, "no_weight_decay", set)())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("backbone.encoder.")
        if short != name:
            layer_id = layer_id_of(short)
        elif name.startswith("backbone.rel_pos_bias."):
            layer_id = int(name.split(".")[2]) + 1  # BEiT's table sits in block i
        else:
            layer_id = num_layers  # necks and heads
        no_decay = p.ndim == 1 or name.endswith(".bias") or short in skip or "relative_position_bias_table" in name
        group = groups.setdefault(
            (layer_id, no_decay),
            {"lr_scale": layer_decay ** (num_layers - layer_id), "weight_decay": 0.0 if no_decay else weight_decay,
             "params": []},
        )  # fmt: skip
        group["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def whole_inference(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, H, W) logits: the model's, upsampled bilinearly (align_corners=False), as mmseg's
    ``whole`` mode."""
    logits = model(img)[0]
    return _resize(logits.float(), img.shape[-2:])  # in fp32 under autocast, as mmseg's inference


@torch.no_grad()
def slide_inference(
    model: nn.Module, img: torch.Tensor, nb_classes: int, crop: int | tuple[int, int], stride: int | tuple[int, int]
) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, H, W) float32 logits, mmseg's ``slide`` mode: windows of ``crop`` every ``stride``
    (the last of each row and column moved back to end at the image's edge; one smaller window where the image is
    smaller than the crop), each window's upsampled logits added in place, divided by how many windows cover each
    pixel. The recipe: crop 512, stride 341."""
    h_crop, w_crop = _pair(crop)
    h_stride, w_stride = _pair(stride)
    B, _, H, W = img.shape
    h_grids = max(H - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(W - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((B, nb_classes, H, W), dtype=torch.float32)
    count = img.new_zeros((1, 1, H, W), dtype=torch.float32)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, H)
            x2 = min(w_idx * w_stride + w_crop, W)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += whole_inference(model, img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count
