"""Specimen photos -> RGB -> the paper's eval or train transform (a [0, 1] tensor, no mean/std).

Usage:
    image = load_image("photo.jpg")                       # any mode -> RGB PIL image
    pixels = image_transform(224, 256, train=False)(image) # FloatTensor [3, 224, 224]
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

ImageInput = str | os.PathLike | bytes | Image.Image


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


def load_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """Open a path, bytes or PIL image fully and return it as RGB.

    Raises `ValueError` naming the file for a missing, unreadable or truncated image.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    label = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<image bytes>")
    source: Any = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    try:
        with Image.open(source) as opened:
            opened.load()  # decode now: a truncated file fails here, not later inside a worker
            return to_rgb(opened)
    except FileNotFoundError as error:
        raise ValueError(f"{label}: image file not found") from error
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
