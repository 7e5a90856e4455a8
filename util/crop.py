"""RandomResizedCrop as in the TF/TPU code (BYOL): one draw of area and aspect ratio, clipped to the image.

torchvision's version retries up to 10 times and falls back to a center crop; this one never loops, as the
official MAE linear probe.
"""

import math
from collections.abc import Sequence

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):
    @staticmethod
    def get_params(img, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
        _, height, width = F.get_dimensions(img)
        area = height * width

        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)

        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w


SQUARE_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect ratios (width / height)


def crop_ratio(input_size: int | Sequence[int]) -> tuple[float, float]:
    """RandomResizedCrop's range of crop aspect ratios (width / height) for ``input_size``: the official (3/4, 4/3)
    for a square; for H x W that range times W / H, so that the crop, resized to H x W, is not stretched."""
    if isinstance(input_size, int) or input_size[0] == input_size[1]:
        return SQUARE_CROP_RATIO
    h, w = input_size
    return SQUARE_CROP_RATIO[0] * w / h, SQUARE_CROP_RATIO[1] * w / h
