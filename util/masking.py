"""Mask sampling strategies of the MAE paper (Table 1f, Figure 6): random, block-wise and grid-wise.

Every strategy is expressed as *noise* for MAE's argsort masking (``random_masking``: per image, the ``K`` patches
with the smallest noise are kept, ``K = int(L * (1 - mask_ratio))``), so each image keeps exactly ``K`` patches and
the encoder's batching is the same for every strategy.

- ``random``: uniform noise, ``torch.rand(N, L)``, the official draw (same seed, same mask).
- ``grid``: keep the top-left patch of every 2x2 cell, the same fixed pattern for every image (Figure 6); the mask
  ratio is 0.75 by construction and the patch grid must have even sides. No random draws.
- ``block``: block-wise masking after BEiT (Bao et al., 2021, Algorithm 1), not identical to it (below): per
  image, draw rectangles until at least ``L - K`` patches are covered. Each has a size ``s`` uniform in
  [16, max(16, patches still to cover)] and an aspect ratio ``r`` log-uniform in [0.3, 1/0.3]; its sides are
  ``ceil(sqrt(s * r))`` x ``ceil(sqrt(s / r))`` patches (rows x columns; so at least ``s`` patches), clipped to the
  grid, at a uniform position. The last rectangle may overshoot the target: its newly covered patches are then the
  ones handed back (kept) at random, so all earlier rectangles stay whole. Drawn on the CPU, the batch's images in
  step (a round of array operations per rectangle), then moved. BEiT instead rounds the sides, retries a rectangle
  that leaves the grid or would cover too many patches, and so may stop short of the ratio; here every image keeps
  exactly ``K`` patches, which batching needs.

Random draws use torch's RNG only: the global one, or ``generator`` (reproducible pictures without touching the
global streams). Shapes: N images, (H, W) the patch grid, L = H * W patches.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

MASK_TYPES = ("random", "block", "grid")
GRID_MASK_RATIO = 0.75  # grid keeps one patch of every 2x2
MIN_BLOCK_PATCHES = 16  # BEiT's smallest block
BLOCK_ASPECT = (0.3, 1 / 0.3)  # BEiT's aspect ratio range (rows / columns)


class Rectangle(NamedTuple):
    """A block of ``block`` masking: its place on the patch grid and the size and aspect ratio it was drawn with."""

    top: int
    left: int
    height: int
    width: int
    size: float
    aspect: float


def check_mask_type(mask_type: str, mask_ratio: float, grid_hw: tuple[int, int]) -> None:
    """A ValueError unless ``mask_type`` can mask a (H, W) patch grid at ``mask_ratio``."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
    if mask_type == "grid":
        if mask_ratio != GRID_MASK_RATIO:
            raise ValueError(f"grid masking keeps one patch of every 2x2: it needs mask_ratio 0.75, got {mask_ratio}")
        if grid_hw[0] % 2 or grid_hw[1] % 2:
            raise ValueError(f"grid masking needs a patch grid with even sides, got {grid_hw[0]}x{grid_hw[1]}")


def grid_mask(grid_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool, True where masked: all but the top-left patch of every 2x2 cell."""
    H, W = grid_hw
    rows = torch.arange(H).view(H, 1)
    cols = torch.arange(W).view(1, W)
    return (rows % 2 != 0) | (cols % 2 != 0)


class BlockDraws(NamedTuple):
    """The rectangles of ``N`` images' block masks, drawn round by round (one rectangle per image and round): per
    round and image (R, N arrays) the rectangle's ``top``, ``left``, ``height``, ``width`` and the ``size`` and
    ``aspect`` it was drawn with, ``drawn`` whether the image still needed it; per image (N, H, W) the patches
    ``earlier`` rectangles cover and those of its ``last`` one."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    size: np.ndarray
    aspect: np.ndarray
    drawn: np.ndarray
    earlier: np.ndarray
    last: np.ndarray

    def rectangles(self, i: int) -> list[Rectangle]:
        """Image ``i``'s rectangles, in drawing order."""
        return [
            Rectangle(
                int(self.top[r, i]),
                int(self.left[r, i]),
                int(self.height[r, i]),
                int(self.width[r, i]),
                float(self.size[r, i]),
                float(self.aspect[r, i]),
            )  # fmt: skip
            for r in range(len(self.drawn))
            if self.drawn[r, i]
        ]


def draw_blocks(
    grid_hw: tuple[int, int], num_masked: int, batch: int = 1, generator: torch.Generator | None = None
) -> BlockDraws:
    """The rectangles of ``batch`` images' block masks: each image's until they cover at least ``num_masked``
    patches. All images draw in step, a round at a time (``torch.rand(batch, 4)``: size, aspect ratio, top, left
    per image; an image already covered discards its draws), so a batch costs a few array operations per round
    instead of a Python loop per rectangle."""
    H, W = grid_hw
    log_lo, log_hi = math.log(BLOCK_ASPECT[0]), math.log(BLOCK_ASPECT[1])
    rows, cols = np.arange(H).reshape(1, H, 1), np.arange(W).reshape(1, 1, W)
    covered = np.zeros((batch, H, W), dtype=bool)
    earlier, last = np.zeros_like(covered), np.zeros_like(covered)
    count = np.zeros(batch, dtype=np.int64)
    rounds = []
    active = count < num_masked
    while active.any():
        u_size, u_aspect, u_top, u_left = torch.rand(batch, 4, generator=generator, dtype=torch.float64).numpy().T
        size = MIN_BLOCK_PATCHES + u_size * np.maximum(0, num_masked - count - MIN_BLOCK_PATCHES)
        aspect = np.exp(log_lo + u_aspect * (log_hi - log_lo))
        height = np.minimum(H, np.ceil(np.sqrt(size * aspect))).astype(np.int64)
        width = np.minimum(W, np.ceil(np.sqrt(size / aspect))).astype(np.int64)
        top, left = (u_top * (H - height + 1)).astype(np.int64), (u_left * (W - width + 1)).astype(np.int64)
        rect = (rows >= top[:, None, None]) & (rows < (top + height)[:, None, None])  # (N, H, 1)
        rect = rect & (cols >= left[:, None, None]) & (cols < (left + width)[:, None, None])  # (N, H, W)
        rect &= active[:, None, None]
        earlier[active], last[active] = covered[active], rect[active]  # so far: this is each one's last
        covered |= rect
        rounds.append((top, left, height, width, size, aspect, active))
        count = covered.sum(axis=(1, 2))
        active = count < num_masked
    if not rounds:  # nothing to mask
        return BlockDraws(*(np.zeros((0, batch), dtype=t) for t in [np.int64] * 4 + [np.float64] * 2 + [bool]),
                          earlier, last)  # fmt: skip
    return BlockDraws(*(np.stack(column) for column in zip(*rounds, strict=True)), earlier, last)


def block_noise(
    batch: int, grid_hw: tuple[int, int], mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, L) noise for block masking, on the CPU: the images' blocks are drawn first (``draw_blocks``), then one
    ``torch.rand(N, L)`` orders the patches within three groups, kept first: uncovered (noise in [0, 0.5)), covered
    first by the last rectangle ([1, 1.5)), covered by an earlier one ([2, 2.5)). The 0.5 keeps float32 rounding
    from merging the groups."""
    H, W = grid_hw
    L = H * W
    num_masked = L - int(L * (1 - mask_ratio))
    draws = draw_blocks(grid_hw, num_masked, batch, generator)
    group = np.where(draws.earlier, 2.0, np.where(draws.last, 1.0, 0.0)).astype(np.float32)  # (N, H, W)
    return torch.from_numpy(group).view(batch, L) + 0.5 * torch.rand(batch, L, generator=generator)  # (N, L)


def mask_noise(
    mask_type: str,
    batch: int,
    grid_hw: tuple[int, int],
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, L) noise on ``device`` whose argsort masks the (H, W) patch grid of each image the ``mask_type`` way.

    ``random`` without ``generator`` is exactly ``torch.rand(N, L, device=device)``, the official draw; with one, it
    is drawn on the generator's device and moved. ``block`` draws on the CPU (``generator`` must be a CPU one)."""
    check_mask_type(mask_type, mask_ratio, grid_hw)
    H, W = grid_hw
    if mask_type == "random":
        if generator is None:
            return torch.rand(batch, H * W, device=device)  # noise in [0, 1)
        return torch.rand(batch, H * W, generator=generator, device=generator.device).to(device)
    if mask_type == "grid":
        return grid_mask(grid_hw).float().view(1, H * W).expand(batch, -1).to(device)  # 0 keep, 1 remove
    return block_noise(batch, grid_hw, mask_ratio, generator).to(device)
