"""``main_pretrain.py --decode_on_device``: JPEG decoding and the pretraining crop on the device (nvJPEG on CUDA).

The CPU path decodes each image with PIL in a DataLoader worker, crops, resizes and flips it there. On a GPU machine
the workers can be the limit: decoding an ImageNet JPEG costs a few milliseconds of a core. Here the workers only
read the file's bytes and its header (size, mode) and draw the augmentation exactly as the CPU path does
(``RandomResizedCrop.get_params`` with scale (0.2, 1) and ratio (3/4, 4/3) (times W / H for H x W images), then the
flip's ``torch.rand(1) < 0.5``,
from the same RNG in the same order, so the same seed gives the same boxes and flips); the batch goes to the device
as encoded bytes, where ``torchvision.io.decode_jpeg`` decodes it in one call and each image is cropped, resized
(bicubic, antialiased: torchvision's counterpart of PIL's bicubic) and flipped, giving the uint8 (B, 3, H, W)
batch the CPU path gives, which the engine then normalises on the device as before.

Files that are not RGB or grey-scale JPEGs (PNG, CMYK JPEG, ...) are decoded by PIL in the worker and sent decoded.
A batch crosses from the worker as one flat tensor. On CUDA the decode waits for the step already queued (see
``EncodedBatch._decode``): this path syncs the host once per step, which the CPU path does not. A file whose header
reads but whose data does not decode stops the run with one line naming it (also with --skip_bad_images).

``torchvision.io`` is deprecated from torchvision 0.29 in favour of TorchCodec, which the GPU machines do not have
yet; its DeprecationWarning is silenced here, and the decode moves to TorchCodec once the pinned stack has it.
"""

import io
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from util.crop import crop_ratio
from util.errors import BadImageError

JPEG_MAGIC = b"\xff\xd8"


def decode_jpeg(*args, **kwargs):
    """torchvision's ``decode_jpeg`` without its per-call DeprecationWarning (see the module's docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return _decode_jpeg(*args, **kwargs)


class EncodedImage:
    """A file's bytes (uint8, 1-D) when the device can decode them, else the decoded RGB image (uint8 (3, h, w)),
    with its image size and, once ``DeviceCrop`` has drawn them, the crop box (top, left, height, width) and flip."""

    def __init__(self, data: torch.Tensor, size: tuple[int, int], path: str):
        self.data, self.size, self.path = data, size, path  # size: (height, width)
        self.box: tuple[int, int, int, int] | None = None
        self.flip = False
        self.out_size: tuple[int, int] | None = None  # (H, W) after the crop's resize

    @property
    def encoded(self) -> bool:
        return self.data.ndim == 1


def read_encoded(path: str) -> EncodedImage:
    """The DataLoader's ``loader`` for ``--decode_on_device``: the bytes of an RGB / grey JPEG (its header
    read by PIL, not its data), else the image decoded to RGB by PIL. PIL's errors propagate (a bad file)."""
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:  # the header only, from the bytes already read
        width, height = img.size
        device_decodes = raw[:2] == JPEG_MAGIC and img.format == "JPEG" and img.mode in ("RGB", "L")
        if not device_decodes:
            decoded = TF.pil_to_tensor(img.convert("RGB"))  # (3, h, w) uint8
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if device_decodes else decoded
    return EncodedImage(data, (height, width), path)


class DeviceCrop:
    """The pretraining transform's random draws, on an ``EncodedImage``: ``RandomResizedCrop(input_size, scale,
    ratio)``'s box and ``RandomHorizontalFlip``'s coin, in the CPU transform's order (``pretrain_transform``)."""

    def __init__(self, input_size: int | Sequence[int], scale=(0.2, 1.0), ratio: tuple[float, float] | None = None):
        self.size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.scale, self.ratio = scale, ratio or crop_ratio(input_size)  # as pretrain_transform

    def __call__(self, image: EncodedImage) -> EncodedImage:
        h, w = image.size
        shape_only = torch.empty(1, 1, 1).expand(1, h, w)  # get_params reads the dimensions only
        image.box = transforms.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        image.flip = bool(torch.rand(1) < 0.5)
        image.out_size = self.size
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class _Item(NamedTuple):
    """One image of an ``EncodedBatch``: where its bytes (or decoded pixels) lie in the batch's flat tensor."""

    offset: int
    length: int
    shape: tuple[int, int, int] | None  # (3, h, w) when decoded in the worker, None when encoded
    box: tuple[int, int, int, int]
    flip: bool
    path: str


class EncodedBatch:
    """A collated batch of ``EncodedImage``s: one flat uint8 tensor (one shared-memory transfer, one pinned buffer,
    rather than one per image) and where each image lies in it. ``to(device)`` decodes, crops, resizes and flips on
    the device and returns the uint8 (B, 3, H, W) images, as ``samples.to(device)`` of the CPU path returns them."""

    def __init__(self, flat: torch.Tensor, items: list[_Item], size: tuple[int, int]):
        self.flat, self.items, self.size = flat, items, size

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":
        self.flat = self.flat.pin_memory()
        return self

    def _data(self, item: _Item) -> torch.Tensor:
        data = self.flat[item.offset : item.offset + item.length]
        return data if item.shape is None else data.view(item.shape)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        decoded = self._decode(device)
        out = torch.empty((len(self.items), 3, *self.size), dtype=torch.uint8, device=device)
        for k, (item, pixels) in enumerate(zip(self.items, decoded, strict=True)):
            top, left, height, width = item.box
            crop = TF.resized_crop(pixels, top, left, height, width, list(self.size), InterpolationMode.BICUBIC,
                                   antialias=True)  # fmt: skip
            out[k] = TF.hflip(crop) if item.flip else crop
        return out

    def _decode(self, device: torch.device) -> list[torch.Tensor]:
        """Every image as uint8 (3, h, w) on ``device``: the encoded ones in one ``decode_jpeg`` call (per image on
        the CPU if the batched call fails, to name the file)."""
        encoded = [k for k, item in enumerate(self.items) if item.shape is None]
        pixels: list[torch.Tensor | None] = [
            None if item.shape is None else self._data(item).to(device, non_blocking=True) for item in self.items
        ]
        if encoded:
            data = [self._data(self.items[k]) for k in encoded]  # views of the (pinned) CPU buffer, as decode wants
            try:
                if device.type == "cuda":
                    # nvJPEG's hardware engine writes its outputs without waiting for the work queued on the stream,
                    # into blocks the caching allocator may have just freed from it (pytorch/vision#9606,
                    # meta-pytorch/torchcodec#1634): let that work finish first. decode_jpeg syncs the host before
                    # it returns anyway, so this moves the wait earlier rather than adding one.
                    torch.cuda.current_stream(device).synchronize()
                    results = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                else:
                    results = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
            except RuntimeError:
                results = [self._decode_one(self._data(self.items[k]), self.items[k].path).to(device) for k in encoded]
            for k, result in zip(encoded, results, strict=True):
                pixels[k] = result
        return pixels

    @staticmethod
    def _decode_one(data: torch.Tensor, path: str) -> torch.Tensor:
        try:
            return decode_jpeg(data.cpu(), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            reason = re.sub(r"^.*\.cpp:\d+,\s*", "", (str(e).strip().splitlines() or [""])[0])  # not torchvision's
            raise BadImageError(f"cannot decode image {path} ({reason}); remove or replace the file") from e


def collate_encoded(images: list[EncodedImage]) -> EncodedBatch:
    """``EncodedImage``s of one batch (their crops drawn) -> an ``EncodedBatch`` of the crops' output size."""
    items, offset = [], 0
    for image in images:
        n = image.data.numel()
        items.append(_Item(offset, n, None if image.encoded else tuple(image.data.shape), image.box, image.flip,
                           image.path))  # fmt: skip
        offset += n
    flat = torch.cat([image.data.reshape(-1) for image in images])
    return EncodedBatch(flat, items, images[0].out_size)
