"""What a data-loading worker does to one record: decode, crop or resize, flip, normalise.

Promises: each transform is a pure function of the record and, for training, of a NumPy
generator that :mod:`ddjax.data.streaming.order` seeds from (seed, epoch, position) -- never
from a worker or process -- so a batch is the same whatever the number of workers or processes.
Pixels go through PIL as torchvision's PIL path does (the ImageNet reference recipe):

* train: ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` with bilinear
  resampling, then ``RandomHorizontalFlip(0.5)``;
* eval: ``Resize(round(image_size * eval_resize))`` of the shorter side (bilinear), then
  ``CenterCrop(image_size)`` (ImageNet's 256 -> 224);

then uint8 -> float32 in [0, 1] -> ``(x - mean) / std``, exactly as
:func:`ddjax.data.load_dataset` scales and normalises (so a stream at the native size without
resize equals the in-memory dataset bit for bit). Images are decoded in full: PIL's JPEG
``draft`` mode (decoding at a reduced scale) would be faster but would change the pixels.

The crop box follows :func:`ddjax.sre2l.crops.rrc_boxes` (torchvision's ``get_params``), written
here for one image on the host: the ten tries are drawn one at a time, as torchvision does.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from ddjax.data.normalisation import to_unit_interval
from ddjax.data.sources.folder import COLOUR_MODES, GRAYSCALE_MODES
from ddjax.errors import DDJaxError, check

#: torchvision ``RandomResizedCrop`` defaults: area fraction and aspect ratio (w / h).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10


def decode(value: bytes | np.ndarray, channels: int, where: str) -> Image.Image:
    """A record's image as a PIL image of mode ``'RGB'`` (3 channels) or ``'L'`` (1).

    Args:
        value: an encoded image file, or a uint8 ``(H, W)``/``(H, W, C)`` array.
        channels: 3 or 1.
        where: names the record in error messages.
    """
    if isinstance(value, bytes):
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
        except OSError as error:
            raise DDJaxError(f"{where}: cannot decode the image: {error}") from error
        if image.mode not in GRAYSCALE_MODES + COLOUR_MODES:
            raise DDJaxError(
                f"{where} has PIL mode {image.mode!r}; use 8-bit grayscale or RGB images"
            )
    else:
        pixels = np.asarray(value)
        check(pixels.dtype == np.uint8, f"{where}: expected uint8 pixels, got {pixels.dtype}")
        image = Image.fromarray(
            pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
        )
    return image.convert("RGB" if channels == 3 else "L")


def crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of a random crop.

    Up to ten tries of an area ``H·W·U(scale)`` and an aspect ratio ``exp(U(log ratio))``,
    ``w = round(√(area·aspect))``, ``h = round(√(area/aspect))``; the first that fits gets a
    uniform integer offset. If none fits, the centre crop of the largest box whose aspect ratio
    lies in ``ratio``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class Transform:
    """The train or eval transform of a :class:`~ddjax.data.streaming.StreamingDataset`.

    Attributes:
        train: random crop and flip (``True``) or resize and centre crop (``False``).
        image_shape: ``(H, W, C)`` of the output.
        resize_to: eval only: the shorter side before the centre crop, or ``None``.
        mean: per-channel mean of images in [0, 1].
        std: per-channel standard deviation.
        native: the images keep their own size (``image_size=None``): train crops are resized
            back to it, and an image of another size is an error.
    """

    train: bool
    image_shape: tuple[int, int, int]
    resize_to: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native: bool

    def __call__(
        self, value: bytes | np.ndarray, rng: np.random.Generator | None, where: str
    ) -> np.ndarray:
        """One record's value -> normalised float32 ``image_shape`` pixels."""
        height, width, channels = self.image_shape
        image = decode(value, channels, where)
        if self.native and image.size != (width, height):
            raise DDJaxError(
                f"{where} is {image.width}x{image.height} pixels, the first train image is "
                f"{width}x{height}; streams with image_size=None need images of one size"
            )
        if self.train:
            top, left, h, w = crop_box(rng, image.height, image.width)
            image = image.crop((left, top, left + w, top + h))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            if self.resize_to is not None:
                image = _resize_shorter_side(image, self.resize_to)
            image = _centre_crop(image, height, width, where)
        pixels = np.asarray(image)
        pixels = to_unit_interval(pixels[..., None] if pixels.ndim == 2 else pixels, where)
        pixels -= np.asarray(self.mean, np.float32)
        pixels /= np.asarray(self.std, np.float32)
        return pixels


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)``: the shorter side to ``size``, the longer one truncated."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    return image.resize((new_width, new_height), Image.Resampling.BILINEAR)


def _centre_crop(image: Image.Image, height: int, width: int, where: str) -> Image.Image:
    """torchvision ``CenterCrop``: offsets ``round((H - h) / 2)``, ``round((W - w) / 2)``."""
    if image.size == (width, height):
        return image
    check(
        image.width >= width and image.height >= height,
        f"{where} is {image.width}x{image.height} pixels, smaller than the {width}x{height} "
        "centre crop; pass a smaller image_size or an eval_resize",
    )
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))
