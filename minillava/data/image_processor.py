"""Turn any picture into the tensor a vision transformer expects.

A ViT sees a fixed-size square grid of patches, so every image must become a (3, S, S) float
tensor, whatever its original size, aspect ratio or colour mode. Two ways to make it square:

- "crop" (CLIP's way): resize so the *shorter* side is S, then cut the centre square out.
  Nothing is distorted, but whatever lies near the long edges is lost.
- "pad" (LLaVA-1.5's way, `expand2square`): paste the image in the middle of a square canvas
  filled with the mean colour, then resize to S. Nothing is lost; the padding normalises to 0,
  so the model sees "no signal" there.

Then the pixel values are normalised per channel: x = (pixel / 255 - mean) / std. With the
default mean = std = 0.5 the values lie in [-1, 1]; a CLIP checkpoint would use its own
statistics (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD below).

Reading the file comes first (`read_image`), and a file is outside input: it may be missing,
truncated, not an image at all, or a "decompression bomb" (a PNG of some tens of KB that
decodes to 30000 x 30000 pixels: gigabytes). `read_image` turns each of these into one
`ImageReadError` that names the file and says why, before anything large is allocated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The longest side `read_image` decodes. The model reads 48-224 px, so a big picture buys
# nothing; what it costs is memory, and the cost is set by the longest side: "pad" pastes the
# image on a square canvas of that side before shrinking it, so a 1 x 100,000 px strip (a PNG
# of a few hundred bytes) would ask for a 30 GB canvas. 8192 px bounds both the decoded picture
# and the canvas to 8192^2 = 67 megapixels (200 MB as RGB), and still takes an 8K video frame
# (7680 x 4320) or a 50-megapixel phone photo (8160 x 6120). It sits below PIL's own guard
# (Image.MAX_IMAGE_PIXELS, 89 megapixels: a warning up to twice that, an error above), so every
# image PIL would warn about is refused here first, with the same message.
MAX_IMAGE_SIDE = 8192


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and says why."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image (grayscale "L", "RGBA", palette "P", "CMYK", 16-bit "I;16", ...) -> "RGB".

    Transparent pixels are laid over `background` rather than dropped to black, which is what a
    plain `convert("RGB")` would do to an RGBA logo.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency is only honoured through RGBA
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16/32-bit grayscale: scale to 8 bits first, convert() would clip instead.
        array = np.asarray(image, dtype=np.float64)
        top = max(float(array.max()), 1.0)
        image = Image.fromarray((array / top * 255.0).astype(np.uint8), mode="L")
    return image.convert("RGB")


def read_image(path: str | Path, max_side: int = MAX_IMAGE_SIDE) -> tuple[Image.Image, str]:
    """Open and fully decode an image file -> (RGB image, its original mode).

    Raises ImageReadError if the file is missing, unreadable, not an image, larger than
    `max_side` pixels on a side (checked on the header, before decoding), truncated or corrupt,
    or in a pixel mode that has no RGB conversion.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"a folder, not an image file: {path}")
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL warns about images over its own limit; every one of them is over ours too,
            # and is refused below with a message that says what to do.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                if max(width, height) > max_side:
                    raise ImageReadError(_too_large(path, f"{width}x{height} px", max_side))
                image.load()  # decode now: a truncated file fails here, not later in a batch
                mode = image.mode
                try:
                    return to_rgb(image), mode
                except (ValueError, OSError) as error:
                    raise ImageReadError(
                        f"cannot convert {mode} pixels to RGB: {path} ({error})"
                    ) from None
    except ImageReadError:
        raise
    except Image.DecompressionBombError:  # over twice PIL's limit: PIL refuses to open it
        pixels = f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise ImageReadError(_too_large(path, pixels, max_side)) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"not a readable image file: {path}") from None
    except PermissionError as error:
        raise ImageReadError(f"cannot read image file: {path} ({error.strerror})") from None
    except Exception as error:
        # A damaged file can make PIL's decoders raise almost anything (OSError for a truncated
        # file, but also SyntaxError, ValueError, EOFError, struct.error, ...): bytes from
        # outside, not a bug of ours. KeyboardInterrupt is not an Exception and still stops.
        detail = str(error) or type(error).__name__
        raise ImageReadError(f"image is truncated or corrupt: {path} ({detail})") from None


def _too_large(path: Path, size: str, max_side: int) -> str:
    return (
        f"image too large to decode safely: {path} is {size}, the limit is {max_side} px a side "
        "(a small file that decodes to gigabytes is a 'decompression bomb'); shrink it first"
    )


@dataclass
class ImageProcessor:
    """PIL image -> normalised tensor (3, S, S); `denormalise` goes back for plotting.

    >>> processor = ImageProcessor(image_size=64)
    >>> processor(Image.new("RGB", (100, 50))).shape
    torch.Size([3, 64, 64])
    """

    image_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mode: str = "pad"  # "pad" (LLaVA-1.5) or "crop" (CLIP)
    # The filter that shrinks a larger picture: Lanczos (PIL's resize widens every filter but
    # NEAREST to the shrink factor, so all the others antialias). Measured on the trained cpu
    # model, test scenes drawn at 64-200 px and shrunk to its 48 (docs/results.md, "Chatting
    # about images of other sizes"): Lanczos was the best filter at 64 px (85.2%, where bicubic
    # got 84.8%, box 84.2%, nearest 81.8%) and within noise of the best at 96-200 px;
    # reducing_gap gained nothing. No filter
    # comes close to the same scenes drawn at 48 px (90.3%): the model knows ShapesWorld's
    # shapes at the exact pixel sizes it draws them, so the chat should get 48 px drawings.
    resample: int = Image.Resampling.LANCZOS

    def __post_init__(self) -> None:
        if self.mode not in ("pad", "crop"):
            raise ValueError(f"ImageProcessor mode must be 'pad' or 'crop', got {self.mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {self.mean}, {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        # x_norm = (x / 255 - mean) / std  =  x * scale + shift, precomputed per channel.
        # (NumPy, not torch: for one small image torch's per-op overhead dominates.)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The mean colour in 0..255: padded pixels normalise to exactly zero."""
        return tuple(int(round(m * 255)) for m in self.mean)

    def square(self, image: Image.Image) -> Image.Image:
        """RGB image of any size -> RGB image of size (S, S), by padding or centre-cropping."""
        size = self.image_size
        width, height = image.size
        if (width, height) == (size, size):
            return image
        if self.mode == "pad":
            if width != height:
                side = max(width, height)
                canvas = Image.new("RGB", (side, side), self.pad_colour)
                canvas.paste(image, ((side - width) // 2, (side - height) // 2))
                image = canvas
            return image.resize((size, size), self.resample)
        # crop: the shorter side becomes S, then the centre S x S square is kept.
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), self.resample)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """One PIL image -> (3, S, S); a list of them -> (B, 3, S, S)."""
        if isinstance(image, (list, tuple)):
            return torch.stack([self(one) for one in image])
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor expects a PIL.Image, got {type(image).__name__}")
        return self.normalise(np.asarray(self.square(to_rgb(image))))

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 array (H, W, 3) -> float tensor (3, H, W), (x / 255 - mean) / std per channel."""
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected a (H, W, 3) array, got shape {pixels.shape}")
        # (H, W, 3) -> (3, H, W): a C-ordered copy, else every op after it is strided and slow
        x = pixels.transpose(2, 0, 1).astype(np.float32, order="C")
        x *= self._scale
        x += self._shift
        return torch.from_numpy(x)

    def denormalise(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) normalised -> same shape in [0, 1].

        For plotting: `plt.imshow(processor.denormalise(x).permute(1, 2, 0))`.
        """
        if pixel_values.ndim < 3 or pixel_values.shape[-3] != 3:
            raise ValueError(f"expected (..., 3, H, W), got shape {tuple(pixel_values.shape)}")
        std = torch.tensor(self.std, dtype=pixel_values.dtype, device=pixel_values.device)
        mean = torch.tensor(self.mean, dtype=pixel_values.dtype, device=pixel_values.device)
        x = pixel_values * std.view(3, 1, 1) + mean.view(3, 1, 1)
        return x.clamp(0.0, 1.0)

    def to_pil(self, pixel_values: torch.Tensor) -> Image.Image:
        """(3, H, W) normalised tensor -> PIL image (the inverse of __call__ up to rounding)."""
        x = self.denormalise(pixel_values.detach().cpu().float())
        array = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        return Image.fromarray(array, mode="RGB")
