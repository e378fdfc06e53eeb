"""Real data through the same door: any LLaVA-format JSON file plus a folder of images.

LLaVA's training data (LLaVA-Instruct-150K, the 558K caption set, a COCO subset you bring
yourself) is one JSON list of records:

    [{"id": "000000215677",
      "image": "000000215677.jpg",                      # relative to the image folder
      "conversations": [{"from": "human", "value": "<image>\\nWhat is the man holding?"},
                        {"from": "gpt",   "value": "A red umbrella."}, ...]}, ...]

Real data is messy, so every record is checked when the file is loaded, and each problem is
reported with the file and the record it is in (never a bare traceback from deep inside PIL):

- the image is missing, unreadable or truncated;
- the turns are empty, or do not alternate human, gpt, human, gpt, ...;
- the first human turn has no `<image>` placeholder (or a text-only record has one);
- the text is not valid UTF-8.

Grayscale, RGBA and palette images are fine: they are converted to RGB (and counted).
With `skip_bad=True` bad records are skipped and counted instead of stopping the load
(`minillava data check JSON IMAGE_DIR --skip-bad` does the same from the command line).
ShapesWorld's own export (`minillava data export DIR`) loads back through this class.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from minillava.data.image_processor import ImageProcessor, to_rgb

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


class DataError(ValueError):
    """A problem in a data file, with the file and the record it was found in."""


@dataclass
class BadRecord:
    index: int  # position of the record in the JSON list
    id: str | None
    reason: str

    def describe(self, json_path: Path | str) -> str:
        name = f" (id {self.id!r})" if self.id is not None else ""
        return f"{json_path}: record {self.index}{name}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Reading the JSON


def read_json_records(json_path: str | Path) -> list:
    """The list of records in a .json (a list) or .jsonl (one record a line) file.

    Bytes that are not UTF-8 do not stop the load: they are kept as lone surrogates
    ("surrogateescape"), so that the check can name the *record* that holds them.
    """
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"{path}: JSON file not found")
    raw = path.read_bytes()
    text = raw.decode(
        "utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8", "surrogateescape"
    )
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def _has_bad_unicode(text: str) -> bool:
    # Lone surrogates: undecodable bytes (surrogateescape) or "\udXXX" escapes in the JSON.
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _find_bad_unicode(value, where: str) -> str | None:
    """Path of the first string inside `value` that is not valid UTF-8 text, or None."""
    if isinstance(value, str):
        return where if _has_bad_unicode(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = str(key)
        inner = f"{where}{key}" if key.startswith("[") else (f"{where}.{key}" if where else key)
        found = _find_bad_unicode(item, inner)
        if found is not None:
            return found
    return None


def check_record(record) -> str | None:
    """What is wrong with one record's structure and text (None if nothing). No image I/O."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    bad = _find_bad_unicode(record, "")
    if bad is not None:
        return f"text that is not valid UTF-8 in {bad}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no conversations (expected a non-empty list of turns)"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{k}] must be an object with 'from' and 'value'"
        expected = ROLES[k % 2]
        if turn["from"] not in ROLES:
            return f"conversations[{k}] is from {turn['from']!r}; expected 'human' or 'gpt'"
        if turn["from"] != expected:
            return (
                f"conversations[{k}] is from {turn['from']!r} but expected {expected!r}: turns "
                "must alternate human, gpt, human, gpt, ..."
            )
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            return f"conversations[{k}] ({turn['from']}) has an empty value"
    if len(turns) % 2 == 1:
        return f"conversations[{len(turns) - 1}] is a human turn with no gpt answer after it"
    placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            return f"'image' must be a file name, got {record['image']!r}"
        if IMAGE_TOKEN not in turns[0]["value"]:
            return f"the first human turn has no {IMAGE_TOKEN} placeholder for the image"
        if placeholders != 1:
            return f"{IMAGE_TOKEN} appears {placeholders} times; expected once, in the first turn"
    elif placeholders:
        return f"{IMAGE_TOKEN} appears in a record without an 'image' field"
    return None


# ---------------------------------------------------------------------------------------------
# Reading images


def open_image(path: Path) -> tuple[Image.Image, str]:
    """Open and fully decode an image -> (RGB image, original mode). Raises DataError."""
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a batch
            mode = image.mode
            return to_rgb(image), mode
    except UnidentifiedImageError:
        raise DataError(f"not a readable image file: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image is truncated or corrupt: {path} ({error})") from None


class LlavaJsonDataset(torch.utils.data.Dataset):
    """A LLaVA-format JSON + image folder as a Dataset of {"pixel_values", "conversations", ...}.

    Args:
        json_path: the JSON list (or .jsonl) of records.
        image_dir: where record["image"] paths start; default: `images/` next to the JSON if
            that folder exists, else the JSON's own folder.
        processor: turns each PIL image into a tensor (default ImageProcessor(), 64 px, pad).
        skip_bad: skip bad records and count them (self.skipped) instead of raising DataError.
        check_images: open every image at load time (recommended: errors surface before
            training starts, with the record that caused them).

    Item: {"pixel_values": (3, S, S) or None for text-only records, "conversations": turns,
    "id": ..., "image": file name or None} plus any extra fields of the record ("kind", ...).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_dir: str | Path | None = None,
        processor: ImageProcessor | None = None,
        skip_bad: bool = False,
        check_images: bool = True,
    ) -> None:
        self.json_path = Path(json_path)
        if image_dir is None:
            beside = self.json_path.parent / "images"
            image_dir = beside if beside.is_dir() else self.json_path.parent
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        self.processor = processor or ImageProcessor()
        self.skip_bad = skip_bad
        self.records: list[dict] = []
        self.skipped: list[BadRecord] = []
        self.converted: collections.Counter[str] = collections.Counter()  # original mode -> n

        for index, record in enumerate(read_json_records(self.json_path)):
            reason = check_record(record)
            if reason is None and check_images and "image" in record:
                try:
                    _, mode = open_image(self.image_dir / record["image"])
                    if mode != "RGB":
                        self.converted[mode] += 1
                except DataError as error:
                    reason = str(error)
            if reason is None:
                self.records.append(record)
                continue
            record_id = record.get("id") if isinstance(record, dict) else None
            bad = BadRecord(index, None if record_id is None else str(record_id), reason)
            if not skip_bad:
                raise DataError(bad.describe(self.json_path) + " (use skip_bad=True to skip)")
            self.skipped.append(bad)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixel_values = None
        if "image" in record:
            try:
                image, _ = open_image(self.image_dir / record["image"])
            except DataError as error:
                name = f" (id {record.get('id')!r})" if "id" in record else ""
                raise DataError(f"{self.json_path}: record{name}: {error}") from None
            pixel_values = self.processor(image)
        extras = {k: v for k, v in record.items() if k not in ("conversations", "image", "id")}
        return {
            **extras,
            "pixel_values": pixel_values,
            "conversations": record["conversations"],
            "id": record.get("id"),
            "image": record.get("image"),
        }

    def summary(self) -> str:
        """One paragraph: how many records loaded, skipped (with reasons) and converted."""
        lines = [f"{self.json_path}: {len(self.records)} good records, {len(self.skipped)} skipped"]
        for bad in self.skipped[:20]:
            lines.append("  " + bad.describe(self.json_path))
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        if self.converted:
            modes = ", ".join(f"{n} {mode}" for mode, n in sorted(self.converted.items()))
            lines.append(f"  converted to RGB: {modes}")
        return "\n".join(lines)
