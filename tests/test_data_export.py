"""`minillava data export DIR`: PNG + LLaVA JSON that load back exactly through llava_json."""

from __future__ import annotations

import json

import torch

from minillava.cli import main as cli_main
from minillava.data.export import main as data_main
from minillava.data.image_processor import ImageProcessor
from minillava.data.instruct import KINDS, QUESTION_TYPES
from minillava.data.llava_json import LlavaJsonDataset
from minillava.data.shapes import ShapesWorld, WorldConfig


def test_export_round_trip(tmp_path, capsys):
    out = tmp_path / "set"
    assert data_main(["export", str(out), "--split", "val", "--n", "6", "--image-size", "32"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == [f"val_{i:06d}.png" for i in range(6)]
    records = json.loads((out / "data.json").read_text(encoding="utf-8"))
    assert len(records) == 6 * len(KINDS)
    assert {r["kind"] for r in records} == set(KINDS)
    for record in records:
        assert record["conversations"][0]["value"].startswith("<image>\n")
        for turn in record["conversations"][1::2]:
            assert turn["from"] == "gpt" and "type" in turn
    types = {t["type"] for r in records if r["kind"] == "conversation"
             for t in r["conversations"][1::2]}  # fmt: skip
    assert types <= set(QUESTION_TYPES) and len(types) >= 3

    loaded = LlavaJsonDataset(out / "data.json", processor=ImageProcessor(image_size=32))
    assert len(loaded) == len(records) and not loaded.skipped
    world = ShapesWorld("val", 6, WorldConfig(image_size=32))
    for k, record in enumerate(records):
        item = loaded[k]
        assert item["conversations"] == record["conversations"]  # extra "type" fields kept
        assert item["kind"] == record["kind"] and item["id"] == record["id"]
        index = int(record["image"][4:10])
        assert torch.equal(item["pixel_values"], world[index].pixel_values), "PNG not lossless"
        if record["kind"] == "detail":
            assert record["conversations"][1]["value"] == world[index].description

    scenes = json.loads((out / "scenes.json").read_text())
    first = scenes["val_000000.png"]
    assert first["captions"] == world[0].captions
    assert [o["shape"] for o in first["scene"]["objects"]] == [
        o.shape for o in world[0].scene.objects
    ]
    # and the checker agrees the set is clean
    assert data_main(["check", str(out / "data.json"), str(out / "images")]) == 0


def test_export_through_the_cli_and_python_m(tmp_path, capsys):
    assert cli_main(["data", "export", str(tmp_path / "a"), "--n", "2", "--kinds", "caption"]) == 0
    records = json.loads((tmp_path / "a" / "data.json").read_text())
    assert [r["kind"] for r in records] == ["caption", "caption"]
    # `python -m minillava.data.export DIR` (no subcommand) exports too
    assert data_main([str(tmp_path / "b"), "--n", "1"]) == 0
    assert (tmp_path / "b" / "images" / "train_000000.png").is_file()


def test_export_rejects_bad_options(tmp_path, capsys):
    assert data_main(["export", str(tmp_path), "--kinds", "chat"]) == 2
    assert "unknown kinds" in capsys.readouterr().err
    assert data_main(["export", str(tmp_path), "--n", "0"]) == 2
    assert data_main(["export", str(tmp_path), "--image-size", "4"]) == 2
    assert "image_size" in capsys.readouterr().err
