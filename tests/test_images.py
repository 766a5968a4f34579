import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clibd.processing import image_transform, load_image, to_rgb


def test_eval_transform_on_real_photo(data_dir):
    path = data_dir / "bioscan_imgfilter_images" / "images" / "AACTA1595-20.jpg"
    pixels = image_transform(224, 256)(load_image(path))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0  # no mean/std normalisation
    # Independent computation: [0,1] tensor, bilinear antialiased resize of the short side, centre crop.
    raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    h, w = raw.shape[1:]
    size = (256, round(w * 256 / h)) if h <= w else (round(h * 256 / w), 256)
    resized = F.interpolate(raw[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
    expected = resized[:, top : top + 224, left : left + 224]
    assert torch.allclose(pixels, expected, atol=1e-4)


def test_train_transform_is_random_and_sized(data_dir):
    image = load_image(data_dir / "bioscan_imgfilter_images" / "images" / "AACTA1595-20.jpg")
    transform = image_transform(224, 256, train=True)
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 224, 224)
    assert not torch.equal(a, b)


def test_mode_conversions():
    grey = Image.new("L", (8, 8), 100)
    assert to_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited onto white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I")
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))
    assert to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    palette = Image.new("P", (8, 8), 3)
    assert to_rgb(palette).mode == "RGB"


def test_sixteen_bit_png_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_truncated_and_missing_files_named(tmp_path, data_dir):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a photo")
    with pytest.raises(ValueError, match="notes.jpg: unreadable"):
        load_image(not_image)
    real = (data_dir / "bioscan_imgfilter_images" / "images" / "AACTA1595-20.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(ValueError, match="cut.jpg: unreadable or truncated"):
        load_image(cut)
    with pytest.raises(ValueError, match="nowhere.jpg: image file not found"):
        load_image(tmp_path / "nowhere.jpg")


def test_bytes_input():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (40, 30)
    with pytest.raises(ValueError, match="<image bytes>"):
        load_image(b"garbage")
