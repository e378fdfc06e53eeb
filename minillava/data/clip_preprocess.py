"""CLIP's image preprocessing, by hand: the pixels a pretrained CLIP (or LLaVA-1.5) expects.

A pretrained vision tower only works on inputs prepared exactly as in its training. For OpenAI's
CLIP, and so for LLaVA-1.5 (`llava-hf/...` checkpoints), that is transformers'
`CLIPImageProcessor`:

    any PIL image
      -> RGB (transparency laid over white)                              (H, W, 3) uint8
      -> resize so the *shortest* side is S (bicubic, PIL's), the long
         side scaled by the same factor and rounded *down*              (H', W', 3), min = S
      -> centre crop to the crop size (S x S for LLaVA-1.5: 336 x 336)   (S, S, 3)
      -> rescale to [0, 1] (x / 255) and normalise per channel with CLIP's
         mean and std: x = (x / 255 - mean) / std                        (3, S, S) float32

`CLIPPreprocess` does these steps with PIL and NumPy, and matches `CLIPImageProcessor` (its PIL
backend, the one the LLaVA-1.5 checkpoints were evaluated with) to 1e-5 on images of any size and
colour mode (tests/test_pretrained.py compares them). Two details decide that match:

- the long side is `int(S * long / short)`, truncated, not rounded: a 333 x 517 photo becomes
  336 x 521 (521.6 truncated), never 522;
- the resize is one plain `PIL.Image.resize(..., BICUBIC)` with no `reducing_gap`, which
  antialiases when shrinking (PIL widens the filter by the shrink factor).

minillava's own `ImageProcessor` (image_processor.py) is the one its tiny models are trained
with; this one is for weights someone else trained. One deliberate difference from
transformers: 16-bit grayscale images are scaled to 8 bits (`to_rgb`), where transformers clips
them, which turns most 16-bit photos white.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from minillava.data.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb

# The most pixels the resize may produce. A photo stays far below it (a 4000 x 3000 one becomes
# 448 x 336), but a thin strip does not: its short side is scaled up to S and its long side with
# it, so a 1 x 900 px strip becomes 336 x 302,400 (100 megapixels, 300 MB, seconds of work) and a
# 1 x 8192 one would need 8 GB, for a crop that keeps 336 x 336 of it. transformers would try;
# we refuse above this many pixels with a message that says what to do.
MAX_RESIZED_PIXELS = 128 * 2**20


@dataclass
class CLIPPreprocess:
    """PIL image -> (3, crop_height, crop_width) float32 tensor, as `CLIPImageProcessor`.

    >>> preprocess = CLIPPreprocess(shortest_edge=336, crop_size=(336, 336))
    >>> preprocess(Image.new("RGB", (333, 517))).shape
    torch.Size([3, 336, 336])
    """

    shortest_edge: int = 336  # S: the shorter side after resizing
    crop_size: tuple[int, int] = (336, 336)  # (height, width) cut from the centre
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC  # PIL's filter id; CLIP's configs say 3 = bicubic

    def __post_init__(self) -> None:
        self.crop_size = tuple(int(s) for s in self.crop_size)
        if self.shortest_edge < 1 or len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(
                f"CLIPPreprocess: shortest_edge={self.shortest_edge} and crop_size="
                f"{self.crop_size} must be positive (crop_size is (height, width))"
            )
        if max(self.crop_size) > self.shortest_edge:
            # The resized image is at least S on each side, so an S x S or smaller crop always
            # fits; a larger one would need padding, which no CLIP checkpoint uses.
            raise ValueError(
                f"CLIPPreprocess: crop_size={self.crop_size} is larger than shortest_edge="
                f"{self.shortest_edge}: the centre crop would not fit in the resized image"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")

    @classmethod
    def from_config(cls, config: dict, image_size: int | None = None) -> CLIPPreprocess:
        """From a checkpoint's preprocessor_config.json (as a dict); `image_size` (the vision
        tower's) fills in the sizes when the file gives none.

        Both layouts transformers has written are read: `"size": {"shortest_edge": 336}` and
        `"crop_size": {"height": 336, "width": 336}`, or the older plain ints `"size": 336`.
        """
        size = config.get("size", image_size if image_size is not None else 336)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
        crop = config.get("crop_size", size)
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not config.get(flag, True):
                raise ValueError(
                    f"preprocessor_config.json {flag}=false: CLIPPreprocess always does every "
                    "step (resize, centre crop, rescale, normalise), as LLaVA-1.5 does"
                )
        return cls(
            shortest_edge=int(size),
            crop_size=crop,
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: the shorter side S, the longer one scaled with it
        and truncated (transformers' `get_resize_output_image_size`, torchvision's rule)."""
        S = self.shortest_edge
        if width <= height:
            return S, int(S * height / width)
        return int(S * width / height), S

    def __call__(self, image: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """One PIL image -> (3, H, W); a list of them -> (B, 3, H, W)."""
        if isinstance(image, (list, tuple)):
            return torch.stack([self(one) for one in image])
        if not isinstance(image, Image.Image):
            raise TypeError(f"CLIPPreprocess expects a PIL.Image, got {type(image).__name__}")
        if "transparency" in image.info:
            # A transparent colour key (PNG "tRNS" on an L, RGB or P image) counts as alpha:
            # through RGBA it is laid over white, as transformers does.
            image = image.convert("RGBA")
        image = to_rgb(image)  # alpha composited over white, every mode -> "RGB"
        size = self.resized_size(*image.size)
        if size[0] * size[1] > MAX_RESIZED_PIXELS:
            raise ValueError(
                f"a {image.size[0]} x {image.size[1]} px image is too thin a strip for CLIP's "
                f"resize: its short side at {self.shortest_edge} px would make it {size[0]} x "
                f"{size[1]} px; crop it closer to square first"
            )
        image = image.resize(size, self.resample)
        width, height = image.size
        crop_h, crop_w = self.crop_size
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pixels = np.asarray(image)[top : top + crop_h, left : left + crop_w]  # (h, w, 3) uint8
        return self.normalise(pixels)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, H, W): (x * rescale_factor - mean) / std.

        The arithmetic follows transformers' step for step (rescale in float64, then float32 for
        the normalisation), so the two agree to float32 rounding, not just approximately.
        """
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std  # (H, W, 3), per channel
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)
