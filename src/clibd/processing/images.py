"""Specimen photos -> RGB -> the paper's eval or train transform (a [0, 1] tensor, no mean/std).

Images larger than `max_image_pixels()` (width x height) are refused from their header, before
decoding: `$CLIBD_MAX_IMAGE_PIXELS`, else `MAX_IMAGE_PIXELS` (PIL's default). A higher limit works:
PIL's own decompression-bomb limit is switched off while a header is read and, when our limit is above
PIL's, while the image is decoded (under a lock; PIL keeps it in a module global).

Usage:
    image = load_image("photo.jpg")                       # any mode -> RGB PIL image
    pixels = image_transform(224, 256, train=False)(image) # FloatTensor [3, 224, 224]
    load_image("scan.tif", max_pixels=300_000_000)        # or: export CLIBD_MAX_IMAGE_PIXELS=300000000
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

ImageInput = str | os.PathLike | bytes | Image.Image

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default: ~0.25 GiB as 24-bit RGB; specimen photos are far smaller
MAX_PIXELS_ENV = "CLIBD_MAX_IMAGE_PIXELS"
_PIL_LIMIT_LOCK = threading.Lock()


def max_image_pixels() -> int:
    """The largest width x height `load_image` accepts: `$CLIBD_MAX_IMAGE_PIXELS`, else `MAX_IMAGE_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {value!r}")
    return limit


@contextlib.contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL's decompression-bomb check off (ours is done instead): it raises at twice its limit, which
    would block a user's higher limit, and warns above it. It is a module global, so other threads
    see it off while this is held: hold it only for a header read, or a decode our limit admitted."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], label: str, limit: int) -> None:
    width, height = size
    if width * height > limit:
        raise ValueError(
            f"{label}: image is {width} x {height} = {width * height:,} px, above the limit of {limit:,} px; "
            f"to accept it, set the environment variable {MAX_PIXELS_ENV} (or pass max_pixels=) to a higher count"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert greyscale, palette, RGBA (onto white), CMYK and 16/32-bit images to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL clips these to 255 on convert("RGB"); rescale the real range instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open a path, bytes or PIL image fully and return it as RGB.

    Raises `ValueError` naming the file for a missing, unreadable or truncated image, and for one
    larger than `max_pixels` (width x height; default `max_image_pixels()`), checked before decoding.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    label = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<image bytes>")
    limit = max_image_pixels() if max_pixels is None else max_pixels
    source: Any = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    try:
        with _pil_limit_off():
            opened = Image.open(source)  # the header only: the size is known, nothing decoded yet
        with opened:
            _check_pixels(opened.size, label, limit)
            pil_limit = Image.MAX_IMAGE_PIXELS
            # decode now: a truncated file fails here, not later inside a worker. Some formats check
            # PIL's limit again while decoding (GIF frames, TIFF tiles): lift it if ours is higher.
            with _pil_limit_off() if pil_limit is not None and limit > pil_limit else contextlib.nullcontext():
                opened.load()
            return to_rgb(opened)
    except FileNotFoundError as error:
        raise ValueError(f"{label}: image file not found") from error
    except Image.DecompressionBombError as error:  # a frame or tile larger than the header said
        raise ValueError(f"{label}: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{label}: unreadable or truncated image ({error})") from error


def image_transform(image_size: int = 224, resize_size: int = 256, train: bool = False) -> v2.Compose:
    """The paper's transform. Eval: resize short side, centre crop. Train: resize, random resized
    crop, horizontal and vertical flips, rotation of +-45 degrees. Resizing runs on the [0, 1]
    tensor (bilinear, antialiased), as the official code does."""
    steps: list[Any] = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize(resize_size, antialias=True),
    ]
    if train:
        steps += [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(45),
        ]
    else:
        steps.append(v2.CenterCrop(image_size))
    return v2.Compose(steps)
