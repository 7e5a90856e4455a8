"""Position embeddings: fixed 2-D sine-cosine tables and resizing of learned ones for another resolution.

Shape legend: G grid side (patches per row), Gh x Gw a rectangular grid (rows x columns), D embedding width,
E extra tokens (cls).
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """2-D sine-cosine embedding of a grid, (G*G, D), or (1+G*G, D) with a zero row for the cls token.

    ``grid_size``: the side G of a square grid (the official function), or (Gh, Gw) for a rectangular one, whose
    rows come in row-major order, (Gh*Gw, D). As in the official code, the first half of the channels encodes the
    column (meshgrid puts w first) and the second half the row.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first: two (Gh, Gw) arrays
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])  # (2, 1, Gh, Gw)
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """grid: (2, 1, Gh, Gw) coordinates -> (Gh*Gw, D)."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (G*G, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (G*G, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (G*G, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: M positions (any shape) -> (M, D), sin in the first half, cos in the second."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)  # float64 as the official np.float
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def interpolate_pos_embed(
    model: torch.nn.Module, checkpoint_model: dict, key: str = "pos_embed", orig_grid: tuple[int, int] | None = None
) -> None:
    """Resize a ViT checkpoint's ``pos_embed`` (or ``key``, e.g. an MAE's ``decoder_pos_embed``) in place to the
    model's patch grid (Gh, Gw), bicubically, keeping the extra tokens (cls) unchanged.

    ``orig_grid``: the checkpoint's grid (Gh0, Gw0), when known (our checkpoints record their input size). Else, as
    the official function, a square grid (the official checkpoints are square); a count that makes no square is
    taken as the model's grid when it has as many positions (a non-square checkpoint that lost its record, into a
    model of its size), else left for the load to report as a shape mismatch.
    """
    if key not in checkpoint_model:
        return
    pos_embed_checkpoint = checkpoint_model[key]  # (1, E + Gh0*Gw0, D)
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = model.patch_embed.num_patches
    side = int(num_patches**0.5)
    gh, gw = tuple(getattr(model.patch_embed, "grid_size", (side, side)))
    num_extra_tokens = getattr(model, key).shape[-2] - num_patches
    orig_patches = pos_embed_checkpoint.shape[-2] - num_extra_tokens
    if orig_grid is None:
        orig_size = int(round(orig_patches**0.5))
        if orig_size**2 == orig_patches:
            orig_grid = (orig_size, orig_size)
            if orig_patches == num_patches and gh != gw:
                logger.warning("%s: %d positions, as many as the model's %dx%d grid; taken as a square %dx%d one "
                               "and resized (the checkpoint does not record its input size; official checkpoints "
                               "are square)", key, orig_patches, gh, gw, orig_size, orig_size)  # fmt: skip
        elif orig_patches == num_patches:
            orig_grid = (gh, gw)
        else:
            return  # not a square grid: left for the load to report as a shape mismatch
    oh, ow = (int(v) for v in orig_grid)
    if oh * ow != orig_patches or (oh, ow) == (gh, gw):
        return  # a grid that does not fit the checkpoint is left for the load to report; the model's: nothing to do
    logger.info("%s: interpolate from %dx%d to %dx%d", key, oh, ow, gh, gw)
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]  # (1, E, D)
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, oh, ow, embedding_size).permute(0, 3, 1, 2)  # (1, D, Gh0, Gw0)
    pos_tokens = F.interpolate(pos_tokens.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(
        pos_embed_checkpoint.dtype
    )
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)  # (1, Gh*Gw, D)
    checkpoint_model[key] = torch.cat((extra_tokens, pos_tokens), dim=1)


# --------------------------------------------------------------------------------------------------------------
# MixMIM: absolute and decoder position embeddings (no extra tokens) and relative-position bias tables


def _resize_grid_embed(embed: torch.Tensor, new_size: int) -> torch.Tensor:
    """(1, G0*G0, D) -> (1, G*G, D), bicubic."""
    orig_size = int(embed.shape[-2] ** 0.5)
    grid = embed.reshape(-1, orig_size, orig_size, embed.shape[-1]).permute(0, 3, 1, 2)  # (1, D, G0, G0)
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode="bicubic", align_corners=False)
    return grid.to(embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)  # (1, G*G, D)


def interpolate_pos_embed_mixmim(model: torch.nn.Module, checkpoint_model: dict) -> None:
    """Fit a MixMIM checkpoint (in place) to ``model``'s input size and window sizes, as the official code.

    - ``absolute_pos_embed`` (and ``decoder_pos_embed`` when the model has one) are resized bicubically to the
      model's grid;
    - every ``relative_position_bias_table``, ((2*ws0-1)**2, nH), is resized bicubically as an nH-channel image to
      the model's window (e.g. 224 -> 384 fine-tuning: windows [14, 14, 14, 7] -> [16, 16, 24, 12]); a table with
      another number of heads is left for the load to report;
    - ``relative_position_index`` and ``attn_mask`` buffers are dropped: the model rebuilds its own.
    """
    own = model.state_dict()
    for key in ("absolute_pos_embed", "decoder_pos_embed"):
        if key not in checkpoint_model or key not in own:
            continue
        orig_size = int(checkpoint_model[key].shape[-2] ** 0.5)
        new_size = int(own[key].shape[-2] ** 0.5)
        if orig_size != new_size:
            logger.info("%s: interpolate from %dx%d to %dx%d", key, orig_size, orig_size, new_size, new_size)
            checkpoint_model[key] = _resize_grid_embed(checkpoint_model[key], new_size)

    for key in [k for k in checkpoint_model if "relative_position_bias_table" in k]:
        if key not in own:
            logger.info("%s is not in the model", key)
            continue
        table = checkpoint_model[key]  # (S0*S0, nH)
        (L1, nH1), (L2, nH2) = table.shape, own[key].shape
        if nH1 != nH2:
            logger.warning("%s has %d heads, the model %d: not interpolated", key, nH1, nH2)
        elif L1 != L2:
            S1, S2 = int(L1**0.5), int(L2**0.5)
            logger.info("%s: interpolate from %dx%d to %dx%d", key, S1, S1, S2, S2)
            img = table.permute(1, 0).reshape(1, nH1, S1, S1).float()  # (1, nH, S0, S0)
            img = F.interpolate(img, size=(S2, S2), mode="bicubic", align_corners=False)
            checkpoint_model[key] = img.reshape(nH2, L2).permute(1, 0).to(table.dtype)  # (S*S, nH)

    for key in [k for k in checkpoint_model if "relative_position_index" in k or "attn_mask" in k]:
        del checkpoint_model[key]
