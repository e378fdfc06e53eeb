"""Real data through the same door: any LLaVA-format JSON file plus a folder of images.

LLaVA's training data (LLaVA-Instruct-150K, the 558K caption set, a COCO subset you bring
yourself) is one JSON list of records:

    [{"id": "000000215677",
      "image": "000000215677.jpg",                      # relative to the image folder
      "conversations": [{"from": "human", "value": "<image>\\nWhat is the man holding?"},
                        {"from": "gpt",   "value": "A red umbrella."}, ...]}, ...]

Real data is messy, so every record is checked when the file is loaded, and each problem is
reported with the file and the record it is in (never a bare traceback from deep inside PIL):

- the image is missing, unreadable, truncated, not an image, or too large to decode safely
  (a "decompression bomb": `image_processor.read_image` checks the size before decoding);
- the image path leads outside the image folder ("../", an absolute path, or a symlink that
  points out): refused unless `allow_outside=True`;
- the turns are empty, or do not alternate human, gpt, human, gpt, ...;
- the first human turn has no `<image>` placeholder (or a text-only record has one);
- the text is not valid UTF-8.

Why confine the paths: a data set is often someone else's file. Left free, a record could make
training open any file the user can read (`"image": "/home/you/.ssh/id_rsa"`), and the error
("not an image" rather than "not found") would tell whoever reads the log that it exists. So a
path that leads out gets one message, the same whether or not something is there.

Grayscale, RGBA and palette images are fine: they are converted to RGB (and counted).
With `skip_bad=True` bad records are skipped and counted instead of stopping the load
(`minillava data check JSON IMAGE_DIR --skip-bad` does the same from the command line).
ShapesWorld's own export (`minillava data export DIR`) loads back through this class.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from minillava.data.image_processor import ImageProcessor, ImageReadError, read_image

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
    try:
        raw = path.read_bytes()
    except OSError as error:  # e.g. no permission to read it
        raise DataError(f"{path}: cannot read the file ({error.strerror})") from None
    text = raw.decode(
        "utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8", "surrogateescape"
    )
    if path.suffix == ".jsonl":
        records = [
            _parse_json(path, line, number)
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    else:
        records = _parse_json(path, text)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def _parse_json(path: Path, text: str, line: int | None = None):
    """json.loads, with its errors as DataError naming the file (and the line of a .jsonl)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line else f"line {error.lineno}, column {error.colno}"
        raise DataError(f"{path}: not valid JSON ({where}: {error.msg})") from None
    except RecursionError:
        # Python's parser recurses once per level of [ or {: "[[[[..." a hundred thousand
        # deep exhausts the stack. A LLaVA record is four levels deep.
        where = f" (line {line})" if line else ""
        raise DataError(
            f"{path}: JSON nested too deeply to read{where}; a LLaVA record needs only a few "
            "levels of [ and {"
        ) from None


def _has_bad_unicode(text: str) -> bool:
    # Lone surrogates: undecodable bytes (surrogateescape) or "\udXXX" escapes in the JSON.
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _find_bad_unicode(value, where: str) -> str | None:
    """Path of the first string inside `value` that is not valid UTF-8 text, or None.

    Walks with a stack of its own rather than by recursion, so that no nesting the JSON parser
    accepted can run into Python's recursion limit here, however deep the caller's stack is.
    """
    stack = [(where, value)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _has_bad_unicode(value):
                return where
            continue
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        for key, item in reversed(items):  # reversed: the first item is looked at first
            key = str(key)
            inner = f"{where}{key}" if key.startswith("[") else (f"{where}.{key}" if where else key)
            stack.append((inner, item))
    return None


def _shown(value, limit: int = 200) -> str:
    """A value from the file, as a message shows it: a short repr of a string or number, the
    type of anything else (whose repr could be a megabyte, or a list nested 900 deep)."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return f"a {type(value).__name__}"


def _record_id(record) -> str | None:
    """A record's "id" as text for messages; None if it has none, or one that is not a name."""
    record_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(record_id, str | int) and not isinstance(record_id, bool):
        return str(record_id)[:100]  # a name, not a megabyte of text
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
            return f"conversations[{k}] is from {_shown(turn['from'])}; expected 'human' or 'gpt'"
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
            return f"'image' must be a file name, got {_shown(record['image'])}"
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
    """Open and fully decode an image -> (RGB image, original mode). Raises DataError.

    `image_processor.read_image` does the work (and refuses decompression bombs).
    """
    try:
        return read_image(path)
    except ImageReadError as error:
        raise DataError(str(error)) from None


def confined_image_path(image_dir: Path, name: str) -> Path:
    """`image_dir / name` resolved, if it stays inside `image_dir`; else DataError.

    Checked twice: first on the path as written ("../x", "/etc/x"), which needs no access to
    anything outside; then on the path with its symlinks followed, which catches a link inside
    the folder that points out. Either way the message is the same, and says nothing of
    whether the file exists. Symlinks between files inside the folder are fine, and so is an
    image folder that is itself a symlink (its target is the folder).
    """
    outside = DataError(
        f"image path {_shown(name)} leads outside the image folder {image_dir} (only files "
        "inside it are read; allow_outside=True, or --allow-outside-images, reads others)"
    )
    folder = os.path.abspath(image_dir)
    written = os.path.normpath(os.path.join(folder, name))  # ".." folded, nothing read
    if os.path.commonpath([folder, written]) != folder:
        raise outside
    try:
        # The path as written, not `written`: the system follows a symlink before it applies
        # "..", so "link/../x" may leave the folder although its normalised form does not.
        resolved = (Path(folder) / name).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a name too long...
        raise DataError(f"image path {_shown(name)} cannot be resolved ({error})") from None
    if not resolved.is_relative_to(Path(folder).resolve()):
        raise outside
    return resolved


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
        allow_outside: read image paths that lead outside `image_dir` ("../", absolute paths,
            symlinks that point out). Off by default: a record of someone else's data set
            should not make training open any file you can read (`confined_image_path`).

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
        allow_outside: bool = False,
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
        self.allow_outside = allow_outside
        self.records: list[dict] = []
        self.skipped: list[BadRecord] = []
        self.converted: collections.Counter[str] = collections.Counter()  # original mode -> n

        for index, record in enumerate(read_json_records(self.json_path)):
            reason = check_record(record)
            if reason is None and "image" in record:
                try:
                    path = self.image_path(record["image"])  # confined even if not opened now
                    if check_images:
                        _, mode = open_image(path)
                        if mode != "RGB":
                            self.converted[mode] += 1
                except DataError as error:
                    reason = str(error)
            if reason is None:
                self.records.append(record)
                continue
            bad = BadRecord(index, _record_id(record), reason)
            if not skip_bad:
                raise DataError(bad.describe(self.json_path) + " (use skip_bad=True to skip)")
            self.skipped.append(bad)

    def image_path(self, name: str) -> Path:
        """Where a record's "image" is read from: inside the image folder unless allow_outside."""
        if self.allow_outside:
            return self.image_dir / name
        return confined_image_path(self.image_dir, name)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixel_values = None
        if "image" in record:
            try:
                image, _ = open_image(self.image_path(record["image"]))
            except DataError as error:
                record_id = _record_id(record)
                name = f" (id {record_id!r})" if record_id is not None else ""
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
