"""Reconstructions of a pretraining model as pictures, as the official MAE demo notebook draws them: for each image
four panels, original | masked input (MixMIM: the mixed input) | reconstruction | reconstruction with the visible
patches pasted in. ``visualize.py`` draws them for a checkpoint; ``main_pretrain.py --vis_freq`` for fixed training
images during the run (``ReconstructionLog``).

MAE masks each image on its own, the model's ``mask_type`` way (random, block or grid); masked patches are shown
grey (zero after normalisation), as in the notebook. MixMIM masks with one mask per batch and fills each image's
masked cells with those of its partner (the batch in reverse order), so it needs at least two images; the
reconstruction puts each cell's prediction back in place, from whichever of the two decoder rows had that cell
hidden. For models trained with ``norm_pix_loss`` the predictions are per-patch normalised pixels; they are shown
with the mean and variance of the original patch, as the target was normalised (so a patch's brightness comes from
the original; its content from the model).

The masks come from a seed, not from the global RNGs: the same seed gives the same masks, and the training's random
draws are left alone. Only methods of the model object are called (``patchify``, ``unpatchify``, MixMIM's
``unmix``): this module imports no model file.
"""

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from util import masking
from util.datasets import BadImage, ImageFiles, normalize_on_device
from util.errors import UsageError
from util.families import family_of_module, unwrap
from util.fashion_mnist import denormalize
from util.seeding import seeded_rng

if TYPE_CHECKING:  # TensorBoard is imported by the scripts that write to it
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
MIXMIM_TITLES = ("original", "mixed", "reconstruction", "reconstruction + visible")
PANELS = ("original", "masked", "reconstruction", "pasted")  # the keys of ``reconstruct``, in the panels' order
GAP = 4  # pixels between and around the panels
TITLE_HEIGHT = 14  # pixels above the panels for their titles
FIXED_IMAGES = 8  # training images that main_pretrain.py --vis_freq reconstructs


def denorm_patches(model: nn.Module, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Predicted patches (N, L, P) in image space: undo the per-patch target normalisation of norm_pix_loss."""
    if not model.norm_pix_loss:
        return pred
    target = model.patchify(imgs)  # (N, L, P)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def mask_noise(model: nn.Module, imgs: torch.Tensor, seed: int, mask_ratio: float) -> torch.Tensor:
    """The noise the model masks by: MAE (N, L), a row per image, of the model's ``mask_type`` (``util/masking.py``);
    MixMIM (1, Lo), uniform, one mask for the batch.

    Drawn on the CPU from a generator seeded with ``seed``: for random masks, the numbers ``torch.manual_seed(seed)``
    then the model's own draw give on the CPU (the notebook's), without touching torch's global RNG."""
    generator = torch.Generator().manual_seed(seed)
    if family_of_module(model) == "mixmim":
        cells = model.patchify(imgs).shape[1]  # output-grid cells
        return torch.rand(1, cells, generator=generator).to(imgs.device)
    grid = tuple(model.patch_embed.grid_size)  # (H / p, W / p)
    mask_type = getattr(model, "mask_type", "random")
    return masking.mask_noise(mask_type, imgs.shape[0], grid, mask_ratio, imgs.device, generator)


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: torch.Tensor, mask_ratio: float, seed: int) -> dict[str, torch.Tensor]:
    """Run a pretraining model (in eval mode, then back in its mode) on normalised images (N, C, H, W); returns
    normalised (N, C, H, W) images.

    Keys: ``original``, ``masked`` (MAE: masked patches zeroed; MixMIM: the mixed input), ``reconstruction``,
    ``pasted`` (the visible patches of the original, the reconstruction elsewhere) and ``mask`` (N, 1, H, W),
    1 where the image was hidden from the encoder. The masks, of the model's ``mask_type``, come from ``seed``
    (``mask_noise``; MixMIM's mask-ratio jitter from Python ``random`` seeded with it, its state given back after).
    """
    mixmim = family_of_module(model) == "mixmim"
    if mixmim and imgs.shape[0] < 2:
        raise ValueError("MixMIM mixes each image with another of the batch: give at least 2 images")
    noise = mask_noise(model, imgs, seed, mask_ratio)
    was_training, py_state = model.training, random.getstate()
    model.eval()
    try:
        random.seed(seed)
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # MAE (N, L, P), (N, L); MixMIM below
    finally:
        model.train(was_training)
        random.setstate(py_state)
    if mixmim:  # pred: (2N, Lo, P), mask: (1, Lo, 1)
        pred = model.unmix(pred, mask)  # (N, Lo, P)
        mask = mask.expand(imgs.shape[0], -1, -1)  # (N, Lo, 1)
    else:
        mask = mask.unsqueeze(-1)  # (N, L, 1)
    pred = denorm_patches(model, imgs, pred)
    recon = model.unpatchify(pred)  # (N, C, H, W)
    mask = model.unpatchify(mask.expand(-1, -1, pred.shape[-1] // imgs.shape[1]))  # (N, 1, H, W), 1 is hidden
    partner = imgs.flip(0) if mixmim else torch.zeros_like(imgs)  # what the encoder saw at hidden positions
    return {
        "original": imgs,
        "masked": imgs * (1 - mask) + partner * mask,
        "reconstruction": recon,
        "pasted": imgs * (1 - mask) + recon * mask,
        "mask": mask,
    }


def to_pil(img: torch.Tensor, scale: int = 1, stats: tuple | None = None) -> Image.Image:
    """A normalised (C, H, W) image -> an RGB PIL image, upscaled ``scale`` times (nearest neighbour). ``stats``:
    the (mean, std) it was normalised with (default ImageNet's); other channel counts than 3 show channel 0 in grey."""
    img = img.detach().float().cpu()
    if stats is None:
        pixels = denormalize(img)
    else:
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in stats)
        pixels = (img * std + mean).clamp(0, 1)
    if pixels.shape[0] != 3:
        pixels = pixels[:1].expand(3, -1, -1)  # (3, H, W) grey
    rgb = (pixels * 255).round().to(torch.uint8)  # (3, H, W)
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy(), mode="RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale != 1 else pil


def panel_size(height: int, width: int, scale: int = 1, columns: int = 4) -> tuple[int, int]:
    """(width, height) of the picture ``make_panel`` draws for images of ``height`` x ``width``."""
    return columns * width * scale + (columns + 1) * GAP, TITLE_HEIGHT + height * scale + 2 * GAP


def make_panel(
    images: list[torch.Tensor], titles: tuple[str, ...], scale: int = 1, stats: tuple | None = None
) -> Image.Image:
    """Normalised (C, H, W) images side by side on white, each under its title (``stats``: as ``to_pil``)."""
    tiles = [to_pil(img, scale, stats) for img in images]
    w, h = tiles[0].size
    canvas = Image.new("RGB", panel_size(h, w, 1, len(tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        x = GAP + i * (w + GAP)
        canvas.paste(tile, (x, TITLE_HEIGHT + GAP))
        text = title
        while draw.textlength(text, font=font) > w and len(text) > 1:  # shorten titles wider than small tiles
            text = text[:-1]
        draw.text((x, 1), text, fill="black", font=font)
    return canvas


def default_scale(side: int) -> int:
    """Upscale small images so that each panel is at least ~128 pixels wide."""
    return max(1, 128 // side)


def reconstruction_panels(
    model: nn.Module,
    imgs: torch.Tensor,
    mask_ratio: float,
    seed: int,
    scale: int | None = None,
    stats: tuple | None = None,
) -> list[Image.Image]:
    """One ``make_panel`` picture per image of ``imgs`` (N, C, H, W), normalised with ``stats`` ((mean, std);
    default ImageNet's) and on the model's device; ``scale`` defaults to ``default_scale`` of the width."""
    out = reconstruct(model, imgs, mask_ratio, seed)
    titles = MIXMIM_TITLES if family_of_module(model) == "mixmim" else TITLES
    scale = scale or default_scale(imgs.shape[-1])
    return [make_panel([out[k][i] for k in PANELS], titles, scale, stats) for i in range(imgs.shape[0])]


def stack(panels: list[Image.Image]) -> Image.Image:
    """Pictures of one size, one under the other."""
    grid = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, (0, i * panels[0].height))
    return grid


def fixed_images(
    dataset,
    count: int,
    mean: Sequence[float],
    std: Sequence[float],
    transform=None,
    pairs: bool = False,
) -> torch.Tensor:
    """The first ``count`` readable images of ``dataset`` (fewer if it has fewer; an even number with ``pairs``, as
    MixMIM mixes pairs), as (K, C, H, W) float normalised with ``mean`` / ``std`` (uint8 items as in training).

    With ``transform`` (the evaluation transform: no random crop), the files of a ``util.datasets.CheckedImages``
    (its ``samples``, the first ``4 * count``) are read anew, with PIL or ``load_tensor`` whatever the dataset's own
    loader (``--decode_on_device`` reads bytes). Without, the dataset's own items, drawn with the global RNGs seeded
    and given back: a random augmentation gives the same images every run, and the run's draws are left alone.
    """
    if transform is not None:
        paths = [path for path, _ in dataset.samples[: 4 * count]]
        dataset = ImageFiles(dataset.root, paths, transform, dataset.in_chans)
    images = []
    with seeded_rng(0):
        for i in range(len(dataset)):
            if len(images) == count:
                break
            image = dataset[i][0]
            if not isinstance(image, BadImage):  # unreadable files: training skips or stops on them, not here
                images.append(image)
    if pairs:
        images = images[: len(images) - len(images) % 2]
    if not images:
        raise UsageError(f"--vis_freq: no readable {'pair of images' if pairs else 'image'} among the first "
                         f"{len(dataset)} training images")  # fmt: skip
    return normalize_on_device(torch.stack(images), mean, std)  # (K, C, H, W)


class ReconstructionLog:
    """``main_pretrain.py --vis_freq``: after an epoch, the reconstructions of fixed images with fixed masks, as
    one picture (``stack`` of the panels) in TensorBoard (``reconstructions``, step = epoch) and in
    ``output_dir/reconstructions/epoch_{epoch}.png``. Call on the main process only: nothing is communicated."""

    TAG = "reconstructions"

    def __init__(
        self, images: torch.Tensor, mask_ratio: float, seed: int, stats: tuple | None, output_dir: str | Path | None
    ):
        self.images, self.mask_ratio, self.seed, self.stats = images, mask_ratio, seed, stats
        self.folder = Path(output_dir) / "reconstructions" if output_dir else None

    def __call__(self, model: nn.Module, epoch: int, log_writer: "SummaryWriter | None" = None) -> Image.Image:
        """Draw the picture for ``model`` (DDP or compiled too: the module inside runs, eagerly) after ``epoch``;
        returns it."""
        model = unwrap(model)
        images = self.images.to(next(model.parameters()).device)
        grid = stack(reconstruction_panels(model, images, self.mask_ratio, self.seed, stats=self.stats))
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            grid.save(self.folder / f"epoch_{epoch}.png")
        if log_writer is not None:
            log_writer.add_image(self.TAG, np.asarray(grid), epoch, dataformats="HWC")
        logger.info("reconstructions of %d images after epoch %d%s", len(images), epoch,
                    f" in {self.folder / f'epoch_{epoch}.png'}" if self.folder else "")  # fmt: skip
        return grid
