"""ShapesWorld: a tiny procedural world of coloured shapes, with the words to describe it.

No data set can be downloaded here, so the course draws its own. A scene is 1-4 shapes on a 3x3
grid (one per cell, so they never overlap), each with a shape, a colour and a size, and sometimes
a letter or digit written in a free cell. From the scene we render an RGB image and write
captions and a detailed description: the image-text pairs that LLaVA's stage 1 learns from.
`instruct.py` then turns the same annotation into question-answer conversations.

Three rules make it a good teaching world:

1. Learnable by a tiny model. Colours are saturated and far apart, shapes fill most of their cell,
   the two sizes are clearly different, the background noise is light. A model must still look at
   many pixels, though: the noise means no single pixel value gives a colour away.
2. Deterministic. Sample i of a split depends only on (seed, split, i): a `random.Random` is
   seeded from that triple for every sample, so worker count and access order change nothing.
3. Honest splits. A scene's *content* (objects and cells, text and its cell) decides which of
   train / val / test it may belong to, by hashing it into a bucket: a test scene is never a
   train scene with other noise. The `heldout` split holds (shape, colour) pairs that never
   appear anywhere else, to test compositional generalisation: has the model learnt "purple"
   and "triangle", or only the pairs it saw?
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFont

from minillava.data.image_processor import ImageProcessor

# ----------------------------------------------------------------------------------------------
# The world's vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 90, 245),
    "yellow": (245, 225, 30),
    "purple": (165, 50, 225),
    "orange": (255, 140, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.6, "large": 0.92}  # side as a fraction of a grid cell
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "middle", "right")
# Letters and digits that stay distinct when drawn ~20 pixels tall (no O/0, I/1, 6/9, ...).
CHARACTERS: str = "ABCDEFGHKLMNPRSTXYZ2345789"
BACKGROUND: tuple[int, int, int] = (32, 32, 36)  # dark, so every colour and white text pop
TEXT_COLOUR: tuple[int, int, int] = (250, 250, 250)
# Never drawn in train / val / test; every heldout scene has at least one of them.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("triangle", "purple"),
    ("circle", "orange"),
    ("square", "green"),
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
# Fractions of scene-content buckets given to each ordinary split.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")


def cell_name(row: int, col: int) -> str:
    """Grid cell -> its canonical name: "top left", "middle right", "center", ..."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


CELL_NAMES: tuple[str, ...] = tuple(cell_name(r, c) for r in range(3) for c in range(3))


@dataclass
class WorldConfig:
    """Everything that shapes the world. The defaults are what the course trains on."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    text_prob: float = 0.25  # chance that a scene also shows a letter or digit
    noise: float = 0.04  # std of the background noise, as a fraction of 255
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    characters: str = CHARACTERS
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 9 (one object per grid cell), got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name, chosen, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES),
        ):
            unknown = [x for x in chosen if x not in known]
            if unknown or not chosen:
                raise ValueError(f"WorldConfig.{name}: unknown {unknown}, choose from {known}")
        self.shapes, self.colours, self.sizes = (
            tuple(self.shapes),
            tuple(self.colours),
            tuple(self.sizes),
        )
        if not 0.0 <= self.text_prob <= 1.0:
            raise ValueError(f"text_prob must be in [0, 1], got {self.text_prob}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        self.heldout_combos = tuple(tuple(c) for c in self.heldout_combos)
        for shape, colour in self.heldout_combos:
            if shape not in self.shapes or colour not in self.colours:
                raise ValueError(f"heldout combo ({shape}, {colour}) is not in this world")


# ----------------------------------------------------------------------------------------------
# Scenes: what is in the picture


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    row: int  # 0 = top
    col: int  # 0 = left
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), normalised to [0, 1]

    @property
    def name(self) -> str:
        """ "red circle": the colour-shape phrase used in captions and answers."""
        return f"{self.colour} {self.shape}"

    @property
    def cell(self) -> str:
        return cell_name(self.row, self.col)


@dataclass
class Scene:
    objects: list[SceneObject]
    text: str | None = None  # the letter or digit written in the image, if any
    text_row: int | None = None
    text_col: int | None = None
    text_box: tuple[float, float, float, float] | None = None

    @property
    def text_kind(self) -> str | None:
        """ "letter" or "digit" (None without text)."""
        if self.text is None:
            return None
        return "digit" if self.text.isdigit() else "letter"

    @property
    def text_cell(self) -> str | None:
        return None if self.text is None else cell_name(self.text_row, self.text_col)

    def signature(self) -> str:
        """The content of the scene, ignoring noise and jitter: what decides its split."""
        content = [(o.row, o.col, o.size, o.colour, o.shape) for o in self.objects]
        return content_signature(content, self.text, self.text_row, self.text_col)


def content_signature(content: list[tuple], text: str | None, text_row, text_col) -> str:
    """Canonical string of (row, col, size, colour, shape) tuples plus the text and its cell."""
    parts = sorted(
        f"{row}{col}:{size}:{colour}:{shape}" for row, col, size, colour, shape in content
    )
    if text is not None:
        parts.append(f"text:{text_row}{text_col}:{text}")
    return "|".join(parts)


def split_of_signature(signature: str) -> str:
    """Hash a scene's content into train / val / test buckets (80 / 10 / 10 by default)."""
    digest = hashlib.blake2b(signature.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for split, fraction in SPLIT_FRACTIONS.items():
        edge += fraction
        if u < edge:
            return split
    return "test"


def sample_rng(seed: int, split: str, index: int, stream: str = "scene") -> random.Random:
    """The one source of randomness of sample `index`: a function of its identity only.

    Seeding with a string hashes it with SHA-512, the same in every process and Python run.
    `stream` gives independent generators for the same sample (e.g. its questions).
    """
    return random.Random(f"shapesworld:{seed}:{split}:{index}:{stream}")


def _draw_object(rng: random.Random, config: WorldConfig, forbidden: set) -> tuple[str, str]:
    while True:
        shape, colour = rng.choice(config.shapes), rng.choice(config.colours)
        if (shape, colour) not in forbidden:
            return shape, colour


def _place(rng: random.Random, row: int, col: int, fraction: float, image_size: int):
    """Pixel box of side `fraction` of a cell, jittered near the cell's centre; and normalised.

    The jitter uses only half of the free space: a small object pushed into the corner of its
    cell would look as if it sat in the next cell, since no grid lines are drawn.
    """
    cell = image_size / 3
    side = max(3, round(fraction * cell))
    free = max(0.0, cell - side)
    x0 = int(col * cell + free / 2 + rng.uniform(-free / 4, free / 4))
    y0 = int(row * cell + free / 2 + rng.uniform(-free / 4, free / 4))
    # Clamp so that the box stays inside its cell even after rounding: no overlaps, ever.
    x0 = min(x0, int((col + 1) * cell) - side)
    y0 = min(y0, int((row + 1) * cell) - side)
    pixel_box = (x0, y0, x0 + side, y0 + side)
    return pixel_box, tuple(v / image_size for v in pixel_box)


def sample_scene(rng: random.Random, config: WorldConfig, split: str = "train") -> Scene:
    """Draw a scene for `split`, from `rng` alone (no pixels are drawn here)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout" and not config.heldout_combos:
        raise ValueError("the heldout split needs WorldConfig.heldout_combos (it is empty)")
    forbidden = set() if split == "heldout" else set(config.heldout_combos)
    # First the content (what and which cell), by rejection sampling until the content belongs
    # to this split; only then the exact boxes, which do not decide the split.
    while True:
        n = rng.randint(config.min_objects, config.max_objects)
        cells = rng.sample(range(9), n + 1)  # one spare cell for the text
        content = []  # (row, col, size, colour, shape)
        for k in range(n):
            if split == "heldout" and k == 0:  # at least one held-out pair; others may be too
                shape, colour = rng.choice(config.heldout_combos)
            else:
                shape, colour = _draw_object(rng, config, forbidden)
            content.append((*divmod(cells[k], 3), rng.choice(config.sizes), colour, shape))
        text = None
        if config.characters and rng.random() < config.text_prob:
            text = rng.choice(config.characters)
        text_row, text_col = divmod(cells[n], 3)
        if split == "heldout":
            break
        signature = content_signature(content, text, text_row, text_col)
        if split_of_signature(signature) == split:
            break
    objects = []
    for row, col, size, colour, shape in sorted(content):  # reading order, as captions list them
        _, box = _place(rng, row, col, SIZES[size], config.image_size)
        objects.append(SceneObject(shape, colour, size, row, col, box))
    scene = Scene(objects)
    if text is not None:
        scene.text, scene.text_row, scene.text_col = text, text_row, text_col
        _, scene.text_box = _place(rng, text_row, text_col, 0.8, config.image_size)
    return scene


def swap_one_shape(
    scene: Scene, rng: random.Random, config: WorldConfig, split: str = "train", tries: int = 8
) -> Scene | None:
    """A twin of `scene` that differs in the shape of one object only (None if none is found).

    The twin must belong to the same `split` as the scene (its content hashes there: no val or
    test scene leaks into training) and must avoid the held-out (shape, colour) pairs outside
    the heldout split. Used by the `clip` stage as a hard negative (stages.CaptionBatches).
    """
    forbidden = set() if split == "heldout" else set(config.heldout_combos)
    for _ in range(tries):
        k = rng.randrange(len(scene.objects))
        old = scene.objects[k]
        shape = rng.choice([x for x in config.shapes if x != old.shape])
        if (shape, old.colour) in forbidden:
            continue
        objects = list(scene.objects)
        objects[k] = SceneObject(shape, old.colour, old.size, old.row, old.col, old.box)
        twin = Scene(objects, scene.text, scene.text_row, scene.text_col, scene.text_box)
        if split == "heldout" or split_of_signature(twin.signature()) == split:
            return twin
    return None


# ----------------------------------------------------------------------------------------------
# Rendering: scene -> pixels


@lru_cache(maxsize=8)
def _noise_bank(image_size: int, noise: float) -> tuple[Image.Image, Image.Image]:
    """A (2S, 2S) field of Gaussian noise; each image takes a random S x S window of it.

    Drawing fresh noise per image would cost a NumPy generator per sample; a shifted window
    of a fixed field is just as unreadable pixel by pixel, and far cheaper. The field is kept
    as two images, its positive and its negative part, so that adding it is two saturating
    PIL operations (ImageChops.add / subtract clip at 255 and 0, as they should).
    """
    rng = np.random.default_rng(1234)
    field_ = rng.normal(0.0, noise * 255.0, size=(2 * image_size, 2 * image_size, 3)).round()
    positive = Image.fromarray(field_.clip(0, 255).astype(np.uint8), mode="RGB")
    negative = Image.fromarray((-field_).clip(0, 255).astype(np.uint8), mode="RGB")
    return positive, negative


@lru_cache(maxsize=256)
def _glyph(character: str, side: int) -> Image.Image:
    """Mask ("L") of one character filling a side x side square, in Pillow's built-in font."""
    # Draw big, cut the ink out, scale it to fill the square: every glyph then has the same
    # height whatever the font's metrics, and small images still get a legible character.
    big = 96
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    font = ImageFont.load_default(size=big)
    ImageDraw.Draw(canvas).text(
        (big, big),
        character,
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=big // 24,
        stroke_fill=255,
    )
    ink = canvas.crop(canvas.getbbox())
    height = side
    width = max(1, min(side, round(ink.width * height / ink.height)))
    mask = Image.new("L", (side, side), 0)
    mask.paste(ink.resize((width, height), Image.Resampling.LANCZOS), ((side - width) // 2, 0))
    return mask


def _shape_outline(shape: str, box: tuple[int, int, int, int]):
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1  # PIL boxes include their last pixel
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        t = (x1 - x0) / 6  # half the arm width: arms one third of the side
        return [
            (cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t),
            (cx + t, cy + t), (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t),
            (x0, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(
    scene: Scene, config: WorldConfig, rng: random.Random | None = None
) -> Image.Image:
    """Draw `scene` as an RGB image of config.image_size pixels (boxes from the annotation).

    `rng` picks the noise window; without it the noise is fixed by the scene's content.
    """
    size = config.image_size
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (round(v * size) for v in obj.box)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon(_shape_outline(obj.shape, (x0, y0, x1, y1)), fill=colour)
    if scene.text is not None:
        x0, y0, x1, _ = (round(v * size) for v in scene.text_box)
        image.paste(TEXT_COLOUR, (x0, y0), _glyph(scene.text, x1 - x0))
    if config.noise > 0:
        positive, negative = _noise_bank(size, config.noise)
        rng = rng or random.Random(scene.signature())
        dy, dx = rng.randrange(size), rng.randrange(size)
        window = (dx, dy, dx + size, dy + size)
        image = ImageChops.add(image, positive.crop(window))
        image = ImageChops.subtract(image, negative.crop(window))
    return image


# ----------------------------------------------------------------------------------------------
# Words: scene -> captions and a detailed description


def object_phrase(obj: SceneObject, with_size: bool = True) -> str:
    return f"a {obj.size} {obj.name}" if with_size else f"a {obj.name}"


def text_phrase(scene: Scene) -> str:
    """ "the letter A" / "the digit 7"."""
    return f"the {scene.text_kind} {scene.text}"


def cell_phrase(row: int, col: int) -> str:
    """ "in the top left", "in the center"."""
    return f"in the {cell_name(row, col)}"


def join_words(items: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def count_phrase(n: int, noun: str = "shape") -> str:
    """3 -> "three shapes", 1 -> "one shape"."""
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def list_phrase(objects: list[SceneObject]) -> str:
    """Objects as one phrase, twins grouped: "two small red circles and a large blue square"."""
    groups: dict[tuple[str, str, str], int] = {}
    for o in objects:
        key = (o.size, o.colour, o.shape)
        groups[key] = groups.get(key, 0) + 1
    phrases = []
    for (size, colour, shape), k in groups.items():
        if k == 1:
            phrases.append(f"a {size} {colour} {shape}")
        else:
            plural = shape + ("es" if shape.endswith("s") else "s")
            phrases.append(f"{NUMBER_WORDS[k]} {size} {colour} {plural}")
    return join_words(phrases)


def make_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Several short captions of the scene in varied wording, all true of it."""
    objs = scene.objects
    n = len(objs)
    shuffled = rng.sample(objs, n)
    plain = list_phrase(objs)
    placed = join_words([f"{object_phrase(o)} {cell_phrase(o.row, o.col)}" for o in shuffled])
    is_are = "is" if n == 1 else "are"
    captions = [
        f"{plain}.",
        f"{count_phrase(n)}: {plain}.",
        f"an image of {list_phrase(shuffled)}.",
        f"{placed}.",
        f"there {is_are} {count_phrase(n)} on a dark background: {plain}.",
    ]
    if scene.text is not None:
        where = cell_phrase(scene.text_row, scene.text_col)
        captions = [c[:-1] + f", and {text_phrase(scene)}." for c in captions]
        captions.append(f"{text_phrase(scene)} {where}, next to {plain}.")
    rng.shuffle(captions)
    return captions


def make_description(scene: Scene) -> str:
    """A detailed description: how many shapes, every object with its cell, the text, colours.

    Objects come in reading order (the scene keeps them so), one sentence each: a model that
    learns to write this walks the grid cell by cell. No relations between objects ("the red
    circle is left of the blue square"): the tiny model cannot work them out (chapter 10), and a
    description trained to contain them would make it state what it cannot see.
    """
    n = len(scene.objects)
    sentences = [f"The image shows {count_phrase(n)} on a dark background."]
    for obj in scene.objects:
        sentences.append(f"In the {obj.cell} there is {object_phrase(obj)}.")
    if scene.text is not None:
        sentences.append(
            f"The {scene.text_kind} {scene.text} is written in white in the {scene.text_cell}."
        )
    colours = sorted({o.colour for o in scene.objects})
    if n > 1:
        if len(colours) == 1:
            sentences.append(f"All the shapes are {colours[0]}.")
        else:
            sentences.append(f"There are {count_phrase(len(colours), 'colour')} in total.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------
# The dataset


@dataclass
class Sample:
    index: int
    image: Image.Image
    pixel_values: torch.Tensor  # (3, H, W), normalised by the ImageProcessor
    scene: Scene
    captions: list[str]
    description: str
    split: str = "train"


class ShapesWorld(torch.utils.data.Dataset):
    """`size` samples of one split, generated on the fly (or cached with cache=True).

    >>> world = ShapesWorld("train", size=100)
    >>> sample = world[0]
    >>> sample.pixel_values.shape, sample.captions[0]   # doctest: +SKIP
    (torch.Size([3, 64, 64]), 'a large red circle and a small blue square.')
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        config: WorldConfig | None = None,
        seed: int = 0,
        processor: ImageProcessor | None = None,
        cache: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split, self.size, self.seed = split, size, seed
        self.config = config or WorldConfig()
        self.processor = processor or ImageProcessor(image_size=self.config.image_size)
        self.cache: dict[int, Sample] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        """The annotation of sample `index` without drawing it (cheap: for text-only uses)."""
        return sample_scene(sample_rng(self.seed, self.split, index), self.config, self.split)

    def __getitem__(self, index: int) -> Sample:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesWorld of size {self.size}")
        index = index % self.size
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        rng = sample_rng(self.seed, self.split, index)
        sample = self.draw(index, sample_scene(rng, self.config, self.split), rng)
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def draw(self, index: int, scene: Scene, rng: random.Random) -> Sample:
        """Render `scene` and write its captions: the Sample that item `index` holds."""
        image = render_scene(scene, self.config, rng)
        return Sample(
            index=index,
            image=image,
            pixel_values=self.processor(image),
            scene=scene,
            captions=make_captions(scene, rng),
            description=make_description(scene),
            split=self.split,
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.size):
            yield self[i]
