"""LLaVA-format JSON loading: every kind of bad input gets a clear error naming file and record."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from minillava.data.export import main as data_main
from minillava.data.image_processor import ImageProcessor
from minillava.data.llava_json import DataError, LlavaJsonDataset


def good_turns(question: str = "What colour is the circle?") -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]


def png_bytes(mode: str = "RGB", size=(40, 30)) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(png_bytes())
    return tmp_path


def write(folder: Path, records, name: str = "data.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def load(folder: Path, records, **kwargs) -> LlavaJsonDataset:
    return LlavaJsonDataset(write(folder, records), folder / "images", **kwargs)


def good(record_id: str = "ok") -> dict:
    return {"id": record_id, "image": "good.png", "conversations": good_turns()}


def test_good_file_loads(folder):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "hello"}]}  # fmt: skip
    data = load(folder, [good("a"), text_only], processor=ImageProcessor(image_size=32))
    assert len(data) == 2 and not data.skipped
    item = data[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["id"] == "a"
    assert item["conversations"] == good_turns()
    assert data[1]["pixel_values"] is None  # a text-only record is allowed, as in LLaVA
    # default image folder: images/ beside the JSON
    assert len(LlavaJsonDataset(folder / "data.json")) == 2


BAD_RECORDS = {
    "missing image": ({"image": "nope.png"}, "image file not found"),
    "no placeholder": (
        {"conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}]},
        "no <image> placeholder",
    ),
    "two placeholders": (
        {"conversations": good_turns() + [{"from": "human", "value": "<image> again"},
                                          {"from": "gpt", "value": "x"}]},
        "appears 2 times",
    ),
    "empty conversations": ({"conversations": []}, "no conversations"),
    "no conversations": ({"conversations": None}, "no conversations"),
    "empty value": (
        {"conversations": [good_turns()[0], {"from": "gpt", "value": "  "}]},
        "has an empty value",
    ),
    "gpt first": (
        {"conversations": [{"from": "gpt", "value": "<image>\nhi"}, good_turns()[0]]},
        "must alternate",
    ),
    "two humans": (
        {"conversations": [good_turns()[0], {"from": "human", "value": "and?"}]},
        "must alternate",
    ),
    "unanswered": ({"conversations": good_turns() + [{"from": "human", "value": "?"}]},
                   "no gpt answer"),
    "unknown role": (
        {"conversations": [good_turns()[0], {"from": "assistant", "value": "red"}]},
        "expected 'human' or 'gpt'",
    ),
    "turn without value": ({"conversations": [{"from": "human"}]}, "'from' and 'value'"),
    "lone surrogate escape": (
        {"conversations": [good_turns()[0], {"from": "gpt", "value": "bad \udcff"}]},
        "not valid UTF-8 in conversations[1].value",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_named(folder, case):
    change, message = BAD_RECORDS[case]
    bad = {**good("bad-one"), **change}
    with pytest.raises(DataError) as error:
        load(folder, [good("a"), bad, good("c")])
    text = str(error.value)
    assert message in text, text
    assert "data.json" in text and "record 1" in text and "'bad-one'" in text
    # ... and skip_bad skips it, and counts it
    data = load(folder, [good("a"), bad, good("c")], skip_bad=True)
    assert [r["id"] for r in data.records] == ["a", "c"]
    assert len(data.skipped) == 1 and data.skipped[0].index == 1
    assert message in data.skipped[0].reason
    assert "1 skipped" in data.summary()


def test_record_not_an_object(folder):
    with pytest.raises(DataError, match="record 0: a record must be a JSON object"):
        load(folder, ["just a string"])


def test_unreadable_and_truncated_images(folder):
    (folder / "images" / "garbage.png").write_bytes(b"this is not an image at all")
    full = png_bytes(size=(64, 64))
    (folder / "images" / "cut.png").write_bytes(full[: len(full) // 2])
    records = [
        good("a"),
        {**good("g"), "image": "garbage.png"},
        {**good("t"), "image": "cut.png"},
    ]
    with pytest.raises(DataError, match=r"record 1 \(id 'g'\): not a readable image file"):
        load(folder, records)
    data = load(folder, records, skip_bad=True)
    assert len(data) == 1 and [b.id for b in data.skipped] == ["g", "t"]
    assert "truncated or corrupt" in data.skipped[1].reason
    # when images are not checked up front, the error still names the record at access time
    lazy = load(folder, records, check_images=False)
    assert len(lazy) == 3
    with pytest.raises(DataError, match="'t'.*truncated or corrupt"):
        lazy[2]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_grayscale_rgba_palette_images_are_converted(folder, mode):
    (folder / "images" / f"odd_{mode.replace(';', '')}.png").write_bytes(png_bytes(mode))
    record = {**good("m"), "image": f"odd_{mode.replace(';', '')}.png"}
    data = load(folder, [record], processor=ImageProcessor(image_size=16))
    assert data[0]["pixel_values"].shape == (3, 16, 16)
    assert torch.isfinite(data[0]["pixel_values"]).all()
    assert sum(data.converted.values()) == 1


def test_rgba_transparency_becomes_white_not_black(folder):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    image.save(folder / "images" / "clear.png")
    data = load(folder, [{**good(), "image": "clear.png"}], processor=ImageProcessor(8))
    assert torch.allclose(data[0]["pixel_values"], torch.ones(3, 8, 8), atol=1e-5)


def test_non_utf8_bytes_name_the_record(folder):
    text = json.dumps([good("a"), {**good("latin"), "conversations": [
        good_turns()[0], {"from": "gpt", "value": "caf\u00e9"}]}])  # fmt: skip
    raw = text.encode("utf-8").replace(b"caf\\u00e9", b"caf\xe9")  # Latin-1 byte
    (folder / "data.json").write_bytes(raw)
    with pytest.raises(DataError, match=r"record 1 \(id 'latin'\): text that is not valid UTF-8"):
        LlavaJsonDataset(folder / "data.json", folder / "images")
    data = LlavaJsonDataset(folder / "data.json", folder / "images", skip_bad=True)
    assert len(data) == 1 and len(data.skipped) == 1


def test_broken_files(folder):
    (folder / "broken.json").write_text('[{"id": 1,\n "image": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json: not valid JSON \(line 2"):
        LlavaJsonDataset(folder / "broken.json", folder / "images")
    write(folder, {"not": "a list"}, "dict.json")
    with pytest.raises(DataError, match="expected a JSON list"):
        LlavaJsonDataset(folder / "dict.json", folder / "images")
    with pytest.raises(DataError, match="JSON file not found"):
        LlavaJsonDataset(folder / "missing.json", folder / "images")
    with pytest.raises(DataError, match="image folder not found"):
        LlavaJsonDataset(write(folder, [good()]), folder / "no_such_dir")


def test_jsonl_and_bom(folder):
    lines = "\n".join(json.dumps(good(str(i))) for i in range(3))
    (folder / "data.jsonl").write_text(lines, encoding="utf-8")
    assert len(LlavaJsonDataset(folder / "data.jsonl", folder / "images")) == 3
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([good()]).encode())
    assert len(LlavaJsonDataset(folder / "bom.json", folder / "images")) == 1


def test_check_command_reports_without_traceback(folder, capsys):
    bad = {**good("bad"), "image": "nope.png"}
    path = write(folder, [good("a"), bad])
    assert data_main(["check", str(path), str(folder / "images")]) == 1
    out, err = capsys.readouterr()
    assert "1 good records, 1 skipped" in out and "image file not found" in out
    assert "--skip-bad" in err and "Traceback" not in out + err
    assert data_main(["check", str(path), str(folder / "images"), "--skip-bad"]) == 0
    assert data_main(["check", str(folder / "nope.json"), str(folder / "images")]) == 1
    assert "JSON file not found" in capsys.readouterr().err
    write(folder, [good("a")], "clean.json")
    assert data_main(["check", str(folder / "clean.json"), str(folder / "images")]) == 0


# ----------------------------------------------------------------------------------------------
# Hardening: image paths stay inside the image folder; bombs, truncated files and deep nesting
# are per-record (or per-file) messages, never a traceback.


@pytest.fixture
def escapes(folder: Path) -> dict[str, bool]:
    """Image names that lead outside folder/images -> whether a real image is there."""
    (folder / "outside.png").write_bytes(png_bytes())  # a real image, beside the image folder
    (folder / "elsewhere").mkdir()
    (folder / "images" / "link.png").symlink_to(folder / "outside.png")
    (folder / "images" / "linkdir").symlink_to(folder / "elsewhere")
    return {
        "../outside.png": True,
        "../missing.png": False,
        str(folder / "outside.png"): True,  # absolute
        "/no/such/dir/x.png": False,
        "link.png": True,  # a symlink inside that points out
        "linkdir/../outside.png": True,  # ".." after a symlink: looks inside, is not
        "linkdir/../missing.png": False,
    }


def test_image_paths_that_leave_the_folder_are_refused_alike(folder, escapes):
    records = [good("a")] + [{**good(name), "image": name} for name in escapes]
    data = load(folder, records, skip_bad=True)
    assert [r["id"] for r in data.records] == ["a"]
    # One message for all, the name aside: it does not tell whether a file is there.
    reasons = {re.sub(r"^image path .* leads", "NAME leads", b.reason) for b in data.skipped}
    assert len(data.skipped) == len(escapes) and len(reasons) == 1, reasons
    assert "leads outside the image folder" in reasons.pop()
    with pytest.raises(DataError, match=r"record 1 .*leads outside the image folder"):
        load(folder, records)
    # The check is on the path, so it holds when images are not opened at load time.
    lazy = load(folder, records, check_images=False, skip_bad=True)
    assert len(lazy) == 1 and len(lazy.skipped) == len(escapes)


def test_allow_outside_reads_them(folder, escapes):
    records = [{**good(name), "image": name} for name in escapes]
    data = load(folder, records, skip_bad=True, allow_outside=True)
    assert sorted(r["image"] for r in data.records) == sorted(n for n, ok in escapes.items() if ok)
    assert all("image file not found" in bad.reason for bad in data.skipped)
    assert data[0]["pixel_values"].shape == (3, 64, 64)


def test_paths_and_symlinks_that_stay_inside_are_fine(folder):
    (folder / "images" / "sub").mkdir()
    (folder / "images" / "same.png").symlink_to(folder / "images" / "good.png")
    names = ["same.png", "sub/../good.png", "./good.png"]
    data = load(folder, [{**good(n), "image": n} for n in names])
    assert len(data) == 3 and not data.skipped


def test_data_check_refuses_outside_images_unless_allowed(folder, escapes, capsys):
    path = write(folder, [good("a"), {**good("up"), "image": "../outside.png"}])
    images = str(folder / "images")
    assert data_main(["check", str(path), images]) == 1
    out, err = capsys.readouterr()
    assert "record 1 (id 'up'): image path '../outside.png' leads outside" in out
    assert "--allow-outside-images" in out and "Traceback" not in out + err
    assert data_main(["check", str(path), images, "--allow-outside-images"]) == 0
    assert "2 good records, 0 skipped" in capsys.readouterr().out


def test_a_bomb_is_a_bad_record_that_skip_bad_skips(folder, capsys):
    from test_image_processor import png_claiming

    png_claiming(folder / "images" / "bomb.png", 30_000, 30_000, rows=1)  # PIL's own error
    png_claiming(folder / "images" / "wide.png", 10_000, 1)  # under PIL's limits, over ours
    records = [good("a"), {**good("bomb"), "image": "bomb.png"}]
    records.append({**good("wide"), "image": "wide.png"})
    with pytest.raises(DataError, match=r"record 1 \(id 'bomb'\): image too large .*bomb.png"):
        load(folder, records)
    data = load(folder, records, skip_bad=True)
    assert len(data) == 1 and [b.id for b in data.skipped] == ["bomb", "wide"]
    assert all("decompression bomb" in b.reason for b in data.skipped)
    # `minillava data check --skip-bad` reports them and carries on, as for any bad record
    path, images = str(folder / "data.json"), str(folder / "images")
    assert data_main(["check", path, images, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "1 good records, 2 skipped" in out and "record 2 (id 'wide'): image too large" in out


def test_json_nested_too_deeply_is_one_error_naming_the_file(folder, capsys):
    deep = "[" * 1000 + "]" * 1000  # enough to exhaust Python's recursion limit of 1000
    (folder / "deep.json").write_text(deep, encoding="utf-8")
    with pytest.raises(DataError, match=r"deep.json: JSON nested too deeply to read;"):
        LlavaJsonDataset(folder / "deep.json", folder / "images")
    (folder / "deep.jsonl").write_text(json.dumps(good()) + "\n" + deep, encoding="utf-8")
    with pytest.raises(DataError, match=r"deep.jsonl: JSON nested too deeply to read \(line 2\)"):
        LlavaJsonDataset(folder / "deep.jsonl", folder / "images")
    assert data_main(["check", str(folder / "deep.json"), str(folder / "images")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "nested too deeply" in err
    # nested as deep as the parser allows, inside a record: a short message, not its repr
    value = "[" * 900 + "]" * 900
    text = f'[{{"id": "d", "image": {value}, "conversations": {json.dumps(good_turns())}}}]'
    (folder / "deep_record.json").write_text(text, encoding="utf-8")
    data = LlavaJsonDataset(folder / "deep_record.json", folder / "images", skip_bad=True)
    assert data.skipped[0].reason == "'image' must be a file name, got a list"


def test_a_bad_jsonl_line_is_named(folder):
    (folder / "bad.jsonl").write_text(json.dumps(good()) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: not valid JSON \(line 2:"):
        LlavaJsonDataset(folder / "bad.jsonl", folder / "images")
