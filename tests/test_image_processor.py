"""ImageProcessor's resize: how a picture of another size becomes the model's S x S input.

Training never resizes (ShapesWorld draws at the model's size); the chat does, for any other
picture. The filter is the one measured closest to a native drawing (image_processor.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minillava.data.image_processor import ImageProcessor
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
