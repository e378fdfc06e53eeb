"""ImageProcessor's resize: how a picture of another size becomes the model's S x S input.

Training never resizes (ShapesWorld draws at the model's size); the chat does, for any other
picture. The filter is the one measured closest to a native drawing (image_processor.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minillava.data.image_processor import (
    MAX_IMAGE_SIDE,
    ImageProcessor,
    ImageReadError,
    read_image,
)
from minillava.data.shapes import ShapesWorld, WorldConfig

LANCZOS = Image.Resampling.LANCZOS


def scene(size: int) -> Image.Image:
    """A ShapesWorld test scene drawn at `size` px: sharp edges, where filters differ most."""
    return ShapesWorld("test", 1, WorldConfig(image_size=size))[0].image


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_a_larger_picture_is_shrunk_with_lanczos(mode):
    processor = ImageProcessor(image_size=48, mode=mode)
    assert processor.resample == LANCZOS
    image = scene(96)
    expected = processor.normalise(np.asarray(image.resize((48, 48), LANCZOS)))
    assert torch.equal(processor(image), expected)
    # The old default, bicubic, gives other pixels: this test tells the two apart.
    bicubic = processor.normalise(np.asarray(image.resize((48, 48), Image.Resampling.BICUBIC)))
    assert not torch.equal(processor(image), bicubic)


def test_shrinking_antialiases():
    # A one-pixel checkerboard halved: an antialiasing filter averages it to grey, where
    # NEAREST would keep one colour of every pair (all black or all white).
    board = (np.indices((96, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, axis=-1))
    pixels = ImageProcessor(image_size=48).square(image)
    assert np.abs(np.asarray(pixels, dtype=float) - 127.5).max() < 16


def test_a_picture_of_the_model_size_is_not_resampled():
    # What training feeds the model: ShapesWorld's own pixels, untouched by any filter.
    image = scene(48)
    processor = ImageProcessor(image_size=48)
    assert processor.square(image) is image
    assert torch.equal(processor(image), processor.normalise(np.asarray(image)))


def test_the_filter_can_still_be_chosen():
    image = scene(64)
    nearest = ImageProcessor(image_size=48, resample=Image.Resampling.NEAREST)
    expected = nearest.normalise(np.asarray(image.resize((48, 48), Image.Resampling.NEAREST)))
    assert torch.equal(nearest(image), expected)


# ----------------------------------------------------------------------------------------------
# read_image: every file that cannot be used is one ImageReadError naming it, and nothing large
# is decoded to find out.


def png_claiming(path, width: int, height: int, rows: int | None = None) -> None:
    """Write a 1-bit black PNG of width x height whose pixel data is all zeros, so it compresses
    about 1000:1 (10000 x 10000 is 12 KB): a decompression bomb. `rows` < height writes only
    that many rows of pixel data: a header that claims the size, for sizes PIL refuses on open.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = bytes(1 + (width + 7) // 8)  # a filter byte, then the row's bits
    compressor = zlib.compressobj(9)
    left = height if rows is None else rows
    data = []
    while left:
        n = min(left, 1000)
        data.append(compressor.compress(row * n))
        left -= n
    data.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(data))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def decoded(monkeypatch) -> list:
    """The sizes of the images PIL is asked to decode (it decodes none of them while this is
    in use): empty after a read proves the file was refused on its header alone."""
    from PIL import ImageFile

    sizes = []

    def load(self):
        sizes.append(self.size)
        raise RuntimeError("decoding is off in this test")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_a_decompression_bomb_is_refused_on_its_header(tmp_path, decoded, recwarn):
    # 100 megapixels in 12 KB: above PIL's warning limit (89 MP), below its error limit (179 MP),
    # so PIL alone would warn and then decode 100 MB.
    bomb = tmp_path / "bomb.png"
    png_claiming(bomb, 10_000, 10_000)
    assert bomb.stat().st_size < 20_000
    with pytest.raises(ImageReadError) as error:
        read_image(bomb)
    message = str(error.value)
    assert str(bomb) in message and "10000x10000" in message and "decompression bomb" in message
    assert f"{MAX_IMAGE_SIDE} px" in message
    assert decoded == []
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_an_image_over_pils_own_limit_gets_the_same_message(tmp_path):
    huge = tmp_path / "huge.png"
    png_claiming(huge, 30_000, 30_000, rows=1)  # PIL raises DecompressionBombError on open
    with pytest.raises(ImageReadError, match="huge.png is over .* pixels.*decompression bomb"):
        read_image(huge)


def test_a_long_thin_strip_is_refused_too(tmp_path, decoded):
    # Few pixels, but "pad" would paste it on a square canvas of its longest side.
    strip = tmp_path / "strip.png"
    png_claiming(strip, MAX_IMAGE_SIDE + 1, 1)
    with pytest.raises(ImageReadError, match=f"{MAX_IMAGE_SIDE + 1}x1 px"):
        read_image(strip)
    assert decoded == []


def test_an_image_at_the_limit_is_read(tmp_path):
    edge = tmp_path / "edge.png"
    png_claiming(edge, MAX_IMAGE_SIDE, 2)
    image, mode = read_image(edge)
    assert image.mode == "RGB" and image.size == (MAX_IMAGE_SIDE, 2) and mode == "1"


def test_every_unusable_file_is_one_error_naming_it(tmp_path):
    import io

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")  # noise: a PNG of ~12 KB to cut in half
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    cases = {
        "missing.png": "image file not found",
        "folder.png": "a folder, not an image file",
        "notes.png": "not a readable image file",
        "cut.png": "image is truncated or corrupt",
    }
    for name, why in cases.items():
        with pytest.raises(ImageReadError) as error:
            read_image(tmp_path / name)
        assert why in str(error.value) and str(tmp_path / name) in str(error.value)
        assert isinstance(error.value, ValueError)  # what callers that predate it catch


def test_a_mode_with_no_rgb_conversion_is_an_error_not_a_crash(tmp_path, monkeypatch):
    # No file format PIL writes holds such a mode; simulate one by making conversion fail.
    import minillava.data.image_processor as image_processor

    Image.new("L", (4, 4)).save(tmp_path / "odd.png")

    def no_conversion(image, background=(255, 255, 255)):
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr(image_processor, "to_rgb", no_conversion)
    with pytest.raises(ImageReadError, match=r"cannot convert L pixels to RGB: .*odd.png"):
        read_image(tmp_path / "odd.png")
